"""The pruning policy: which heads each block keeps, and the files that record it.

One home, shared by OrionStudent (a plugin module) and the tools (``tools/head_pruning``):

- ``pruning_ratio`` is the fraction of heads REMOVED. Every block keeps
  ``round(H * (1 - pruning_ratio))`` heads, half up (:func:`kept_per_block`); both strategies keep
  ``depth`` times that in total. 0.3 of 16 heads keeps 11 per block, 264 of 384 at depth 24.
- ``uniform``: each block keeps its top-k heads. ``global``: every block keeps its top
  ``min_heads_per_layer``, the rest of the budget goes to the best heads of the whole network after
  each block's scores are divided by their L2 norm (Michel et al., 2019), so that the ranking follows
  importance within a block and not the block type (global blocks see more keys and larger
  activations than window blocks). The normalisation is recorded in the configuration's metadata.
- :class:`HeadImportance` (``.json``/``.npz``/``.pkl``) and :class:`PruningConfig` (``.json``) are
  the file formats; :func:`load_head_selection` is how OrionStudent reads a configuration.

Scores are ``[blocks, units]`` matrices and allocation works on any unit (heads today); SwiGLU
channels can reuse :func:`kept_per_block`, :func:`normalize_block_scores` and the allocators.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.head_importance import HeadImportance, ScoresLike, read_json

CONFIG_FORMAT = "orion-kd-pruning-config"
STRATEGIES = ("uniform", "global")
#: How each block's scores are scaled before the global ranking ('none' ranks the raw scores).
BLOCK_NORMALIZATIONS = ("l2", "none")


# --------------------------------------------------------------------------- ratio and counts


def check_pruning_ratio(pruning_ratio: Any, name: str = "pruning_ratio") -> float:
    """``pruning_ratio`` as a float in [0, 1) (the fraction REMOVED), or ``ValueError``."""
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, (int, float)) or \
            not math.isfinite(float(pruning_ratio)) or not 0.0 <= float(pruning_ratio) < 1.0:
        raise ValueError(f"{name}: expected the fraction of heads REMOVED in [0, 1) (0.5 keeps half), "
                         f"got {pruning_ratio!r}")
    return float(pruning_ratio)


def kept_per_block(units: int, pruning_ratio: float) -> int:
    """THE rounding policy: ``round(units * (1 - pruning_ratio))``, half up (8 of 16 for 0.5, 11 for 0.3)."""
    return int(math.floor(units * (1.0 - pruning_ratio) + 0.5 + 1e-9))


def _kept_count_message(ratio: float, keep: int, heads: int, depth: int, kept: int) -> str:
    """Why a selection does not match ``ratio``; names the other reading of the ratio only when it fits."""
    message = (f"pruning_ratio {ratio:g} is the fraction of heads REMOVED: it keeps {keep} of {heads} heads per "
               f"block ({depth * keep} in total), but the selection keeps {kept} ({kept / depth:g} per block on "
               f"average)")
    if ratio > 0 and kept == depth * kept_per_block(heads, 1.0 - ratio):
        message += (f"; that is pruning_ratio {1 - ratio:g} in this code base ({ratio:g} would be the kept "
                    f"fraction, the other reading)")
    return message


def resolve_head_selection(depth: int, teacher_num_heads: int, num_heads: Union[int, Sequence[int]],
                           selected_heads_per_layer: Optional[Sequence[Sequence[int]]]) -> List[List[int]]:
    """Check ``num_heads`` (int or one per block) against a selection; return one sorted list per block.

    Without a selection each block keeps its first ``num_heads`` heads.
    """
    counts = _head_counts(depth, teacher_num_heads, num_heads)
    if selected_heads_per_layer is None:
        return [list(range(count)) for count in counts]
    selection = [list(heads) for heads in selected_heads_per_layer]
    if len(selection) != depth:
        raise ValueError(f"selected_heads_per_layer: expected {depth} blocks, got {len(selection)}")
    for layer, heads in enumerate(selection):
        prefix = f"selected_heads_per_layer[{layer}]"
        if not heads:
            raise ValueError(f"{prefix}: at least one head must be kept, got []")
        if any(not isinstance(h, int) or isinstance(h, bool) for h in heads):
            raise ValueError(f"{prefix}: expected integers, got {heads}")
        if any(h < 0 or h >= teacher_num_heads for h in heads):
            raise ValueError(f"{prefix}: expected indices in [0, {teacher_num_heads}), got {heads}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"{prefix}: duplicate head indices in {heads}")
        if heads != sorted(heads):
            raise ValueError(f"{prefix}: expected sorted indices, got {heads}")
        if len(heads) != counts[layer]:
            raise ValueError(f"{prefix} keeps {len(heads)} heads but num_heads says {counts[layer]}")
    return selection


def _head_counts(depth: int, teacher_num_heads: int, num_heads: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(num_heads, int) and not isinstance(num_heads, bool):
        counts = [num_heads] * depth
    else:
        counts = list(num_heads)
        if any(not isinstance(n, int) or isinstance(n, bool) for n in counts):
            raise ValueError(f"num_heads: expected an int or one int per block, got {num_heads!r}")
        if len(counts) != depth:
            raise ValueError(f"num_heads: expected one count per block ({depth}), got {len(counts)}")
    for layer, count in enumerate(counts):
        if not 1 <= count <= teacher_num_heads:
            raise ValueError(f"num_heads[{layer}]: expected 1..{teacher_num_heads} (teacher_num_heads), got {count}")
    return counts


def validate_pruning_config(selected_heads_per_layer: Union[PruningConfig, Sequence[Sequence[int]]], depth: int,
                            teacher_num_heads: int, num_heads: Optional[Union[int, Sequence[int]]] = None,
                            pruning_ratio: Optional[float] = None) -> List[List[int]]:
    """Check a head selection and return it as lists of ints; every problem raises ``ValueError``.

    Checks: one list per block, integer indices in ``[0, teacher_num_heads)``, unique, sorted, at least one
    head per block, agreement with ``num_heads`` (int or per block) and with ``pruning_ratio`` (the fraction
    REMOVED: ``depth * kept_per_block(H, ratio)`` heads in total, the budget of both strategies).
    """
    if isinstance(selected_heads_per_layer, PruningConfig):
        selected_heads_per_layer = selected_heads_per_layer.selected_heads_per_layer
    for name, value in (("depth", depth), ("teacher_num_heads", teacher_num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(selected_heads_per_layer, (str, bytes)) or not isinstance(selected_heads_per_layer, Sequence):
        raise ValueError(f"selected_heads_per_layer: expected one list of head indices per block, "
                         f"got {type(selected_heads_per_layer).__name__}")
    if len(selected_heads_per_layer) != depth:
        raise ValueError(f"selected_heads_per_layer: expected {depth} blocks, got {len(selected_heads_per_layer)}")
    cleaned = []
    for layer, heads in enumerate(selected_heads_per_layer):
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
            raise ValueError(f"selected_heads_per_layer[{layer}]: expected a list of head indices, got {heads!r}")
        if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for h in heads):
            raise ValueError(f"selected_heads_per_layer[{layer}]: expected integers, got {list(heads)}")
        cleaned.append([int(h) for h in heads])
    counts: Union[int, List[int]]
    if num_heads is None:
        counts = [min(max(len(h), 1), teacher_num_heads) for h in cleaned]
    elif isinstance(num_heads, (int, np.integer)) and not isinstance(num_heads, bool):
        counts = int(num_heads)
    else:
        counts = [int(n) if isinstance(n, np.integer) else n for n in num_heads]
    result = resolve_head_selection(depth, teacher_num_heads, counts, cleaned)
    if pruning_ratio is not None:
        ratio = check_pruning_ratio(pruning_ratio)
        keep = kept_per_block(teacher_num_heads, ratio)
        kept = sum(len(h) for h in result)
        if kept != depth * keep:
            raise ValueError(_kept_count_message(ratio, keep, teacher_num_heads, depth, kept))
    return result


# --------------------------------------------------------------------------- the configuration record


@dataclass
class PruningConfig:
    """Which teacher heads each block keeps.

    ``selected_heads_per_layer``: sorted teacher head indices per block (what
    ``EVAViTStudent(selected_heads_per_layer=...)`` takes); ``num_heads``: heads kept per block;
    ``pruning_ratio``: fraction of heads REMOVED that was asked for. Iterating over the object
    yields the per-block lists, so it can also be passed where a list of lists is expected.
    """

    selected_heads_per_layer: List[List[int]]
    teacher_num_heads: int
    pruning_ratio: float
    strategy: str = "uniform"
    method: str = ""
    min_heads_per_layer: int = 1
    num_heads: List[int] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selected_heads_per_layer = validate_pruning_config(
            self.selected_heads_per_layer, depth=len(self.selected_heads_per_layer),
            teacher_num_heads=self.teacher_num_heads, num_heads=self.num_heads or None)
        self.num_heads = [len(h) for h in self.selected_heads_per_layer]
        check_pruning_ratio(self.pruning_ratio)

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.selected_heads_per_layer)

    def __len__(self) -> int:
        return len(self.selected_heads_per_layer)

    def __getitem__(self, index: int) -> List[int]:
        return self.selected_heads_per_layer[index]

    @property
    def depth(self) -> int:
        return len(self.selected_heads_per_layer)

    def to_model_kwargs(self) -> Dict[str, Any]:
        """Arguments for ``EVAViTStudent``: ``num_heads``, ``teacher_num_heads``, ``selected_heads_per_layer``."""
        return dict(num_heads=list(self.num_heads), teacher_num_heads=self.teacher_num_heads,
                    selected_heads_per_layer=[list(h) for h in self.selected_heads_per_layer])

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=CONFIG_FORMAT, version=1, selected_heads_per_layer=self.selected_heads_per_layer,
                    num_heads=self.num_heads, teacher_num_heads=self.teacher_num_heads,
                    pruning_ratio=self.pruning_ratio, strategy=self.strategy, method=self.method,
                    min_heads_per_layer=self.min_heads_per_layer, metadata=self.metadata)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write the configuration as JSON (atomically)."""
        if os.path.splitext(os.fspath(path))[1].lower() != ".json":
            raise ValueError(f"{os.fspath(path)}: pruning configurations are saved as .json")
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "PruningConfig":
        """Read and validate a configuration written by :meth:`save`."""
        path = os.fspath(path)
        payload = read_json(path, "pruning configuration")
        if not isinstance(payload, Mapping) or payload.get("format") != CONFIG_FORMAT:
            raise ValueError(f"{path}: not a pruning configuration (expected format {CONFIG_FORMAT!r}, written by "
                             f"PruningConfig.save or `tools/head_pruning_utils.py prune-config`)")
        try:
            return cls(selected_heads_per_layer=payload["selected_heads_per_layer"],
                       teacher_num_heads=int(payload["teacher_num_heads"]),
                       pruning_ratio=float(payload["pruning_ratio"]), strategy=payload.get("strategy", "uniform"),
                       method=payload.get("method", ""), min_heads_per_layer=int(payload.get("min_heads_per_layer", 1)),
                       num_heads=list(payload.get("num_heads") or []), metadata=dict(payload.get("metadata") or {}))
        except KeyError as err:
            raise ValueError(f"{path}: pruning configuration without the key {err}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- allocation


def normalize_block_scores(scores: torch.Tensor, how: str = "l2") -> torch.Tensor:
    """Each block's row divided by its L2 norm (``'l2'``, Michel et al.) or left alone (``'none'``)."""
    if how not in BLOCK_NORMALIZATIONS:
        raise ValueError(f"block_normalization: expected one of {BLOCK_NORMALIZATIONS}, got {how!r}")
    if how == "none":
        return scores
    return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)


def allocate_uniform(scores: torch.Tensor, counts: Sequence[int]) -> List[List[int]]:
    """Block ``l`` keeps its ``counts[l]`` best units (ties go to the lower index), sorted."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return [sorted(order[layer, :count].tolist()) for layer, count in enumerate(counts)]


def allocate_global(scores: torch.Tensor, budget: int, floor: int) -> List[List[int]]:
    """Every block keeps its ``floor`` best units; the rest of ``budget`` goes to the best scores overall."""
    depth, units = scores.shape
    chosen = torch.zeros(depth, units, dtype=torch.bool)
    for layer, kept in enumerate(allocate_uniform(scores, [floor] * depth)):
        chosen[layer, kept] = True
    remaining = budget - int(chosen.sum())
    for flat in torch.sort(scores.flatten(), descending=True, stable=True).indices.tolist():
        if remaining <= 0:
            break
        layer, unit = divmod(flat, units)
        if not chosen[layer, unit]:
            chosen[layer, unit] = True
            remaining -= 1
    return [torch.nonzero(chosen[layer]).flatten().tolist() for layer in range(depth)]


def _kept_mass(scores: torch.Tensor, selection: Sequence[Sequence[int]]) -> Optional[float]:
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for layer, heads in enumerate(selection):
        kept[layer, list(heads)] = True
    total = float(scores.sum())
    return float(scores[kept].sum()) / total if total > 0 else None


def create_pruning_config(importance: Union[HeadImportance, ScoresLike], pruning_ratio: float = 0.5,
                          strategy: str = "uniform", min_heads_per_layer: int = 1,
                          block_normalization: str = "l2") -> PruningConfig:
    """Choose the heads to keep from importance scores (see the module docstring for the policy).

    ``pruning_ratio`` is the fraction of heads REMOVED (0.5: 16 -> 8 heads); when ``H * (1 - ratio)``
    is not a whole number a warning says so and ``metadata['effective_pruning_ratio']`` records
    ``1 - k / H``. ``block_normalization`` ('l2' or 'none') scales each block's scores before the
    ``global`` ranking; ``metadata['importance_mass_kept']`` is measured on the same scaled scores.
    Ties go to the lower head index.
    """
    importance = HeadImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    ratio = check_pruning_ratio(pruning_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    ranked = normalize_block_scores(scores, block_normalization)
    depth, heads = scores.shape
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int) or \
            not 1 <= min_heads_per_layer <= heads:
        raise ValueError(f"min_heads_per_layer: expected an int in [1, {heads}], got {min_heads_per_layer!r}")
    keep = kept_per_block(heads, ratio)
    if keep < 1:
        raise ValueError(f"pruning_ratio {ratio} removes every head of a {heads}-head block "
                         f"(round({heads} * {1 - ratio:.4g}) = 0); the largest ratio that keeps one head is "
                         f"{1 - 1 / heads:.4g}")
    if abs(heads * (1.0 - ratio) - keep) > 1e-6:
        warnings.warn(f"pruning_ratio {ratio}: {heads} * (1 - {ratio}) = {heads * (1 - ratio):.4g} heads is not a "
                      f"whole number; keeping {keep} per block (effective ratio {1 - keep / heads:.4g})")
    budget = depth * keep
    if strategy == "uniform":
        if keep < min_heads_per_layer:
            raise ValueError(f"uniform pruning at ratio {ratio} keeps {keep} heads per block, fewer than "
                             f"min_heads_per_layer={min_heads_per_layer}")
        selection = allocate_uniform(ranked, [keep] * depth)
    else:
        if budget < depth * min_heads_per_layer:
            raise ValueError(f"global pruning at ratio {ratio} keeps {budget} heads in total, fewer than the floor "
                             f"of {min_heads_per_layer} per block x {depth} blocks")
        selection = allocate_global(ranked, budget, min_heads_per_layer)
    metadata = dict(effective_pruning_ratio=1.0 - budget / (depth * heads), heads_kept_total=budget,
                    block_normalization=block_normalization, importance_mass_kept=_kept_mass(ranked, selection),
                    importance_source=importance.source, importance_num_samples=importance.num_samples)
    return PruningConfig(selected_heads_per_layer=selection, teacher_num_heads=heads, pruning_ratio=ratio,
                         strategy=strategy, method=method, min_heads_per_layer=min_heads_per_layer,
                         num_heads=[len(h) for h in selection], metadata=metadata)


# --------------------------------------------------------------------------- reading a selection


def load_head_selection(source: Union[PruningConfig, str, "os.PathLike[str]", Mapping[str, Any],
                                      Sequence[Sequence[int]]],
                        teacher_num_heads: Optional[int] = None) -> Tuple[List[List[int]], str]:
    """Per-block head lists and a label from a configuration file, a :class:`PruningConfig`, a dict or lists.

    A file must be a configuration written by ``PruningConfig.save`` (``prune-config`` on the command
    line); a dict needs ``selected_heads_per_layer``. A configuration made for another teacher head
    count than ``teacher_num_heads`` is refused; the indices themselves are checked by the caller,
    who knows the backbone.
    """
    label, recorded = "pruning_config", None
    if isinstance(source, (str, os.PathLike)):
        label, source = f"pruning_config {os.fspath(source)}", PruningConfig.load(source)
    if isinstance(source, PruningConfig):
        recorded, source = source.teacher_num_heads, source.selected_heads_per_layer
    elif isinstance(source, Mapping):
        if "selected_heads_per_layer" not in source:
            raise ValueError(f"pruning_config: expected key 'selected_heads_per_layer', got keys {sorted(source)}")
        recorded, source = source.get("teacher_num_heads"), source["selected_heads_per_layer"]
    if not isinstance(source, (list, tuple)) or not all(isinstance(h, (list, tuple)) for h in source):
        raise ValueError(f"{label}: expected one list of head indices per block, got {type(source).__name__}")
    if recorded is not None and teacher_num_heads is not None and int(recorded) != int(teacher_num_heads):
        raise ValueError(f"{label}: made for a teacher with {recorded} heads per block, but this teacher has "
                         f"{teacher_num_heads}")
    return [list(heads) for heads in source], label


__all__ = [
    "CONFIG_FORMAT", "STRATEGIES", "BLOCK_NORMALIZATIONS", "HeadImportance", "PruningConfig", "check_pruning_ratio",
    "kept_per_block", "resolve_head_selection", "validate_pruning_config", "normalize_block_scores",
    "allocate_uniform", "allocate_global", "create_pruning_config", "load_head_selection",
]
