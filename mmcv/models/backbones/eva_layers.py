"""Building blocks of ORION's EVA-02 backbone: rotary tables, windows, position resize, patch embedding,
and the SwiGLU MLP that may keep a subset of the teacher's hidden channels.

Used by :mod:`mmcv.models.backbones.eva_vit_student` (which re-exports them). A module that keeps a
subset of a teacher's units (attention heads, SwiGLU channels) records the kept indices in a buffer
and checks them on load (:class:`RecordedSelection`). Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.utils.eva_surgery import CHANNEL_INDEX_KEY, describe_indices

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



class PatchEmbed(nn.Module):
    """Non-overlapping patches (Conv2d, kernel = stride = patch size) to a [B, H, W, C] grid."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)



# --------------------------------------------------------------------------- kept-unit records


class SelectionMismatchError(RuntimeError):
    """A checkpoint holds other teacher units than the module it is loaded into (one line, naming the key)."""


class RecordedSelection(nn.Module):
    """A module holding a sorted subset of a teacher's units, recorded in the buffer ``index_key``.

    On load, a recorded index that differs from this module's selection raises
    :class:`SelectionMismatchError` naming the key and both selections, and so does a pruned
    module's tensors without their index (they could hold any units). It raises rather than
    appending to ``error_msgs`` because non-strict loaders (mmcv's ``load_checkpoint``, which
    ORION's test.py and ``load_from`` use) only print those. An absent index is forgiven only when
    the module keeps every teacher unit (ORION's own checkpoints carry no index) or when the
    checkpoint holds none of the module's tensors (a partial load leaves it as it is).
    """

    def _init_selection(self, index_key: str, unit: str, selected: Sequence[int], teacher_units: int,
                        record: bool) -> None:
        self.selection_index_key, self.selection_unit = index_key, unit
        self.selection = [int(i) for i in selected]
        self.teacher_units = int(teacher_units)
        self.record_selection = bool(record)
        if record:  # set directly: the buffer may share its name with a read-only property (a backbone's kept_blocks)
            self._buffers[index_key] = torch.tensor(self.selection, dtype=torch.long)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        key = prefix + self.selection_index_key
        unpruned = self.selection == list(range(self.teacher_units))
        if self.record_selection and key in state_dict:
            stored = [int(i) for i in state_dict[key].tolist()]
            if stored != self.selection:
                raise SelectionMismatchError(
                    f"{key}: checkpoint keeps teacher {self.selection_unit} {describe_indices(stored)}, this model "
                    f"keeps {describe_indices(self.selection)}; build the model with the checkpoint's selection "
                    f"(its meta['img_backbone']; the exported *_infer.py config does)")
        elif self.record_selection and not unpruned and any(k.startswith(prefix) for k in state_dict):
            raise SelectionMismatchError(
                f"{key}: the checkpoint holds {prefix}* tensors without {key}, so which teacher "
                f"{self.selection_unit} they are is unknown; this model keeps {describe_indices(self.selection)}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.record_selection and key not in state_dict and key in missing_keys and unpruned:
            missing_keys.remove(key)


class SwiGLU(RecordedSelection):
    """EVA-02's MLP ``w3(ffn_ln(silu(w1 x) * w2 x))`` keeping a subset of the teacher's hidden channels.

    ``selected_channels``: sorted teacher channel indices kept (default: all ``teacher_hidden``); ``w1``,
    ``w2`` and ``ffn_ln`` hold the kept channels, ``w3`` their columns. ``ffn_ln`` normalises over the
    kept channels only, so a pruned MLP is not the teacher with the other channels masked to zero.
    ``record_channel_index`` stores the selection as ``channel_index``.
    """

    def __init__(self, dim: int, teacher_hidden: int, eps: float = 1e-6,
                 selected_channels: Optional[Sequence[int]] = None, record_channel_index: bool = True) -> None:
        super().__init__()
        selected = list(range(teacher_hidden)) if selected_channels is None else list(selected_channels)
        self._init_selection(CHANNEL_INDEX_KEY, "channels", selected, teacher_hidden, record_channel_index)
        hidden = len(selected)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    @property
    def selected_channels(self) -> List[int]:
        return list(self.selection)

    @property
    def hidden(self) -> int:
        return len(self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


__all__ = [
    "drop_path", "DropPath", "rotate_half", "RotaryEmbedding2D", "window_partition", "window_unpartition",
    "resize_abs_pos_embed", "PatchEmbed", "RecordedSelection", "SelectionMismatchError", "SwiGLU",
]
