"""TinyVLProjector: the LM's scene tokens carry the detection head's object counts (CPU, tiny shapes)."""
from __future__ import annotations

import pytest
import torch

from mmcv.models.detectors.tiny_orion_heads import TinyVLProjector

B, N, C, CD, K, H, W = 2, 2, 8, 6, 3, 4, 4


def _projector() -> TinyVLProjector:
    torch.manual_seed(0)
    return TinyVLProjector(in_channels=C, det_channels=CD, out_channels=16, num_cams=N, grid_hw=(H, W), pool=2,
                           num_classes=K)


def _class_logits(cars_in_front: int) -> torch.Tensor:
    """Background everywhere, except ``cars_in_front`` cells of camera 0 that are confidently class 0."""
    logits = torch.zeros(B, N, K + 1, H, W)
    logits[:, :, K] = 12.0
    cells = torch.arange(cars_in_front)
    logits[:, 0, 0, cells // W, cells % W] = 24.0
    return logits


def _features() -> tuple:
    torch.manual_seed(1)
    return torch.randn(B, N, C, H, W), torch.randn(B, N, CD, H, W)


def test_tokens_have_local_global_and_count_tokens_per_camera():
    img, det = _features()
    tokens = _projector()(img, det, _class_logits(2))
    assert tokens.shape == (B, N * ((H // 2) * (W // 2) + 2), 16)


def test_soft_counts_are_the_expected_number_of_objects_per_class():
    counts = _projector().soft_counts(_class_logits(3))
    assert counts.shape == (B, N, K)
    assert torch.allclose(counts[:, 0], torch.tensor([3.0, 0.0, 0.0]).expand(B, K), atol=1e-3)
    assert torch.allclose(counts[:, 1], torch.zeros(B, K), atol=1e-3)


def test_one_more_object_changes_only_the_count_token_of_its_camera():
    proj, (img, det) = _projector(), _features()
    per_cam = (H // 2) * (W // 2) + 2
    two = proj(img, det, _class_logits(2)).reshape(B, N, per_cam, -1)
    three = proj(img, det, _class_logits(3)).reshape(B, N, per_cam, -1)
    assert torch.equal(two[:, :, :-1], three[:, :, :-1])  # scene tokens do not depend on the class logits
    assert torch.equal(two[:, 1], three[:, 1])  # the rear camera saw no change
    assert (two[:, 0, -1] - three[:, 0, -1]).abs().max() > 1e-3  # the front count token did


def test_qa_gradients_reach_the_count_embedding_but_not_the_detection_logits():
    proj, (img, det) = _projector(), _features()
    det.requires_grad_(True)
    logits = _class_logits(2).requires_grad_(True)
    proj(img, det, logits).square().sum().backward()
    assert logits.grad is None  # the class probabilities are read detached: the QA loss leaves the detector alone
    assert det.grad is not None and det.grad.abs().sum() > 0  # the detection features still train through the LM
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.count_proj.parameters())


def test_class_logits_of_the_wrong_shape_are_rejected_with_the_expected_shape():
    img, det = _features()
    with pytest.raises(ValueError, match=r"expected class logits \[2, 2, 4, 4, 4\] \(classes \+ background\)"):
        _projector()(img, det, torch.zeros(B, N, K, H, W))
