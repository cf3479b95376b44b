"""The demo's joint mode pieces: the tiny joint KD config, timing-based choice of the heads-only student, the
comparison target and report section (the whole --joint demo is too slow for the test suite; README_KD.md has a run)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from mmcv import Config
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.builder import build_model
from tests.test_orion_student import TINY, teacher_ckpt  # noqa: F401  (a fixture)
from tools.demo_joint import (choose_heads, heads_only_backbones, joint_report_section, joint_targets,
                              measure_speedups)

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_joint_config_builds_a_student_with_narrower_mlps(teacher_ckpt, capsys):  # noqa: F811
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_kd_joint.py"))
    cfg.model.teacher_backbone_path = teacher_ckpt
    cfg.model.kd_config.teacher_backbone_path = teacher_ckpt
    student = build_model(cfg.model)
    assert student.img_backbone.mlp_hidden_per_layer == [192] * 4 and student.img_backbone.num_heads_per_layer == [8] * 4
    assert "SwiGLU channels kept per block [192, 192, 192, 192] of 341" in capsys.readouterr().out


class Sleeper(torch.nn.Module):
    """A stand-in backbone that takes a known time and claims a known MAC count."""

    def __init__(self, seconds: float, macs: int) -> None:
        super().__init__()
        self.seconds, self.macs = seconds, macs

    def forward(self, image):
        time.sleep(self.seconds)
        return [image]

    def analytic_macs(self, hw):
        return self.macs


def test_speedups_and_ceilings_follow_known_times_and_mac_counts_and_the_choice_follows_the_speed():
    teacher, joint = Sleeper(0.040, 400), Sleeper(0.020, 200)
    candidates = {1: Sleeper(0.010, 100), 8: Sleeper(0.030, 300)}
    speed = measure_speedups(teacher, joint, candidates, torch.zeros(2, 3, 80, 80), repeats=3)
    assert speed["joint_speedup"] == pytest.approx(2.0, rel=0.2)  # 40 ms / 20 ms
    assert speed["heads_only_speedup"][1] == pytest.approx(4.0, rel=0.2)
    assert speed["heads_only_speedup"][8] == pytest.approx(4 / 3, rel=0.2)
    assert speed["joint_ceiling"] == 2.0 and speed["heads_only_ceiling"] == {1: 4.0, 8: 4 / 3}
    assert choose_heads(speed) == dict(heads=1, matched=True)
    assert choose_heads(dict(joint_speedup=1.5, heads_only_speedup={1: 1.6, 4: 1.52, 8: 1.2})) == \
        dict(heads=4, matched=True)
    assert choose_heads(dict(joint_speedup=1.9, heads_only_speedup={1: 1.6, 2: 1.55, 8: 1.2})) == \
        dict(heads=1, matched=False)


def counted_macs(backbone) -> float:
    """Multiply-accumulates that torch's own FLOP counter sees in one image's forward (explicit matmul attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    for block in backbone.blocks:
        block.attn.attn_impl = "math"
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(torch.randn(1, 3, 80, 80))
    return counter.get_total_flops() / 2


def test_heads_only_candidates_and_the_analytic_ceiling_match_torchs_flop_count():
    backbone_cfg = dict(TINY.model.img_backbone.to_dict(), type="EVAViTStudent", teacher_num_heads=16)
    candidates = heads_only_backbones(dict(backbone_cfg, num_heads=8, mlp_hidden=192), 16)
    assert sorted(candidates) == list(range(1, 16))
    assert candidates[3].num_heads_per_layer == [3] * 4 and candidates[3].mlp_hidden_per_layer == [341] * 4
    full = EVAViTStudent(**{k: v for k, v in dict(backbone_cfg, num_heads=16).items() if k != "type"}).eval()
    joint = EVAViTStudent(**{k: v for k, v in dict(backbone_cfg, num_heads=8, mlp_hidden=192).items()
                             if k != "type"}).eval()
    image = torch.randn(2, 3, 80, 80)
    speed = measure_speedups(full, joint, {k: candidates[k] for k in (1, 8)}, image, repeats=2)
    assert speed["joint_ceiling"] == pytest.approx(counted_macs(full) / counted_macs(joint), rel=1e-9)
    assert speed["heads_only_ceiling"][8] == pytest.approx(counted_macs(full) / counted_macs(candidates[8]), rel=1e-9)


def fake_report(joint_cos: float, heads_cos: float) -> dict:
    metrics = dict(det_f1=0.9, lane_iou=0.9, qa_acc=0.5, plan_l2=2.0)
    kept = {k: 1.0 for k in metrics}
    equal = dict(heads_only_heads=1, matched=False, joint_speedup=1.7, heads_only_speedup={1: 1.5},
                 joint_ceiling=1.8, heads_only_ceiling={1: 1.6}, repeats=30, batch=16, heads_only_metrics=metrics,
                 heads_only_backbone=dict(cosine=heads_cos), heads_only_retained=dict(kept, det_f1=0.9))
    return dict(teacher_metrics=metrics, after_kd_metrics=metrics, retained_after_kd=kept,
                after_kd_backbone=dict(cosine=joint_cos), equal_speed=equal,
                pruning_config=dict(num_heads=[8] * 4, mlp_hidden=[192] * 4, teacher_mlp_hidden=341))


def test_the_comparison_target_and_report_section_say_what_was_measured():
    targets = joint_targets(fake_report(0.99, 0.95))
    (name, target), = targets.items()
    assert "the fastest heads-only student, still slower" in name and target["met"]
    assert target["value"]["heads_only_mean_kept"] == statistics.mean([0.9, 1.0, 1.0, 1.0])
    assert not next(iter(joint_targets(fake_report(0.90, 0.95)).values()))["met"]
    section = joint_report_section(fake_report(0.99, 0.95))
    assert "| measured speedup (median of 30, batch 16) | 1.000x | 1.700x | 1.500x |" in section
    assert "none reaches the joint student's measured speed" in section
    assert joint_targets({}) == {} and joint_report_section({}) == ""
