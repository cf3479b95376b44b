"""What a head or a SwiGLU channel costs in each block, and cost-aware allocation under a budget.

Cost-aware pruning spends a budget of cost, not of counts: a unit is kept when its importance per
unit of cost is among the best, so a global block's head (it attends over the whole token grid) is
priced at what it costs compared with a window block's head. Costs come from the analytic MAC model
(:func:`analytic_unit_costs`, ``eva_cost.block_unit_macs``) or from measured latency per unit and block
type (a file written by ``tools/benchmark_backbone.py --unit-latency``, :meth:`UnitCosts.load`).
Whole blocks are priced as well (``tools/head_pruning/budget.py``): a kept block costs its heads and
channels plus a fixed overhead per block type (norms, residual adds, window partition: measured, 0 in
the MAC model), a removed block costs nothing, and the stem (patch embedding) is paid once.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch

from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_cost import block_unit_macs
from mmcv.models.utils.head_importance import read_json

UNIT_COSTS_FORMAT = "orion-kd-unit-costs"
BLOCK_TYPES = ("window", "global")
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class UnitCosts:
    """Cost of ONE head and of ONE hidden channel, per block type (``'window'``, ``'global'``).

    ``unit``: ``'MACs'`` (analytic) or ``'seconds'`` (measured); ``source``: how they were obtained;
    ``metadata``: the geometry or the measurement settings. :meth:`per_block` spreads them over blocks.
    ``block``: what a kept block costs beyond its heads and channels, per block type (what removing the
    whole block saves on top of them; missing: 0, as in files written before it was measured);
    ``fixed``: the stem (patch embedding), paid by every configuration.
    """

    head: Dict[str, float]
    channel: Dict[str, float]
    unit: str
    source: str = ""
    metadata: Dict[str, Any] = field(default_factory=dict)
    block: Dict[str, float] = field(default_factory=dict)
    fixed: float = 0.0

    def __post_init__(self) -> None:
        for kind, table in (("head", self.head), ("channel", self.channel)):
            if not isinstance(table, Mapping) or not table:
                raise ValueError(f"unit costs: expected {kind} costs per block type {BLOCK_TYPES}, got {table!r}")
            for block_type, value in table.items():
                if block_type not in BLOCK_TYPES:
                    raise ValueError(f"unit costs: unknown block type {block_type!r} (expected {BLOCK_TYPES})")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ValueError(f"unit costs: the cost of one {kind} in a {block_type} block must be a positive "
                                     f"number, got {value!r}")
        self.head = {k: float(v) for k, v in self.head.items()}
        self.channel = {k: float(v) for k, v in self.channel.items()}
        if not isinstance(self.block, Mapping):
            raise ValueError(f"unit costs: expected the block overheads per block type {BLOCK_TYPES}, got {self.block!r}")
        for block_type, value in list(self.block.items()) + [(None, self.fixed)]:
            if block_type is not None and block_type not in BLOCK_TYPES:
                raise ValueError(f"unit costs: unknown block type {block_type!r} (expected {BLOCK_TYPES})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                what = "the stem" if block_type is None else f"the overhead of a {block_type} block"
                raise ValueError(f"unit costs: {what} must be a number >= 0, got {value!r}")
        self.block = {k: float(v) for k, v in self.block.items()}
        self.fixed = float(self.fixed)

    def block_overheads(self, window_per_block: Sequence[int]) -> List[float]:
        """What each block costs beyond its heads and channels, by its type (0 where none was measured)."""
        return [self.block.get("window" if window > 0 else "global", 0.0) for window in window_per_block]

    def per_block(self, window_per_block: Sequence[int]) -> Tuple[List[float], List[float]]:
        """(cost of one head, cost of one channel) for every block, by its type (window size > 0 or not)."""
        heads, channels = [], []
        for layer, window in enumerate(window_per_block):
            block_type = "window" if window > 0 else "global"
            if block_type not in self.head or block_type not in self.channel:
                raise ValueError(f"unit costs ({self.source or self.unit}) have no {block_type} block, but block "
                                 f"{layer} is one")
            heads.append(self.head[block_type])
            channels.append(self.channel[block_type])
        return heads, channels

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=UNIT_COSTS_FORMAT, version=2, unit=self.unit, source=self.source, head=self.head,
                    channel=self.channel, block=self.block, fixed=self.fixed, metadata=self.metadata)

    def save(self, path: PathLike) -> str:
        """Write the costs as JSON (atomically)."""
        if os.path.splitext(os.fspath(path))[1].lower() != ".json":
            raise ValueError(f"{os.fspath(path)}: unit costs are saved as .json")
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "UnitCosts":
        """Read a file written by :meth:`save` (e.g. ``benchmark_backbone.py --unit-latency``; version 1 files,
        without block overheads or stem, load with both at 0)."""
        path = os.fspath(path)
        payload = read_json(path, "unit costs file")
        if not isinstance(payload, Mapping) or payload.get("format") != UNIT_COSTS_FORMAT:
            raise ValueError(f"{path}: not a unit costs file (expected format {UNIT_COSTS_FORMAT!r}, written by "
                             f"tools/benchmark_backbone.py --unit-latency)")
        try:
            return cls(head=dict(payload["head"]), channel=dict(payload["channel"]), unit=str(payload["unit"]),
                       source=str(payload.get("source") or path), metadata=dict(payload.get("metadata") or {}),
                       block=dict(payload.get("block") or {}), fixed=payload.get("fixed", 0.0))
        except KeyError as err:
            raise ValueError(f"{path}: unit costs file without the key {err}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def analytic_unit_costs(geometry: Mapping[str, Any]) -> UnitCosts:
    """Analytic MACs of one head and one channel per block type, from a backbone geometry.

    ``geometry``: what ``describe_backbone`` records (``img_hw``, ``patch_size``, ``embed_dim``,
    ``head_dim``, ``window_per_block``, optionally ``in_chans``, default 3); a missing entry is an error
    naming it. The block overhead is 0 (the MAC model counts matmuls only); ``fixed`` is the patch
    convolution.
    """
    missing = [k for k in ("img_hw", "patch_size", "embed_dim", "head_dim", "window_per_block") if not geometry.get(k)]
    if missing:
        raise ValueError(f"analytic unit costs need the backbone geometry; missing {missing} (compute the importance "
                         f"on the model, or pass the model / --config so that its geometry is known)")
    img_hw = (int(geometry["img_hw"][0]), int(geometry["img_hw"][1]))
    head: Dict[str, float] = {}
    channel: Dict[str, float] = {}
    for window in sorted(set(int(w) for w in geometry["window_per_block"])):
        block_type = "window" if window > 0 else "global"
        head_cost, channel_cost = block_unit_macs(img_hw, int(geometry["patch_size"]), int(geometry["embed_dim"]),
                                                  int(geometry["head_dim"]), window)
        head[block_type], channel[block_type] = float(head_cost), float(channel_cost)
    patch, embed = int(geometry["patch_size"]), int(geometry["embed_dim"])
    stem = (img_hw[0] // patch) * (img_hw[1] // patch) * embed * int(geometry.get("in_chans") or 3) * patch * patch
    return UnitCosts(head=head, channel=channel, unit="MACs", source=f"analytic MACs at {img_hw[0]}x{img_hw[1]}",
                     metadata=dict(img_hw=list(img_hw), window_per_block=list(geometry["window_per_block"])),
                     fixed=float(stem))


def allocate_by_cost(scores: torch.Tensor, cost_per_block: Sequence[float], budget: float, floor: int
                     ) -> Tuple[List[List[int]], float]:
    """Keep the units with the most score per cost until ``budget`` is spent; every block keeps its ``floor`` best.

    ``scores``: ``[blocks, units]`` (already normalised per block by the caller); ``cost_per_block[l]``:
    the cost of one unit of block ``l``. Greedy by score / cost (ties: lower block, then lower unit),
    skipping units that no longer fit. Returns the sorted selection per block and the cost spent.
    """
    depth, units = scores.shape
    costs = torch.as_tensor([float(c) for c in cost_per_block], dtype=torch.float64)
    if costs.numel() != depth:
        raise ValueError(f"cost-aware allocation: expected one unit cost per block ({depth}), got {costs.numel()}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    chosen = torch.zeros(depth, units, dtype=torch.bool)
    chosen[torch.arange(depth)[:, None], order[:, :floor]] = True
    spent = float(costs.sum()) * floor
    tolerance = 1e-9 * max(abs(budget), 1.0)
    if spent > budget + tolerance:
        raise ValueError(f"cost-aware allocation: the floor of {floor} per block costs {spent:.6g}, more than the "
                         f"budget {budget:.6g}")
    value = scores.double() / costs[:, None]
    flags = chosen.flatten().tolist()  # plain Python in the loop: it visits up to every unit of the network
    unit_cost = costs.tolist()
    cheapest = min(unit_cost)
    for flat in torch.sort(value.flatten(), descending=True, stable=True).indices.tolist():
        if spent + cheapest > budget + tolerance:
            break  # nothing fits any more
        cost = unit_cost[flat // units]
        if not flags[flat] and spent + cost <= budget + tolerance:
            flags[flat] = True
            spent += cost
    return [[unit for unit in range(units) if flags[layer * units + unit]] for layer in range(depth)], spent


def round_to_multiple(scores: torch.Tensor, selection: Sequence[Sequence[int]], multiple: int,
                      cost_per_block: Sequence[float], budget: float, floor: int = 0) -> List[List[int]]:
    """Make every block keep a multiple of ``multiple`` units (its best ones), spending at most ``budget``.

    Matmul kernels run far slower at odd widths (measured on this CPU: a 1024 x 1365 SwiGLU runs at 56%
    of the FLOP rate of 1024 x 1536), so kept widths are rounded. Each block's count goes to the nearest
    multiple (half up, at least one multiple, at most all its units); then, while over ``budget``, the block
    whose last ``multiple`` kept units score least gives them up, and while a chunk still fits, the block
    whose next ``multiple`` units score most per cost gains them. ``scores`` are the (normalised) scores;
    ``floor``: no block goes below it (rounded up to a multiple, at most all units).
    """
    depth, units = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked = torch.gather(scores.double(), 1, order)
    costs = [float(c) for c in cost_per_block]
    least = min(units, max(multiple, -(-floor // multiple) * multiple))
    counts = [min(units, max(least, int(math.floor(len(kept) / multiple + 0.5)) * multiple)) for kept in selection]

    def chunk(layer: int, start: int) -> float:
        return float(ranked[layer, start:start + multiple].sum())

    def spent() -> float:
        return sum(count * cost for count, cost in zip(counts, costs))

    tolerance = 1e-9 * max(abs(budget), 1.0)
    while spent() > budget + tolerance:
        shrinkable = [layer for layer in range(depth) if counts[layer] - multiple >= least]
        if not shrinkable:
            raise ValueError(f"rounding to multiples of {multiple}: {least} units per block already exceed the budget")
        layer = min(shrinkable, key=lambda l: (chunk(l, counts[l] - multiple) / (multiple * costs[l]), l))
        counts[layer] -= multiple
    while True:
        growable = [layer for layer in range(depth) if counts[layer] + multiple <= units
                    and spent() + multiple * costs[layer] <= budget + tolerance]
        if not growable:
            break
        layer = max(growable, key=lambda l: (chunk(l, counts[l]) / (multiple * costs[l]), -l))
        counts[layer] += multiple
    return [sorted(order[layer, :count].tolist()) for layer, count in enumerate(counts)]


__all__ = ["UNIT_COSTS_FORMAT", "BLOCK_TYPES", "UnitCosts", "analytic_unit_costs", "allocate_by_cost",
           "round_to_multiple"]
