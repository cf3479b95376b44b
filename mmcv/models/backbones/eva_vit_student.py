"""EVAViTStudent: ORION's EVA-02 backbone with any subset of attention heads and SwiGLU channels kept.

With every head kept it computes exactly what ORION's ``EVAViT`` computes and
loads ORION's ``img_backbone.*`` keys unchanged. With fewer heads the q/k/v
rows, the q/v biases, the ``proj`` columns (and ``inner_attn_ln`` when
``subln=True``) hold only the kept heads; ``head_dim`` and the rotary tables
stay the teacher's, so the pruned block equals the teacher block with the
other heads' outputs set to zero (exactly when ``subln=False``; with
``subln=True`` the inner LayerNorm normalises over fewer channels and the
outputs differ). Each SwiGLU MLP may likewise keep a subset of the teacher's hidden channels
(``mlp_hidden``, ``selected_channels_per_layer``): ``w1``/``w2`` rows, ``ffn_ln`` entries and ``w3``
columns of the kept channels. ``ffn_ln`` then normalises over the kept channels only, so a pruned
MLP is NOT the teacher with the other channels masked; with every channel kept it is the teacher.
Blocks record what they keep in ``attn.head_index`` and ``mlp.channel_index``.

Depth pruning: ``selected_blocks`` keeps a sorted subset of the teacher's ``depth`` blocks. ``blocks`` then
holds only those (compact keys ``blocks.0..K-1``; block ``j`` is teacher block ``kept_blocks[j]``, with
that block's window/global kind, rotary table and drop-path rate), the root buffer ``kept_blocks``
records them and is checked on load, and the per-block arguments keep one entry per TEACHER block (the
removed blocks' entries are ignored). The model is the teacher with the removed blocks skipped (exactly
so when heads and channels are all kept). ``depth`` and ``window_block_indexes`` keep ORION's meaning.

The layers (rotary tables, windows, SwiGLU, ...) live in ``eva_layers.py`` and are re-exported here.
Besides the plain forward the backbone can record distillation taps, keyed by teacher block: hidden
states after chosen blocks and pre-softmax attention logits of sampled query rows (``eva_taps.py``:
:class:`BackboneTaps`, :func:`default_block_map`). This file is a plugin: it also runs inside
ORION's Python 3.8 / torch 2.0-2.4 environment.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmcv.models.backbones.eva_layers import (DropPath, PatchEmbed, RecordedSelection, RotaryEmbedding2D, SwiGLU,
                                              drop_path, resize_abs_pos_embed, rotate_half, window_partition,
                                              window_unpartition)
from mmcv.models.backbones.eva_taps import BackboneTaps, default_block_map, resolve_block_maps
from mmcv.models.builder import BACKBONES
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.eva_surgery import (CHANNEL_INDEX_SUFFIX, HEAD_INDEX_KEY, HEAD_INDEX_SUFFIX, KEPT_BLOCKS_KEY,
                                           apply_slice_plan, extract_backbone_state_dict, is_selection_index_key,
                                           pruning_slice_plan, resolve_block_selection, select_teacher_blocks,
                                           teacher_block_count)
from mmcv.models.utils.selection_checks import resolve_channel_selection, resolve_head_selection

HeadMask = Union[torch.Tensor, Sequence[torch.Tensor], None]
#: eps of ORION's ``inner_attn_ln``: its Attention builds it with ``nn.LayerNorm``'s default, whatever norm_layer is.
INNER_ATTN_LN_EPS = 1e-5


# --------------------------------------------------------------------------- modules


class HeadPrunedAttention(RecordedSelection):
    """Multi-head attention with ORION's parameter layout, holding a subset of the teacher's heads.

    ``selected_heads`` lists the teacher heads kept (sorted); every head keeps the teacher's
    ``head_dim`` and rotary table, so q/k/v have ``len(selected_heads) * head_dim`` rows. With
    ``record_head_index`` the selection is stored as ``head_index`` and checked on load. ``block_index``
    of ``forward`` is the block's TEACHER index (the key of its attention taps).
    """

    def __init__(self, dim: int, head_dim: int, selected_heads: Sequence[int], rope: RotaryEmbedding2D,
                 qkv_bias: bool = True, subln: bool = False, attn_impl: str = "sdpa",
                 record_head_index: bool = True, teacher_num_heads: Optional[int] = None) -> None:
        super().__init__()
        selected = [int(h) for h in selected_heads]
        teacher_num_heads = len(selected) if teacher_num_heads is None else int(teacher_num_heads)
        self._init_selection(HEAD_INDEX_KEY, "heads", selected, teacher_num_heads, record_head_index)
        self.selected_heads, self.teacher_num_heads = selected, teacher_num_heads
        self.num_heads = len(selected)
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

    @property
    def record_head_index(self) -> bool:
        return self.record_selection

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
        for tap in taps.attn_taps_at(block_index) if taps is not None else ():
            rows = taps.sample_queries(tap, n, x.device)
            taps.attn_logits[tap] = (q[:, :, rows] * self.scale) @ k.transpose(-2, -1)
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
    """Pre-norm transformer block; window attention when ``window_size > 0`` (padded keys not masked).

    ``mlp_hidden`` is the teacher's SwiGLU width; ``selected_channels`` the hidden channels kept (all by default).
    """

    def __init__(self, dim: int, head_dim: int, selected_heads: Sequence[int], mlp_hidden: int,
                 rope: RotaryEmbedding2D, window_size: int = 0, qkv_bias: bool = True, subln: bool = False,
                 drop_path_rate: float = 0.0, attn_impl: str = "sdpa", eps: float = 1e-6,
                 record_head_index: bool = True, teacher_num_heads: Optional[int] = None,
                 selected_channels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = HeadPrunedAttention(dim, head_dim, selected_heads, rope, qkv_bias=qkv_bias, subln=subln,
                                        attn_impl=attn_impl, record_head_index=record_head_index,
                                        teacher_num_heads=teacher_num_heads)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, eps=eps, selected_channels=selected_channels,
                          record_channel_index=record_head_index)

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
class EVAViTStudent(RecordedSelection):
    """ORION's EVA-02 ViT backbone keeping a chosen subset of the teacher's blocks, heads and SwiGLU channels.

    Args match ORION's ``EVAViT`` (same meaning and defaults; ``depth`` is the TEACHER's block count) plus:
        selected_blocks: sorted teacher block indices kept (default: all). Per-block arguments below keep
            one entry per teacher block; the entries of removed blocks are ignored (``[]`` / 0 is fine).
        num_heads: heads kept, one int for all blocks or one per block.
        teacher_num_heads: heads of the unpruned model; ``head_dim = embed_dim // teacher_num_heads``.
        selected_heads_per_layer: sorted teacher head indices kept per block (default: the first ones).
        mlp_hidden: SwiGLU hidden channels kept, one int or one per block (default: all of the teacher's
            ``int(embed_dim * mlp_ratio)``, which ``mlp_ratio`` keeps meaning).
        selected_channels_per_layer: sorted teacher hidden-channel indices kept per block (default: the first).
        attn_impl: ``'sdpa'`` (fused ``scaled_dot_product_attention``) or ``'math'`` (explicit softmax);
            default: from ``flash_attn``.
        norm_eps: eps of the block LayerNorms (default 1e-6); ``norm_layer`` may say it instead.
    ORION's own arguments: ``flash_attn`` maps to ``attn_impl`` when that is not given (True, ORION's
    default and its configs' setting: ``'sdpa'``, the fused path; False: ``'math'``, ORION's explicit
    softmax; both paths compute the same);
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
                 intp_freq: bool = True, subln: bool = False, flash_attn: bool = True, with_cp: bool = False,
                 frozen: bool = False, teacher_num_heads: Optional[int] = 16,
                 selected_heads_per_layer: Optional[Sequence[Sequence[int]]] = None,
                 mlp_hidden: Optional[Union[int, Sequence[int]]] = None,
                 selected_channels_per_layer: Optional[Sequence[Sequence[int]]] = None, attn_impl: Optional[str] = None,
                 norm_eps: Optional[float] = None, init_cfg: Optional[dict] = None,
                 selected_blocks: Optional[Sequence[int]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, act_layer: Any = None,
                 use_rel_pos: bool = False, rope: bool = True, residual_block_indexes: Sequence[int] = (),
                 out_feature: str = "last_feat", **unknown: Any) -> None:
        super().__init__()
        check_orion_only_arguments(use_rel_pos, rope, residual_block_indexes, out_feature, unknown)
        eps = layer_norm_eps(norm_layer, norm_eps)
        attn_impl = attn_impl if attn_impl is not None else ("sdpa" if flash_attn else "math")
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
        self.with_cp, self.frozen, self.flash_attn, self.attn_impl = with_cp, frozen, flash_attn, attn_impl
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.window_block_indexes = tuple(int(i) for i in window_block_indexes)
        self.init_cfg = init_cfg
        self._out_features = [out_feature]  # ORION's (detectron2-style) output description
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        self.teacher_mlp_hidden = int(embed_dim * mlp_ratio)
        kept = resolve_block_selection(depth, selected_blocks)
        self._init_selection(KEPT_BLOCKS_KEY, "blocks", kept, depth, self._records_selection_index())
        heads = resolve_head_selection(depth, teacher_num_heads, num_heads, selected_heads_per_layer, kept)
        channels = resolve_channel_selection(depth, self.teacher_mlp_hidden, mlp_hidden, selected_channels_per_layer,
                                             kept)

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

        self.blocks = self._build_blocks(heads, channels, window_size, global_window_size,
                                         dict(qkv_bias=qkv_bias, subln=subln, attn_impl=attn_impl, eps=eps),
                                         drop_path_rate)
        self._active_taps: Optional[BackboneTaps] = None
        self.init_weights()
        if frozen:
            self._freeze()

    # ---------------------------------------------------------------- construction

    def _build_blocks(self, heads: Sequence[Sequence[int]], channels: Sequence[Sequence[int]], window_size: int,
                      global_window_size: int, block_kwargs: Dict[str, Any], drop_path_rate: float) -> nn.ModuleList:
        """The kept blocks with their kept heads and channels; each takes its teacher block's window/global kind,
        rotary table and drop-path rate (rates grow linearly over the teacher's blocks, as torch.linspace)."""
        rates = [drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        blocks = []
        for i in self.kept_blocks:
            windowed = i in self.window_block_indexes
            if windowed and self.rope_win is None:
                raise ValueError(f"block {i} is a window block but window_size is {window_size}")
            blocks.append(EVABlock(
                self.embed_dim, self.head_dim, heads[i], self.teacher_mlp_hidden,
                rope=self.rope_win if windowed else self.rope_glb,
                window_size=window_size if windowed else global_window_size, drop_path_rate=rates[i],
                record_head_index=self._records_selection_index(), teacher_num_heads=self.teacher_num_heads,
                selected_channels=channels[i], **block_kwargs))
        return nn.ModuleList(blocks)

    def _records_selection_index(self) -> bool:
        """Whether the state dict records the selections: ``head_index`` / ``channel_index`` per block and the
        root's ``kept_blocks`` (the teacher alias does not: ORION's keys)."""
        return True

    @property
    def kept_blocks(self) -> Tuple[int, ...]:
        """Teacher indices of the blocks held, in order (``blocks[j]`` is teacher block ``kept_blocks[j]``)."""
        return tuple(self.selection)

    @property
    def num_blocks(self) -> int:
        """Number of blocks held (``len(blocks)``; ``depth`` stays the teacher's)."""
        return len(self.selection)

    @property
    def prunes_blocks(self) -> bool:
        """Whether some teacher blocks are removed."""
        return self.num_blocks != self.depth

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
        """Teacher head indices kept by each kept block (the head map used for distillation)."""
        return [list(block.attn.selected_heads) for block in self.blocks]

    @property
    def num_heads_per_layer(self) -> List[int]:
        return [block.attn.num_heads for block in self.blocks]

    @property
    def selected_channels(self) -> List[List[int]]:
        """Teacher SwiGLU hidden-channel indices kept by each block."""
        return [block.mlp.selected_channels for block in self.blocks]

    @property
    def mlp_hidden_per_layer(self) -> List[int]:
        return [block.mlp.hidden for block in self.blocks]

    @property
    def prunes_channels(self) -> bool:
        """Whether any block keeps fewer SwiGLU channels than the teacher."""
        return any(hidden != self.teacher_mlp_hidden for hidden in self.mlp_hidden_per_layer)

    def analytic_macs(self, img_hw: Optional[Tuple[int, int]] = None) -> int:
        """Multiply-accumulates of one image's forward (see :func:`analytic_backbone_macs`)."""
        img_hw = img_hw or (self.img_size, self.img_size)
        return analytic_backbone_macs(
            img_hw, self.patch_size, self.patch_embed.proj.in_channels, self.embed_dim,
            self.mlp_hidden_per_layer, self.head_dim, self.num_heads_per_layer,
            [block.window_size for block in self.blocks])

    # ---------------------------------------------------------------- forward

    def _block_masks(self, head_mask: HeadMask) -> List[Optional[torch.Tensor]]:
        """One mask row per KEPT block, indexed by kept head: entry ``j`` scales head ``selected_heads[l][j]``."""
        if head_mask is None:
            return [None] * self.num_blocks
        if len(head_mask) != self.num_blocks:
            raise ValueError(f"head_mask: expected {self.num_blocks} rows (one per kept block, teacher blocks "
                             f"{list(self.kept_blocks)}), got {len(head_mask)}")
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
        ``head_mask``: ``[num_blocks, heads]`` or one row per kept block, indexed by kept head (see
        :meth:`_block_masks`); it multiplies each head's output before ``inner_attn_ln``/``proj``.
        """
        taps = self._active_taps
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        if self.pos_embed is not None:
            x = x + resize_abs_pos_embed(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        masks = self._block_masks(head_mask)
        for i, (block, teacher_index) in enumerate(zip(self.blocks, self.kept_blocks)):
            tapped_attn = taps is not None and bool(taps.attn_taps_at(teacher_index))
            if self.with_cp and self.training and torch.is_grad_enabled() and not tapped_attn:
                x = checkpoint(block, x, masks[i], None, teacher_index, use_reentrant=False)
            else:
                x = block(x, masks[i], taps, teacher_index)
            for tap in taps.hidden_taps_at(teacher_index) if taps is not None else ():
                taps.hidden_states[tap] = x
        features = [x.permute(0, 3, 1, 2).contiguous()]
        if taps is not None:
            taps.features = features
        return features

    @contextlib.contextmanager
    def tapping(self, hidden_blocks: Sequence[int] = (), attn_blocks: Sequence[int] = (),
                num_query_samples: int = 64, query_index: Optional[Mapping[int, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None,
                block_map: Optional[Mapping[int, int]] = None) -> Iterator[BackboneTaps]:
        """Make every ``forward`` inside the block record distillation taps into the yielded object.

        Blocks are TEACHER indices in ``[0, depth)``; ``block_map`` ({teacher block: kept teacher block})
        overrides :func:`default_block_map` (``eva_taps.resolve_block_maps``). Attention taps of removed
        blocks that no ``block_map`` entry names are dropped (``taps.attn_blocks`` lists those recorded).
        """
        for name, blocks in (("hidden_blocks", hidden_blocks), ("attn_blocks", attn_blocks)):
            bad = [b for b in blocks if not 0 <= b < self.depth]
            if bad:
                raise ValueError(f"{name}: expected teacher block indices in [0, {self.depth}), got {bad}")
        hidden_map, attn_map = resolve_block_maps(self.depth, self.kept_blocks, self.window_block_indexes, block_map)
        heads = dict(zip(self.kept_blocks, self.selected_heads))
        taps = BackboneTaps(hidden_blocks=tuple(hidden_blocks),
                            attn_blocks=tuple(b for b in attn_blocks if b in attn_map),
                            num_query_samples=num_query_samples, generator=generator,
                            query_index=dict(query_index or {}), block_map=hidden_map, attn_map=attn_map,
                            head_map=[list(heads[attn_map.get(t, hidden_map[t])]) for t in range(self.depth)])
        previous, self._active_taps = self._active_taps, taps
        try:
            yield taps
        finally:
            self._active_taps = previous

    def forward_with_taps(self, x: torch.Tensor, hidden_blocks: Sequence[int] = (),
                          attn_blocks: Sequence[int] = (), num_query_samples: int = 64,
                          query_index: Optional[Mapping[int, torch.Tensor]] = None,
                          generator: Optional[torch.Generator] = None, head_mask: HeadMask = None,
                          block_map: Optional[Mapping[int, int]] = None) -> BackboneTaps:
        """One forward that also returns hidden states and sampled attention logits (see :meth:`tapping`)."""
        with self.tapping(hidden_blocks, attn_blocks, num_query_samples, query_index, generator, block_map) as taps:
            self.forward(x, head_mask=head_mask)
        return taps

    # ---------------------------------------------------------------- loading

    def load_from_teacher(self, source: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
        """Fill every tensor from an unpruned teacher backbone, cutting the kept heads and channels (``eva_surgery``).

        Block ``j`` comes from teacher block ``kept_blocks[j]``. ``source``: a backbone state dict, a full
        ORION/mmcv checkpoint dict, or a path to one. Anything missing, unexpected or mis-shaped raises
        ``ValueError`` naming the key. Returns a report: ``{'source', 'copied', 'sliced', 'teacher_num_heads',
        'teacher_mlp_hidden', 'kept_blocks'}``.
        """
        label = str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
        teacher = extract_backbone_state_dict(source)
        if KEPT_BLOCKS_KEY in teacher and teacher[KEPT_BLOCKS_KEY].tolist() != list(range(self.depth)):
            raise ValueError(f"{label}: {KEPT_BLOCKS_KEY} says this source keeps only blocks "
                             f"{teacher[KEPT_BLOCKS_KEY].tolist()}; load_from_teacher needs the unpruned backbone")
        found = teacher_block_count(teacher)
        if found != self.depth:
            raise ValueError(f"{label}: the teacher backbone has {found} blocks, expected depth {self.depth} (the "
                             f"teacher's depth; the student keeps blocks {list(self.kept_blocks)})")
        teacher = select_teacher_blocks(teacher, self.kept_blocks)
        own = self.state_dict()
        expected_keys = [k for k in own if not is_selection_index_key(k)]
        teacher_keys = {k for k in teacher if not is_selection_index_key(k)}
        missing = [k for k in expected_keys if k not in teacher_keys]
        unexpected = sorted(teacher_keys - set(expected_keys))
        if missing or unexpected:
            parts = ([f"missing {len(missing)} key(s), e.g. {missing[:4]}"] if missing else []) + \
                    ([f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:4]}"] if unexpected else [])
            raise ValueError(f"{label}: teacher backbone does not match this EVAViTStudent "
                             f"(depth {self.depth}, embed_dim {self.embed_dim}): " + "; ".join(parts))
        full = {HEAD_INDEX_SUFFIX: list(range(self.teacher_num_heads)),
                CHANNEL_INDEX_SUFFIX: list(range(self.teacher_mlp_hidden))}
        for key, value in teacher.items():
            suffix = next((s for s in full if key.endswith("." + s)), None)
            if suffix is not None and value.tolist() != full[suffix]:
                unit = "heads" if suffix == HEAD_INDEX_SUFFIX else "hidden channels"
                raise ValueError(f"{label}: {key} says this source is already pruned to {len(value)} {unit}; "
                                 f"load_from_teacher needs the unpruned backbone")
        new_state = {key: teacher[key] for key in expected_keys}
        plans = pruning_slice_plan(self.selected_heads, self.head_dim, self.teacher_num_heads,
                                   self.selected_channels, self.teacher_mlp_hidden)
        sliced = apply_slice_plan(new_state, plans, label=label)
        for key in expected_keys:
            if tuple(new_state[key].shape) != tuple(own[key].shape):
                raise ValueError(f"{label}: {key}: expected shape {tuple(own[key].shape)}, "
                                 f"got {tuple(new_state[key].shape)}")
        new_state.update({key: value for key, value in own.items() if is_selection_index_key(key)})
        self.load_state_dict(new_state, strict=True)
        return dict(source=label, copied=len(expected_keys) - len(sliced), sliced=len(sliced),
                    teacher_num_heads=self.teacher_num_heads, teacher_mlp_hidden=self.teacher_mlp_hidden,
                    kept_blocks=list(self.kept_blocks))


__all__ = [
    "EVAViTStudent", "EVABlock", "HeadPrunedAttention", "layer_norm_eps", "check_orion_only_arguments",
    # re-exported from eva_taps
    "BackboneTaps", "default_block_map",
    # re-exported from eva_layers (their home before the split)
    "drop_path", "DropPath", "rotate_half", "RotaryEmbedding2D", "window_partition", "window_unpartition",
    "resize_abs_pos_embed", "PatchEmbed", "SwiGLU",
]
