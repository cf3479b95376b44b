"""Analytic cost of ORION's EVA-02 backbone: multiply-accumulates per image, block by block, unit by unit.

Used for the speedup ceiling of a pruning configuration (impact analysis, benchmarks, the demo) and
for pricing heads and SwiGLU channels in cost-aware allocation. The cost of a block is linear in its
kept heads and hidden channels (:func:`block_unit_macs`), so per-block lists of both are the input.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union


def block_unit_macs(img_hw: Tuple[int, int], patch_size: int, embed_dim: int, head_dim: int,
                    window: int) -> Tuple[int, int]:
    """Multiply-accumulates of ONE attention head and of ONE SwiGLU hidden channel in a block, per image.

    A head: its q, k, v rows and ``proj`` columns on every token the block runs (window blocks run
    the zero-padded grid: the padding is real work), ``4 * tokens * embed_dim * head_dim``, plus its
    ``q k^T`` and ``attn v``, ``2 * tokens * seq * head_dim`` (``seq``: window or whole grid). A channel:
    its ``w1``/``w2`` rows and ``w3`` column on the unpadded grid, ``3 * tokens * embed_dim``.
    """
    gh, gw = img_hw[0] // patch_size, img_hw[1] // patch_size
    if window > 0:
        hp, wp = -(-gh // window) * window, -(-gw // window) * window
        tokens, seq = hp * wp, window * window
    else:
        tokens, seq = gh * gw, gh * gw
    head = tokens * embed_dim * head_dim * 4 + tokens * seq * head_dim * 2
    return head, gh * gw * embed_dim * 3


def analytic_backbone_macs(img_hw: Tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                           mlp_hidden: Union[int, Sequence[int]], head_dim: int, heads_per_block: Sequence[int],
                           window_per_block: Sequence[int]) -> int:
    """Multiply-accumulates of one image through the backbone (matmuls and the patch conv only).

    ``mlp_hidden``: hidden channels of every block (one int) or kept per block. Per block,
    ``heads * head_cost + hidden * channel_cost`` (:func:`block_unit_macs`). Norms, rope and softmax
    are ignored (a few per cent of the total).
    """
    gh, gw = img_hw[0] // patch_size, img_hw[1] // patch_size
    hidden = [mlp_hidden] * len(heads_per_block) if isinstance(mlp_hidden, int) else list(mlp_hidden)
    if len(hidden) != len(heads_per_block) or len(window_per_block) != len(heads_per_block):
        raise ValueError(f"analytic_backbone_macs: expected one head count, MLP width and window per block, got "
                         f"{len(heads_per_block)}, {len(hidden)} and {len(window_per_block)}")
    total = gh * gw * embed_dim * in_chans * patch_size * patch_size
    for heads, channels, window in zip(heads_per_block, hidden, window_per_block):
        head_cost, channel_cost = block_unit_macs(img_hw, patch_size, embed_dim, head_dim, window)
        total += heads * head_cost + channels * channel_cost
    return total


__all__ = ["block_unit_macs", "analytic_backbone_macs"]
