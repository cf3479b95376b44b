"""kd_config.label_fraction: every frame is distilled, the task loss trains only through the labelled ones."""
from __future__ import annotations

import pytest
import torch

from mmcv.models.utils.kd_config import resolve_kd_config
from mmcv.models.utils.label_subset import detach_unlabelled, frame_key, is_labelled, labelled_mask
from tests.test_orion_student import batch, make_student, teacher_ckpt  # noqa: F401  (fixtures)


def metas(n):
    return [dict(scene_token=f"scene{i // 8}", frame_idx=i % 8, sample_idx=i) for i in range(n)]


def test_labelled_frames_are_a_fixed_nested_share_of_the_frames():
    frames = metas(4000)
    tenth = labelled_mask(frames, 0.1)
    half = labelled_mask(frames, 0.5)
    assert 0.08 < tenth.float().mean() < 0.12 and 0.47 < half.float().mean() < 0.53
    assert bool((half | ~tenth).all())  # every frame labelled at 10% is labelled at 50%
    assert torch.equal(tenth, labelled_mask(list(reversed(frames)), 0.1).flip(0))  # order does not matter
    assert labelled_mask(frames, 1.0).all() and not labelled_mask(frames, 0.0).any()


def test_frame_key_prefers_scene_and_frame_and_names_missing_keys():
    assert frame_key(dict(scene_token="s", frame_idx=3, sample_idx=9)) == "s/3"
    assert frame_key(dict(sample_idx=9)) == "9"
    with pytest.raises(KeyError, match="scene_token"):
        is_labelled(dict(filename="x"), 0.5)


def test_detach_unlabelled_passes_gradient_only_through_labelled_samples():
    features = torch.ones(6, 3, requires_grad=True)  # 3 samples x 2 cameras
    detach_unlabelled(features, torch.tensor([True, False, True])).sum().backward()
    assert features.grad[:, 0].tolist() == [1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="do not split"):
        detach_unlabelled(torch.ones(5, 3), torch.tensor([True, False]))


@pytest.mark.parametrize("bad", [1.5, -0.1, "all", True])
def test_label_fraction_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="label_fraction"):
        resolve_kd_config(dict(label_fraction=bad))


def backbone_grads(student, batch, alpha):  # noqa: F811
    student.train()
    student.set_distillation_alpha(alpha)
    student.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = student.forward_train(**batch)
    losses["total_loss"].backward()
    return losses, {n: p.grad.clone() for n, p in student.img_backbone.named_parameters() if p.grad is not None}


def test_no_labels_means_the_task_loss_trains_nothing(teacher_ckpt, batch):  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(label_fraction=0.0))
    losses, grads = backbone_grads(student, batch, alpha=0.0)
    assert float(losses["task_loss"]) > 0  # the heads still see every frame
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads.values())
    labelled = make_student(teacher_ckpt)
    _, full = backbone_grads(labelled, batch, alpha=0.0)
    assert any(float(g.abs().max()) > 0 for g in full.values())


def test_pure_distillation_works_without_labels(teacher_ckpt, batch):  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(label_fraction=0.0))
    losses, grads = backbone_grads(student, batch, alpha=1.0)
    assert float(losses["task_loss"]) == 0.0 and float(losses["backbone_distill_loss"]) > 0
    assert any(float(g.abs().max()) > 0 for g in grads.values())
