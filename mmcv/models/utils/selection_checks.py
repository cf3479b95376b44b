"""Per-block unit selections (attention heads, SwiGLU channels): the checks and the rounding policy.

The pruning ratio is the fraction of units REMOVED and every block keeps ``round(units * (1 - ratio))``,
half up (:func:`kept_per_block`). A selection keeps one entry per TEACHER block; with a block
selection (``selected_blocks``) the entries of the removed blocks are ignored and normalised to ``[]``.
Used by :mod:`mmcv.models.utils.pruning_config` (which re-exports the public names) and the backbone.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from mmcv.models.utils.eva_surgery import describe_indices, resolve_block_selection

Selection = List[List[int]]


class UnitKind(NamedTuple):
    """Names used in messages and arguments for one kind of prunable unit."""

    singular: str
    count_arg: str
    selection_arg: str
    full_arg: str
    ratio_arg: str


HEADS = UnitKind("head", "num_heads", "selected_heads_per_layer", "teacher_num_heads", "pruning_ratio")
CHANNELS = UnitKind("channel", "mlp_hidden", "selected_channels_per_layer", "the teacher's MLP width",
                    "mlp_pruning_ratio")


# --------------------------------------------------------------------------- ratio and counts


def check_pruning_ratio(pruning_ratio: Any, name: str = "pruning_ratio", unit: str = "heads") -> float:
    """``pruning_ratio`` as a float in [0, 1) (the fraction REMOVED), or ``ValueError``."""
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, (int, float)) or \
            not math.isfinite(float(pruning_ratio)) or not 0.0 <= float(pruning_ratio) < 1.0:
        raise ValueError(f"{name}: expected the fraction of {unit} REMOVED in [0, 1) (0.5 keeps half), "
                         f"got {pruning_ratio!r}")
    return float(pruning_ratio)


def kept_per_block(units: int, pruning_ratio: float) -> int:
    """THE rounding policy: ``round(units * (1 - pruning_ratio))``, half up (8 of 16 for 0.5, 11 for 0.3)."""
    return int(math.floor(units * (1.0 - pruning_ratio) + 0.5 + 1e-9))


def _kept_count_message(ratio: float, keep: int, units: int, depth: int, kept: int, kind: UnitKind) -> str:
    """Why a selection does not match ``ratio``; names the other reading of the ratio only when it fits."""
    message = (f"{kind.ratio_arg} {ratio:g} is the fraction of {kind.singular}s REMOVED: it keeps {keep} of {units} "
               f"{kind.singular}s per block ({depth * keep} in total), but the selection keeps {kept} "
               f"({kept / depth:g} per block on average)")
    if ratio > 0 and kept == depth * kept_per_block(units, 1.0 - ratio):
        message += (f"; that is {kind.ratio_arg} {1 - ratio:g} in this code base ({ratio:g} would be the kept "
                    f"fraction, the other reading)")
    else:
        message += (f"; fix: keep {keep} {kind.singular}s per block ({kind.count_arg}), or set {kind.ratio_arg} "
                    f"to {1 - kept / (depth * units):.4g}, the fraction this selection removes")
    return message


def _removed(depth: int, selected_blocks: Optional[Sequence[int]]) -> set:
    """The teacher blocks a depth-pruned selection removes (their per-block entries are ignored)."""
    return set() if selected_blocks is None else set(range(depth)) - {int(b) for b in selected_blocks}


def _unit_counts(depth: int, full: int, counts: Union[int, Sequence[int]], kind: UnitKind,
                 removed: frozenset = frozenset()) -> List[int]:
    if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
        result = [int(counts)] * depth
    else:
        result = list(counts) if isinstance(counts, Sequence) and not isinstance(counts, str) else [counts]
        if any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) for n in result):
            raise ValueError(f"{kind.count_arg}: expected an int or one int per block, got {counts!r}")
        if len(result) != depth:
            raise ValueError(f"{kind.count_arg}: expected one count per block ({depth}), got {len(result)}")
        result = [int(n) for n in result]
    for layer, count in enumerate(result):
        if layer not in removed and not 1 <= count <= full:
            raise ValueError(f"{kind.count_arg}[{layer}]: expected 1..{full} ({kind.full_arg}), got {count}")
    return result


def _resolve_selection(depth: int, full: int, counts: Union[int, Sequence[int]],
                       selection: Optional[Sequence[Sequence[int]]], kind: UnitKind,
                       selected_blocks: Optional[Sequence[int]] = None) -> Selection:
    """Check counts (int or one per block) against a selection; without one each block keeps its first units.

    One entry per teacher block; the entries of blocks outside ``selected_blocks`` are ignored and come back ``[]``.
    """
    removed = frozenset(_removed(depth, selected_blocks))
    counts = _unit_counts(depth, full, counts, kind, removed)
    if selection is None:
        return [[] if layer in removed else list(range(count)) for layer, count in enumerate(counts)]
    selection = [list(units) for units in selection]
    if len(selection) != depth:
        raise ValueError(f"{kind.selection_arg}: expected {depth} blocks, got {len(selection)}")
    for layer, units in enumerate(selection):
        if layer in removed:
            selection[layer] = []
            continue
        prefix = f"{kind.selection_arg}[{layer}]"
        shown = describe_indices(units)
        if not units:
            raise ValueError(f"{prefix}: at least one {kind.singular} must be kept, got []")
        if any(not isinstance(u, int) or isinstance(u, bool) for u in units):
            raise ValueError(f"{prefix}: expected integers, got {shown}")
        if any(u < 0 or u >= full for u in units):
            raise ValueError(f"{prefix}: expected indices in [0, {full}), got {shown}")
        if len(set(units)) != len(units):
            raise ValueError(f"{prefix}: duplicate {kind.singular} indices in {shown}")
        if units != sorted(units):
            raise ValueError(f"{prefix}: expected sorted indices, got {shown}")
        if len(units) != counts[layer]:
            raise ValueError(f"{prefix} keeps {len(units)} {kind.singular}s but {kind.count_arg} says {counts[layer]}")
    return selection


def resolve_head_selection(depth: int, teacher_num_heads: int, num_heads: Union[int, Sequence[int]],
                           selected_heads_per_layer: Optional[Sequence[Sequence[int]]],
                           selected_blocks: Optional[Sequence[int]] = None) -> Selection:
    """Check ``num_heads`` (int or one per block) against a selection; return one sorted list per block.

    Without a selection each block keeps its first ``num_heads`` heads. ``depth`` entries (teacher
    blocks); with ``selected_blocks`` the removed blocks' entries are ignored (returned as ``[]``).
    """
    return _resolve_selection(depth, teacher_num_heads, num_heads, selected_heads_per_layer, HEADS, selected_blocks)


def resolve_channel_selection(depth: int, teacher_hidden: int, mlp_hidden: Union[int, Sequence[int], None],
                              selected_channels_per_layer: Optional[Sequence[Sequence[int]]],
                              selected_blocks: Optional[Sequence[int]] = None) -> Selection:
    """As :func:`resolve_head_selection` for SwiGLU hidden channels; ``mlp_hidden=None`` keeps every channel."""
    counts = teacher_hidden if mlp_hidden is None else mlp_hidden
    return _resolve_selection(depth, teacher_hidden, counts, selected_channels_per_layer, CHANNELS, selected_blocks)


def _clean_selection(selection: Any, depth: int, kind: UnitKind) -> Selection:
    if isinstance(selection, (str, bytes)) or not isinstance(selection, Sequence):
        raise ValueError(f"{kind.selection_arg}: expected one list of {kind.singular} indices per block, "
                         f"got {type(selection).__name__}")
    if len(selection) != depth:
        raise ValueError(f"{kind.selection_arg}: expected {depth} blocks, got {len(selection)}")
    cleaned = []
    for layer, units in enumerate(selection):
        if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
            raise ValueError(f"{kind.selection_arg}[{layer}]: expected a list of {kind.singular} indices, got {units!r}")
        if any(isinstance(u, bool) or not isinstance(u, (int, np.integer)) for u in units):
            raise ValueError(f"{kind.selection_arg}[{layer}]: expected integers, got {describe_indices(units)}")
        cleaned.append([int(u) for u in units])
    return cleaned


def validate_unit_selection(selection: Any, depth: int, full: int, counts: Optional[Union[int, Sequence[int]]],
                            ratio: Optional[float], kind: UnitKind, selected_blocks: Optional[Sequence[int]]
                            ) -> Selection:
    """A selection of ``kind`` checked against ``counts`` and ``ratio`` (counted over the kept blocks only)."""
    for name, value in (("depth", depth), (kind.full_arg, full)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    cleaned = _clean_selection(selection, depth, kind)
    if selected_blocks is not None:
        selected_blocks = resolve_block_selection(depth, selected_blocks)
    if counts is None:
        counts = [min(max(len(u), 1), full) for u in cleaned]
    result = _resolve_selection(depth, full, counts, cleaned, kind, selected_blocks)
    if ratio is not None:
        ratio = check_pruning_ratio(ratio, kind.ratio_arg, kind.singular + "s")
        blocks = depth if selected_blocks is None else len(selected_blocks)
        keep, kept = kept_per_block(full, ratio), sum(len(u) for u in result)
        if kept != blocks * keep:
            raise ValueError(_kept_count_message(ratio, keep, full, blocks, kept, kind))
    return result


__all__ = ["Selection", "UnitKind", "HEADS", "CHANNELS", "check_pruning_ratio", "kept_per_block",
           "resolve_head_selection", "resolve_channel_selection", "validate_unit_selection"]
