"""Head importance, pruning configurations, impact analysis and the CLI of tools/head_pruning_utils.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import EVAViTStudent, resize_abs_pos_embed, window_partition
from mmcv.models.builder import MODELS, build_backbone
from tools.head_pruning_utils import (HeadImportance, PruningConfig, analyze_pruning_impact,
                                      compute_head_importance_activation, compute_head_importance_entropy,
                                      compute_head_importance_gradient, compute_head_importance_magnitude,
                                      create_pruning_config, describe_backbone, find_backbone, main,
                                      plot_fidelity_vs_ratio, plot_head_importance, validate_pruning_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(img_size=112, patch_size=16, embed_dim=128, depth=3, window_size=4, window_block_indexes=(0, 1),
             mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=224)
HEADS = 8
ORION_L = dict(img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
               mlp_ratio=4 * 2 / 3, qkv_bias=True, window_block_indexes=[i for i in range(24) if i % 3 != 2])


def make_teacher(seed: int = 0, **overrides) -> EVAViT:
    torch.manual_seed(seed)
    model = EVAViT(**dict(SMALL, num_heads=HEADS, **overrides)).eval()
    with torch.no_grad():  # non-trivial biases, norms and weights so that heads differ
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(torch.rand(p.shape[0], 1) * 30)  # sharper attention in some heads
    return model


def loader_of(count: int = 2, batch: int = 1, seed: int = 5, views: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, views, 3, 112, 112) if views else (batch, 3, 112, 112)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


# --------------------------------------------------------------------------- an independent ORION-layout tree


def _rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, tokens, head_dim):
        super().__init__()
        self.register_buffer("freqs_cos", torch.zeros(tokens, head_dim))
        self.register_buffer("freqs_sin", torch.zeros(tokens, head_dim))

    def forward(self, t):
        return t * self.freqs_cos + _rotate_half(t) * self.freqs_sin


class OrionAttention(nn.Module):
    """Written like ORION's attention: [B, H, W, C] in, F.linear on the weights, explicit softmax."""

    def __init__(self, dim, num_heads, rope):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rope = rope
        self.inner_attn_ln = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.view(b, -1, c)
        n = h * w
        q = F.linear(x, self.q_proj.weight, self.q_bias).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        k = F.linear(x, self.k_proj.weight).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        v = F.linear(x, self.v_proj.weight, self.v_bias).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        q = self.rope(q).type_as(v)
        k = self.rope(k).type_as(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        x = self.proj(self.inner_attn_ln(x))
        return x.view(b, h, w, c)


class OrionMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class OrionBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden, rope, window_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OrionAttention(dim, num_heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = OrionMlp(dim, hidden)
        self.window_size = window_size

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        if ws > 0:
            b, h, w, c = x.shape
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
        x = self.attn(x)
        if ws > 0:
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w].contiguous()
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=16, stride=16)


class OrionLikeEVAViT(nn.Module):
    """Not an EVAViTStudent: ORION's module tree and keys, its own forward."""

    def __init__(self, dim=128, depth=3, num_heads=HEADS, window=4, window_blocks=(0, 1), grid=7):
        super().__init__()
        head_dim = dim // num_heads
        self.patch_embed = PatchEmbedding(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 14 * 14 + 1, dim))
        self.rope_win = VisionRotaryEmbeddingFast(window * window, head_dim)
        self.rope_glb = VisionRotaryEmbeddingFast(grid * grid, head_dim)
        self.blocks = nn.ModuleList(
            OrionBlock(dim, num_heads, int(dim * 4 * 2 / 3), self.rope_win if i in window_blocks else self.rope_glb,
                       window if i in window_blocks else 0) for i in range(depth))

    def forward(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        x = x + resize_abs_pos_embed(self.pos_embed, True, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return [x.permute(0, 3, 1, 2)]


def orion_twin(teacher: EVAViT) -> OrionLikeEVAViT:
    tree = OrionLikeEVAViT().to(next(teacher.parameters()).dtype)
    tree.load_state_dict(teacher.state_dict(), strict=True)
    return tree.eval()


class TinyDetector(nn.Module):
    """ORION's detector contract: img_backbone, forward(data, return_loss=True) -> dict(loss, ...)."""

    def __init__(self, backbone, teacher=None):
        super().__init__()
        self.img_backbone = backbone
        if teacher is not None:
            self.teacher_backbone = teacher
        self.head = nn.Linear(128, 1)

    def forward(self, data, return_loss=True):
        img = data["img"].flatten(0, 1)
        feat = self.img_backbone(img)[0]
        loss = (self.head(feat.mean(dim=(2, 3))) - data["target"]).pow(2).mean()
        return dict(loss=loss, log_vars={}, num_samples=img.shape[0])


def target_loss(outputs, batch):
    torch.manual_seed(11)
    target = torch.randn(outputs[0].shape[1:], dtype=outputs[0].dtype)
    return (outputs[0] - target).pow(2).mean()


def spearman(a, b):
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


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


def _block_inputs(model, img):
    taps = model.forward_with_taps(img, hidden_blocks=range(3), attn_blocks=range(3), num_query_samples=10 ** 6)
    x0 = model.patch_embed(img)
    x0 = x0 + resize_abs_pos_embed(model.pos_embed, True, (x0.shape[1], x0.shape[2]))
    return [x0, taps.hidden_states[0], taps.hidden_states[1]], taps


def _valid_rows(model, block, batch):
    """[S, N] 1 for real tokens, computed with the backbone's own window partition of a ones grid."""
    if model.blocks[block].window_size == 0:
        return torch.ones(batch, 49)
    parts, _ = window_partition(torch.ones(batch, 7, 7, 1), 4)
    return parts.reshape(parts.shape[0], -1)


def test_entropy_and_activation_equal_explicit_computations():
    model = make_teacher(seed=3, attn_impl="math")
    loader = loader_of(2, batch=2)
    ent = compute_head_importance_entropy(model, loader, num_query_samples=None, progress=False)
    act = compute_head_importance_activation(model, loader, progress=False)
    ent_sum = torch.zeros(3, HEADS, dtype=torch.float64)
    act_sum = torch.zeros(3, HEADS, dtype=torch.float64)
    counts = torch.zeros(3, dtype=torch.float64)
    max_ent = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for img in loader:
            inputs, taps = _block_inputs(model, img)
            for l in range(3):
                block = model.blocks[l]
                logits = taps.attn_logits[l].double()  # [S, heads, N, N], every query row
                p = logits.softmax(-1)
                valid = _valid_rows(model, l, img.shape[0]).double()
                entropy = -(p * p.log()).sum(-1)  # [S, heads, N]
                ent_sum[l] += (entropy * valid[:, None]).sum(dim=(0, 2))
                x = block.norm1(inputs[l])
                if block.window_size:
                    x, _ = window_partition(x, block.window_size)
                x = x.reshape(x.shape[0], -1, 128).double()
                v = F.linear(x, block.attn.v_proj.weight.double(), block.attn.v_bias.double())
                v = v.view(x.shape[0], -1, HEADS, 16).transpose(1, 2)
                out_norm = (p @ v).norm(dim=-1)  # [S, heads, N]
                act_sum[l] += (out_norm * valid[:, None]).sum(dim=(0, 2))
                counts[l] += valid.sum()
                max_ent[l] = math.log(logits.shape[-1])
    assert torch.allclose(ent.scores, max_ent[:, None] - ent_sum / counts[:, None], rtol=1e-4, atol=1e-5)
    assert torch.allclose(act.scores, act_sum / counts[:, None], rtol=1e-4)
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


# --------------------------------------------------------------------------- pruning configurations


def test_uniform_keeps_the_per_block_top_k():
    scores = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    scores[0, :] = 1.0  # ties go to the lower index
    for ratio, k in ((0.5, 8), (0.25, 12), (0.75, 4), (0.0, 16)):
        config = create_pruning_config(HeadImportance(scores, "test"), pruning_ratio=ratio)
        assert config.num_heads == [k] * 5 and config.strategy == "uniform"
        for l in range(1, 5):
            assert config.selected_heads_per_layer[l] == sorted(scores[l].topk(k).indices.tolist())
        assert config.selected_heads_per_layer[0] == list(range(k))
    assert config.to_model_kwargs()["num_heads"] == [16] * 5
    with pytest.warns(UserWarning, match="not a whole number"):
        rounded = create_pruning_config(scores, pruning_ratio=0.3)
    assert rounded.num_heads == [11] * 5 and rounded.metadata["effective_pruning_ratio"] == pytest.approx(5 / 16)


def test_global_keeps_the_exact_budget_and_the_floor():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 16, generator=g) + 1.0
    scores[2] = torch.rand(16, generator=g) * 0.01  # a block the global ranking would empty
    for floor in (1, 3):
        config = create_pruning_config(scores, pruning_ratio=0.5, strategy="global", min_heads_per_layer=floor)
        assert sum(config.num_heads) == 6 * 8
        assert config.num_heads[2] == floor and min(config.num_heads) >= floor
        assert config.selected_heads_per_layer[2] == sorted(scores[2].topk(floor).indices.tolist())
        kept = torch.zeros(6, 16, dtype=torch.bool)
        for l, hs in enumerate(config.selected_heads_per_layer):
            kept[l, hs] = True
        others = kept.clone()
        others[2] = False  # outside the floor block, kept heads outrank every removed head
        assert scores[others].min() > scores[~kept & (torch.arange(6)[:, None] != 2)].max()
    assert len(set(config.num_heads)) > 1  # non-uniform allocation


@pytest.mark.parametrize("selection, kwargs, match", [
    ([[0, 1]] * 2, {}, "expected 3 blocks"),
    ([[0, 1], [0, 8], [1, 2]], {}, r"indices in \[0, 8\)"),
    ([[0, 1], [-1, 2], [1, 2]], {}, r"indices in \[0, 8\)"),
    ([[0, 1], [2, 2], [1, 2]], {}, "duplicate"),
    ([[0, 1], [3, 2], [1, 2]], {}, "sorted"),
    ([[0, 1], [], [1, 2]], {}, "at least one head"),
    ([[0, 1], [0.5, 2], [1, 2]], {}, "integers"),
    ([[0, 1], 3, [1, 2]], {}, "list of head indices"),
    ("0,1", {}, "one list of head indices per block"),
    ([[0, 1], [0, 1], [1, 2]], dict(num_heads=3), "num_heads says 3"),
    ([[0, 1], [0, 1], [1, 2]], dict(num_heads=[2, 2]), "one count per block"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=0.75), "REMOVED"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=1.0), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=50), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=-0.1), r"in \[0, 1\)"),
    ([[0, 1, 2, 3]] * 3, dict(pruning_ratio=True), r"in \[0, 1\)"),
])
def test_every_invalid_configuration_is_refused(selection, kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_pruning_config(selection, depth=3, teacher_num_heads=8, **kwargs)


def test_ratio_read_as_kept_fraction_fails_loudly_and_valid_ones_pass():
    twelve = [list(range(12))] * 24
    with pytest.raises(ValueError, match=r"REMOVED.*pruning_ratio 0.25.*other reading"):
        validate_pruning_config(twelve, depth=24, teacher_num_heads=16, num_heads=12, pruning_ratio=0.75)
    assert validate_pruning_config(twelve, 24, 16, num_heads=12, pruning_ratio=0.25) == twelve
    config = create_pruning_config(torch.rand(24, 16), 0.5, "global")
    assert validate_pruning_config(config, 24, 16, num_heads=config.num_heads, pruning_ratio=0.5) == list(config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pruning_ratio=0.97), "removes every head"),
    (dict(pruning_ratio=1.0), "REMOVED"),
    (dict(strategy="layerwise"), "strategy"),
    (dict(min_heads_per_layer=0), "min_heads_per_layer"),
    (dict(min_heads_per_layer=17), "min_heads_per_layer"),
    (dict(pruning_ratio=0.75, min_heads_per_layer=5), "fewer than min_heads_per_layer"),
    (dict(pruning_ratio=0.75, strategy="global", min_heads_per_layer=5), "fewer than the floor"),
])
def test_create_pruning_config_refuses_impossible_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_pruning_config(torch.rand(4, 16), **kwargs)


def test_scores_must_be_finite_and_two_dimensional():
    with pytest.raises(ValueError, match="NaN"):
        HeadImportance(torch.tensor([[1.0, float("nan")]]), "x")
    with pytest.raises(ValueError, match=r"\[layers, heads\]"):
        HeadImportance(torch.ones(4), "x")


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("ext", [".json", ".npz", ".pkl"])
def test_importance_save_load_round_trip(tmp_path, ext):
    imp = compute_head_importance_magnitude(make_teacher())
    path = tmp_path / f"sub/imp{ext}"
    imp.save(path)
    loaded = HeadImportance.load(path, allow_pickle=ext == ".pkl")
    assert torch.equal(loaded.scores, imp.scores)
    assert (loaded.method, loaded.num_samples, loaded.source) == (imp.method, imp.num_samples, imp.source)
    assert loaded.metadata["backbone"]["num_heads"] == HEADS
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_pickle_is_refused_without_the_flag_and_unknown_files_are_rejected(tmp_path):
    imp = HeadImportance(np.ones((2, 4)), "magnitude")
    imp.save(tmp_path / "imp.pkl")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        HeadImportance.load(tmp_path / "imp.pkl")
    with pytest.raises(ValueError, match="extension"):
        imp.save(tmp_path / "imp.txt")
    (tmp_path / "other.json").write_text(json.dumps({"scores": [[1]]}))
    with pytest.raises(ValueError, match="not a head importance file"):
        HeadImportance.load(tmp_path / "other.json")


def test_pruning_config_round_trip_builds_the_student(tmp_path):
    teacher = make_teacher()
    config = create_pruning_config(compute_head_importance_magnitude(teacher), 0.5, "global")
    config.save(tmp_path / "prune.json")
    loaded = PruningConfig.load(tmp_path / "prune.json")
    assert loaded == config
    student = EVAViTStudent(**SMALL, **loaded.to_model_kwargs())
    student.load_from_teacher(teacher.state_dict())
    assert student.selected_heads == config.selected_heads_per_layer
    payload = json.loads((tmp_path / "prune.json").read_text())
    payload["selected_heads_per_layer"][0] = [3, 3]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="duplicate"):
        PruningConfig.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- analysis and plots


def test_analysis_of_orion_l_geometry_gives_the_contract_speedups():
    with torch.device("meta"):
        backbone = EVAViT(**ORION_L)
    geometry = describe_backbone(backbone)
    imp = HeadImportance(torch.rand(24, 16), "magnitude", metadata=dict(backbone=geometry))
    analysis = analyze_pruning_impact(imp, strategies=("uniform",), verbose=False)
    ceilings = [round(r["speedup_ceiling"], 3) for r in analysis["results"]]
    assert ceilings == [1.128, 1.294, 1.517]
    assert analysis["full"]["macs"] / 1e9 == pytest.approx(592.9, abs=0.1)
    half = analysis["results"][1]
    assert geometry["num_params"] - half["attention_params_removed"] == pytest.approx(253.0e6, rel=1e-3)


def test_measured_fidelity_equals_the_masked_backbone(tmp_path, capsys):
    teacher = make_teacher(seed=7)
    loader = loader_of(2)
    imp = compute_head_importance_magnitude(teacher)
    analysis = analyze_pruning_impact(imp, pruning_ratios=(0.0, 0.5), model=teacher, dataloader=loader,
                                      save_path=tmp_path / "analysis.json")
    assert "speedup<=" in capsys.readouterr().out
    zero, half = analysis["results"][0], analysis["results"][1]
    assert zero["cosine_similarity"] == pytest.approx(1.0) and zero["relative_l2_error"] == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(3, HEADS)
    for l, hs in enumerate(half["selected_heads_per_layer"]):
        mask[l, hs] = 1.0
    with torch.no_grad():
        cos = [F.cosine_similarity(teacher(x, head_mask=mask)[0].flatten(1).double(),
                                   teacher(x)[0].flatten(1).double()).item() for x in loader]
    assert half["cosine_similarity"] == pytest.approx(float(np.mean(cos)), abs=1e-6)
    assert json.loads((tmp_path / "analysis.json").read_text())["results"][1]["heads_kept"] == 12
    plot_fidelity_vs_ratio(analysis, tmp_path / "fid.png")
    plot_head_importance(imp, tmp_path / "heat.png", pruning_config=create_pruning_config(imp, 0.5))
    for name in ("fid.png", "heat.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- command line


if "HPUTestDetector" not in MODELS.module_dict:
    @MODELS.register_module(name="HPUTestDetector")
    class _CliDetector(TinyDetector):
        def __init__(self, img_backbone, train_cfg=None, test_cfg=None):
            super().__init__(build_backbone(img_backbone))

try:
    from mmcv.datasets import DATASETS
except ImportError:  # pragma: no cover - the miniature datasets are optional here
    DATASETS = None

if DATASETS is not None and "HPURandomViews" not in DATASETS.module_dict:
    @DATASETS.register_module(name="HPURandomViews")
    class _RandomViews(torch.utils.data.Dataset):
        def __init__(self, length=4, seed=0):
            self.items = [torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(seed + i))
                          for i in range(length)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return dict(img=self.items[i], target=torch.ones(1))


@pytest.mark.skipif(DATASETS is None, reason="mmcv.datasets not importable")
def test_cli_end_to_end_on_a_tiny_config(tmp_path, capsys):
    teacher = make_teacher(seed=8)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"state_dict": {"img_backbone." + k: v for k, v in teacher.state_dict().items()}}, ckpt)
    backbone_cfg = dict(SMALL, type="EVAViTStudent", num_heads=4, teacher_num_heads=HEADS)
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(f"model = dict(type='HPUTestDetector', img_backbone={backbone_cfg!r})\n"
                   f"data = dict(train=dict(type='HPURandomViews', length=4))\n")
    common = ["--config", str(cfg), "--checkpoint", str(ckpt), "--num-batches", "2", "--device", "cpu"]
    for method in ("magnitude", "activation", "gradient"):
        assert main(["importance", *common, "--method", method, "--out", str(tmp_path / f"{method}.json")]) == 0
    activation = HeadImportance.load(tmp_path / "activation.json")
    data = [dict(img=torch.stack([_RandomViews(4).items[i]])) for i in range(2)]
    assert torch.allclose(activation.scores, compute_head_importance_activation(teacher, data, progress=False).scores)
    assert activation.metadata["backbone"]["num_heads"] == HEADS  # the teacher architecture, not the student's
    magnitude = HeadImportance.load(tmp_path / "magnitude.json")
    assert torch.equal(magnitude.scores, compute_head_importance_magnitude(teacher).scores)
    assert HeadImportance.load(tmp_path / "gradient.json").num_samples == 2
    assert main(["analyze", *common, "--importance", str(tmp_path / "magnitude.json"), "--pruning-ratios", "0.5",
                 "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    assert "cosine_similarity" in json.loads((tmp_path / "a.json").read_text())["results"][0]
    assert main(["plot", "--importance", str(tmp_path / "magnitude.json"), "--out", str(tmp_path / "h.png")]) == 0
    # as a script, from another directory: the sys.path fix makes the repository importable
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "head_pruning_utils.py"), "prune-config",
                             "--importance", str(tmp_path / "gradient.json"), "--pruning-ratio", "0.5",
                             "--strategy", "global", "--out", str(tmp_path / "p.json")],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sum(PruningConfig.load(tmp_path / "p.json").num_heads) == 3 * 4


def test_plugin_file_parses_as_python_3_8():
    candidates = ["/root/.pyenv/versions/3.8.18/bin/python", shutil.which("python3.8")]
    python38 = next((c for c in candidates if c and os.path.exists(c)), None)
    if python38 is None:
        pytest.skip("no python3.8 on this machine")
    path = os.path.join(ROOT, "tools", "head_pruning_utils.py")
    result = subprocess.run([python38, "-c", f"import ast; ast.parse(open({path!r}).read(), feature_version=(3, 8))"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
