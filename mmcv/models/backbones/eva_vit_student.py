"""EVAViTStudent: ORION's EVA-02 backbone with any subset of attention heads kept.

With every head kept it computes exactly what ORION's ``EVAViT`` computes and
loads ORION's ``img_backbone.*`` keys unchanged. With fewer heads the q/k/v
rows, the q/v biases, the ``proj`` columns (and ``inner_attn_ln`` when
``subln=True``) hold only the kept heads; ``head_dim`` and the rotary tables
stay the teacher's, so the pruned block equals the teacher block with the
other heads' outputs set to zero (exactly when ``subln=False``; with
``subln=True`` the inner LayerNorm normalises over fewer channels and the
outputs differ).

Besides the plain forward the backbone can record distillation taps: hidden
states after chosen blocks and pre-softmax attention logits of sampled query
rows (see :class:`BackboneTaps`). This file is a plugin: it also runs inside
ORION's Python 3.8 / torch 2.0-2.4 environment.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmcv.models.builder import BACKBONES
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.eva_surgery import (HEAD_INDEX_KEY, apply_slice_plan, extract_backbone_state_dict,
                                           head_slice_plan)
from mmcv.models.utils.pruning_config import resolve_head_selection

HeadMask = Union[torch.Tensor, Sequence[torch.Tensor], None]
#: eps of ORION's ``inner_attn_ln``: its Attention builds it with ``nn.LayerNorm``'s default, whatever norm_layer is.
INNER_ATTN_LN_EPS = 1e-5


# --------------------------------------------------------------------------- helpers


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (no parameters, no state-dict keys)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate neighbouring channel pairs: (x1, x2) -> (-x2, x1)."""
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding2D(nn.Module):
    """EVA-02's 2-D rotary tables for an ``side x side`` token grid.

    Built for ``dim = head_dim // 2`` frequencies ``1 / 10000 ** (arange(0, dim, 2) / dim)``
    over positions ``arange(side) / side * pt_seq_len``, each frequency repeated twice
    (interleaved); the row and column tables are concatenated to ``head_dim`` channels and
    flattened to ``[side * side, head_dim]``.
    """

    def __init__(self, head_dim: int, side: int, pt_seq_len: int = 16) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rotary embedding needs head_dim divisible by 4, got {head_dim}")
        dim = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
        positions = torch.arange(side, dtype=torch.float32) / side * pt_seq_len
        angles = torch.einsum("i,f->if", positions, freqs).repeat_interleave(2, dim=-1)  # [side, dim]
        rows = angles[:, None, :].expand(side, side, dim)
        cols = angles[None, :, :].expand(side, side, dim)
        table = torch.cat((rows, cols), dim=-1).reshape(side * side, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Apply the rotation to ``t`` of shape [..., side*side, head_dim]."""
        if t.shape[-2] != self.freqs_cos.shape[0]:
            raise ValueError(f"rotary table covers {self.freqs_cos.shape[0]} tokens, "
                             f"got a sequence of {t.shape[-2]}")
        cos = self.freqs_cos.to(t.dtype)
        sin = self.freqs_sin.to(t.dtype)
        return t * cos + rotate_half(t) * sin


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad [B, H, W, C] at the bottom/right to multiples of ``window`` and cut into windows."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


def resize_abs_pos_embed(pos_embed: torch.Tensor, has_cls_token: bool, hw: Tuple[int, int]) -> torch.Tensor:
    """Drop the cls slot and resize the square grid bicubically (float32) to ``hw``: [1, H, W, C]."""
    tokens = pos_embed[:, 1:] if has_cls_token else pos_embed
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"pos_embed must hold a square grid (plus cls slot), got {tokens.shape[1]} tokens")
    grid = tokens.reshape(1, side, side, -1)
    if (side, side) == tuple(hw):
        return grid
    resized = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=hw, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


# --------------------------------------------------------------------------- taps


@dataclass
class BackboneTaps:
    """Intermediate values recorded for distillation (mmrazor-style recorder output).

    ``hidden_states[l]``: output of block ``l``, [B, Hp, Wp, C].
    ``attn_logits[l]``: pre-softmax logits (rope applied, scaled) of the sampled query rows,
    [B', heads, Q, K] (B' = B * windows for window blocks, K includes padded keys).
    ``query_index[l]``: the sampled positions within the attention sequence, [Q].
    ``head_map[l]``: teacher head index of each head of block ``l``.
    """

    hidden_blocks: Tuple[int, ...] = ()
    attn_blocks: Tuple[int, ...] = ()
    num_query_samples: int = 64
    generator: Optional[torch.Generator] = None
    query_index: Dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_states: Dict[int, torch.Tensor] = field(default_factory=dict)
    attn_logits: Dict[int, torch.Tensor] = field(default_factory=dict)
    features: List[torch.Tensor] = field(default_factory=list)
    head_map: List[List[int]] = field(default_factory=list)

    def sample_queries(self, block: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Query rows for ``block``: the given ones, or a sorted random subset drawn from ``generator``."""
        if block not in self.query_index:
            count = min(self.num_query_samples, seq_len)
            perm = torch.randperm(seq_len, generator=self.generator)
            self.query_index[block] = perm[:count].sort().values
        index = self.query_index[block]
        if int(index.max()) >= seq_len or int(index.min()) < 0:
            raise ValueError(f"query_index of block {block} must lie in [0, {seq_len}), got {index.tolist()}")
        return index.to(device)


# --------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """Non-overlapping patches (Conv2d, kernel = stride = patch size) to a [B, H, W, C] grid."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class SwiGLU(nn.Module):
    """EVA-02's MLP: ``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class HeadPrunedAttention(nn.Module):
    """Multi-head attention with ORION's parameter layout, holding a subset of the teacher's heads.

    ``selected_heads`` lists the teacher heads kept (sorted); every head keeps the teacher's
    ``head_dim`` and rotary table, so q/k/v have ``len(selected_heads) * head_dim`` rows.
    """

    def __init__(self, dim: int, head_dim: int, selected_heads: Sequence[int], rope: RotaryEmbedding2D,
                 qkv_bias: bool = True, subln: bool = False, attn_impl: str = "sdpa",
                 record_head_index: bool = True, teacher_num_heads: Optional[int] = None) -> None:
        super().__init__()
        self.selected_heads = [int(h) for h in selected_heads]
        self.teacher_num_heads = len(self.selected_heads) if teacher_num_heads is None else int(teacher_num_heads)
        self.num_heads = len(self.selected_heads)
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.attn_impl = attn_impl
        inner = self.num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = None
            self.v_bias = None
        self.rope = rope
        self.inner_attn_ln = nn.LayerNorm(inner, eps=INNER_ATTN_LN_EPS) if subln else nn.Identity()
        self.proj = nn.Linear(inner, dim)
        self.record_head_index = record_head_index
        if record_head_index:
            self.register_buffer(HEAD_INDEX_KEY, torch.tensor(self.selected_heads, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + HEAD_INDEX_KEY
        if self.record_head_index and key in state_dict:
            stored = [int(h) for h in state_dict[key].tolist()]
            if stored != self.selected_heads:
                error_msgs.append(f"{key}: checkpoint keeps teacher heads {stored}, this model keeps "
                                  f"{self.selected_heads}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # ORION's own checkpoints carry no head index: forgive its absence only where the block keeps
        # every teacher head; a pruned block must say which heads its tensors hold.
        unpruned = self.selected_heads == list(range(self.teacher_num_heads))
        if self.record_head_index and key not in state_dict and key in missing_keys and unpruned:
            missing_keys.remove(key)

    def forward(self, x: torch.Tensor, head_mask: Optional[torch.Tensor] = None,
                taps: Optional[BackboneTaps] = None, block_index: int = -1) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q = self.rope(q)
        k = self.rope(k)
        if taps is not None and block_index in taps.attn_blocks:
            rows = taps.sample_queries(block_index, n, x.device)
            taps.attn_logits[block_index] = (q[:, :, rows] * self.scale) @ k.transpose(-2, -1)
        if self.attn_impl == "math":
            attn = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        if head_mask is not None:
            out = out * head_mask.to(out.dtype).view(1, -1, 1, 1)
        out = out.transpose(1, 2).reshape(b, h, w, self.num_heads * self.head_dim)
        return self.proj(self.inner_attn_ln(out))


class EVABlock(nn.Module):
    """Pre-norm transformer block; window attention when ``window_size > 0`` (padded keys not masked)."""

    def __init__(self, dim: int, head_dim: int, selected_heads: Sequence[int], mlp_hidden: int,
                 rope: RotaryEmbedding2D, window_size: int = 0, qkv_bias: bool = True, subln: bool = False,
                 drop_path_rate: float = 0.0, attn_impl: str = "sdpa", eps: float = 1e-6,
                 record_head_index: bool = True, teacher_num_heads: Optional[int] = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = HeadPrunedAttention(dim, head_dim, selected_heads, rope, qkv_bias=qkv_bias, subln=subln,
                                        attn_impl=attn_impl, record_head_index=record_head_index,
                                        teacher_num_heads=teacher_num_heads)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, eps=eps)

    def forward(self, x: torch.Tensor, head_mask: Optional[torch.Tensor] = None,
                taps: Optional[BackboneTaps] = None, block_index: int = -1) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded_hw = window_partition(x, self.window_size)
        x = self.attn(x, head_mask, taps, block_index)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, padded_hw, hw)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------- backbone


def layer_norm_eps(norm_layer: Optional[Callable[..., nn.Module]], norm_eps: Optional[float]) -> float:
    """The LayerNorm eps of ORION's ``norm_layer`` argument (``nn.LayerNorm`` or a ``partial`` of it).

    ORION builds ``norm1``, ``norm2`` and ``mlp.ffn_ln`` with ``norm_layer(dim)``; only a plain,
    affine LayerNorm has ORION's parameters and keys, so anything else is refused.
    """
    if norm_layer is None:
        return 1e-6 if norm_eps is None else float(norm_eps)
    probe = norm_layer(4) if callable(norm_layer) else None
    if type(probe) is not nn.LayerNorm or not probe.elementwise_affine or probe.bias is None:
        raise ValueError(f"norm_layer: expected nn.LayerNorm or a partial of it (e.g. partial(nn.LayerNorm, "
                         f"eps=1e-6), ORION's default), got {norm_layer!r}")
    if norm_eps is not None and float(norm_eps) != probe.eps:
        raise ValueError(f"norm_eps={norm_eps} contradicts norm_layer's eps={probe.eps}; give one of them")
    return float(probe.eps)


def check_orion_only_arguments(use_rel_pos: bool, rope: bool, residual_block_indexes: Sequence[int],
                               out_feature: Any, unknown: Mapping[str, Any]) -> None:
    """Refuse ORION ``EVAViT`` arguments whose value ORION ignores or that this backbone does not build."""
    if use_rel_pos:
        raise ValueError("use_rel_pos=True: ORION's EVAViT accepts it but builds no relative position tables "
                         "(its blocks never receive it), so the meaning is unclear; remove it or set False")
    if not rope:
        raise ValueError("rope=False: ORION's EVAViT always applies rotary embeddings whatever this flag says; "
                         "remove it or set True")
    if list(residual_block_indexes):
        raise ValueError(f"residual_block_indexes={list(residual_block_indexes)}: the convolutional residual blocks "
                         f"of ViTDet are not built by EVAViTStudent (ORION's configs use none); remove them")
    if not isinstance(out_feature, str):
        raise ValueError(f"out_feature: expected a string (the output feature's name), got {out_feature!r}")
    if unknown:
        raise TypeError(f"EVAViTStudent: unexpected arguments {sorted(unknown)} (neither ORION's EVAViT nor "
                        f"EVAViTStudent takes them)")


@BACKBONES.register_module()
class EVAViTStudent(nn.Module):
    """ORION's EVA-02 ViT backbone keeping a chosen subset of each block's attention heads.

    Args match ORION's ``EVAViT`` (same meaning and defaults) plus:
        num_heads: heads kept, one int for all blocks or one per block.
        teacher_num_heads: heads of the unpruned model; ``head_dim = embed_dim // teacher_num_heads``.
        selected_heads_per_layer: sorted teacher head indices kept per block (default: the first ones).
        attn_impl: ``'sdpa'`` (fused ``scaled_dot_product_attention``) or ``'math'`` (explicit softmax).
        norm_eps: eps of the block LayerNorms (default 1e-6); ``norm_layer`` may say it instead.
    ORION's own arguments: ``flash_attn`` maps to ``attn_impl`` (both paths compute the same);
    ``norm_layer`` must be a LayerNorm (its eps is used; ``inner_attn_ln`` keeps eps 1e-5 as in ORION);
    ``act_layer`` is accepted and unused, as in ORION (the SwiGLU MLP always uses SiLU); ``out_feature``
    names the output (``_out_features``); ``use_rel_pos``, ``rope`` and ``residual_block_indexes`` are
    accepted at ORION's defaults only (:func:`check_orion_only_arguments`).
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: Union[int, Sequence[int]] = 12, mlp_ratio: float = 4 * 2 / 3,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, window_size: int = 0,
                 window_block_indexes: Sequence[int] = (), global_window_size: int = 0, use_abs_pos: bool = True,
                 pretrain_img_size: int = 224, pretrain_use_cls_token: bool = True, pt_hw_seq_len: int = 16,
                 intp_freq: bool = True, subln: bool = False, flash_attn: bool = False, with_cp: bool = False,
                 frozen: bool = False, teacher_num_heads: Optional[int] = 16,
                 selected_heads_per_layer: Optional[Sequence[Sequence[int]]] = None, attn_impl: str = "sdpa",
                 norm_eps: Optional[float] = None, init_cfg: Optional[dict] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, act_layer: Any = None,
                 use_rel_pos: bool = False, rope: bool = True, residual_block_indexes: Sequence[int] = (),
                 out_feature: str = "last_feat", **unknown: Any) -> None:
        super().__init__()
        check_orion_only_arguments(use_rel_pos, rope, residual_block_indexes, out_feature, unknown)
        eps = layer_norm_eps(norm_layer, norm_eps)
        if attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl: expected 'sdpa' or 'math', got {attn_impl!r}")
        if teacher_num_heads is None:
            teacher_num_heads = num_heads if isinstance(num_heads, int) else max(num_heads)
        if embed_dim % teacher_num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by teacher_num_heads {teacher_num_heads}")
        bad_windows = [i for i in window_block_indexes if not 0 <= i < depth]
        if bad_windows:
            raise ValueError(f"window_block_indexes: expected indices in [0, {depth}), got {bad_windows}")
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.teacher_num_heads = teacher_num_heads
        self.head_dim = embed_dim // teacher_num_heads
        self.with_cp, self.frozen, self.flash_attn = with_cp, frozen, flash_attn
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.window_block_indexes = tuple(int(i) for i in window_block_indexes)
        self.init_cfg = init_cfg
        self._out_features = [out_feature]  # ORION's (detectron2-style) output description
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        selection = resolve_head_selection(depth, teacher_num_heads, num_heads, selected_heads_per_layer)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos:
            num_positions = (pretrain_img_size // patch_size) ** 2 + (1 if pretrain_use_cls_token else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None
        grid = img_size // patch_size
        win_side = window_size if intp_freq else pt_hw_seq_len
        glb_side = (global_window_size if global_window_size > 0 else grid) if intp_freq else pt_hw_seq_len
        self.rope_win = RotaryEmbedding2D(self.head_dim, win_side, pt_hw_seq_len) if window_size > 0 else None
        self.rope_glb = RotaryEmbedding2D(self.head_dim, glb_side, pt_hw_seq_len)

        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as torch.linspace
        blocks = []
        for i in range(depth):
            windowed = i in self.window_block_indexes
            if windowed and self.rope_win is None:
                raise ValueError(f"block {i} is a window block but window_size is {window_size}")
            blocks.append(EVABlock(
                embed_dim, self.head_dim, selection[i], int(embed_dim * mlp_ratio),
                rope=self.rope_win if windowed else self.rope_glb,
                window_size=window_size if windowed else global_window_size,
                qkv_bias=qkv_bias, subln=subln, drop_path_rate=rates[i], attn_impl=attn_impl, eps=eps,
                record_head_index=self._records_head_index(), teacher_num_heads=teacher_num_heads))
        self.blocks = nn.ModuleList(blocks)
        self._active_taps: Optional[BackboneTaps] = None
        self.init_weights()
        if frozen:
            self._freeze()

    # ---------------------------------------------------------------- construction

    def _records_head_index(self) -> bool:
        """Whether blocks keep a ``head_index`` buffer in the state dict (the teacher alias does not)."""
        return True

    def init_weights(self) -> None:
        """Truncated-normal init (std 0.02) for linear layers and ``pos_embed``; unit LayerNorms."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad = False
        super().train(False)

    def train(self, mode: bool = True) -> "EVAViTStudent":
        """Like ``nn.Module.train`` but a ``frozen`` backbone stays in eval mode."""
        super().train(mode and not self.frozen)
        return self

    @property
    def selected_heads(self) -> List[List[int]]:
        """Teacher head indices kept by each block (the head map used for distillation)."""
        return [list(block.attn.selected_heads) for block in self.blocks]

    @property
    def num_heads_per_layer(self) -> List[int]:
        return [block.attn.num_heads for block in self.blocks]

    def analytic_macs(self, img_hw: Optional[Tuple[int, int]] = None) -> int:
        """Multiply-accumulates of one image's forward (see :func:`analytic_backbone_macs`)."""
        img_hw = img_hw or (self.img_size, self.img_size)
        return analytic_backbone_macs(
            img_hw, self.patch_size, self.patch_embed.proj.in_channels, self.embed_dim,
            self.blocks[0].mlp.w1.out_features, self.head_dim, self.num_heads_per_layer,
            [block.window_size for block in self.blocks])

    # ---------------------------------------------------------------- forward

    def _block_masks(self, head_mask: HeadMask) -> List[Optional[torch.Tensor]]:
        """One mask row per block, indexed by KEPT head: entry ``j`` scales head ``selected_heads[l][j]``."""
        if head_mask is None:
            return [None] * self.depth
        if len(head_mask) != self.depth:
            raise ValueError(f"head_mask: expected {self.depth} rows (one per block), got {len(head_mask)}")
        masks = []
        for i, block in enumerate(self.blocks):
            row, kept = head_mask[i], block.attn.num_heads
            if row.ndim != 1:
                raise ValueError(f"head_mask[{i}]: expected a 1-D row of {kept} entries, got shape {tuple(row.shape)}")
            if row.shape[0] != kept:
                raise ValueError(f"head_mask[{i}]: expected {kept} entries, one per kept head (teacher heads "
                                 f"{block.attn.selected_heads}), got {row.shape[0]}; a mask indexed by teacher head "
                                 f"converts with mask[layer][selected_heads[layer]]")
            masks.append(row)
        return masks

    def forward(self, x: torch.Tensor, head_mask: HeadMask = None) -> List[torch.Tensor]:
        """[B, 3, H, W] images -> ``[feature map [B, C, H/16, W/16]]`` (ORION's output).

        The input is cast to the weights' dtype first, as ORION's EVAViT does (bf16 weights, fp32 images).
        ``head_mask``: ``[depth, heads]`` or one row per block, indexed by kept head (see
        :meth:`_block_masks`); it multiplies each head's output before ``inner_attn_ln``/``proj``.
        """
        taps = self._active_taps
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        if self.pos_embed is not None:
            x = x + resize_abs_pos_embed(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        masks = self._block_masks(head_mask)
        for i, block in enumerate(self.blocks):
            tapped_attn = taps is not None and i in taps.attn_blocks
            if self.with_cp and self.training and torch.is_grad_enabled() and not tapped_attn:
                x = checkpoint(block, x, masks[i], None, i, use_reentrant=False)
            else:
                x = block(x, masks[i], taps, i)
            if taps is not None and i in taps.hidden_blocks:
                taps.hidden_states[i] = x
        features = [x.permute(0, 3, 1, 2).contiguous()]
        if taps is not None:
            taps.features = features
        return features

    @contextlib.contextmanager
    def tapping(self, hidden_blocks: Sequence[int] = (), attn_blocks: Sequence[int] = (),
                num_query_samples: int = 64, query_index: Optional[Mapping[int, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None) -> Iterator[BackboneTaps]:
        """Make every ``forward`` inside the block record distillation taps into the yielded object."""
        for name, blocks in (("hidden_blocks", hidden_blocks), ("attn_blocks", attn_blocks)):
            bad = [b for b in blocks if not 0 <= b < self.depth]
            if bad:
                raise ValueError(f"{name}: expected block indices in [0, {self.depth}), got {bad}")
        taps = BackboneTaps(hidden_blocks=tuple(hidden_blocks), attn_blocks=tuple(attn_blocks),
                            num_query_samples=num_query_samples, generator=generator,
                            query_index=dict(query_index or {}), head_map=self.selected_heads)
        previous, self._active_taps = self._active_taps, taps
        try:
            yield taps
        finally:
            self._active_taps = previous

    def forward_with_taps(self, x: torch.Tensor, hidden_blocks: Sequence[int] = (),
                          attn_blocks: Sequence[int] = (), num_query_samples: int = 64,
                          query_index: Optional[Mapping[int, torch.Tensor]] = None,
                          generator: Optional[torch.Generator] = None, head_mask: HeadMask = None) -> BackboneTaps:
        """One forward that also returns hidden states and sampled attention logits (see BackboneTaps)."""
        with self.tapping(hidden_blocks, attn_blocks, num_query_samples, query_index, generator) as taps:
            self.forward(x, head_mask=head_mask)
        return taps

    # ---------------------------------------------------------------- loading

    def load_from_teacher(self, source: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
        """Fill every tensor from an unpruned teacher backbone, cutting the kept heads (``eva_surgery``).

        ``source``: a backbone state dict, a full ORION/mmcv checkpoint dict, or a path to one.
        Anything missing, unexpected or mis-shaped raises ``ValueError`` naming the key.
        Returns a report: ``{'source', 'copied', 'sliced', 'teacher_num_heads'}``.
        """
        label = str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
        teacher = extract_backbone_state_dict(source)
        own = self.state_dict()
        expected_keys = [k for k in own if not k.endswith("." + HEAD_INDEX_KEY)]
        teacher_keys = {k for k in teacher if not k.endswith("." + HEAD_INDEX_KEY)}
        missing = [k for k in expected_keys if k not in teacher_keys]
        unexpected = sorted(teacher_keys - set(expected_keys))
        if missing or unexpected:
            parts = ([f"missing {len(missing)} key(s), e.g. {missing[:4]}"] if missing else []) + \
                    ([f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:4]}"] if unexpected else [])
            raise ValueError(f"{label}: teacher backbone does not match this EVAViTStudent "
                             f"(depth {self.depth}, embed_dim {self.embed_dim}): " + "; ".join(parts))
        for key, value in teacher.items():
            if key.endswith("." + HEAD_INDEX_KEY) and value.tolist() != list(range(self.teacher_num_heads)):
                raise ValueError(f"{label}: {key} says this source is already pruned to heads {value.tolist()}; "
                                 f"load_from_teacher needs the unpruned backbone")
        new_state = {key: teacher[key] for key in expected_keys}
        plans = head_slice_plan(self.selected_heads, self.head_dim, self.teacher_num_heads)
        sliced = apply_slice_plan(new_state, plans, label=label)
        for key in expected_keys:
            if tuple(new_state[key].shape) != tuple(own[key].shape):
                raise ValueError(f"{label}: {key}: expected shape {tuple(own[key].shape)}, "
                                 f"got {tuple(new_state[key].shape)}")
        for i, block in enumerate(self.blocks):
            if block.attn.record_head_index:
                new_state[f"blocks.{i}.attn.{HEAD_INDEX_KEY}"] = own[f"blocks.{i}.attn.{HEAD_INDEX_KEY}"]
        self.load_state_dict(new_state, strict=True)
        return dict(source=label, copied=len(expected_keys) - len(sliced), sliced=len(sliced),
                    teacher_num_heads=self.teacher_num_heads)
