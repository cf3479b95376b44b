"""Head importance on the miniature ORION: through a real OrionStudent, and the CLI on an OrionStudent config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmcv.models  # noqa: F401  (registers everything)
from mmcv import Config
from mmcv.datasets import build_dataset
from mmcv.models.builder import build_model
from tools.head_pruning_utils import HeadImportance, compute_head_importance_gradient, main

ROOT = Path(__file__).resolve().parents[1]
TINY = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
TINY_KD = ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"


def save_random_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save({"state_dict": build_model(TINY.model.to_dict()).state_dict()}, path)
    return path


def plain_detector(checkpoint: Path):
    """TinyOrion (the base detector) holding the checkpoint's weights: the reference for the teacher's loss."""
    model = build_model(TINY.model.to_dict())
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    return model


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return save_random_teacher(folder / "a.pth", 0), save_random_teacher(folder / "b.pth", 1)


@pytest.fixture(scope="module")
def batches():
    cfg = TINY.data.train.to_dict()
    cfg.update(num_samples=2)
    dataset = build_dataset(cfg)
    return [dataset.collate_fn([dataset[i]]) for i in range(2)]


def test_gradient_importance_through_a_real_orion_student_scores_the_teacher(teachers, batches):
    """Inside an OrionStudent the teacher stands in for the pruned backbone and the loss is the task loss."""
    teacher_a, _ = teachers
    model_cfg = TINY.model.to_dict()
    model_cfg.pop("type")
    model_cfg.update(type="OrionStudent", base_detector="TinyOrion", teacher_backbone_path=str(teacher_a),
                     kd_config=dict(head_selection="magnitude", alpha_schedule="constant", distillation_alpha=0.6),
                     img_backbone=dict(model_cfg["img_backbone"], type="EVAViTStudent", num_heads=8,
                                       teacher_num_heads=16))
    student = build_model(model_cfg)
    pruned = student.img_backbone
    via_student = compute_head_importance_gradient(student, batches, progress=False)
    via_detector = compute_head_importance_gradient(plain_detector(teacher_a), batches, progress=False)
    assert via_student.scores.shape == (4, 16)
    assert torch.allclose(via_student.scores, via_detector.scores, rtol=1e-4, atol=1e-8)
    assert "teacher_backbone" in via_student.source
    assert student.img_backbone is pruned and student.distillation_alpha == 0.6  # restored


def test_cli_importance_honours_checkpoint_for_an_orion_student_config(teachers, batches, tmp_path):
    teacher_a, teacher_b = teachers
    cfg = tmp_path / "kd.py"
    cfg.write_text(f"_base_ = [{str(TINY_KD)!r}]\n"
                   f"model = dict(teacher_backbone_path={str(teacher_a)!r}, "
                   f"kd_config=dict(teacher_backbone_path={str(teacher_a)!r}))\n"
                   f"data = dict(train=dict(num_samples=2))\n")
    out = tmp_path / "gradient.json"
    assert main(["importance", "--config", str(cfg), "--checkpoint", str(teacher_b), "--method", "gradient",
                 "--num-batches", "2", "--device", "cpu", "--out", str(out)]) == 0
    scores = HeadImportance.load(out).scores
    of_b = compute_head_importance_gradient(plain_detector(teacher_b), batches, progress=False).scores
    of_a = compute_head_importance_gradient(plain_detector(teacher_a), batches, progress=False).scores
    assert torch.allclose(scores, of_b, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(scores, of_a, rtol=1e-2)
