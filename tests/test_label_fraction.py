"""kd_config.label_fraction: every frame is distilled, the task loss trains only through the labelled ones."""
from __future__ import annotations

import hashlib

import pytest
import torch

from mmcv.models.utils.kd_config import resolve_kd_config
from mmcv.models.utils.label_subset import detach_unlabelled, frame_draw, frame_key, is_labelled, labelled_mask
from tests.test_orion_student import batch, make_student, teacher_ckpt  # noqa: F401  (fixtures)


def metas(n):
    return [dict(scene_token=f"scene{i // 8}", frame_idx=i % 8, sample_idx=i) for i in range(n)]


def test_labelled_frames_are_a_fixed_nested_share_of_the_frames():
    frames = metas(4000)
    tenth = labelled_mask(frames, 0.1)
    half = labelled_mask(frames, 0.5)
    assert 0.08 < tenth.float().mean() < 0.12 and 0.47 < half.float().mean() < 0.53
    assert bool((half | ~tenth).all())  # every frame labelled at 10% is labelled at 50%
    assert labelled_mask(frames, 1.0).all() and not labelled_mask(frames, 0.0).any()


def test_the_draw_is_the_first_8_bytes_of_blake2b_of_the_frame_key():
    # Known answers, written out by hand from the hex digest (a second route to the same number).
    key = "synthetic-train-0-scene00000/3"
    hexdigest = hashlib.new("blake2b", key.encode("ascii"), digest_size=8).hexdigest()
    assert frame_draw(dict(scene_token="synthetic-train-0-scene00000", frame_idx=3)) == int(hexdigest, 16) / 2.0 ** 64
    assert frame_draw(dict(sample_idx=7)) == int(hashlib.new("blake2b", b"7", digest_size=8).hexdigest(), 16) / 2 ** 64


def test_frame_key_prefers_scene_and_frame_and_names_missing_keys():
    assert frame_key(dict(scene_token="s", frame_idx=3, sample_idx=9)) == "s/3"
    assert frame_key(dict(sample_idx=9)) == "9"
    with pytest.raises(KeyError, match="scene_token"):
        is_labelled(dict(filename="x"), 0.5)


def test_detach_unlabelled_passes_gradient_only_through_labelled_samples_as_their_mean():
    features = torch.arange(18.0).view(6, 3).requires_grad_()  # 3 samples x 2 cameras
    out = detach_unlabelled(features, torch.tensor([True, False, True]))
    assert torch.equal(out, features)  # the heads see the same values
    out.sum().backward()
    # 2 of 3 samples labelled: their rows carry the batch's weight, 3 / 2 each
    assert features.grad[:, 0].tolist() == [1.5, 1.5, 0, 0, 1.5, 1.5]
    none = torch.ones(4, 3, requires_grad=True)
    detach_unlabelled(none, torch.tensor([False, False])).sum().backward()
    assert float(none.grad.abs().max()) == 0.0
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
