"""The demo's joint mode pieces: the tiny joint KD config, timing-based choice of the heads-only student, the
comparison target and report section (the whole --joint demo is too slow for the test suite; README_KD.md has a run)."""
from __future__ import annotations

import statistics
from pathlib import Path

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


def test_heads_only_candidates_are_timed_alternately_and_the_choice_follows_the_measured_speed():
    backbone_cfg = dict(TINY.model.img_backbone.to_dict(), type="EVAViTStudent", teacher_num_heads=16)
    candidates = heads_only_backbones(dict(backbone_cfg, num_heads=8, mlp_hidden=192), 16)
    assert sorted(candidates) == list(range(1, 16))
    assert candidates[3].num_heads_per_layer == [3] * 4 and candidates[3].mlp_hidden_per_layer == [341] * 4
    full = EVAViTStudent(**{k: v for k, v in dict(backbone_cfg, num_heads=16).items() if k != "type"}).eval()
    joint = EVAViTStudent(**{k: v for k, v in dict(backbone_cfg, num_heads=8, mlp_hidden=192).items()
                             if k != "type"}).eval()
    image = torch.randn(2, 3, 80, 80)
    few = {k: candidates[k] for k in (1, 8)}
    speed = measure_speedups(full, joint, few, image, repeats=2)
    median = speed["median_s"]
    assert speed["joint_speedup"] == median["teacher"] / median["joint"]
    assert speed["heads_only_speedup"][8] == median["teacher"] / median["heads_8"]
    assert speed["joint_ceiling"] == full.analytic_macs((80, 80)) / joint.analytic_macs((80, 80))
    assert speed["heads_only_ceiling"][1] > speed["heads_only_ceiling"][8]
    assert choose_heads(dict(joint_speedup=1.5, heads_only_speedup={1: 1.6, 4: 1.52, 8: 1.2})) == \
        dict(heads=4, matched=True)
    assert choose_heads(dict(joint_speedup=1.9, heads_only_speedup={1: 1.6, 2: 1.55, 8: 1.2})) == \
        dict(heads=1, matched=False)


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
