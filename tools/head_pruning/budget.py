"""Prune to a budget: the heads, SwiGLU channels and whole blocks that reach a target speedup.

The cost model (:class:`BlockCosts`): a kept block costs ``heads * head_cost + channels * channel_cost
+ overhead`` by block type (window or global), a removed block costs nothing, and the stem (patch
embedding) is paid once. The costs are analytic MACs (``pruning_cost.analytic_unit_costs``, overhead 0)
or latencies measured on the machine (``UnitCosts`` from ``tools/benchmark_backbone.py --unit-latency``,
with the per-block overhead that removing a whole block saves). The predicted speedup is the teacher's
cost over the student's.

The policy (:func:`prune_to_budget`):

- within an axis, units are ranked by importance per unit of cost: heads and channels by their
  block-normalised (L2) score per cost (``pruning_cost.allocate_by_cost``), every kept block keeping
  ``min_heads_per_layer`` heads and ``min_channels_per_layer`` channels; blocks are removed in the order
  of block score over the block's full cost (the least first), at most down to ``min_blocks`` kept, and a
  global-attention block only while more than ``min_global_blocks`` stay (past that floor the order skips
  global blocks: without any, no token attends across windows);
- the split of the budget across axes is a small search: ``d`` blocks removed (0 up to the floor) times a
  head budget of ``k`` heads per kept block on average (a grid of eighths of the teacher's heads, and the
  floor), and the channels spend what is left of the target cost (rounded to ``channel_multiple``). When
  channels are not an axis, the heads take what is left; when neither is, only ``d`` varies;
- each candidate whose predicted cost meets the target is scored, lower is better, by ``calibrate(config)``
  when given, else by ``1 - kept importance mass``: the product over the pruned axes of the fraction of that
  axis's importance kept (heads and channels: block-normalised scores of the kept blocks; blocks: the
  block scores, negatives counted as 0). Ties go to fewer removed blocks, then the larger head budget.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mmcv.models.utils.head_importance import ChannelImportance, HeadImportance
from mmcv.models.utils.pruning_config import PruningConfig, normalize_block_scores
from mmcv.models.utils.pruning_cost import UnitCosts, allocate_by_cost, analytic_unit_costs, round_to_multiple

AXES = ("heads", "channels", "blocks")
POLICY = ("budget: units ranked by importance per unit of cost within each axis; the split across axes searched "
          "over blocks removed x head budget, channels solved for the target; candidates scored by {}")
Selection = List[List[int]]


class UnreachableTargetError(ValueError):
    """A target speedup that no configuration the allowed axes and floors admit reaches."""

    def __init__(self, target: float, fastest: float, axes: Sequence[str], floors: str, cost_model: str) -> None:
        self.target, self.fastest_reachable = float(target), float(fastest)
        super().__init__(f"target speedup {target:g}x is out of reach: the fastest configuration the axes "
                         f"{'+'.join(axes)} allow ({floors}) is {fastest:.3f}x predicted ({cost_model})")


@dataclass
class BlockCosts:
    """The cost of every teacher block's parts: one head, one channel, the overhead; the stem; the unit."""

    head: List[float]
    channel: List[float]
    overhead: List[float]
    fixed: float
    unit: str
    source: str
    teacher_heads: int
    teacher_channels: int
    global_blocks: List[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.head)

    def block_cost(self, block: int, heads: int, channels: int) -> float:
        """A kept block with ``heads`` heads and ``channels`` channels."""
        return self.overhead[block] + heads * self.head[block] + channels * self.channel[block]

    def total(self, heads: Sequence[int], channels: Sequence[int], kept: Sequence[int]) -> float:
        """The backbone with ``kept`` blocks (teacher indices), ``heads[b]`` / ``channels[b]`` per teacher block."""
        return self.fixed + sum(self.block_cost(b, heads[b], channels[b]) for b in kept)

    def teacher_total(self) -> float:
        full = range(self.depth)
        return self.total([self.teacher_heads] * self.depth, [self.teacher_channels] * self.depth, full)

    def describe(self) -> str:
        overhead = " + block overhead" if any(self.overhead) else ""
        return f"{self.source}; {self.unit} of heads + channels{overhead} + stem, a removed block costs 0"


def block_costs(geometry: Optional[Mapping[str, Any]], unit_costs: Optional[UnitCosts], depth: int,
                teacher_heads: int, teacher_channels: int) -> Tuple[BlockCosts, UnitCosts]:
    """The cost model for ``depth`` blocks: ``unit_costs`` (measured) or analytic MACs from ``geometry``.

    Which blocks are window blocks comes from ``geometry['window_per_block']``, else from the unit
    costs' metadata; either must list ``depth`` blocks.
    """
    if unit_costs is None:
        if not isinstance(geometry, Mapping):
            raise ValueError("a budget needs a cost model: the backbone geometry (importance computed on the model "
                             "records it; or pass geometry= / --config) or unit_costs (a measured latency file)")
        unit_costs = analytic_unit_costs(geometry)
    windows = (geometry or {}).get("window_per_block") or unit_costs.metadata.get("window_per_block")
    if not windows or len(windows) != depth:
        raise ValueError(f"a budget needs the window/global kind of each of the {depth} blocks (geometry "
                         f"'window_per_block' or the unit costs' metadata), got {windows!r}")
    heads, channels = unit_costs.per_block(windows)
    costs = BlockCosts(head=heads, channel=channels, overhead=unit_costs.block_overheads(windows),
                       fixed=unit_costs.fixed, unit=unit_costs.unit, source=unit_costs.source or unit_costs.unit,
                       teacher_heads=teacher_heads, teacher_channels=teacher_channels,
                       global_blocks=[b for b, window in enumerate(windows) if not window > 0])
    return costs, unit_costs


def block_scores_of(block_importance: Any, depth: int) -> torch.Tensor:
    """One score per teacher block from a tensor / sequence ``[depth]`` or any object with ``.scores``."""
    scores = getattr(block_importance, "scores", block_importance)
    try:
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"block_importance: expected one score per block, got {type(scores).__name__}") from None
    if tuple(scores.shape) != (depth,) or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"block_importance: expected {depth} finite scores (one per teacher block), got shape "
                         f"{tuple(scores.shape)}")
    return scores


def removal_order(scores: torch.Tensor, costs: BlockCosts) -> List[int]:
    """Teacher blocks in the order the budget removes them: the least score per unit of full block cost first."""
    full = [costs.block_cost(b, costs.teacher_heads, costs.teacher_channels) for b in range(costs.depth)]
    return sorted(range(costs.depth), key=lambda b: (float(scores[b]) / full[b], b))


def floored_order(order: Sequence[int], global_blocks: Sequence[int], min_global_blocks: int) -> List[int]:
    """The blocks the budget may remove, in ``order``: a global block only while more than ``min_global_blocks``
    global blocks stay kept (the others are skipped, the next removable block goes instead)."""
    globals_left, removable = len(global_blocks), []
    for block in order:
        if block in global_blocks:
            if globals_left <= min_global_blocks:
                continue
            globals_left -= 1
        removable.append(block)
    return removable


def default_min_global_blocks(global_blocks: Sequence[int]) -> int:
    """Half the teacher's global-attention blocks, rounded up (ORION-L: 4 of 8)."""
    return -(-len(global_blocks) // 2)


class Floors(NamedTuple):
    """The per-block and whole-network floors (channels already rounded up to ``channel_multiple``)."""

    heads: int
    channels: int
    blocks: int
    channel_multiple: int
    global_blocks: int = 0

    def describe(self, axes: Sequence[str], depth: int, teacher_global: int = 0) -> str:
        parts = [f"{self.heads} head(s)" if "heads" in axes else "",
                 f"{self.channels} channels" if "channels" in axes else "",
                 f"{self.blocks} of {depth} blocks kept" if "blocks" in axes else "",
                 f"{self.global_blocks} of {teacher_global} global blocks kept" if "blocks" in axes and teacher_global
                 else ""]
        return "floors: " + ", ".join(p for p in parts if p) + (" per block" if "blocks" not in axes else "")


@dataclass
class _Problem:
    """Everything a candidate needs: normalised scores, costs, floors, axes and the target cost."""

    heads: torch.Tensor
    channels: Optional[torch.Tensor]
    blocks: Optional[torch.Tensor]
    costs: BlockCosts
    floors: Floors
    axes: Tuple[str, ...]
    target_cost: float
    order: List[int] = field(default_factory=list)


@dataclass
class Candidate:
    """One point of the search: the selection per teacher block ([] for a removed one) and its row."""

    removed: List[int]
    heads: Selection
    channels: Optional[Selection]
    row: Dict[str, Any]


def _fraction(scores: torch.Tensor, selection: Sequence[Sequence[int]], kept: Sequence[int]) -> float:
    """Fraction of the kept blocks' (normalised) score mass that ``selection`` keeps."""
    total = sum(float(scores[b].clamp_min(0).sum()) for b in kept)
    got = sum(float(scores[b, list(selection[b])].clamp_min(0).sum()) for b in kept)
    return got / total if total > 0 else sum(len(selection[b]) for b in kept) / (len(kept) * scores.shape[1])


def _allocate(scores: torch.Tensor, unit_cost: Sequence[float], kept: Sequence[int], budget: float, floor: int,
              multiple: int = 1) -> Optional[Tuple[Selection, float]]:
    """Units of the kept blocks by score per cost within ``budget`` (None when the floors do not fit)."""
    units = scores.shape[1]
    costs = [unit_cost[b] for b in kept]
    if budget >= units * sum(costs) * (1 - 1e-12):
        chosen: Selection = [list(range(units)) for _ in kept]
    elif budget < floor * sum(costs) * (1 - 1e-12):
        return None
    else:
        chosen, _ = allocate_by_cost(scores[list(kept)], costs, budget, floor)
        if multiple > 1:
            chosen = round_to_multiple(scores[list(kept)], chosen, multiple, costs, budget, floor)
    full: Selection = [[] for _ in range(scores.shape[0])]
    for block, units_kept in zip(kept, chosen):
        full[block] = units_kept
    return full, sum(len(c) * cost for c, cost in zip(chosen, costs))


def _candidate(problem: _Problem, removed_count: int, head_budget: Optional[float]) -> Candidate:
    """The configuration for ``removed_count`` blocks removed and ``head_budget`` heads per kept block."""
    costs, floors, axes = problem.costs, problem.floors, problem.axes
    removed = sorted(problem.order[:removed_count])
    kept = [b for b in range(costs.depth) if b not in removed]
    fixed = costs.fixed + sum(costs.overhead[b] for b in kept)
    row: Dict[str, Any] = dict(blocks_removed=removed_count, removed_blocks=removed, head_budget=head_budget)
    all_channels = costs.teacher_channels * sum(costs.channel[b] for b in kept)
    if "heads" not in axes:
        heads: Optional[Tuple[Selection, float]] = _allocate(problem.heads, costs.head, kept, math.inf, 1)
    elif head_budget is None:  # the heads take what the target leaves
        heads = _allocate(problem.heads, costs.head, kept, problem.target_cost - fixed - all_channels, floors.heads)
    else:
        heads = _allocate(problem.heads, costs.head, kept, head_budget * sum(costs.head[b] for b in kept),
                          floors.heads)
    channels: Optional[Tuple[Selection, float]] = None
    if heads is not None and "channels" in axes:
        channels = _allocate(problem.channels, costs.channel, kept, problem.target_cost - fixed - heads[1],
                             floors.channels, floors.channel_multiple)
    elif heads is not None:
        channels = ([[] for _ in range(costs.depth)], all_channels)
    if heads is None or channels is None:
        row.update(feasible=False, reason="the floors alone exceed the target cost")
        return Candidate(removed, [], None, row)
    head_counts = [len(h) for h in heads[0]]
    channel_counts = [len(c) for c in channels[0]] if "channels" in axes else [costs.teacher_channels] * costs.depth
    cost = costs.total(head_counts, channel_counts, kept)
    row.update(heads_kept=sum(head_counts), channels_kept=sum(channel_counts[b] for b in kept),
               predicted_speedup=costs.teacher_total() / cost, feasible=cost <= problem.target_cost * (1 + 1e-9))
    if not row["feasible"]:
        row["reason"] = "predicted cost above the target"
    mass = 1.0
    if "heads" in axes:
        mass *= _fraction(problem.heads, heads[0], kept)
    if "channels" in axes:
        mass *= _fraction(problem.channels, channels[0], kept)
    if "blocks" in axes and problem.blocks is not None:
        positive = problem.blocks.clamp_min(0)
        mass *= float(positive[kept].sum()) / float(positive.sum()) if float(positive.sum()) > 0 else \
            len(kept) / costs.depth
    row["importance_mass_kept"] = mass
    return Candidate(removed, heads[0], channels[0] if "channels" in axes else None, row)


@dataclass
class BudgetResult:
    """What :func:`prune_to_budget` chose and why.

    ``config``: the configuration (``selected_blocks`` when blocks are removed; removed blocks keep ``[]``);
    ``predicted_speedup``: teacher cost over its cost in the cost model; ``cost_model``: what the costs are;
    ``candidates``: one row per candidate of the search (``feasible``, ``predicted_speedup``, ``score``,
    ``chosen``, ...); ``fastest_reachable``: the predicted speedup of the cheapest configuration the axes and
    floors allow.
    """

    config: PruningConfig
    predicted_speedup: float
    cost_model: str
    candidates: List[Dict[str, Any]]
    fastest_reachable: float

    @property
    def chosen(self) -> Dict[str, Any]:
        return next(row for row in self.candidates if row.get("chosen"))


def _check_arguments(target_speedup: Any, axes: Optional[Sequence[str]], channel_importance: Any,
                     block_importance: Any) -> Tuple[float, Tuple[str, ...]]:
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or \
            not math.isfinite(target_speedup) or target_speedup < 1:
        raise ValueError(f"target_speedup: expected a number >= 1 (teacher time / student time), got {target_speedup!r}")
    if axes is None:
        axes = ["heads"] + (["channels"] if channel_importance is not None else []) + \
            (["blocks"] if block_importance is not None else [])
    axes = tuple(axes)
    if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"axes: expected distinct names from {AXES}, got {list(axes)}")
    for axis, given, what in (("channels", channel_importance, "channel_importance"),
                              ("blocks", block_importance, "block_importance")):
        if axis in axes and given is None:
            raise ValueError(f"axis {axis!r} needs {what} (the scores that rank its units)")
    return float(target_speedup), tuple(a for a in AXES if a in axes)


def _floors(costs: BlockCosts, min_heads: Any, min_channels: Any, min_blocks: Any, multiple: Any,
            min_global: Any) -> Floors:
    depth, heads, channels = costs.depth, costs.teacher_heads, costs.teacher_channels
    for name, value, low, high in (
            ("min_heads_per_layer", min_heads, 1, heads), ("min_channels_per_layer", min_channels, 1, channels),
            ("min_blocks", min_blocks, 1, depth), ("channel_multiple", multiple, 1, channels),
            ("min_global_blocks", min_global, 0, len(costs.global_blocks))):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value!r}")
    return Floors(min_heads, min(channels, -(-min_channels // multiple) * multiple), min_blocks, multiple, min_global)


def _head_grid(problem: _Problem) -> List[Optional[float]]:
    """Head budgets (heads per kept block) searched when channels are solved; else the heads are solved."""
    if "heads" not in problem.axes or "channels" not in problem.axes:
        return [None]
    full = problem.costs.teacher_heads
    grid = {int(round(full * j / 8)) for j in range(1, 9)} | {problem.floors.heads}
    return [float(k) for k in sorted(grid, reverse=True) if k >= problem.floors.heads]


def _fastest(problem: _Problem, max_removed: int) -> float:
    costs, floors = problem.costs, problem.floors
    kept = [b for b in range(costs.depth) if b not in problem.order[:max_removed]]
    heads = floors.heads if "heads" in problem.axes else costs.teacher_heads
    channels = floors.channels if "channels" in problem.axes else costs.teacher_channels
    return costs.teacher_total() / costs.total([heads] * costs.depth, [channels] * costs.depth, kept)


def _config(problem: _Problem, candidate: Candidate, head_method: str, channel_method: str,
            metadata: Dict[str, Any]) -> PruningConfig:
    """The :class:`PruningConfig` of a candidate (``selected_blocks`` only when blocks are removed)."""
    costs = problem.costs
    kept = [b for b in range(costs.depth) if b not in candidate.removed]
    heads_kept = sum(len(h) for h in candidate.heads)
    kwargs: Dict[str, Any] = dict(
        selected_heads_per_layer=candidate.heads, teacher_num_heads=costs.teacher_heads,
        pruning_ratio=1.0 - heads_kept / (len(kept) * costs.teacher_heads), strategy="cost", method=head_method,
        min_heads_per_layer=problem.floors.heads, num_heads=[len(h) for h in candidate.heads], metadata=metadata)
    if candidate.channels is not None:
        channels_kept = sum(len(c) for c in candidate.channels)
        kwargs.update(selected_channels_per_layer=candidate.channels, teacher_mlp_hidden=costs.teacher_channels,
                      mlp_pruning_ratio=1.0 - channels_kept / (len(kept) * costs.teacher_channels),
                      mlp_hidden=[len(c) for c in candidate.channels], channel_method=channel_method,
                      min_channels_per_layer=problem.floors.channels)
    if candidate.removed:
        kwargs["selected_blocks"] = kept
    return PruningConfig(**kwargs)


def _signature(candidate: Candidate) -> Tuple[Any, ...]:
    channels = None if candidate.channels is None else tuple(map(tuple, candidate.channels))
    return tuple(candidate.removed), tuple(map(tuple, candidate.heads)), channels


def _score(candidates: Sequence[Candidate], calibrate: Optional[Callable[[PruningConfig], float]],
           build: Callable[[Candidate], PruningConfig]) -> None:
    """Fill ``score`` of every feasible row: ``calibrate(config)`` (once per distinct selection) or 1 - mass."""
    seen: Dict[Tuple[Any, ...], float] = {}
    for candidate in candidates:
        row = candidate.row
        if not row["feasible"]:
            continue
        if calibrate is None:
            row["score"] = 1.0 - row["importance_mass_kept"]
            continue
        key = _signature(candidate)
        if key not in seen:
            value = calibrate(build(candidate))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"calibrate: expected a finite number (lower is better), got {value!r}")
            seen[key] = float(value)
        row["score"] = row["calibration"] = seen[key]



def prune_to_budget(target_speedup: float, head_importance: Union[HeadImportance, torch.Tensor],
                    channel_importance: Optional[Union[ChannelImportance, torch.Tensor]] = None,
                    block_importance: Any = None, *, geometry: Optional[Mapping[str, Any]] = None,
                    unit_costs: Optional[UnitCosts] = None, axes: Optional[Sequence[str]] = None,
                    min_heads_per_layer: int = 1, min_channels_per_layer: int = 1, min_blocks: Optional[int] = None,
                    channel_multiple: int = 1, calibrate: Optional[Callable[[PruningConfig], float]] = None,
                    min_global_blocks: Optional[int] = None) -> BudgetResult:
    """The configuration predicted to run ``target_speedup`` times faster than the teacher (policy: module docstring).

    ``head_importance`` / ``channel_importance``: ``[blocks, units]`` scores (or the records);
    ``block_importance``: ``[blocks]`` scores or any object with ``.scores`` (e.g. ``BlockImportance``).
    Costs: ``unit_costs`` (measured) or analytic MACs from ``geometry`` (default: the head importance's
    recorded ``backbone`` geometry). ``axes``: what may be pruned (default: heads, plus channels / blocks
    when their importance is given). Floors: ``min_heads_per_layer``, ``min_channels_per_layer`` (rounded up
    to ``channel_multiple``) per kept block, ``min_blocks`` kept (default: two thirds, rounded up),
    ``min_global_blocks`` global-attention blocks kept (default: half the teacher's, rounded up; 0 allows
    removing all).
    ``calibrate(config) -> float``, lower is better, scores the feasible candidates instead of the kept
    importance mass. A target no candidate meets raises :class:`UnreachableTargetError`.
    """
    target, axes = _check_arguments(target_speedup, axes, channel_importance, block_importance)
    heads = HeadImportance.coerce(head_importance)
    channels = ChannelImportance.coerce(channel_importance) if channel_importance is not None else None
    depth, teacher_heads = heads.scores.shape
    if channels is not None and channels.num_layers != depth:
        raise ValueError(f"channel importance has {channels.num_layers} blocks, head importance {depth}")
    if geometry is None and isinstance(heads.metadata, Mapping):
        geometry = heads.metadata.get("backbone")
    if unit_costs is None and not isinstance(geometry, Mapping):
        raise ValueError("a budget needs a cost model: the backbone geometry (importance computed on the model "
                         "records it; or pass geometry= / --config) or unit_costs (a measured latency file)")
    teacher_channels = channels.num_channels if channels is not None else int((geometry or {}).get("mlp_hidden") or 0)
    if teacher_channels < 1:
        raise ValueError("the teacher's MLP width is unknown: pass channel_importance, or a geometry with mlp_hidden")
    costs, units = block_costs(geometry, unit_costs, depth, teacher_heads, teacher_channels)
    floors = _floors(costs, min_heads_per_layer, min_channels_per_layer,
                     -(-2 * depth // 3) if min_blocks is None else min_blocks, channel_multiple,
                     default_min_global_blocks(costs.global_blocks) if min_global_blocks is None else min_global_blocks)
    blocks = block_scores_of(block_importance, depth) if block_importance is not None else None
    problem = _Problem(normalize_block_scores(heads.scores), None if channels is None else
                       normalize_block_scores(channels.scores), blocks, costs, floors, axes,
                       costs.teacher_total() / target)
    problem.order = floored_order(removal_order(blocks, costs) if blocks is not None else list(range(depth)),
                                  costs.global_blocks, floors.global_blocks)
    max_removed = min(depth - floors.blocks, len(problem.order)) if "blocks" in axes else 0
    candidates = [_candidate(problem, d, k) for d in range(max_removed + 1) for k in _head_grid(problem)]
    fastest = _fastest(problem, max_removed)
    scored_by = "calibrate(config), lower is better" if calibrate is not None else "1 - kept importance mass"
    budget = dict(policy=POLICY.format(scored_by), target_speedup=target, axes=list(axes),
                  floors=floors._asdict(), cost_model=costs.describe(), unit_costs=units.to_dict(),
                  teacher_cost=costs.teacher_total(), fastest_reachable=fastest, removal_order=problem.order,
                  teacher_global_blocks=costs.global_blocks)

    def build(candidate: Candidate, extra: Optional[Dict[str, Any]] = None) -> PruningConfig:
        return _config(problem, candidate, heads.method, channels.method if channels is not None else "",
                       dict(budget=dict(budget, **(extra or {})), importance_source=heads.source))

    _score(candidates, calibrate, build)
    feasible = [c for c in candidates if c.row["feasible"]]
    if not feasible:
        raise UnreachableTargetError(target, fastest, axes, floors.describe(axes, depth, len(costs.global_blocks)),
                                     costs.describe())
    best = min(feasible, key=lambda c: c.row["score"])  # first of equals: fewer blocks removed, more heads
    best.row["chosen"] = True
    config = build(best, dict(predicted_speedup=best.row["predicted_speedup"], chosen=dict(best.row)))
    config.metadata.update(_summary(config, best))
    return BudgetResult(config, best.row["predicted_speedup"], costs.describe(), [c.row for c in candidates], fastest)


def _summary(config: PruningConfig, best: Candidate) -> Dict[str, Any]:
    """The usual configuration metadata (totals, effective ratios) of a budgeted configuration."""
    summary: Dict[str, Any] = dict(effective_pruning_ratio=config.pruning_ratio, block_normalization="l2",
                                   heads_kept_total=best.row["heads_kept"], policy="budget")
    if config.prunes_channels:
        summary.update(effective_mlp_pruning_ratio=config.mlp_pruning_ratio,
                       channels_kept_total=best.row["channels_kept"],
                       channel_multiple=config.metadata["budget"]["floors"]["channel_multiple"])
    return summary


def format_candidates(result: BudgetResult, limit: int = 12) -> str:
    """The search as a table: the chosen row, then the best-scored feasible ones (``limit`` rows in all)."""
    rows = sorted((r for r in result.candidates if r["feasible"]), key=lambda r: (not r.get("chosen"), r["score"]))
    lines = ["blocks removed | head budget | heads kept | channels kept | predicted | score",
             "---|---|---|---|---|---"]
    for row in rows[:limit]:
        budget = "-" if row["head_budget"] is None else f"{row['head_budget']:g}/block"
        lines.append(f"{row['blocks_removed']} {row['removed_blocks'] or ''} | {budget} | {row['heads_kept']} | "
                     f"{row['channels_kept']} | {row['predicted_speedup']:.3f}x | {row['score']:.4g}"
                     + (" (chosen)" if row.get("chosen") else ""))
    skipped = len(result.candidates) - len(rows)
    return "\n".join(lines) + (f"\n({skipped} candidate(s) miss the target)" if skipped else "")


__all__ = ["AXES", "UnreachableTargetError", "BlockCosts", "block_costs", "block_scores_of", "removal_order",
           "floored_order", "default_min_global_blocks", "Floors", "Candidate", "BudgetResult", "prune_to_budget",
           "format_candidates"]
