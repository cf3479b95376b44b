"""The four head-importance methods equal their definitions, on any ORION-layout tree, through detectors."""
from __future__ import annotations

import math

import pytest
import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from tests.head_pruning_fixtures import (HEADS, SMALL, TinyDetector, explicit_entropy_and_activation, loader_of,
                                         make_teacher, orion_twin, spearman, target_loss)
from tools.head_pruning_utils import (analyze_pruning_impact, compute_head_importance_activation,
                                      compute_head_importance_entropy, compute_head_importance_gradient,
                                      compute_head_importance_magnitude, describe_backbone, find_backbone)


# --------------------------------------------------------------------------- importance equals its definition


def test_magnitude_equals_the_formula():
    teacher = make_teacher()
    sd = teacher.state_dict()
    imp = compute_head_importance_magnitude(teacher)
    with_proj = compute_head_importance_magnitude(teacher, include_proj=True)
    d = 128 // HEADS
    for l in range(3):
        for h in range(HEADS):
            rows = slice(h * d, (h + 1) * d)
            sq = sum(sd[f"blocks.{l}.attn.{n}.weight"][rows].double().pow(2).sum() for n in ("q_proj", "k_proj", "v_proj"))
            assert imp.scores[l, h].item() == pytest.approx(math.sqrt(sq), rel=1e-9)
            sq += sd[f"blocks.{l}.attn.proj.weight"][:, rows].double().pow(2).sum()
            assert with_proj.scores[l, h].item() == pytest.approx(math.sqrt(sq), rel=1e-9)
    assert imp.method == "magnitude" and imp.num_samples == 0 and "EVAViT" in imp.source


def test_gradient_matches_finite_differences_of_the_head_mask():
    teacher = make_teacher(seed=2).double()
    loader = [img.double() for img in loader_of(2)]
    raw = compute_head_importance_gradient(teacher, loader, loss_fn=target_loss, normalize=False, progress=False)
    eps = 1e-6
    fd = torch.zeros(3, HEADS, dtype=torch.float64)
    with torch.no_grad():
        for img in loader:
            for l in range(3):
                for h in range(HEADS):
                    plus, minus = torch.ones(3, HEADS, dtype=torch.float64), torch.ones(3, HEADS, dtype=torch.float64)
                    plus[l, h] += eps
                    minus[l, h] -= eps
                    diff = target_loss(teacher(img, head_mask=plus), img) - target_loss(teacher(img, head_mask=minus), img)
                    fd[l, h] += (diff / (2 * eps)).abs()
    fd /= len(loader)
    assert spearman(raw.scores, fd) >= 0.99
    assert torch.allclose(raw.scores, fd, rtol=1e-4, atol=1e-10)
    normalized = compute_head_importance_gradient(teacher, loader, loss_fn=target_loss, progress=False)
    assert torch.allclose(normalized.scores, fd / fd.norm(dim=1, keepdim=True), rtol=1e-4)
    assert raw.num_samples == 2


def test_entropy_and_activation_equal_explicit_computations():
    model = make_teacher(seed=3, attn_impl="math")
    loader = loader_of(2, batch=2)
    ent = compute_head_importance_entropy(model, loader, num_query_samples=None, progress=False)
    act = compute_head_importance_activation(model, loader, progress=False)
    expected_ent, expected_act = explicit_entropy_and_activation(model, loader)
    assert torch.allclose(ent.scores, expected_ent, rtol=1e-4, atol=1e-5)
    assert torch.allclose(act.scores, expected_act, rtol=1e-4)
    assert ent.num_samples == act.num_samples == 4
    assert (ent.scores > 0).all()


def test_entropy_with_sampled_queries_is_seeded_and_close_to_all_rows():
    model = make_teacher(seed=3)
    loader = loader_of(2, batch=2)
    a = compute_head_importance_entropy(model, loader, num_query_samples=12, seed=1, progress=False)
    b = compute_head_importance_entropy(model, loader, num_query_samples=12, seed=1, progress=False)
    full = compute_head_importance_entropy(model, loader, num_query_samples=None, progress=False)
    assert torch.equal(a.scores, b.scores)
    assert spearman(a.scores, full.scores) > 0.8


# --------------------------------------------------------------------------- any ORION-layout module tree


def test_four_methods_on_an_orion_layout_tree_equal_the_student_scores():
    teacher = make_teacher(seed=4, attn_impl="math")
    tree = orion_twin(teacher)
    assert not isinstance(tree, EVAViTStudent)
    loader = loader_of(2)
    assert torch.allclose(tree(loader[0])[0], teacher(loader[0])[0], atol=1e-5)
    pairs = [
        (compute_head_importance_magnitude(teacher), compute_head_importance_magnitude(tree)),
        (compute_head_importance_entropy(teacher, loader, num_query_samples=7, progress=False),
         compute_head_importance_entropy(tree, loader, num_query_samples=7, progress=False)),
        (compute_head_importance_activation(teacher, loader, progress=False),
         compute_head_importance_activation(tree, loader, progress=False)),
        (compute_head_importance_gradient(teacher, loader, loss_fn=target_loss, progress=False),
         compute_head_importance_gradient(tree, loader, loss_fn=target_loss, progress=False)),
    ]
    for ours, orion in pairs:
        assert torch.allclose(ours.scores, orion.scores, rtol=2e-4, atol=1e-6), ours.method
    geometry = describe_backbone(tree)
    assert geometry["img_hw"] == [112, 112] and geometry["window_per_block"] == [4, 4, 0]


def test_gradient_through_a_detector_and_the_teacher_of_a_student_detector():
    teacher = make_teacher(seed=5)
    data = [dict(img=img, target=torch.ones(2, 1)) for img in loader_of(2, views=2)]
    detector = TinyDetector(orion_twin(teacher))
    via_detector = compute_head_importance_gradient(detector, data, progress=False)
    assert via_detector.num_samples == 2 and "TinyDetector.img_backbone" in via_detector.source
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS)
    student.load_from_teacher(teacher.state_dict())
    kd = TinyDetector(student, teacher=orion_twin(teacher))
    kd.head.load_state_dict(detector.head.state_dict())
    assert find_backbone(kd) is kd.teacher_backbone
    via_kd = compute_head_importance_gradient(kd, data, progress=False)
    assert torch.allclose(via_kd.scores, via_detector.scores, rtol=1e-5)
    assert kd.img_backbone is student  # the stand-in is put back
    assert torch.equal(compute_head_importance_magnitude(kd).scores, compute_head_importance_magnitude(teacher).scores)


def test_training_state_and_requires_grad_flags_are_restored():
    teacher = make_teacher(seed=6)
    detector = TinyDetector(teacher).train()
    detector.img_backbone.blocks[1].eval()
    detector.img_backbone.patch_embed.proj.weight.requires_grad_(False)
    modes = {n: m.training for n, m in detector.named_modules()}
    flags = {n: p.requires_grad for n, p in detector.named_parameters()}
    data = [dict(img=img, target=torch.zeros(1, 1)) for img in loader_of(1, views=2)]
    compute_head_importance_gradient(detector, data, progress=False)
    compute_head_importance_entropy(detector, data, progress=False)
    compute_head_importance_activation(detector, data, progress=False)
    analyze_pruning_impact(compute_head_importance_magnitude(detector), model=detector, dataloader=data, verbose=False)
    assert {n: m.training for n, m in detector.named_modules()} == modes
    assert {n: p.requires_grad for n, p in detector.named_parameters()} == flags
    assert all(p.grad is None for p in detector.parameters())
