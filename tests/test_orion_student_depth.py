"""OrionStudent with a depth-pruned backbone: a budgeted configuration (heads + channels + blocks), the KD step and
its taps keyed by teacher block, kd_config.block_map, export and the inference config, loading and refusals."""
from __future__ import annotations

import pytest
import torch

from mmcv import Config
from mmcv.models.backbones.eva_layers import SelectionMismatchError
from mmcv.models.builder import build_model
from mmcv.models.utils.eva_surgery import extract_backbone_state_dict
from mmcv.models.utils.pruning_config import PruningConfig
from mmcv.runner.hooks.kd_hooks import KDExportStudentHook
from tests.test_kd_hooks import Wrapper, make_runner
from tests.test_orion_student import TINY, batch, make_student, student_backbone_cfg, teacher_ckpt  # noqa: F401
from tests.test_orion_student import zero_backbone_then_load_teacher

HIDDEN = 341  # TinyOrion: int(128 * 8 / 3); depth 4, window blocks [0, 2], global blocks [1, 3]
KEPT = [0, 1, 3]  # removes window block 2


def budgeted_config(tmp_path, kept=KEPT) -> str:
    """A configuration as the budget allocator writes it: one entry per teacher block, [] for removed blocks."""
    g = torch.Generator().manual_seed(0)
    heads = [sorted(torch.randperm(16, generator=g)[:8].tolist()) if b in kept else [] for b in range(4)]
    channels = [sorted(torch.randperm(HIDDEN, generator=g)[:192].tolist()) if b in kept else [] for b in range(4)]
    path = tmp_path / "budgeted.json"
    PruningConfig(selected_heads_per_layer=heads, teacher_num_heads=16, pruning_ratio=0.5,
                  selected_channels_per_layer=channels, teacher_mlp_hidden=HIDDEN, mlp_pruning_ratio=1 - 192 / HIDDEN,
                  selected_blocks=list(kept)).save(path)
    return str(path)


class RecordingLoss:
    """Wraps the student's CombinedKDLoss.forward to keep the taps of the last step."""

    def __init__(self, student) -> None:
        self.forward, self.taps = student.distill_loss.forward, None
        student.distill_loss.forward = self

    def __call__(self, student_taps, teacher_taps, **kwargs):
        self.taps = (student_taps, teacher_taps)
        return self.forward(student_taps, teacher_taps, **kwargs)


def test_a_budgeted_configuration_builds_the_depth_pruned_student_and_the_kd_step_trains_only_it(
        teacher_ckpt, batch, tmp_path, capsys):  # noqa: F811
    path = budgeted_config(tmp_path)
    config = PruningConfig.load(path)
    student = make_student(teacher_ckpt, pruning_config=path, img_backbone=student_backbone_cfg())
    backbone, teacher = student.img_backbone, student.teacher_backbone
    assert backbone.kept_blocks == (0, 1, 3) and backbone.num_blocks == 3 and len(backbone.blocks) == 3
    assert teacher.kept_blocks == (0, 1, 2, 3) and teacher.num_heads_per_layer == [16] * 4  # the teacher stays full
    assert backbone.selected_heads == [config.selected_heads_per_layer[b] for b in KEPT]
    assert backbone.selected_channels == [config.selected_channels_per_layer[b] for b in KEPT]
    assert "blocks kept [0, 1, 3] (3 of 4)" in capsys.readouterr().out
    source = extract_backbone_state_dict(teacher_ckpt)
    index = torch.tensor(config.selected_channels_per_layer[3])
    assert torch.equal(backbone.blocks[2].mlp.w3.weight, source["blocks.3.mlp.w3.weight"][:, index])  # j=2 <- t=3
    recorder = RecordingLoss(student)
    out = student.train()(batch, return_loss=True)
    assert torch.isfinite(out["loss"]) and out["log_vars"]["backbone_distill_loss"] > 0
    out["loss"].backward()
    grads = {name for name, p in student.named_parameters() if p.grad is not None}
    assert grads and all(name.startswith("img_backbone.") for name in grads)
    assert {f"img_backbone.blocks.{j}.attn.q_proj.weight" for j in range(3)} <= grads
    assert all(p.grad is None for p in teacher.parameters())
    s_taps, t_taps = recorder.taps  # keyed by teacher block: 2 is recorded at kept block 1, its attention dropped
    assert sorted(s_taps.hidden_states) == sorted(t_taps.hidden_states) == [0, 1, 2, 3]
    assert sorted(s_taps.attn_logits) == sorted(t_taps.attn_logits) == [0, 1, 3]
    assert s_taps.hidden_states[2] is s_taps.hidden_states[1] and s_taps.head_map[3] == backbone.selected_heads[2]


def test_the_block_source_is_the_configuration_or_img_backbone_once(teacher_ckpt, tmp_path):  # noqa: F811
    student = make_student(teacher_ckpt, img_backbone=student_backbone_cfg(selected_blocks=[1, 3]))
    assert student.img_backbone.kept_blocks == (1, 3) and "blocks: img_backbone.selected_blocks" in \
        student.head_selection_source  # heads by magnitude for the kept blocks only
    assert [len(h) for h in student.student_backbone_cfg["selected_heads_per_layer"]] == [0, 8, 0, 8]
    with pytest.raises(ValueError, match=r"give the block selection once: model.pruning_config and "
                                         r"img_backbone.selected_blocks are both set"):
        make_student(teacher_ckpt, pruning_config=budgeted_config(tmp_path),
                     img_backbone=student_backbone_cfg(selected_blocks=[0, 1]))
    with pytest.raises(ValueError, match=r"the block selection \(img_backbone.selected_blocks\) does not fit "
                                         r"img_backbone \(depth 4, the teacher's\): selected_blocks: expected indices "
                                         r"in \[0, 4\) \(the teacher's depth\), got \[4\]"):
        make_student(teacher_ckpt, img_backbone=student_backbone_cfg(selected_blocks=[0, 4]))


def test_kd_config_block_map_pairs_a_removed_block_with_a_kept_block_of_its_kind(teacher_ckpt, batch):  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(block_map={"2": 0}),
                           img_backbone=student_backbone_cfg(selected_blocks=KEPT))
    assert student.kd_config["block_map"] == {2: 0}  # a JSON / --cfg-options key reads as an int
    recorder = RecordingLoss(student)
    student.train()(batch, return_loss=True)
    s_taps, _ = recorder.taps
    assert sorted(s_taps.attn_logits) == [0, 1, 2, 3] and s_taps.hidden_states[2] is s_taps.hidden_states[0]
    with pytest.raises(ValueError, match=r"OrionStudent: kd_config.block_map\[2\] = 1: teacher block 2 is a window "
                                         r"block, block 1 a global block; their attention cannot be paired"):
        make_student(teacher_ckpt, kd_config=dict(block_map={2: 1}),
                     img_backbone=student_backbone_cfg(selected_blocks=KEPT))
    with pytest.raises(ValueError, match=r"the attention part distils teacher blocks \[2\] but the student removes "
                                         r"\[2\] \(it keeps \[0, 1, 3\]\)"):
        make_student(teacher_ckpt, distillation_loss=dict(attention_blocks=[2]),
                     img_backbone=student_backbone_cfg(selected_blocks=KEPT))
    with pytest.raises(ValueError, match=r"kd_config.block_map: expected integer teacher block indices, got 'x': 0"):
        make_student(teacher_ckpt, kd_config=dict(block_map={"x": 0}))


def test_export_records_the_blocks_and_loads_strictly_into_the_inference_config(teacher_ckpt, batch,
                                                                                tmp_path):  # noqa: F811
    student = make_student(teacher_ckpt, pruning_config=budgeted_config(tmp_path),
                           img_backbone=student_backbone_cfg())
    with torch.no_grad():
        for p in student.img_backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # as if trained
    base = tmp_path / "orion_stage3_kd_infer.py"
    base.write_text("model = dict(type='TinyOrion', img_backbone=dict(type='EVAViT', pretrained='eva02.pth'))\n")
    hook = KDExportStudentHook(filename="out/student.pth", inference_config=str(base))
    hook.after_run(make_runner(Wrapper(student.eval()), str(tmp_path)))
    ckpt = torch.load(hook.written["checkpoint"], map_location="cpu", weights_only=True)
    pruning = ckpt["meta"]["pruning"]
    assert pruning["selected_blocks"] == KEPT and pruning["num_heads"] == [8, 8, 0, 8]  # one entry per teacher block
    assert pruning["selected_heads_per_layer"][2] == [] and pruning["mlp_hidden"] == [192, 192, 0, 192]
    assert ckpt["state_dict"]["img_backbone.kept_blocks"].tolist() == KEPT
    assert not any(k.startswith("img_backbone.blocks.3.") for k in ckpt["state_dict"])
    infer = Config.fromfile(hook.written["inference_config"])
    assert infer.model.img_backbone.selected_blocks == KEPT
    cfg = TINY.model.to_dict()
    cfg["img_backbone"] = infer.model.img_backbone.to_dict()
    plain = build_model(cfg).eval()
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(plain.extract_img_feat(batch["img"]), student.extract_img_feat(batch["img"]))
    other = build_model(dict(cfg, img_backbone=dict(cfg["img_backbone"], selected_blocks=[0, 1])))
    for strict in (True, False):
        with pytest.raises(SelectionMismatchError, match=r"^img_backbone.kept_blocks: checkpoint keeps teacher blocks "
                                                         r"\[0, 1, 3\], this model keeps \[0, 1\]"):
            other.load_state_dict(ckpt["state_dict"], strict=strict)


def test_non_strict_load_of_the_teacher_checkpoint_takes_the_kept_blocks(teacher_ckpt, tmp_path):  # noqa: F811
    student = make_student(teacher_ckpt, pruning_config=budgeted_config(tmp_path), img_backbone=student_backbone_cfg())
    config = PruningConfig.load(tmp_path / "budgeted.json")
    full = zero_backbone_then_load_teacher(student, teacher_ckpt)  # ORION's load_from of the original checkpoint
    heads = torch.tensor(config.selected_heads_per_layer[3])
    rows = (heads[:, None] * 8 + torch.arange(8)).reshape(-1)  # TinyOrion: head_dim 8
    assert torch.equal(student.img_backbone.blocks[2].attn.q_proj.weight,
                       full["img_backbone.blocks.3.attn.q_proj.weight"][rows])
    assert torch.equal(student.img_backbone.blocks[1].norm1.weight, full["img_backbone.blocks.1.norm1.weight"])


# --------------------------------------------------------------------------- the shipped KD config, file or ratio

TINY_KD = "adzoo/orion/configs/orion_tiny_kd_train.py"


def kd_model_cfg(teacher, tmp_path, *options):
    """The shipped miniature KD config's model after train_kd.py's --cfg-options (teacher: the test's)."""
    from adzoo.orion.train_kd import parse_args, prepare_config
    args = parse_args([TINY_KD, "--work-dir", str(tmp_path / "wd"), "--cfg-options",
                       f"model.kd_config.teacher_backbone_path={teacher}", *options])
    return prepare_config(args).model


def test_a_budgeted_file_plugs_into_the_shipped_kd_config_with_the_two_settings_of_a_heads_only_one(
        teacher_ckpt, tmp_path, capsys):  # noqa: F811
    counts = {0: (5, 64), 1: (12, 200), 3: (3, 128)}  # heads, channels per kept block; block 2 removed
    g = torch.Generator().manual_seed(1)
    heads = [sorted(torch.randperm(16, generator=g)[:counts[b][0]].tolist()) if b in counts else [] for b in range(4)]
    channels = [sorted(torch.randperm(HIDDEN, generator=g)[:counts[b][1]].tolist()) if b in counts else []
                for b in range(4)]
    path = tmp_path / "budget.json"
    PruningConfig(selected_heads_per_layer=heads, teacher_num_heads=16, pruning_ratio=1 - 20 / 48,
                  selected_channels_per_layer=channels, teacher_mlp_hidden=HIDDEN, mlp_pruning_ratio=1 - 392 / 1023,
                  selected_blocks=[0, 1, 3], metadata=dict(budget=dict(target_speedup=2.0))).save(path)
    model = kd_model_cfg(teacher_ckpt, tmp_path, f"model.pruning_config={path}", "model.kd_config.head_selection=None")
    assert model.kd_config.pruning_ratio == 0.5 and model.img_backbone.num_heads is None  # the config as shipped
    capsys.readouterr()
    student = build_model(model)
    backbone = student.img_backbone
    assert backbone.kept_blocks == (0, 1, 3) and backbone.num_heads_per_layer == [5, 12, 3]
    assert backbone.mlp_hidden_per_layer == [64, 200, 128]
    assert backbone.selected_heads == [heads[b] for b in (0, 1, 3)]
    assert backbone.selected_channels == [channels[b] for b in (0, 1, 3)]
    assert student.head_selection_source == f"pruning_config {path}"
    printed = capsys.readouterr().out
    assert printed.count("is budgeted (metadata.budget)") == 1 and "pruning_ratio / mlp_pruning_ratio do not " \
        "apply" in printed
    # a number given in img_backbone must still agree with the file
    with pytest.raises(ValueError, match=r"head selection \(pruning_config .*budget.json\) does not fit img_backbone "
                                         r"\(num_heads=8"):
        build_model(kd_model_cfg(teacher_ckpt, tmp_path, f"model.pruning_config={path}",
                                 "model.kd_config.head_selection=None", "model.img_backbone.num_heads=8"))


def test_the_shipped_kd_config_takes_its_head_count_from_the_ratio_and_refuses_a_ratio_file_that_disagrees(
        teacher_ckpt, tmp_path):  # noqa: F811
    student = build_model(kd_model_cfg(teacher_ckpt, tmp_path))  # magnitude, no num_heads: pruning_ratio 0.5
    assert student.img_backbone.num_heads_per_layer == [8] * 4 and student.img_backbone.kept_blocks == (0, 1, 2, 3)
    assert "kd_config.head_selection='magnitude'" in student.head_selection_source
    quarter = build_model(kd_model_cfg(teacher_ckpt, tmp_path, "model.kd_config.pruning_ratio=0.25"))
    assert quarter.img_backbone.num_heads_per_layer == [12] * 4
    path = tmp_path / "twelve.json"  # a ratio-based file (no metadata.budget) keeping 12 of 16: ratio 0.25
    PruningConfig(selected_heads_per_layer=[list(range(12))] * 4, teacher_num_heads=16, pruning_ratio=0.25).save(path)
    with pytest.raises(ValueError, match=r"head selection \(pruning_config .*twelve.json\) does not fit img_backbone "
                                         r"\(num_heads=\[12, 12, 12, 12\].*pruning_ratio 0.5 is the fraction of heads "
                                         r"REMOVED: it keeps 8 of 16"):
        build_model(kd_model_cfg(teacher_ckpt, tmp_path, f"model.pruning_config={path}",
                                 "model.kd_config.head_selection=None"))
    agreed = build_model(kd_model_cfg(teacher_ckpt, tmp_path, f"model.pruning_config={path}",
                                      "model.kd_config.head_selection=None", "model.kd_config.pruning_ratio=0.25"))
    assert agreed.img_backbone.num_heads_per_layer == [12] * 4
