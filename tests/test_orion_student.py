"""OrionStudent on the miniature world: freezing, eval modes, loss bookkeeping, export, loading, errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import mmcv.models  # noqa: F401  (registers everything)
from mmcv import Config
from mmcv.datasets import build_dataset
from mmcv.models.builder import DETECTORS, build_model
from mmcv.models.detectors.orion_student import OrionStudent

ROOT = Path(__file__).resolve().parents[1]
TINY = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))


def student_backbone_cfg(**overrides):
    cfg = copy.deepcopy(TINY.model.img_backbone.to_dict())
    cfg.update(type="EVAViTStudent", num_heads=8, teacher_num_heads=16)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_model(TINY.model.to_dict())
    path = tmp_path_factory.mktemp("teacher") / "orion_tiny.pth"
    torch.save({"meta": {"note": "random teacher"}, "state_dict": teacher.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def batch():
    cfg = TINY.data.train.to_dict()
    cfg.update(num_samples=4)
    dataset = build_dataset(cfg)
    return dataset.collate_fn([dataset[i] for i in range(2)])


def make_student(teacher_ckpt, select="magnitude", **kwargs):
    """An OrionStudent on TinyOrion; ``select`` goes to kd_config.head_selection unless a selection is given."""
    kd = dict(kwargs.pop("kd_config", None) or {})
    if select is not None and "pruning_config" not in kwargs and "selected_heads_per_layer" not in \
            kwargs.get("img_backbone", {}):
        kd.setdefault("head_selection", select)
    kwargs["kd_config"] = kd
    model_cfg = TINY.model.to_dict()
    model_cfg.pop("type")
    model_cfg["img_backbone"] = kwargs.pop("img_backbone", student_backbone_cfg())
    model_cfg.update(type="OrionStudent", base_detector="TinyOrion", teacher_backbone_path=teacher_ckpt)
    model_cfg.update(kwargs)
    return build_model(model_cfg)


def test_student_is_a_real_subclass_of_the_base_detector(teacher_ckpt):
    student = make_student(teacher_ckpt)
    assert isinstance(student, DETECTORS.get("TinyOrion")) and isinstance(student, OrionStudent)
    assert student.img_backbone.num_heads_per_layer == [8, 8, 8, 8]


FROZEN_CHILDREN = ("pts_bbox_head", "map_head", "lm_head", "vl_proj")


def test_only_student_backbone_gets_gradients_and_frozen_parts_keep_training_mode(teacher_ckpt, batch):
    student = make_student(teacher_ckpt)
    student.train()
    assert student.img_backbone.training and student.grid_mask.training
    for name in FROZEN_CHILDREN:  # ORION's training behaviour (dropout, denoising, checkpointing) stays on
        assert all(m.training for m in getattr(student, name).modules()), name
    assert not any(m.training for m in student.teacher_backbone.modules())
    out = student(batch, return_loss=True)
    out["loss"].backward()
    for name, param in student.named_parameters():
        if name.startswith("img_backbone."):
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert all(p.grad is None and not p.requires_grad for p in student.teacher_backbone.parameters())
    assert not any("teacher" in key for key in student.state_dict())


def test_frozen_parts_mode_eval_puts_frozen_parts_in_eval_mode(teacher_ckpt):
    student = make_student(teacher_ckpt, kd_config=dict(frozen_parts_mode="eval")).train()
    assert student.img_backbone.training and student.grid_mask.training
    for name in FROZEN_CHILDREN:
        assert not any(m.training for m in getattr(student, name).modules()), name
    assert not any(m.training for m in student.teacher_backbone.modules())
    student.eval()
    assert not student.img_backbone.training
    with pytest.raises(ValueError, match=r"kd_config.frozen_parts_mode: expected one of \('train', 'eval'\).*'frozen'"):
        make_student(teacher_ckpt, kd_config=dict(frozen_parts_mode="frozen"))


def _dtype_recorder(module):
    seen = []
    module.register_forward_hook(lambda mod, inputs, output: seen.append(output.dtype))
    return seen


def test_teacher_runs_in_the_precision_of_an_enclosing_autocast(teacher_ckpt, batch):
    student = make_student(teacher_ckpt).train()
    student_dtypes = _dtype_recorder(student.img_backbone.blocks[0].attn.proj)
    teacher_dtypes = _dtype_recorder(student.teacher_backbone.blocks[0].attn.proj)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(batch, return_loss=True)
    assert student_dtypes == [torch.bfloat16] and teacher_dtypes == [torch.bfloat16]
    assert torch.isfinite(out["loss"])
    student(batch, return_loss=True)  # no autocast: both in fp32
    assert student_dtypes[-1] == torch.float32 and teacher_dtypes[-1] == torch.float32


def test_teacher_follows_autocast_that_only_wraps_the_base_extract_feat(teacher_ckpt, batch):
    """ORION's auto_fp16 runs only extract_feat under autocast; the teacher runs after it, outside."""
    tiny = DETECTORS.get("TinyOrion")

    class AutocastExtractOrion(tiny):
        def extract_feat(self, img, img_metas=None):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().extract_feat(img, img_metas).float()

    student = make_student(teacher_ckpt, base_detector=AutocastExtractOrion).train()
    teacher_dtypes = _dtype_recorder(student.teacher_backbone.blocks[0].attn.proj)
    student(batch, return_loss=True)
    assert teacher_dtypes == [torch.bfloat16]
    student.set_distillation_alpha(1.0)  # backbone-only path: no enclosing autocast, fp32 as the base would run
    student(batch, return_loss=True)
    assert teacher_dtypes[-1] == torch.float32
    forced = make_student(teacher_ckpt, base_detector=AutocastExtractOrion, kd_config=dict(teacher_dtype="fp32"))
    forced_dtypes = _dtype_recorder(forced.teacher_backbone.blocks[0].attn.proj)
    forced.train()(batch, return_loss=True)
    assert forced_dtypes == [torch.float32]


def test_optimised_loss_is_total_loss(teacher_ckpt, batch):
    student = make_student(teacher_ckpt, kd_config=dict(alpha_schedule="constant", distillation_alpha=0.3))
    student.train()
    torch.manual_seed(0)
    out = student(batch, return_loss=True)
    logs = out["log_vars"]
    assert out["loss"].item() == pytest.approx(logs["total_loss"], rel=1e-6)
    task = sum(v for k, v in logs.items() if k.startswith("loss_") or k in ("vlm_loss",))
    assert logs["task_loss"] == pytest.approx(task, rel=1e-5)
    assert logs["total_loss"] == pytest.approx(0.7 * logs["task_loss"] + 0.3 * logs["backbone_distill_loss"], rel=1e-5)
    for key in ("feature_distill_loss", "attention_distill_loss", "output_distill_loss", "alpha"):
        assert key in logs
    assert logs["alpha"] == pytest.approx(0.3)


def test_distillation_is_zero_without_pruning_and_positive_with_it(teacher_ckpt, batch):
    full = make_student(teacher_ckpt, img_backbone=student_backbone_cfg(num_heads=16)).eval()
    logs = full(batch, return_loss=True)["log_vars"]
    for key in ("feature_distill_loss", "attention_distill_loss", "output_distill_loss", "backbone_distill_loss"):
        assert logs[key] == 0.0, key
    pruned = make_student(teacher_ckpt).eval()
    logs = pruned(batch, return_loss=True)["log_vars"]
    for key in ("feature_distill_loss", "attention_distill_loss", "output_distill_loss", "backbone_distill_loss"):
        assert logs[key] > 0.0, key


def test_backbone_only_path_gives_the_same_distillation_parts(teacher_ckpt, batch):
    student = make_student(teacher_ckpt).eval()
    student.set_distillation_alpha(0.5)
    torch.manual_seed(3)
    full = student.forward_train(**batch)
    student.set_distillation_alpha(1.0)
    torch.manual_seed(3)
    only = student.forward_train(**batch)
    assert "loss_cls" in full and "loss_cls" not in only and only["task_loss"].item() == 0.0
    for key in ("feature_distill_loss", "attention_distill_loss", "output_distill_loss", "backbone_distill_loss"):
        assert torch.allclose(full[key], only[key], rtol=1e-5, atol=1e-7), key


def test_vl_distillation_through_side_effect_free_tokens(teacher_ckpt, batch):
    student = make_student(teacher_ckpt, kd_config=dict(vl_distill_weight=0.1)).eval()
    logs = student(batch, return_loss=True)["log_vars"]
    assert logs["vl_distill_loss"] > 0


def test_export_then_reload_in_the_base_detector_gives_identical_outputs(teacher_ckpt, batch, tmp_path):
    student = make_student(teacher_ckpt).eval()
    with torch.no_grad():
        for p in student.img_backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # as if trained
    written = student.export_student(tmp_path / "student.pth")
    ckpt = torch.load(written["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["meta"]["pruning"]["selected_heads_per_layer"] == student.img_backbone.selected_heads
    assert not any("teacher" in k for k in ckpt["state_dict"])
    cfg = TINY.model.to_dict()
    cfg["img_backbone"] = ckpt["meta"]["img_backbone"]
    plain = build_model(cfg).eval()
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(plain.extract_img_feat(batch["img"]), student.extract_img_feat(batch["img"]))
    from safetensors.torch import load_file
    backbone = load_file(written["backbone"])
    assert torch.equal(backbone["blocks.0.attn.q_proj.weight"], student.img_backbone.blocks[0].attn.q_proj.weight)


def zero_backbone_then_load_teacher(student, teacher_ckpt) -> dict:
    """Zero the student backbone, load the teacher-shaped checkpoint non-strictly (no key missing or unexpected);
    return the checkpoint's state dict, so a test can check which rows the load hook kept."""
    with torch.no_grad():
        for p in student.img_backbone.parameters():
            p.zero_()
    full = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    result = student.load_state_dict(full, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return full


def test_non_strict_load_of_the_teacher_checkpoint_slices_heads(teacher_ckpt):
    selection = [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15], list(range(8)), list(range(8, 16))]
    student = make_student(teacher_ckpt, pruning_config=dict(selected_heads_per_layer=selection))
    full = zero_backbone_then_load_teacher(student, teacher_ckpt)
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in selection[1]])
    assert torch.equal(student.img_backbone.blocks[1].attn.q_proj.weight, full["img_backbone.blocks.1.attn.q_proj.weight"][rows])
    assert torch.equal(student.img_backbone.blocks[1].attn.proj.weight,
                       full["img_backbone.blocks.1.attn.proj.weight"][:, rows])
    assert torch.equal(student.img_backbone.blocks[1].attn.v_bias, full["img_backbone.blocks.1.attn.v_bias"][rows])


def test_pruning_config_file_written_by_the_tools_sets_the_heads(teacher_ckpt, tmp_path):
    from tools.head_pruning_utils import PruningConfig
    selection = [list(range(8, 16))] * 4
    path = tmp_path / "prune.json"
    PruningConfig(selected_heads_per_layer=selection, teacher_num_heads=16, pruning_ratio=0.5).save(path)
    student = make_student(teacher_ckpt, pruning_config=str(path))
    assert student.img_backbone.selected_heads == selection
    assert student.head_selection_source == f"pruning_config {path}"
    other_teacher = tmp_path / "prune_8_heads.json"
    PruningConfig(selected_heads_per_layer=[[0, 1, 2, 3]] * 4, teacher_num_heads=8, pruning_ratio=0.5).save(other_teacher)
    with pytest.raises(ValueError, match=r"prune_8_heads.json: made for a teacher with 8 heads per block, but this "
                                         r"teacher has 16"):
        make_student(teacher_ckpt, pruning_config=str(other_teacher), img_backbone=student_backbone_cfg(num_heads=4))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"selected_heads_per_layer": selection}))
    with pytest.raises(ValueError, match=r"bare.json: not a pruning configuration \(expected format "
                                         r"'orion-kd-pruning-config', written by PruningConfig.save"):
        make_student(teacher_ckpt, pruning_config=str(bare))


def test_errors_are_clear(teacher_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="Teacher model not found at .*missing.pth"):
        make_student(str(tmp_path / "missing.pth"))
    deeper = student_backbone_cfg(depth=5, window_block_indexes=[0, 2])
    with pytest.raises(ValueError, match=r"no img_backbone.blocks.4.attn.q_proj.weight; expected an unpruned "
                                         r"backbone of depth 5 with 16 heads"):
        make_student(teacher_ckpt, img_backbone=deeper)
    with pytest.raises(ValueError, match=r"the teacher backbone has 4 blocks, expected depth 5 \(the teacher's depth"):
        make_student(teacher_ckpt, img_backbone=deeper, pruning_config=dict(selected_heads_per_layer=[list(range(8))] * 5))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['distill_alpha'\]"):
        make_student(teacher_ckpt, kd_config=dict(distill_alpha=0.5))
    with pytest.raises(ValueError, match=r"distillation_alpha=0.7 together with alpha_schedule='step'"):
        make_student(teacher_ckpt, kd_config=dict(distillation_alpha=0.7))
    with pytest.raises(ValueError, match="teacher_backbone_path is required"):
        make_student(None)
    with pytest.raises(ValueError, match="img_backbone must be dict\\(type='EVAViTStudent'"):
        make_student(teacher_ckpt, img_backbone=dict(TINY.model.img_backbone.to_dict()))
    with pytest.raises(ValueError, match=r"head selection \(pruning_config\) does not fit img_backbone \(num_heads=8.*"
                                         r"keeps 12 heads but num_heads says 8"):
        make_student(teacher_ckpt, pruning_config=dict(selected_heads_per_layer=[list(range(12))] * 4))
    with pytest.raises(KeyError, match="base_detector 'Orion' is not registered"):
        build_model(dict(type="OrionStudent", teacher_backbone_path=teacher_ckpt, img_backbone=student_backbone_cfg()))
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    broken = dict(state)
    broken.pop("map_head.cls_out.weight", None) or broken.pop(next(k for k in state if k.startswith("map_head.")))
    bad = tmp_path / "broken.pth"
    torch.save({"state_dict": broken}, bad)
    with pytest.raises(ValueError, match=r"does not fit TinyOrion's frozen parts: missing 1 key\(s\)"):
        make_student(str(bad))


# --------------------------------------------------------------------------- head selection: one policy, explicit


def test_a_non_integer_ratio_configuration_made_by_the_tools_is_accepted(teacher_ckpt, tmp_path):
    from tools.head_pruning_utils import HeadImportance, create_pruning_config
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="not a whole number"):
        config = create_pruning_config(HeadImportance(scores, "test"), pruning_ratio=0.3)
    path = tmp_path / "prune_0.3.json"
    config.save(path)
    student = make_student(teacher_ckpt, pruning_config=str(path), kd_config=dict(pruning_ratio=0.3),
                           img_backbone=student_backbone_cfg(num_heads=11))
    assert student.img_backbone.selected_heads == config.selected_heads_per_layer
    assert student.img_backbone.num_heads_per_layer == [11] * 4


def test_ratio_mismatch_hint_is_the_other_reading_only_when_that_fits(teacher_ckpt):
    with pytest.raises(ValueError, match=r"that is pruning_ratio 0.25 in this code base"):
        make_student(teacher_ckpt, img_backbone=student_backbone_cfg(num_heads=12),
                     kd_config=dict(pruning_ratio=0.75, head_selection="magnitude"))
    with pytest.raises(ValueError, match=r"keeps 8 of 16 heads per block \(32 in total\), but the selection keeps 48") \
            as err:
        make_student(teacher_ckpt, img_backbone=student_backbone_cfg(num_heads=12),
                     kd_config=dict(pruning_ratio=0.5, head_selection="magnitude"))
    assert "other reading" not in str(err.value) and "KEPT" not in str(err.value)


def test_a_pruned_student_without_an_explicit_head_choice_is_refused(teacher_ckpt):
    with pytest.raises(ValueError, match=r"keeps \[8, 8, 8, 8\] of 16 heads per block but nothing says which: "
                                         r"set model.pruning_config .* or kd_config.head_selection='magnitude'"):
        make_student(teacher_ckpt, select=None)
    full = make_student(teacher_ckpt, select=None, img_backbone=student_backbone_cfg(num_heads=16))
    assert full.img_backbone.selected_heads == [list(range(16))] * 4
    with pytest.raises(ValueError, match="give the head selection once"):
        make_student(teacher_ckpt, kd_config=dict(head_selection="magnitude"),
                     pruning_config=dict(selected_heads_per_layer=[list(range(8))] * 4))
    with pytest.raises(ValueError, match=r"kd_config.head_selection: expected 'magnitude' or None, got 'entropy'"):
        make_student(teacher_ckpt, kd_config=dict(head_selection="entropy"))


def test_magnitude_selection_is_logged_and_computed_by_the_tools_function(teacher_ckpt, tmp_path, capsys):
    from tools.head_pruning_utils import compute_head_importance_magnitude, create_pruning_config
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    boosted = {1: [3, 5, 7, 9, 11, 13, 14, 15]}  # heads whose q/k/v rows are made 10x larger than the rest
    for layer, heads in boosted.items():
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"img_backbone.blocks.{layer}.attn.{name}.weight"].clone()
            for h in heads:
                weight[h * 8:(h + 1) * 8] *= 10.0
            state[f"img_backbone.blocks.{layer}.attn.{name}.weight"] = weight
    path = tmp_path / "boosted.pth"
    torch.save({"state_dict": state}, path)
    capsys.readouterr()
    student = make_student(str(path), kd_config=dict(head_selection="magnitude", pruning_ratio=0.5))
    assert "kd_config.head_selection='magnitude'" in capsys.readouterr().out
    assert student.img_backbone.selected_heads[1] == boosted[1]
    tools = create_pruning_config(compute_head_importance_magnitude(student.teacher_backbone), 0.5, "uniform")
    assert student.img_backbone.selected_heads == tools.selected_heads_per_layer
    assert "magnitude" in student.head_selection_source
