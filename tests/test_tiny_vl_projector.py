"""Count tokens: TinyVLProjector hands the detection head's object counts to the LM, which reads them by attention
only (kept out of its scene-mean shortcut). CPU, tiny shapes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcv import Config
from mmcv.models.builder import build_model
from mmcv.models.detectors.tiny_lm import TinyCausalLM
from mmcv.models.detectors.tiny_orion_heads import TinyVLProjector

CONFIG = Path(__file__).resolve().parents[1] / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"

B, N, C, CD, K, H, W = 2, 2, 8, 6, 3, 4, 4
SCENE_PER_CAM = (H // 2) * (W // 2) + 1  # local tokens and the global token


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


def test_tokens_are_the_scene_tokens_of_every_camera_then_one_count_token_per_camera():
    img, det = _features()
    proj = _projector()
    assert proj(img, det, _class_logits(2)).shape == (B, N * SCENE_PER_CAM + N, 16)
    assert proj.num_count_tokens == N


def test_soft_counts_are_the_expected_number_of_objects_per_class():
    counts = _projector().soft_counts(_class_logits(3))
    assert counts.shape == (B, N, K)
    assert torch.allclose(counts[:, 0], torch.tensor([3.0, 0.0, 0.0]).expand(B, K), atol=1e-3)
    assert torch.allclose(counts[:, 1], torch.zeros(B, K), atol=1e-3)


@pytest.mark.parametrize("cars", [0, 1, 3])
def test_one_more_object_changes_only_the_count_token_of_its_camera(cars):
    proj, (img, det) = _projector(), _features()
    fewer, more = proj(img, det, _class_logits(cars)), proj(img, det, _class_logits(cars + 1))
    assert torch.equal(fewer[:, :-N], more[:, :-N])  # scene tokens do not depend on the class logits
    assert torch.equal(fewer[:, -1], more[:, -1])  # the rear camera's count token saw no change
    assert (fewer[:, -N] - more[:, -N]).abs().max() > 1e-3  # the front camera's did


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


def _tiny_lm(tail: int) -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32,
                        plan_horizon=2, unconditioned_tail=tail)


def test_the_lm_keeps_the_count_tokens_out_of_its_scene_shortcut_but_attends_to_them():
    lm = _tiny_lm(tail=N)
    torch.manual_seed(2)
    vis = torch.randn(B, 5 + N, 16)
    louder = vis.clone()
    louder[:, -N:] *= 30.0  # count tokens spread ~35x more than scene tokens over frames
    assert torch.equal(lm.scene_conditioning(vis), vis[:, :5].mean(dim=1, keepdim=True))
    assert torch.equal(lm.scene_conditioning(louder), lm.scene_conditioning(vis))
    questions = torch.randint(4, lm.tokenizer.vocab_size, (B, 1, 3))
    with torch.no_grad():
        logits = lm._run(vis, questions)[0]
        assert not torch.allclose(lm._run(louder, questions)[0], logits)  # still read through attention


def test_the_lm_rejects_a_tail_that_leaves_no_scene_token():
    with pytest.raises(ValueError, match="at least one scene token"):
        _tiny_lm(tail=3)._run(torch.zeros(B, 3, 16), torch.zeros(B, 1, 3, dtype=torch.long))


def test_tiny_orion_rejects_an_lm_whose_shortcut_would_average_the_count_tokens():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.lm_head.unconditioned_tail = 0
    with pytest.raises(ValueError, match=r"lm_head.unconditioned_tail is 0, expected 2"):
        build_model(cfg.model)
