"""The pruning policy: which heads and SwiGLU channels each block keeps, and the files that record it.

One home, shared by OrionStudent (a plugin module) and the tools (``tools/head_pruning``):

- ``pruning_ratio`` is the fraction of heads REMOVED, ``mlp_pruning_ratio`` the fraction of hidden
  channels REMOVED. Every block keeps ``round(units * (1 - ratio))``, half up (:func:`kept_per_block`);
  every strategy keeps that many in total (``cost``: that much cost). 0.3 of 16 heads keeps 11 per
  block; 0.4375 of 2730 channels keeps 1536.
- ``uniform``: each block keeps its top-k units. ``global``: every block keeps its top ``min_*_per_layer``,
  the rest of the budget goes to the best units of the whole network after each block's scores are
  divided by their L2 norm (Michel et al., 2019), so the ranking follows importance within a block
  and not the block type. ``cost``: like ``global``, but the budget is the cost (analytic MACs, or
  measured latency, per unit and block type; ``pruning_cost.py``) that the uniform allocation would
  keep, and units are ranked by normalised score per cost, so a global block's head is priced at what
  it costs. Heads and channels are allocated separately, each within its own budget.
- :class:`HeadImportance` / :class:`ChannelImportance` (``.json``/``.npz``/``.pkl``) and
  :class:`PruningConfig` (``.json``; heads, and channels when the MLPs are pruned, and the kept blocks
  when whole blocks are removed) are the file formats; :func:`load_pruning_selection` is how
  OrionStudent reads a configuration. The checks of a selection live in ``selection_checks.py``.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_surgery import resolve_block_selection
from mmcv.models.utils.head_importance import ChannelImportance, HeadImportance, ScoresLike, read_json
from mmcv.models.utils.pruning_cost import UnitCosts, allocate_by_cost, analytic_unit_costs, round_to_multiple
from mmcv.models.utils.selection_checks import (CHANNELS, HEADS, Selection, UnitKind, validate_unit_selection,
                                                check_pruning_ratio, kept_per_block, resolve_channel_selection,
                                                resolve_head_selection)

CONFIG_FORMAT = "orion-kd-pruning-config"
CONFIG_VERSION = 3  # 2: optional SwiGLU channels, 3: optional kept blocks; older files load unchanged
STRATEGIES = ("uniform", "global", "cost")
#: How each block's scores are scaled before the global ranking ('none' ranks the raw scores).
BLOCK_NORMALIZATIONS = ("l2", "none")


def _number(payload: Mapping[str, Any], key: str, kind: type) -> Any:
    """``payload[key]`` as ``kind`` (int or float); a value of another type names the key (the caller adds the file)."""
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"key {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def validate_pruning_config(selected_heads_per_layer: Union["PruningConfig", Sequence[Sequence[int]]], depth: int,
                            teacher_num_heads: int, num_heads: Optional[Union[int, Sequence[int]]] = None,
                            pruning_ratio: Optional[float] = None,
                            selected_blocks: Optional[Sequence[int]] = None) -> Selection:
    """Check a head selection and return it as lists of ints; every problem raises ``ValueError``.

    Checks: one list per teacher block, integer indices in ``[0, teacher_num_heads)``, unique, sorted, at
    least one head per kept block, agreement with ``num_heads`` (int or per block) and with ``pruning_ratio``
    (the fraction REMOVED: ``kept blocks * kept_per_block(H, ratio)`` heads in total, the budget of every
    strategy). ``selected_blocks`` (None: all; a ``PruningConfig`` brings its own): the entries of the
    removed blocks are ignored (``[]`` there is fine) and come back ``[]``.
    """
    if isinstance(selected_heads_per_layer, PruningConfig):
        if selected_blocks is None:
            selected_blocks = selected_heads_per_layer.selected_blocks
        selected_heads_per_layer = selected_heads_per_layer.selected_heads_per_layer
    return validate_unit_selection(selected_heads_per_layer, depth, teacher_num_heads, num_heads, pruning_ratio, HEADS,
                               selected_blocks)


def validate_channel_selection(selected_channels_per_layer: Union["PruningConfig", Sequence[Sequence[int]]],
                               depth: int, teacher_hidden: int, mlp_hidden: Optional[Union[int, Sequence[int]]] = None,
                               mlp_pruning_ratio: Optional[float] = None,
                               selected_blocks: Optional[Sequence[int]] = None) -> Selection:
    """As :func:`validate_pruning_config` for the SwiGLU hidden channels (``mlp_hidden``: kept per block)."""
    if isinstance(selected_channels_per_layer, PruningConfig):
        if selected_blocks is None:
            selected_blocks = selected_channels_per_layer.selected_blocks
        selected_channels_per_layer = selected_channels_per_layer.selected_channels_per_layer
    return validate_unit_selection(selected_channels_per_layer, depth, teacher_hidden, mlp_hidden, mlp_pruning_ratio,
                               CHANNELS, selected_blocks)


# --------------------------------------------------------------------------- the configuration record


@dataclass
class PruningConfig:
    """Which teacher heads, and optionally which SwiGLU hidden channels, each block keeps.

    ``selected_heads_per_layer``: sorted teacher head indices per block; ``num_heads``: heads kept per
    block; ``pruning_ratio``: fraction of heads REMOVED that was asked for. With channels:
    ``selected_channels_per_layer`` (sorted teacher channel indices), ``teacher_mlp_hidden``,
    ``mlp_hidden`` (kept per block) and ``mlp_pruning_ratio``. ``selected_blocks``: the teacher blocks
    kept (sorted; None: every block); the per-block lists keep one entry per teacher block and a removed
    block's entry is ``[]`` (count 0). Iterating yields the per-block head lists, so it can be passed where
    a list of lists is expected.
    """

    selected_heads_per_layer: Selection
    teacher_num_heads: int
    pruning_ratio: float
    strategy: str = "uniform"
    method: str = ""
    min_heads_per_layer: int = 1
    num_heads: List[int] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)
    selected_channels_per_layer: Optional[Selection] = None
    teacher_mlp_hidden: Optional[int] = None
    mlp_pruning_ratio: Optional[float] = None
    mlp_hidden: List[int] = field(default_factory=list)
    channel_method: str = ""
    min_channels_per_layer: int = 1
    selected_blocks: Optional[List[int]] = None

    def __post_init__(self) -> None:
        depth = len(self.selected_heads_per_layer)
        if self.selected_blocks is not None:
            self.selected_blocks = resolve_block_selection(depth, self.selected_blocks)
        self.selected_heads_per_layer = validate_pruning_config(
            self.selected_heads_per_layer, depth=depth, teacher_num_heads=self.teacher_num_heads,
            num_heads=self.num_heads or None, selected_blocks=self.selected_blocks)
        self.num_heads = [len(h) for h in self.selected_heads_per_layer]
        check_pruning_ratio(self.pruning_ratio)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.selected_channels_per_layer is None:
            if self.teacher_mlp_hidden is not None or self.mlp_pruning_ratio is not None or self.mlp_hidden:
                raise ValueError("pruning configuration: teacher_mlp_hidden / mlp_pruning_ratio / mlp_hidden given "
                                 "without selected_channels_per_layer")
            return
        if self.teacher_mlp_hidden is None or self.mlp_pruning_ratio is None:
            raise ValueError("pruning configuration: selected_channels_per_layer needs teacher_mlp_hidden and "
                             "mlp_pruning_ratio")
        self.selected_channels_per_layer = validate_channel_selection(
            self.selected_channels_per_layer, depth, int(self.teacher_mlp_hidden), mlp_hidden=self.mlp_hidden or None,
            selected_blocks=self.selected_blocks)
        self.mlp_hidden = [len(c) for c in self.selected_channels_per_layer]
        check_pruning_ratio(self.mlp_pruning_ratio, "mlp_pruning_ratio", "channels")

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.selected_heads_per_layer)

    def __len__(self) -> int:
        return len(self.selected_heads_per_layer)

    def __getitem__(self, index: int) -> List[int]:
        return self.selected_heads_per_layer[index]

    @property
    def depth(self) -> int:
        return len(self.selected_heads_per_layer)

    @property
    def prunes_channels(self) -> bool:
        """Whether the configuration selects SwiGLU channels (otherwise every MLP keeps its full width)."""
        return self.selected_channels_per_layer is not None

    @property
    def kept_blocks(self) -> List[int]:
        """The teacher blocks kept (every block when ``selected_blocks`` is None)."""
        return list(range(self.depth)) if self.selected_blocks is None else list(self.selected_blocks)

    def to_model_kwargs(self) -> Dict[str, Any]:
        """``EVAViTStudent`` arguments: ``num_heads``, ``teacher_num_heads``, ``selected_heads_per_layer``
        (+ ``mlp_hidden``, ``selected_channels_per_layer`` when channels are selected, ``selected_blocks``
        when blocks are)."""
        kwargs = dict(num_heads=list(self.num_heads), teacher_num_heads=self.teacher_num_heads,
                      selected_heads_per_layer=[list(h) for h in self.selected_heads_per_layer])
        if self.selected_blocks is not None:
            kwargs.update(selected_blocks=list(self.selected_blocks))
        if self.prunes_channels:
            kwargs.update(mlp_hidden=list(self.mlp_hidden),
                          selected_channels_per_layer=[list(c) for c in self.selected_channels_per_layer])
        return kwargs

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=CONFIG_FORMAT, version=CONFIG_VERSION, selected_heads_per_layer=self.selected_heads_per_layer,
                    num_heads=self.num_heads, teacher_num_heads=self.teacher_num_heads,
                    pruning_ratio=self.pruning_ratio, strategy=self.strategy, method=self.method,
                    min_heads_per_layer=self.min_heads_per_layer,
                    selected_channels_per_layer=self.selected_channels_per_layer, mlp_hidden=self.mlp_hidden or None,
                    teacher_mlp_hidden=self.teacher_mlp_hidden, mlp_pruning_ratio=self.mlp_pruning_ratio,
                    channel_method=self.channel_method, min_channels_per_layer=self.min_channels_per_layer,
                    selected_blocks=self.selected_blocks, metadata=self.metadata)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write the configuration as JSON (atomically)."""
        if os.path.splitext(os.fspath(path))[1].lower() != ".json":
            raise ValueError(f"{os.fspath(path)}: pruning configurations are saved as .json")
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "PruningConfig":
        """Read and validate a configuration written by :meth:`save` (version 1 files: heads only)."""
        path = os.fspath(path)
        payload = read_json(path, "pruning configuration")
        if not isinstance(payload, Mapping) or payload.get("format") != CONFIG_FORMAT:
            raise ValueError(f"{path}: not a pruning configuration (expected format {CONFIG_FORMAT!r}, written by "
                             f"PruningConfig.save or `tools/head_pruning_utils.py prune-config`)")
        if not isinstance(payload.get("version", 1), int) or payload.get("version", 1) > CONFIG_VERSION:
            raise ValueError(f"{path}: pruning configuration version {payload.get('version')!r}; this ORION-KD reads "
                             f"versions 1..{CONFIG_VERSION} (update ORION-KD)")
        try:
            hidden = payload.get("teacher_mlp_hidden")
            mlp_ratio = payload.get("mlp_pruning_ratio")
            return cls(selected_heads_per_layer=payload["selected_heads_per_layer"],
                       teacher_num_heads=_number(payload, "teacher_num_heads", int),
                       pruning_ratio=_number(payload, "pruning_ratio", float), strategy=payload.get("strategy", "uniform"),
                       method=payload.get("method", ""), min_heads_per_layer=int(payload.get("min_heads_per_layer", 1)),
                       num_heads=list(payload.get("num_heads") or []), metadata=dict(payload.get("metadata") or {}),
                       selected_channels_per_layer=payload.get("selected_channels_per_layer"),
                       teacher_mlp_hidden=None if hidden is None else _number(payload, "teacher_mlp_hidden", int),
                       mlp_pruning_ratio=None if mlp_ratio is None else _number(payload, "mlp_pruning_ratio", float),
                       mlp_hidden=list(payload.get("mlp_hidden") or []),
                       channel_method=payload.get("channel_method", ""),
                       min_channels_per_layer=int(payload.get("min_channels_per_layer", 1)),
                       selected_blocks=payload.get("selected_blocks"))
        except KeyError as err:
            raise ValueError(f"{path}: pruning configuration without the key {err}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- allocation


def normalize_block_scores(scores: torch.Tensor, how: str = "l2") -> torch.Tensor:
    """Each block's row divided by its L2 norm (``'l2'``, Michel et al.) or left alone (``'none'``)."""
    if how not in BLOCK_NORMALIZATIONS:
        raise ValueError(f"block_normalization: expected one of {BLOCK_NORMALIZATIONS}, got {how!r}")
    if how == "none":
        return scores
    return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)


def allocate_uniform(scores: torch.Tensor, counts: Sequence[int]) -> Selection:
    """Block ``l`` keeps its ``counts[l]`` best units (ties go to the lower index), sorted."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return [sorted(order[layer, :count].tolist()) for layer, count in enumerate(counts)]


def allocate_global(scores: torch.Tensor, budget: int, floor: int) -> Selection:
    """Every block keeps its ``floor`` best units; the rest of ``budget`` goes to the best scores overall."""
    selection, _ = allocate_by_cost(scores, [1.0] * scores.shape[0], float(budget), floor)
    return selection


def _kept_mass(scores: torch.Tensor, selection: Sequence[Sequence[int]]) -> Optional[float]:
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for layer, units in enumerate(selection):
        kept[layer, list(units)] = True
    total = float(scores.sum())
    return float(scores[kept].sum()) / total if total > 0 else None


def _allocate(scores: torch.Tensor, ratio: float, strategy: str, floor: Any, normalization: str,
              unit_cost: Optional[Sequence[float]], kind: UnitKind, multiple: int = 1) -> Tuple[Selection, Dict[str, Any]]:
    """One unit kind's selection and its metadata (``unit_cost``: cost of one unit per block, for ``cost``;
    ``multiple``: every block keeps a multiple of it, within the same budget)."""
    depth, units = scores.shape
    floor_arg = f"min_{kind.singular}s_per_layer"
    if isinstance(floor, bool) or not isinstance(floor, int) or not 1 <= floor <= units:
        raise ValueError(f"{floor_arg}: expected an int in [1, {units}], got {floor!r}")
    keep = kept_per_block(units, ratio)
    if keep < 1:
        raise ValueError(f"{kind.ratio_arg} {ratio} removes every {kind.singular} of a {units}-{kind.singular} block "
                         f"(round({units} * {1 - ratio:.4g}) = 0); the largest ratio that keeps one {kind.singular} is "
                         f"{1 - 1 / units:.4g}")
    ranked = normalize_block_scores(scores, normalization)
    info: Dict[str, Any] = {}
    if strategy == "uniform":
        if keep < floor:
            raise ValueError(f"uniform pruning at {kind.ratio_arg} {ratio} keeps {keep} {kind.singular}s per block, "
                             f"fewer than {floor_arg}={floor}")
        selection = allocate_uniform(ranked, [keep] * depth)
    elif keep * depth < depth * floor:
        raise ValueError(f"{strategy} pruning at {kind.ratio_arg} {ratio} keeps {keep * depth} {kind.singular}s in "
                         f"total, fewer than the floor of {floor} per block x {depth} blocks")
    elif strategy == "global":
        selection = allocate_global(ranked, keep * depth, floor)
    else:
        budget = keep * float(sum(unit_cost))
        selection, spent = allocate_by_cost(ranked, unit_cost, budget, floor)
        info.update(cost_budget=budget, cost_spent=spent)
    if multiple > 1:
        costs = list(unit_cost) if strategy == "cost" else [1.0] * depth
        budget = info.get("cost_budget", float(keep * depth))
        if strategy == "uniform":  # the nearest multiple for every block, not a redistribution
            budget = float(min(units, max(multiple, int(math.floor(keep / multiple + 0.5)) * multiple)) * depth)
        selection = round_to_multiple(ranked, selection, multiple, costs, budget)
        if "cost_budget" in info:
            info["cost_spent"] = sum(len(s) * c for s, c in zip(selection, costs))
    kept = sum(len(s) for s in selection)
    info.update(effective_ratio=1.0 - kept / (depth * units), kept_total=kept,
                importance_mass_kept=_kept_mass(ranked, selection))
    return selection, info


def _unit_costs_for(strategy: str, unit_costs: Optional[UnitCosts], importance: HeadImportance,
                    ) -> Tuple[Optional[List[float]], Optional[List[float]], Optional[UnitCosts]]:
    """Per-block cost of one head and one channel for the ``cost`` strategy (None for the others)."""
    if strategy != "cost":
        return None, None, None
    geometry = importance.metadata.get("backbone") if isinstance(importance.metadata, Mapping) else None
    if unit_costs is None:
        if not isinstance(geometry, Mapping):
            raise ValueError("strategy 'cost' needs unit costs: importance computed on the model (its metadata "
                             "records the backbone geometry) or unit_costs (UnitCosts, e.g. a measured latency file)")
        unit_costs = analytic_unit_costs(geometry)
    windows = (geometry or {}).get("window_per_block") or unit_costs.metadata.get("window_per_block")
    if not windows or len(windows) != importance.num_layers:
        raise ValueError(f"strategy 'cost': which blocks are window blocks is unknown for {importance.num_layers} "
                         f"blocks (importance metadata 'backbone' or the unit costs' window_per_block)")
    heads, channels = unit_costs.per_block(windows)
    return heads, channels, unit_costs


def create_pruning_config(importance: Union[HeadImportance, ScoresLike], pruning_ratio: float = 0.5,
                          strategy: str = "uniform", min_heads_per_layer: int = 1, block_normalization: str = "l2",
                          channel_importance: Optional[Union[ChannelImportance, ScoresLike]] = None,
                          mlp_pruning_ratio: Optional[float] = None, min_channels_per_layer: int = 1,
                          unit_costs: Optional[UnitCosts] = None, channel_multiple: int = 1) -> PruningConfig:
    """Choose the heads (and with ``channel_importance`` the SwiGLU channels) to keep (policy: module docstring).

    ``pruning_ratio`` / ``mlp_pruning_ratio``: fractions of heads / hidden channels REMOVED (0.5: 16 -> 8
    heads; 0.4375: 2730 -> 1536 channels). A head count that is not a whole number warns and
    ``metadata['effective_pruning_ratio']`` records ``1 - k / H`` (channel counts are rarely whole: no
    warning, ``metadata['effective_mlp_pruning_ratio']``). ``block_normalization`` ('l2' or 'none')
    scales each block's scores before a ``global`` or ``cost`` ranking; the ``importance_mass_kept``
    entries are measured on the same scaled scores. ``strategy='cost'`` prices units with ``unit_costs``
    (default: analytic MACs from the importance's recorded backbone geometry). ``channel_multiple``: every
    block keeps a multiple of this many channels (e.g. 64: matmuls at odd widths run slower), within the
    same budget (``pruning_cost.round_to_multiple``). Ties go to the lower index.
    """
    importance = HeadImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    ratio = check_pruning_ratio(pruning_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    depth, heads = scores.shape
    keep = kept_per_block(heads, ratio)
    if keep >= 1 and abs(heads * (1.0 - ratio) - keep) > 1e-6:
        warnings.warn(f"pruning_ratio {ratio}: {heads} * (1 - {ratio}) = {heads * (1 - ratio):.4g} heads is not a "
                      f"whole number; keeping {keep} per block (effective ratio {1 - keep / heads:.4g})")
    head_cost, channel_cost, costs = _unit_costs_for(strategy, unit_costs, importance)
    selection, info = _allocate(scores, ratio, strategy, min_heads_per_layer, block_normalization, head_cost, HEADS)
    metadata = dict(effective_pruning_ratio=info["effective_ratio"], heads_kept_total=info["kept_total"],
                    block_normalization=block_normalization, importance_mass_kept=info["importance_mass_kept"],
                    importance_source=importance.source, importance_num_samples=importance.num_samples)
    if costs is not None:
        metadata.update(unit_costs=costs.to_dict(), head_cost_budget=info["cost_budget"],
                        head_cost_spent=info["cost_spent"])
    channels: Dict[str, Any] = {}
    if channel_importance is not None or mlp_pruning_ratio is not None:
        channels = _channel_part(channel_importance, mlp_pruning_ratio, strategy, min_channels_per_layer,
                                 block_normalization, channel_cost, depth, metadata, channel_multiple)
    return PruningConfig(selected_heads_per_layer=selection, teacher_num_heads=heads, pruning_ratio=ratio,
                         strategy=strategy, method=method, min_heads_per_layer=min_heads_per_layer,
                         num_heads=[len(h) for h in selection], metadata=metadata, **channels)


def _channel_part(channel_importance: Any, mlp_pruning_ratio: Optional[float], strategy: str, floor: int,
                  normalization: str, channel_cost: Optional[Sequence[float]], depth: int,
                  metadata: Dict[str, Any], multiple: int = 1) -> Dict[str, Any]:
    """The channel fields of a joint configuration (and their metadata, added to ``metadata``)."""
    if channel_importance is None or mlp_pruning_ratio is None:
        raise ValueError("joint pruning needs both channel_importance and mlp_pruning_ratio (the fraction of SwiGLU "
                         "hidden channels REMOVED)")
    importance = ChannelImportance.coerce(channel_importance)
    ratio = check_pruning_ratio(mlp_pruning_ratio, "mlp_pruning_ratio", "channels")
    if importance.num_layers != depth:
        raise ValueError(f"channel importance has {importance.num_layers} blocks, head importance {depth}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or not 1 <= multiple <= importance.num_channels:
        raise ValueError(f"channel_multiple: expected an int in [1, {importance.num_channels}], got {multiple!r}")
    selection, info = _allocate(importance.scores, ratio, strategy, floor, normalization, channel_cost, CHANNELS,
                                multiple)
    metadata.update(effective_mlp_pruning_ratio=info["effective_ratio"], channels_kept_total=info["kept_total"],
                    channel_multiple=multiple,
                    channel_importance_mass_kept=info["importance_mass_kept"],
                    channel_importance_source=importance.source)
    if "cost_budget" in info:
        metadata.update(channel_cost_budget=info["cost_budget"], channel_cost_spent=info["cost_spent"])
    return dict(selected_channels_per_layer=selection, teacher_mlp_hidden=importance.num_channels,
                mlp_pruning_ratio=ratio, mlp_hidden=[len(c) for c in selection], channel_method=importance.method,
                min_channels_per_layer=floor)


# --------------------------------------------------------------------------- reading a selection


class PruningSelection(NamedTuple):
    """What a configuration says a student keeps: heads per block, channels per block (None: all), a label,
    the kept teacher blocks (None: all), and whether a budget chose it (``metadata.budget``: counts per block
    from a target speedup, not from a pruning ratio)."""

    heads: Selection
    channels: Optional[Selection]
    label: str
    blocks: Optional[List[int]] = None
    budgeted: bool = False


def load_pruning_selection(source: Union[PruningConfig, str, "os.PathLike[str]", Mapping[str, Any],
                                         Sequence[Sequence[int]]], teacher_num_heads: Optional[int] = None,
                           teacher_mlp_hidden: Optional[int] = None) -> PruningSelection:
    """Heads, channels and blocks from a configuration file, a :class:`PruningConfig`, a dict or head lists.

    A file must be a configuration written by ``PruningConfig.save`` (``prune-config`` on the command
    line); a dict needs ``selected_heads_per_layer`` (and may hold ``selected_channels_per_layer`` and
    ``selected_blocks``). A configuration made for another teacher head count or MLP width is refused;
    the block list is checked here (sorted, unique, within the heads' depth), the unit indices by the
    caller, who knows the backbone.
    """
    label, recorded, recorded_hidden, channels, blocks = "pruning_config", None, None, None, None
    metadata: Any = None
    if isinstance(source, (str, os.PathLike)):
        label, source = f"pruning_config {os.fspath(source)}", PruningConfig.load(source)
    if isinstance(source, PruningConfig):
        recorded, recorded_hidden, blocks = source.teacher_num_heads, source.teacher_mlp_hidden, source.selected_blocks
        channels, metadata = source.selected_channels_per_layer, source.metadata
        source = source.selected_heads_per_layer
    elif isinstance(source, Mapping):
        if "selected_heads_per_layer" not in source:
            raise ValueError(f"pruning_config: expected key 'selected_heads_per_layer', got keys {sorted(source)}")
        recorded, recorded_hidden = source.get("teacher_num_heads"), source.get("teacher_mlp_hidden")
        channels, blocks, metadata = source.get("selected_channels_per_layer"), source.get("selected_blocks"), \
            source.get("metadata")
        source = source["selected_heads_per_layer"]
    if not isinstance(source, (list, tuple)) or not all(isinstance(h, (list, tuple)) for h in source):
        raise ValueError(f"{label}: expected one list of head indices per block, got {type(source).__name__}")
    if recorded is not None and teacher_num_heads is not None and int(recorded) != int(teacher_num_heads):
        raise ValueError(f"{label}: made for a teacher with {recorded} heads per block, but this teacher has "
                         f"{teacher_num_heads}")
    if recorded_hidden is not None and teacher_mlp_hidden is not None and int(recorded_hidden) != int(teacher_mlp_hidden):
        raise ValueError(f"{label}: made for a teacher whose MLPs have {recorded_hidden} hidden channels, but this "
                         f"teacher's have {teacher_mlp_hidden}")
    if channels is not None and (not isinstance(channels, (list, tuple)) or
                                 not all(isinstance(c, (list, tuple)) for c in channels)):
        raise ValueError(f"{label}: expected one list of channel indices per block, got {type(channels).__name__}")
    if blocks is not None:
        try:
            blocks = resolve_block_selection(len(source), blocks)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    budgeted = isinstance(metadata, Mapping) and metadata.get("budget") is not None
    return PruningSelection([list(h) for h in source], None if channels is None else [list(c) for c in channels],
                            label, blocks, budgeted)


__all__ = [
    "CONFIG_FORMAT", "CONFIG_VERSION", "STRATEGIES", "BLOCK_NORMALIZATIONS", "UnitKind", "HEADS", "CHANNELS",
    "HeadImportance", "ChannelImportance", "UnitCosts", "PruningConfig", "PruningSelection", "check_pruning_ratio",
    "kept_per_block", "resolve_head_selection", "resolve_channel_selection", "validate_pruning_config",
    "validate_channel_selection", "normalize_block_scores", "allocate_uniform", "allocate_global",
    "create_pruning_config", "load_pruning_selection",
]
