"""Analytic cost of ORION's EVA-02 backbone: multiply-accumulates per image, block by block.

Used for the speedup ceiling of a pruning configuration (impact analysis, benchmarks, the demo).
A per-block list of kept heads is the input, so a per-block MLP width can join it the same way.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from typing import Sequence, Tuple


def analytic_backbone_macs(img_hw: Tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                           mlp_hidden: int, head_dim: int, heads_per_block: Sequence[int],
                           window_per_block: Sequence[int]) -> int:
    """Multiply-accumulates of one image through the backbone (matmuls and the patch conv only).

    q/k/v and ``proj`` run on the zero-padded token grid in window blocks (the padding is real
    work), attention costs ``2 * seq * seq * heads * head_dim`` per sequence, the MLP runs on the
    unpadded grid. Norms, rope and softmax are ignored (a few per cent of the total).
    """
    gh, gw = img_hw[0] // patch_size, img_hw[1] // patch_size
    total = gh * gw * embed_dim * in_chans * patch_size * patch_size
    for heads, window in zip(heads_per_block, window_per_block):
        inner = heads * head_dim
        if window > 0:
            hp, wp = -(-gh // window) * window, -(-gw // window) * window
            tokens, seq = hp * wp, window * window
        else:
            tokens, seq = gh * gw, gh * gw
        total += tokens * embed_dim * inner * 4  # q, k, v and proj
        total += tokens * seq * inner * 2  # q k^T and attn v
        total += gh * gw * embed_dim * mlp_hidden * 3  # w1, w2, w3
    return total


__all__ = ["analytic_backbone_macs"]
