"""OrionStudent with a joint (heads + SwiGLU channels) configuration: selection sources, KD step, export, the
inference config of the export hook, strict loading, ORION's non-strict load_from, refusals."""
from __future__ import annotations

import torch
import pytest

from mmcv import Config
from mmcv.models.builder import build_model
from mmcv.models.utils.eva_surgery import channel_magnitude_scores, extract_backbone_state_dict
from mmcv.models.utils.pruning_config import PruningConfig
from mmcv.runner.hooks.kd_hooks import KDExportStudentHook
from tests.test_kd_hooks import Wrapper, make_runner
from tests.test_orion_student import TINY, batch, make_student, student_backbone_cfg, teacher_ckpt  # noqa: F401
from tests.test_orion_student import zero_backbone_then_load_teacher

HIDDEN = 341  # TinyOrion: int(128 * 8 / 3)


def joint_config(tmp_path, seed=0, widths=(192, 192, 192, 192)) -> str:
    g = torch.Generator().manual_seed(seed)
    heads = [sorted(torch.randperm(16, generator=g)[:8].tolist()) for _ in range(4)]
    channels = [sorted(torch.randperm(HIDDEN, generator=g)[:n].tolist()) for n in widths]
    path = tmp_path / f"joint_{seed}.json"
    PruningConfig(selected_heads_per_layer=heads, teacher_num_heads=16, pruning_ratio=0.5,
                  selected_channels_per_layer=channels, teacher_mlp_hidden=HIDDEN,
                  mlp_pruning_ratio=1 - 192 / HIDDEN).save(path)
    return str(path)


def test_a_joint_configuration_file_sets_heads_and_channels_and_the_kd_step_runs(teacher_ckpt, batch, tmp_path,
                                                                                capsys):  # noqa: F811
    path = joint_config(tmp_path)
    config = PruningConfig.load(path)
    student = make_student(teacher_ckpt, pruning_config=path, img_backbone=student_backbone_cfg())
    backbone = student.img_backbone
    assert backbone.selected_heads == config.selected_heads_per_layer
    assert backbone.selected_channels == config.selected_channels_per_layer and backbone.mlp_hidden_per_layer == [192] * 4
    assert student.teacher_backbone.mlp_hidden_per_layer == [HIDDEN] * 4
    assert "SwiGLU channels kept per block [192, 192, 192, 192] of 341" in capsys.readouterr().out
    teacher = extract_backbone_state_dict(teacher_ckpt)
    index = torch.tensor(config.selected_channels_per_layer[2])
    assert torch.equal(backbone.blocks[2].mlp.w3.weight, teacher["blocks.2.mlp.w3.weight"][:, index])
    out = student.train()(batch, return_loss=True)
    assert torch.isfinite(out["loss"]) and out["log_vars"]["backbone_distill_loss"] > 0
    out["loss"].backward()
    assert backbone.blocks[1].mlp.w1.weight.grad.shape == (192, 128)


def test_export_loads_strictly_into_the_inference_config_the_hook_writes(teacher_ckpt, batch, tmp_path):  # noqa: F811
    student = make_student(teacher_ckpt, pruning_config=joint_config(tmp_path), img_backbone=student_backbone_cfg())
    with torch.no_grad():
        for p in student.img_backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # as if trained
    base = tmp_path / "orion_stage3_kd_infer.py"
    base.write_text("model = dict(type='TinyOrion', img_backbone=dict(type='EVAViT', pretrained='eva02.pth'))\n")
    hook = KDExportStudentHook(filename="out/student.pth", inference_config=str(base))
    hook.after_run(make_runner(Wrapper(student.eval()), str(tmp_path)))
    ckpt = torch.load(hook.written["checkpoint"], map_location="cpu", weights_only=True)
    pruning = ckpt["meta"]["pruning"]
    assert pruning["selected_channels_per_layer"] == student.img_backbone.selected_channels
    assert pruning["mlp_hidden"] == [192] * 4 and pruning["teacher_mlp_hidden"] == HIDDEN
    infer = Config.fromfile(hook.written["inference_config"])
    assert infer.model.img_backbone.selected_channels_per_layer == student.img_backbone.selected_channels
    cfg = TINY.model.to_dict()
    cfg["img_backbone"] = infer.model.img_backbone.to_dict()
    plain = build_model(cfg).eval()
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(plain.extract_img_feat(batch["img"]), student.extract_img_feat(batch["img"]))
    other = dict(cfg["img_backbone"])
    other["selected_channels_per_layer"] = [list(range(192))] * 4
    refused = build_model(dict(cfg, img_backbone=other))
    with pytest.raises(RuntimeError, match=r"img_backbone.blocks.0.mlp.channel_index: checkpoint keeps teacher channels "
                                           r"192 indices .* this model keeps 192 indices \[0, 1, \.\.\., 191\]"):
        refused.load_state_dict(ckpt["state_dict"], strict=True)


def test_non_strict_load_of_the_teacher_checkpoint_slices_heads_and_channels(teacher_ckpt, tmp_path):  # noqa: F811
    path = joint_config(tmp_path, seed=1, widths=(50, 341, 100, 192))
    config = PruningConfig.load(path)
    student = make_student(teacher_ckpt, pruning_config=path, img_backbone=student_backbone_cfg())
    full = zero_backbone_then_load_teacher(student, teacher_ckpt)
    for layer in (0, 2):
        index = torch.tensor(config.selected_channels_per_layer[layer])
        mlp = student.img_backbone.blocks[layer].mlp
        for name in ("w1.weight", "w2.bias", "ffn_ln.weight"):
            module, attr = name.split(".")
            assert torch.equal(getattr(getattr(mlp, module), attr), full[f"img_backbone.blocks.{layer}.mlp.{name}"][index])
        assert torch.equal(mlp.w3.weight, full[f"img_backbone.blocks.{layer}.mlp.w3.weight"][:, index])
    assert torch.equal(student.img_backbone.blocks[1].mlp.w1.weight, full["img_backbone.blocks.1.mlp.w1.weight"])


def test_magnitude_selection_picks_the_channels_too_when_mlp_hidden_narrows_the_mlps(teacher_ckpt, capsys):  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(pruning_ratio=0.5, mlp_pruning_ratio=1 - 192 / HIDDEN),
                           img_backbone=student_backbone_cfg(mlp_hidden=192))
    scores = channel_magnitude_scores(extract_backbone_state_dict(teacher_ckpt), 4)
    for layer in range(4):
        best = torch.sort(scores[layer], descending=True, stable=True).indices[:192]
        assert student.img_backbone.selected_channels[layer] == sorted(best.tolist())
    assert "SwiGLU channel weight norms of the teacher" in capsys.readouterr().out


def test_channel_selection_errors_are_clear(teacher_ckpt, tmp_path):  # noqa: F811
    path = joint_config(tmp_path, seed=2)
    with pytest.raises(ValueError, match=r"img_backbone.mlp_hidden keeps \[192\] of 341 SwiGLU channels per block but "
                                         r"nothing says which"):
        make_student(teacher_ckpt, select=None, img_backbone=student_backbone_cfg(
            mlp_hidden=192, selected_heads_per_layer=[list(range(8))] * 4))
    with pytest.raises(ValueError, match=r"give the channel selection once: model.pruning_config and "
                                         r"img_backbone.selected_channels_per_layer are both set"):
        make_student(teacher_ckpt, pruning_config=path, img_backbone=student_backbone_cfg(
            selected_channels_per_layer=[list(range(192))] * 4))
    with pytest.raises(ValueError, match=r"the channel selection \(pruning_config .*\) does not fit img_backbone "
                                         r"\(mlp_hidden=100.*keeps 192 channels but mlp_hidden says 100"):
        make_student(teacher_ckpt, pruning_config=path, img_backbone=student_backbone_cfg(mlp_hidden=100))
    with pytest.raises(ValueError, match=r"mlp_pruning_ratio 0.25 is the fraction of channels REMOVED: it keeps 256 "
                                         r"of 341"):
        make_student(teacher_ckpt, pruning_config=path, kd_config=dict(mlp_pruning_ratio=0.25),
                     img_backbone=student_backbone_cfg())
    with pytest.raises(ValueError, match=r"kd_config.mlp_pruning_ratio=0.5 but every SwiGLU keeps its 341 channels"):
        make_student(teacher_ckpt, kd_config=dict(mlp_pruning_ratio=0.5))
