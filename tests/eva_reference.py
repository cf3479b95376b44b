"""An independent float64 reference of ORION's EVA-02 backbone, written from the contract's arithmetic.

Deliberately naive: explicit loops over windows and heads, rotary tables from the formulas
position by position, LayerNorm from mean and variance. It shares no code with the backbone.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rope_tables(head_dim: int, side: int, pt_seq_len: int = 16):
    """cos/sin [side*side, head_dim], entry by entry from the formulas."""
    half = head_dim // 2
    n_freq = half // 2
    cos = torch.zeros(side * side, head_dim, dtype=torch.float64)
    sin = torch.zeros(side * side, head_dim, dtype=torch.float64)
    for r in range(side):
        for c in range(side):
            token = r * side + c
            for ch in range(head_dim):
                axis_pos = r if ch < half else c
                f = (ch % half) // 2  # each frequency repeated twice, interleaved
                assert f < n_freq
                freq = 1.0 / (10000 ** (2 * f / half))
                angle = (axis_pos / side * pt_seq_len) * freq
                cos[token, ch] = math.cos(angle)
                sin[token, ch] = math.sin(angle)
    return cos, sin


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotated = torch.empty_like(t)
    rotated[..., 0::2] = -t[..., 1::2]
    rotated[..., 1::2] = t[..., 0::2]
    return t * cos + rotated * sin


def attention(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str, num_heads: int, head_dim: int,
              cos: torch.Tensor, sin: torch.Tensor, head_mask: Optional[torch.Tensor],
              subln: bool) -> torch.Tensor:
    """x: [N, C] tokens of one sequence -> [N, C]."""
    q = x @ sd[p + "q_proj.weight"].T + sd[p + "q_bias"]
    k = x @ sd[p + "k_proj.weight"].T
    v = x @ sd[p + "v_proj.weight"].T + sd[p + "v_bias"]
    outs = []
    for h in range(num_heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        qh = apply_rope(q[:, sl], cos, sin)
        kh = apply_rope(k[:, sl], cos, sin)
        logits = qh @ kh.T / math.sqrt(head_dim)
        probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        out = probs @ v[:, sl]
        if head_mask is not None:
            out = out * head_mask[h]
        outs.append(out)
    out = torch.cat(outs, dim=-1)
    if subln:  # ORION's Attention builds it with nn.LayerNorm's default eps (1e-5), not the block's 1e-6
        out = layer_norm(out, sd[p + "inner_attn_ln.weight"], sd[p + "inner_attn_ln.bias"], eps=1e-5)
    return out @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]


def reference_forward(sd: Dict[str, torch.Tensor], img: torch.Tensor, *, depth: int, num_heads: int,
                      patch_size: int, window_size: int, window_block_indexes: Sequence[int],
                      pretrain_use_cls_token: bool = True, subln: bool = False,
                      head_mask: Optional[torch.Tensor] = None, img_size: Optional[int] = None,
                      kept_channels: Optional[Sequence[Sequence[int]]] = None,
                      channel_mask: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """ORION's EVAViT forward: [B, 3, H, W] -> [B, C, H/p, W/p] (float64).

    ``kept_channels[l]``: block ``l``'s MLP keeps only these hidden channels of the teacher: its
    ``ffn_ln`` normalises over them alone (mean and variance of the kept channels) and ``w3`` reads
    only their columns, i.e. the arithmetic of a network built with those channels. ``channel_mask[l]``
    instead multiplies every hidden channel by a factor BEFORE ``ffn_ln`` (masking, not pruning).
    """
    sd = {k: v.double() for k, v in sd.items()}
    img = img.double()
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    b, c, gh, gw = x.shape
    x = x.permute(0, 2, 3, 1)
    pos = sd["pos_embed"][:, 1:] if pretrain_use_cls_token else sd["pos_embed"]
    side = int(round(pos.shape[1] ** 0.5))
    pos = pos.reshape(1, side, side, c).permute(0, 3, 1, 2)
    if (side, side) != (gh, gw):
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    x = x + pos.permute(0, 2, 3, 1)
    head_dim = c // num_heads
    win_cos, win_sin = rope_tables(head_dim, window_size) if window_size else (None, None)
    glb_cos, glb_sin = rope_tables(head_dim, (img_size or gh * patch_size) // patch_size)
    for i in range(depth):
        p = f"blocks.{i}."
        mask = None if head_mask is None else head_mask[i]
        shortcut = x
        y = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        out = torch.zeros_like(y)
        for bi in range(b):
            if i in window_block_indexes:
                ws = window_size
                hp, wp = -(-gh // ws) * ws, -(-gw // ws) * ws
                padded = torch.zeros(hp, wp, c, dtype=y.dtype)
                padded[:gh, :gw] = y[bi]
                result = torch.zeros_like(padded)
                for r0 in range(0, hp, ws):
                    for c0 in range(0, wp, ws):
                        tokens = padded[r0:r0 + ws, c0:c0 + ws].reshape(ws * ws, c)
                        att = attention(tokens, sd, p + "attn.", num_heads, head_dim, win_cos, win_sin, mask, subln)
                        result[r0:r0 + ws, c0:c0 + ws] = att.reshape(ws, ws, c)
                out[bi] = result[:gh, :gw]
            else:
                tokens = y[bi].reshape(gh * gw, c)
                att = attention(tokens, sd, p + "attn.", num_heads, head_dim, glb_cos, glb_sin, mask, subln)
                out[bi] = att.reshape(gh, gw, c)
        x = shortcut + out
        y = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        hidden = F.silu(y @ sd[p + "mlp.w1.weight"].T + sd[p + "mlp.w1.bias"]) * (
            y @ sd[p + "mlp.w2.weight"].T + sd[p + "mlp.w2.bias"])
        ln_weight, ln_bias, w3 = sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"], sd[p + "mlp.w3.weight"]
        if channel_mask is not None:
            hidden = hidden * channel_mask[i].double()
        if kept_channels is not None:
            keep = list(kept_channels[i])
            hidden, ln_weight, ln_bias, w3 = hidden[..., keep], ln_weight[keep], ln_bias[keep], w3[:, keep]
        hidden = layer_norm(hidden, ln_weight, ln_bias)
        x = x + hidden @ w3.T + sd[p + "mlp.w3.bias"]
    return x.permute(0, 3, 1, 2)


def masked_teacher_mask(depth: int, num_heads: int, selection: List[List[int]]) -> torch.Tensor:
    """[depth, heads] 0/1 mask keeping the selected teacher heads."""
    mask = torch.zeros(depth, num_heads, dtype=torch.float64)
    for layer, heads in enumerate(selection):
        mask[layer, heads] = 1.0
    return mask


# --------------------------------------------------------------------------- counts from the architecture


def _per_block(value, depth: int) -> List[int]:
    return [value] * depth if isinstance(value, int) else list(value)


def reference_param_count(*, embed_dim: int, depth: int, heads_per_block: Sequence[int], head_dim: int,
                          mlp_hidden, patch_size: int, in_chans: int = 3, pos_tokens: int,
                          qkv_bias: bool = True, subln: bool = False) -> int:
    """Parameters of an EVA-02 backbone, tensor by tensor from ORION's key list (rope tables are buffers).

    ``mlp_hidden``: the SwiGLU width of every block (int) or of each block.
    """
    c = embed_dim
    total = c * in_chans * patch_size * patch_size + c  # patch_embed.proj weight, bias
    total += pos_tokens * c  # pos_embed
    for heads, mlp_hidden in zip(heads_per_block, _per_block(mlp_hidden, depth)):
        inner = heads * head_dim
        total += 2 * c + 2 * c  # norm1, norm2 (weight, bias)
        total += 3 * inner * c  # q_proj, k_proj, v_proj weights (no Linear bias)
        total += 2 * inner if qkv_bias else 0  # q_bias, v_bias (k has none)
        total += c * inner + c  # proj weight, bias
        total += 2 * inner if subln else 0  # inner_attn_ln
        total += 2 * (mlp_hidden * c + mlp_hidden)  # w1, w2
        total += 2 * mlp_hidden  # ffn_ln
        total += c * mlp_hidden + c  # w3
    assert len(heads_per_block) == depth
    return total


def reference_macs(*, img_hw: Sequence[int], patch_size: int, in_chans: int, embed_dim: int, mlp_hidden,
                   head_dim: int, heads_per_block: Sequence[int], window_per_block: Sequence[int]) -> int:
    """Multiply-accumulates of one image, sequence by sequence as the forward runs them (matmuls and the conv).

    Window blocks run every zero-padded window as a sequence of window*window tokens; global blocks run one
    sequence of all tokens; per sequence of n tokens and k heads: q/k/v/proj n*C*k*d each, q k^T and
    attn v n*n*d each per head. The SwiGLU runs on the real tokens: three C x hidden matmuls
    (``mlp_hidden``: one width or one per block).
    """
    gh, gw = img_hw[0] // patch_size, img_hw[1] // patch_size
    macs = gh * gw * (in_chans * patch_size * patch_size) * embed_dim
    widths = _per_block(mlp_hidden, len(heads_per_block))
    for heads, window, mlp_hidden in zip(heads_per_block, window_per_block, widths):
        if window:
            sequences = [window * window] * (math.ceil(gh / window) * math.ceil(gw / window))
        else:
            sequences = [gh * gw]
        for n in sequences:
            macs += 4 * n * embed_dim * heads * head_dim
            macs += heads * 2 * n * n * head_dim
        macs += gh * gw * 3 * embed_dim * mlp_hidden
    return macs
