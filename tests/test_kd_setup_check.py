"""``--check-setup`` before the environment is ready: no torch / mmengine, a teacher not yet materialised."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools import tiny_teacher_asset
from tools.kd_setup_check import FAIL, WARN, check_teacher

ROOT = Path(__file__).resolve().parents[1]


def test_without_torch_or_mmengine_the_report_is_one_fail_line_with_the_fix(tmp_path: Path) -> None:
    # -S: no site-packages, as in a new shell whose python is not the repository's environment
    proc = subprocess.run([sys.executable, "-S", "-B", str(ROOT / "demo_kd_50_pruning.py"), "--check-setup"],
                          cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr == ""
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL  environment  {} (Python {}) cannot import torch, mmengine".format(
        sys.executable, "{}.{}.{}".format(*sys.version_info[:3]))]
    assert "fix: " in proc.stdout and ("bin/activate" in proc.stdout)


def test_a_shipped_teacher_not_yet_materialised_is_a_warning_saying_what_will_happen(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    target = tmp_path / "ckpt/orion_tiny/orion_tiny.pth"
    monkeypatch.setattr(tiny_teacher_asset, "MATERIALIZED_CHECKPOINT", target)
    cfg = dict(model=dict(kd_config=dict(teacher_backbone_path=str(target))))
    line = check_teacher(cfg, "python tools/train_tiny_teacher.py --materialize")
    assert line.status == WARN and "the demo writes it from the shipped teacher" in line.detail
    assert "--materialize" in line.fix
    other = check_teacher(dict(model=dict(kd_config=dict(teacher_backbone_path=str(tmp_path / "x.pth")))), "fix")
    assert other.status == FAIL and other.detail.startswith("Teacher model not found")


def test_a_depth_pruned_students_teacher_is_checked_with_every_block(tmp_path: Path) -> None:
    import torch
    from mmcv import Config
    from mmcv.models.backbones.eva_vit import EVAViT
    from tools.kd_setup_check import PASS

    backbone = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py")).model.img_backbone.to_dict()
    backbone.pop("type")
    path = tmp_path / "teacher.pth"
    torch.save(dict(state_dict={"img_backbone." + k: v for k, v in EVAViT(**backbone).state_dict().items()}), path)
    student = dict(backbone, type="EVAViTStudent", teacher_num_heads=16, num_heads=8, selected_blocks=[0, 3],
                   selected_heads_per_layer=[list(range(8)), [], [], list(range(8))])
    cfg = Config(dict(model=dict(img_backbone=student, kd_config=dict(teacher_backbone_path=str(path)))))
    line = check_teacher(cfg, "")
    assert line.status == PASS and line.detail.endswith(": {} img_backbone tensors fit the config".format(
        len(EVAViT(**backbone).state_dict()))), line
