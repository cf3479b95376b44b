"""Distillation taps of an EVA-02 backbone, keyed by TEACHER block index, and the student -> teacher block map.

A depth-pruned student holds only some of the teacher's blocks. Taps are asked for by teacher block
``t`` (``0 <= t < depth``, the teacher's depth) and recorded as follows:

- hidden state of ``t``: the output of the student's kept block ``block_map[t]``;
- attention logits of ``t``: the logits of kept block ``block_map[t]``, but only when ``t`` is kept
  (it is then its own block) or an explicit ``block_map`` names it; the attention taps of removed
  teacher blocks are otherwise dropped. An attention pair of a window block and a global block is
  refused (their logits have other shapes and meanings).

The default map (:func:`default_block_map`) sends a kept block to itself and a removed block ``t``
to the last kept block before it (the block whose output the student carries on where the teacher
would have run ``t``), or to the first kept block when none comes before. With every block kept the
map is the identity and the taps are the teacher's.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch


def default_block_map(depth: int, kept_blocks: Sequence[int]) -> Dict[int, int]:
    """Teacher block -> the kept teacher block whose output stands for it (see the module docstring)."""
    kept = sorted(int(b) for b in kept_blocks)
    if not kept:
        raise ValueError("default_block_map: at least one block must be kept")
    mapping: Dict[int, int] = {}
    for t in range(int(depth)):
        before = [b for b in kept if b <= t]
        mapping[t] = before[-1] if before else kept[0]
    return mapping


def _check_map_entries(block_map: Mapping[Any, Any], depth: int, kept: Sequence[int]) -> Dict[int, int]:
    """``block_map`` as ``{int: int}`` with keys in ``[0, depth)`` and values among the kept blocks."""
    if not isinstance(block_map, Mapping):
        raise ValueError(f"block_map: expected a dict {{teacher_block: kept_teacher_block}}, got "
                         f"{type(block_map).__name__}")
    cleaned: Dict[int, int] = {}
    for key, value in block_map.items():
        for what, item in (("teacher block", key), ("kept block", value)):
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"block_map: expected integer block indices, got {what} {item!r}")
        if not 0 <= int(key) < depth:
            raise ValueError(f"block_map: teacher block {key} out of range [0, {depth})")
        if int(value) not in kept:
            raise ValueError(f"block_map[{key}]: expected one of the kept blocks {list(kept)}, got {value}")
        cleaned[int(key)] = int(value)
    return cleaned


def resolve_block_maps(depth: int, kept_blocks: Sequence[int], window_blocks: Sequence[int],
                       block_map: Optional[Mapping[Any, Any]] = None) -> Tuple[Dict[int, int], Dict[int, int]]:
    """``(hidden_map, attn_map)``: which kept block records each teacher block's hidden state and attention.

    ``hidden_map`` covers every teacher block (the default map, overridden by ``block_map``); ``attn_map``
    covers the kept blocks (themselves) and the explicit ``block_map`` entries. An explicit pair of a
    window and a global block is refused.
    """
    kept = sorted(int(b) for b in kept_blocks)
    explicit = _check_map_entries(block_map or {}, depth, kept)
    windows = {int(b) for b in window_blocks}
    for t, s in explicit.items():
        if (t in windows) != (s in windows):
            kinds = ["window" if b in windows else "global" for b in (t, s)]
            raise ValueError(f"block_map[{t}] = {s}: teacher block {t} is a {kinds[0]} block, block {s} a "
                             f"{kinds[1]} block; their attention cannot be paired (map {t} to a kept {kinds[0]} "
                             f"block)")
    hidden_map = default_block_map(depth, kept)
    hidden_map.update(explicit)
    attn_map = {b: b for b in kept}
    attn_map.update(explicit)
    return hidden_map, attn_map


@dataclass
class BackboneTaps:
    """Intermediate values recorded for distillation (mmrazor-style recorder output), keyed by teacher block.

    ``hidden_states[t]``: output of teacher block ``t`` (for a student: of its kept block
    ``block_map[t]``), [B, Hp, Wp, C].
    ``attn_logits[t]``: pre-softmax logits (rope applied, scaled) of the sampled query rows,
    [B', heads, Q, K] (B' = B * windows for window blocks, K includes padded keys).
    ``query_index[t]``: the sampled positions within the attention sequence, [Q].
    ``head_map[t]``: teacher head index of each head recorded for teacher block ``t`` (one entry per
    teacher block). ``attn_blocks`` are the attention taps really recorded (those asked for, less the
    removed blocks that the map drops).
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
    block_map: Dict[int, int] = field(default_factory=dict)
    attn_map: Dict[int, int] = field(default_factory=dict)

    def hidden_taps_at(self, block: int) -> List[int]:
        """The teacher blocks whose hidden state is the output of kept teacher block ``block``."""
        return [t for t in self.hidden_blocks if self.block_map.get(t, t) == block]

    def attn_taps_at(self, block: int) -> List[int]:
        """The teacher blocks whose attention logits come from kept teacher block ``block``."""
        return [t for t in self.attn_blocks if self.attn_map.get(t, t) == block]

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


__all__ = ["BackboneTaps", "default_block_map", "resolve_block_maps"]
