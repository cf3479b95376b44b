"""Shared fixtures of the head-pruning tests: small teachers, an independent ORION-layout module tree, explicit
reference computations of the data-driven importance methods."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import resize_abs_pos_embed

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




# --------------------------------------------------------------------------- explicit reference computations


def real_token_mask(grid: int, window: int, images: int) -> torch.Tensor:
    """[images * windows, window * window]: 1 where a window position holds a real token, 0 on the padding.

    Written from the layout (pad the grid at the bottom/right to a multiple of ``window``; windows in
    row-major order, tokens in row-major order inside a window), not from the backbone's own partition.
    """
    per_side = -(-grid // window)
    rows = []
    for wr in range(per_side):
        for wc in range(per_side):
            rows.append([float(wr * window + r < grid and wc * window + c < grid)
                         for r in range(window) for c in range(window)])
    return torch.tensor(rows, dtype=torch.float64).repeat(images, 1)


def explicit_entropy_and_activation(model: EVAViT, loader, grid: int = 7):
    """Entropy and activation importance of every head, written out from the attention of each block.

    The attention probabilities come from the backbone's recorded pre-softmax logits (the backbone
    itself is checked against an independent reference in test_eva_vit_student.py); v and the
    per-head outputs are recomputed here from the block's weights.
    """
    depth, heads = len(model.blocks), model.blocks[0].attn.num_heads
    dim = model.embed_dim
    head_dim = dim // heads
    ent_sum = torch.zeros(depth, heads, dtype=torch.float64)
    act_sum = torch.zeros(depth, heads, dtype=torch.float64)
    counts = torch.zeros(depth, dtype=torch.float64)
    max_ent = torch.zeros(depth, dtype=torch.float64)
    with torch.no_grad():
        for img in loader:
            taps = model.forward_with_taps(img, hidden_blocks=range(depth), attn_blocks=range(depth),
                                           num_query_samples=10 ** 6)
            x0 = model.patch_embed(img)
            x0 = x0 + resize_abs_pos_embed(model.pos_embed, True, (x0.shape[1], x0.shape[2]))
            inputs = [x0] + [taps.hidden_states[layer] for layer in range(depth - 1)]
            for layer, block in enumerate(model.blocks):
                p = taps.attn_logits[layer].double().softmax(-1)  # [S, heads, N, N], every query row
                x = block.norm1(inputs[layer]).double()
                w = block.window_size
                if w:
                    valid = real_token_mask(grid, w, img.shape[0])
                    per_side = -(-grid // w)
                    x = F.pad(x, (0, 0, 0, per_side * w - grid, 0, per_side * w - grid))
                    x = x.view(img.shape[0], per_side, w, per_side, w, dim).permute(0, 1, 3, 2, 4, 5)
                    x = x.reshape(-1, w * w, dim)
                else:
                    valid = torch.ones(img.shape[0], grid * grid, dtype=torch.float64)
                    x = x.reshape(img.shape[0], -1, dim)
                v = F.linear(x, block.attn.v_proj.weight.double(), block.attn.v_bias.double())
                v = v.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)
                entropy = -(p * p.log()).sum(-1)  # [S, heads, N]
                ent_sum[layer] += (entropy * valid[:, None]).sum(dim=(0, 2))
                act_sum[layer] += ((p @ v).norm(dim=-1) * valid[:, None]).sum(dim=(0, 2))
                counts[layer] += valid.sum()
                max_ent[layer] = math.log(p.shape[-1])
    return max_ent[:, None] - ent_sum / counts[:, None], act_sum / counts[:, None]
