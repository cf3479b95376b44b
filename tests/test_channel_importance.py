"""SwiGLU channel importance equals its definitions (magnitude formula, finite differences of the channel mask,
explicit activations), runs on ORION's own module tree, and simulating pruning with hooks equals a pruned model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.head_importance import ChannelImportance, HeadImportance, load_importance
from tests.eva_reference import reference_forward
from tests.head_pruning_fixtures import HEADS, SMALL, TinyDetector, loader_of, make_teacher, orion_twin, target_loss
from tools.head_pruning.channel_importance import (compute_channel_importance, compute_channel_importance_activation,
                                                   compute_channel_importance_gradient,
                                                   compute_channel_importance_magnitude)
from tools.head_pruning.sites import channel_prune_hooks, find_mlp_sites

HIDDEN = 341


def test_magnitude_equals_the_formula_with_the_ffn_ln_scale():
    teacher = make_teacher()
    sd = teacher.state_dict()
    imp = compute_channel_importance_magnitude(teacher)
    assert isinstance(imp, ChannelImportance) and imp.scores.shape == (3, HIDDEN) and imp.method == "magnitude"
    for layer in range(3):
        p = f"blocks.{layer}.mlp."
        for c in (0, 17, 340):
            expected = (sd[p + "w1.weight"][c].double().norm() * sd[p + "w2.weight"][c].double().norm()
                        * (sd[p + "ffn_ln.weight"][c].double() * sd[p + "w3.weight"][:, c].double()).norm())
            assert imp.scores[layer, c].item() == pytest.approx(expected.item(), rel=1e-9)
    assert imp.metadata["backbone"]["mlp_hidden"] == HIDDEN
    assert imp.metadata["backbone"]["mlp_params_per_channel"] == 3 * 128 + 4  # w1, w2 rows + biases, ffn_ln, w3 col


def test_gradient_matches_finite_differences_of_scaling_the_channels_w3_column():
    """m_c multiplies channel c where w3 reads it, which is the same as scaling w3's column c: perturb that."""
    teacher = make_teacher(seed=2).double()
    loader = [img.double() for img in loader_of(2)]
    raw = compute_channel_importance_gradient(teacher, loader, loss_fn=target_loss, normalize=False, progress=False)
    eps = 1e-6
    probes = [(layer, c) for layer in range(3) for c in (0, 5, 99, 200, 340)]
    with torch.no_grad():
        for layer, c in probes:
            column = teacher.blocks[layer].mlp.w3.weight[:, c]
            original = column.clone()
            fd = 0.0
            for img in loader:
                column.copy_(original * (1 + eps))
                plus = target_loss(teacher(img), img)
                column.copy_(original * (1 - eps))
                minus = target_loss(teacher(img), img)
                column.copy_(original)
                fd += abs((plus - minus).item() / (2 * eps))
            fd /= len(loader)
            assert raw.scores[layer, c].item() == pytest.approx(fd, rel=1e-4, abs=1e-12), (layer, c)
    normalized = compute_channel_importance_gradient(teacher, loader, loss_fn=target_loss, progress=False)
    assert torch.allclose(normalized.scores, raw.scores / raw.scores.norm(dim=1, keepdim=True), rtol=1e-9)
    assert raw.num_samples == 2 and raw.metadata["batches"] == 2


def test_activation_equals_the_mean_absolute_ffn_ln_output():
    teacher = make_teacher(seed=3)
    loader = loader_of(2, batch=2)
    imp = compute_channel_importance_activation(teacher, loader, progress=False)
    outputs = {i: [] for i in range(3)}
    handles = [block.mlp.ffn_ln.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out.detach()))
               for i, block in enumerate(teacher.blocks)]
    with torch.no_grad():
        for img in loader:
            teacher(img)
    for handle in handles:
        handle.remove()
    for layer in range(3):
        tokens = torch.cat([o.reshape(-1, HIDDEN) for o in outputs[layer]]).double()
        assert tokens.shape[0] == 2 * 2 * 49  # images x 7x7 real tokens, no window padding
        assert torch.allclose(imp.scores[layer], tokens.abs().mean(dim=0), rtol=1e-6)
    assert imp.num_samples == 4


def test_the_three_methods_on_orions_module_tree_equal_the_student_scores():
    teacher = make_teacher(seed=4, attn_impl="math")
    twin = orion_twin(teacher)
    loader = loader_of(2)
    for method, extra in (("magnitude", {}), ("gradient", dict(loss_fn=target_loss)), ("activation", {})):
        kwargs = {} if method == "magnitude" else dict(extra, progress=False)
        a = compute_channel_importance(teacher, method, None if method == "magnitude" else loader, **kwargs)
        b = compute_channel_importance(twin, method, None if method == "magnitude" else loader, **kwargs)
        assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-9), method
    with pytest.raises(ValueError, match="entropy scores attention heads only"):
        compute_channel_importance(teacher, "entropy", loader)


def test_gradient_through_a_detector_that_holds_a_hidden_teacher():
    teacher = make_teacher(seed=5)
    student = EVAViTStudent(**SMALL, num_heads=4, teacher_num_heads=HEADS, mlp_hidden=100)
    detector = TinyDetector(student, teacher=teacher)
    g = torch.Generator().manual_seed(0)
    loader = [dict(img=torch.randn(1, 2, 3, 112, 112, generator=g), target=torch.randn(2, 1, generator=g))
              for _ in range(2)]
    imp = compute_channel_importance_gradient(detector, loader, progress=False)
    assert imp.scores.shape == (3, HIDDEN) and "teacher_backbone" in imp.source  # the teacher's channels
    assert bool((imp.scores > 0).all()) and detector.img_backbone is student


def test_prune_hooks_on_the_teacher_equal_the_pruned_student_and_the_reference():
    teacher = make_teacher(seed=6)
    g = torch.Generator().manual_seed(1)
    kept = [sorted(torch.randperm(HIDDEN, generator=g)[:n].tolist()) for n in (120, 341, 7)]
    image = torch.randn(1, 3, 112, 112, generator=g)
    student = EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS, mlp_hidden=[120, 341, 7],
                            selected_channels_per_layer=kept).eval()
    student.load_from_teacher(teacher.state_dict())
    with torch.no_grad(), channel_prune_hooks(find_mlp_sites(teacher), kept):
        simulated = teacher(image)[0]
    assert (simulated - student(image)[0]).abs().max().item() <= 1e-5
    expected = reference_forward(teacher.state_dict(), image, depth=3, num_heads=HEADS, patch_size=16, window_size=4,
                                 window_block_indexes=(0, 1), img_size=112, kept_channels=kept)
    assert (simulated.double() - expected).abs().max().item() <= 1e-5
    assert torch.equal(teacher(image)[0], teacher(image)[0])  # hooks removed
    assert not teacher.blocks[0].mlp.ffn_ln._forward_hooks


def test_channel_importance_files_round_trip_and_are_not_read_as_head_scores(tmp_path):
    imp = ChannelImportance(np.random.default_rng(0).random((3, HIDDEN)), "gradient", num_samples=4, source="t",
                            metadata=dict(normalize=True))
    for ext in ("json", "npz"):
        path = tmp_path / f"channels.{ext}"
        imp.save(path)
        loaded = ChannelImportance.load(path)
        assert torch.equal(loaded.scores, imp.scores) and loaded.method == "gradient" and loaded.num_channels == HIDDEN
        assert isinstance(load_importance(path), ChannelImportance)
        with pytest.raises(ValueError, match=r"not a head importance file .*it holds channel importance"):
            HeadImportance.load(path)
    heads = HeadImportance(np.ones((3, 8)), "magnitude")
    heads.save(tmp_path / "heads.json")
    assert type(load_importance(tmp_path / "heads.json")) is HeadImportance
    with pytest.raises(ValueError, match=r"not a channel importance file .*it holds head importance"):
        ChannelImportance.load(tmp_path / "heads.json")
    with pytest.raises(ValueError, match=r"expected channels importance \(ChannelImportance\), got heads importance"):
        ChannelImportance.coerce(heads)
    with pytest.raises(ValueError, match=r"\[layers, channels\]"):
        ChannelImportance(torch.ones(4), "x")
    assert math.isclose(float(imp.scores.sum()), float(ChannelImportance.load(tmp_path / "channels.json").scores.sum()))
