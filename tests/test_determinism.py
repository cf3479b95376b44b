"""Same command, same numbers: a short KD run of the demo's pipeline gives bit-identical students and metrics.

The second run builds its model with extra random draws, as another library version might (transformers'
weight init of the tiny LM is overwritten by the checkpoint but consumes random numbers): the training
stream must not depend on them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmcv import Config
    from mmcv.datasets import build_dataset
    from tools import head_pruning_utils as hpu
    from tools.train_tiny_teacher import DEFAULT_CHECKPOINT, ensure_tiny_teacher, load_tiny_teacher

    folder = tmp_path_factory.mktemp("determinism")
    teacher = load_tiny_teacher(ensure_tiny_teacher(DEFAULT_CHECKPOINT, verbose=False))
    pruning = folder / "pruning_config.json"
    hpu.create_pruning_config(hpu.compute_head_importance_magnitude(teacher), pruning_ratio=0.5,
                              strategy="uniform").save(pruning)
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
    val_set = build_dataset(dict(cfg.data.val, num_samples=32))
    return folder, pruning, val_set


def train_and_evaluate(folder: Path, pruning: Path, val_set, extra_draws: int, monkeypatch) -> tuple:
    import mmcv.models.builder as builder
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from tools.demo_support import load_exported_student, train_kd, write_kd_config

    original = builder.build_model

    def build_drawing_more(*args, **kwargs):
        model = original(*args, **kwargs)
        torch.rand(extra_draws)
        return model

    monkeypatch.setattr(builder, "build_model", build_drawing_more)
    run = folder / f"run_{extra_draws}"
    config = write_kd_config(ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py", run / "config.py", pruning,
                             run / "train", frames=64, epochs=1)
    train_kd(config, run / "train", seed=0)
    monkeypatch.setattr(builder, "build_model", original)
    student = load_exported_student(run / "train" / "student_pruned.pth")
    return evaluate(student, val_set), student.img_backbone.state_dict()


def test_a_short_kd_run_gives_the_same_student_and_metrics_twice(setup, monkeypatch):
    torch.set_num_threads(1)
    folder, pruning, val_set = setup
    metrics, weights = train_and_evaluate(folder, pruning, val_set, 0, monkeypatch)
    again, weights_again = train_and_evaluate(folder, pruning, val_set, 1000, monkeypatch)
    assert metrics == again  # every metric, exactly
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
