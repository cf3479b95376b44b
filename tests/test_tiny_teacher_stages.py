"""The tiny teacher's count tokens and its two training stages: what stage 2 trains, freezes and switches off."""
from __future__ import annotations

import re

import pytest
import torch

import tools.train_tiny_teacher as ttt
from mmcv.models.builder import build_model
from mmcv.models.detectors.tiny_orion_heads import TinyDetHead, TinyVLProjector
from tests.test_tiny_orion import small_cfg

FROZEN = ("img_backbone", "pts_bbox_head", "map_head")
TRAINED = ("vl_proj", "lm_head")


def test_soft_counts_are_the_class_probabilities_summed_over_cells():
    head = TinyDetHead(in_channels=8, feat_channels=8, num_classes=3, memory=False)
    logits = torch.full((2, 4, 5, 5), -30.0)
    logits[:, 3] = 30.0  # every cell background ...
    logits[0, 3, 1, 1], logits[0, 1, 1, 1] = -30.0, 30.0  # ... but one pedestrian cell in image 0
    logits[1, 3, 2, 2:4], logits[1, 0, 2, 2:4] = -30.0, 30.0  # and two car cells in image 1
    counts = head.soft_counts(logits)
    assert torch.allclose(counts, torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), atol=1e-6)
    random = torch.randn(3, 4, 5, 5)
    assert torch.allclose(head.soft_counts(random), random.softmax(1)[:, :3].sum(dim=(2, 3)))


def _projectors():
    torch.manual_seed(0)
    with_counts = TinyVLProjector(in_channels=16, det_channels=8, out_channels=12, num_cams=2, grid_hw=(4, 4),
                                  pool=2, count_tokens=True, num_classes=3)
    plain = TinyVLProjector(in_channels=16, det_channels=8, out_channels=12, num_cams=2, grid_hw=(4, 4), pool=2)
    plain.load_state_dict({k: v for k, v in with_counts.state_dict().items() if not k.startswith("count_")})
    return with_counts, plain


def test_count_tokens_follow_the_scene_tokens_and_carry_the_counts():
    with_counts, plain = _projectors()
    img, det = torch.randn(3, 2, 16, 4, 4), torch.randn(3, 2, 8, 4, 4)
    counts = torch.rand(3, 2, 3) * 4
    tokens = with_counts(img, det, det_counts=counts)
    scene = plain(img, det)
    assert scene.shape == (3, 2 * (4 + 1), 12) and tokens.shape == (3, 2 * (4 + 1) + 2, 12)
    assert torch.equal(tokens[:, :scene.shape[1]], scene)  # the scene tokens are those of the plain projector
    more = counts.clone()
    more[1, 0, 0] += 1.0  # one more car in camera 0 of sample 1 changes that count token only
    changed = (with_counts(img, det, det_counts=more) - tokens).abs().amax(dim=-1) > 1e-6
    assert changed.nonzero().tolist() == [[1, scene.shape[1]]]


@pytest.mark.parametrize("counts, got", [(None, "None"), (torch.ones(3, 2, 4), "(3, 2, 4)")])
def test_count_tokens_without_fitting_counts_are_refused(counts, got):
    with_counts, _ = _projectors()
    with pytest.raises(ValueError, match=r"needs det_counts \[3, 2, 3\].*got " + re.escape(got)):
        with_counts(torch.randn(3, 2, 16, 4, 4), torch.randn(3, 2, 8, 4, 4), det_counts=counts)


def test_language_stage_trains_only_the_vl_path_on_frozen_perception_in_eval_mode(monkeypatch):
    seen = []
    original = ttt.forward_train

    def recording_forward_train(model, batch):
        seen.append((model.use_grid_mask, {name: getattr(model, name).training for name in FROZEN + TRAINED},
                     len(batch["img_metas"])))
        return original(model, batch)

    start = ttt.train_tiny_teacher(small_cfg(2, language_iters=0), seed=1, evaluate_at_end=False, verbose=False)
    monkeypatch.setattr(ttt, "forward_train", recording_forward_train)
    done = ttt.train_tiny_teacher(small_cfg(2, language_iters=3), seed=1, evaluate_at_end=False, verbose=False)
    before, after = start["model"].state_dict(), done["model"].state_dict()
    assert set(before) == set(after) and any(k.startswith("vl_proj.count_proj.") for k in after)
    for key in after:
        if key.startswith(FROZEN):
            assert torch.equal(before[key], after[key]), key  # stage 1's weights, untouched by stage 2
    changed = {key.split(".")[0] for key in after if not torch.equal(before[key], after[key])}
    assert changed == set(TRAINED)
    assert all(not p.requires_grad for name in FROZEN for p in getattr(done["model"], name).parameters())
    stage2 = seen[2:]  # the 2 stage-1 steps train everything with the grid mask
    assert [grid for grid, _, _ in seen[:2]] == [True, True] and all(all(mode.values()) for _, mode, _ in seen[:2])
    assert [batch for _, _, batch in seen] == [8, 8, 4, 4, 4]  # stage 2 batches: language_stage.samples_per_gpu
    for grid, mode, _ in stage2:
        assert grid is False
        assert [mode[name] for name in FROZEN] == [False] * 3 and [mode[name] for name in TRAINED] == [True] * 2


def test_perception_stage_builds_the_projector_without_count_tokens():
    cfg = small_cfg(1, language_iters=0)
    assert cfg.model.vl_proj.count_tokens and not cfg.perception_stage.model_changes.vl_proj.count_tokens
    result = ttt.train_tiny_teacher(cfg, seed=0, evaluate_at_end=False, verbose=False)
    assert result["model"].vl_proj.count_tokens  # the shipped architecture comes out of stage 2


def test_an_unknown_trained_module_is_refused_with_the_modules_there_are():
    cfg = small_cfg(1, language_iters=1)
    source, target = build_model(cfg.model), build_model(cfg.model)
    with pytest.raises(ValueError, match=r"\['llm'\] are not modules of TinyOrion \(expected some of .*'lm_head'"):
        ttt.copy_and_freeze(source, target, ["lm_head", "llm"])
