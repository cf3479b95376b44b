"""Which blocks, heads and SwiGLU channels a KD student keeps: exactly one source says it, the policy checks it.

Used by ``OrionStudent`` when it builds its ``EVAViTStudent`` backbone from a config. Sources, one at
most for each unit kind:

- ``model.pruning_config``: a configuration file / ``PruningConfig`` / dict / head lists (heads, and
  channels when the configuration prunes the MLPs, and the kept blocks when it removes some);
- ``img_backbone.selected_heads_per_layer`` / ``img_backbone.selected_channels_per_layer`` /
  ``img_backbone.selected_blocks``;
- ``kd_config.head_selection='magnitude'``: the teacher's weight magnitudes choose the heads (q/k/v
  row norms) and, when ``img_backbone.mlp_hidden`` narrows the MLPs, the channels
  (``eva_surgery.channel_weight_norms``).

A student that keeps every block (every head, every channel) needs no source for them. The per-block
lists keep one entry per teacher block; the entries of removed blocks are ignored.

Counts: a configuration file decides them (``num_heads`` / ``mlp_hidden`` taken from it when not given);
without one, ``img_backbone.num_heads`` when given, else ``kd_config.pruning_ratio`` (the fraction of heads
REMOVED: ``round(heads * (1 - ratio))`` per block), else every head. A given ``num_heads`` / ``mlp_hidden``
must agree with the selection, and the selection with ``kd_config.pruning_ratio`` / ``mlp_pruning_ratio``
(the same policy the tools use), except for a budgeted configuration (``metadata.budget``: counts per block
from a target speedup), to which the ratios do not apply. Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from mmcv.models.utils.eva_surgery import channel_magnitude_scores, magnitude_scores
from mmcv.models.utils.eva_surgery import resolve_block_selection
from mmcv.models.utils.pruning_config import (allocate_uniform, check_pruning_ratio, kept_per_block,
                                              load_pruning_selection, resolve_channel_selection,
                                              resolve_head_selection, validate_channel_selection,
                                              validate_pruning_config)

Selection = List[List[int]]


def teacher_mlp_width(cfg: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor]) -> int:
    """The teacher's SwiGLU width: its checkpoint's ``blocks.0.mlp.w1`` rows, else ``int(embed_dim * mlp_ratio)``."""
    weight = backbone_state.get("blocks.0.mlp.w1.weight")
    if weight is not None:
        return int(weight.shape[0])
    return int(cfg.get("embed_dim", 768) * cfg.get("mlp_ratio", 4 * 2 / 3))


def _explicit(cfg: Mapping[str, Any], pruning: Any, kd: Mapping[str, Any], arg: str) -> Tuple[Optional[Selection], str]:
    """The one explicit source of ``arg`` (heads or channels), or (None, '')."""
    from_config = pruning is not None and getattr(pruning, arg) is not None
    by_magnitude = arg != "selected_blocks" and kd.get("head_selection") is not None
    given = [name for name, present in (("model.pruning_config", from_config),
                                        (f"img_backbone.{arg}", cfg.get(arg) is not None),
                                        ("kd_config.head_selection", by_magnitude))
             if present]
    kind = {"selected_heads_per_layer": "head", "selected_channels_per_layer": "channel"}.get(arg, "block")
    if len(given) > 1:
        raise ValueError(f"OrionStudent: give the {kind} selection once: {' and '.join(given)} are both set")
    if from_config:
        return _copied(getattr(pruning, arg)), pruning.label
    if cfg.get(arg) is not None:
        return _copied(cfg[arg]), f"img_backbone.{arg}"
    return None, ""


def _copied(value: Any) -> Any:
    """A copy of a selection (lists of unit lists, or a block list); anything else as given, for the checks."""
    if not isinstance(value, (list, tuple)):
        return value
    return [list(u) if isinstance(u, (list, tuple)) else u for u in value]


def _by_magnitude(scores: torch.Tensor, counts: List[int], what: str) -> Tuple[Selection, str]:
    return allocate_uniform(scores, counts), f"kd_config.head_selection='magnitude', {what} of the teacher"


def resolve_student_selection(cfg: Dict[str, Any], pruning_config: Any, kd: Mapping[str, Any],
                              backbone_state: Mapping[str, torch.Tensor], teacher_path: str,
                              log: Optional[Callable[[str], None]] = None) -> Tuple[Dict[str, Any], str]:
    """The student backbone config with its block, head (and channel) selection, and where it came from.

    ``log`` gets one line when a budgeted configuration sets the counts (the ratios do not apply to it).
    """
    depth = cfg.get("depth", 12)
    teacher_heads = cfg.get("teacher_num_heads", 16)
    teacher_hidden = teacher_mlp_width(cfg, backbone_state)
    pruning = None
    if pruning_config is not None:
        loaded = load_pruning_selection(pruning_config, teacher_heads, teacher_hidden)
        pruning = _Loaded(loaded.heads, loaded.channels, loaded.label, loaded.blocks, loaded.budgeted)
        if loaded.budgeted:
            kd = dict(kd, pruning_ratio=None, mlp_pruning_ratio=None)
            if log is not None:
                log(f"[OrionStudent] {loaded.label} is budgeted (metadata.budget): its heads, channels and blocks "
                    f"per block decide the counts; kd_config.pruning_ratio / mlp_pruning_ratio do not apply to it")
    blocks, block_source = _resolve_blocks(cfg, pruning, kd, depth)
    heads, head_source = _resolve_heads(cfg, pruning, kd, backbone_state, teacher_path, depth, teacher_heads, blocks)
    channels, channel_source = _resolve_channels(cfg, pruning, kd, backbone_state, teacher_path, depth, teacher_hidden,
                                                 blocks)
    cfg.update(heads)
    cfg.update(channels)
    if blocks is not None:
        cfg.update(selected_blocks=blocks)
    sources = head_source if not channel_source or channel_source == head_source else \
        f"heads: {head_source}; channels: {channel_source}"
    if block_source and block_source != head_source:
        sources += f"; blocks: {block_source}"
    return cfg, sources


class _Loaded:
    """A loaded configuration's selections under the argument names of ``EVAViTStudent``."""

    def __init__(self, heads: Selection, channels: Optional[Selection], label: str,
                 blocks: Optional[List[int]] = None, budgeted: bool = False) -> None:
        self.selected_heads_per_layer, self.selected_channels_per_layer, self.label = heads, channels, label
        self.selected_blocks, self.budgeted = blocks, budgeted


def _resolve_blocks(cfg: Mapping[str, Any], pruning: Optional[_Loaded], kd: Mapping[str, Any], depth: int
                    ) -> Tuple[Optional[List[int]], str]:
    """The kept teacher blocks (None: every block) from their one source, checked against ``depth``."""
    blocks, source = _explicit(cfg, pruning, kd, "selected_blocks")
    if blocks is None:
        return None, ""
    try:
        return resolve_block_selection(depth, blocks), source
    except ValueError as err:
        raise ValueError(f"OrionStudent: the block selection ({source}) does not fit img_backbone (depth {depth}, "
                         f"the teacher's): {err}") from None


def _resolve_heads(cfg: Mapping[str, Any], pruning: Optional[_Loaded], kd: Mapping[str, Any],
                   backbone_state: Mapping[str, torch.Tensor], teacher_path: str, depth: int, teacher_heads: int,
                   blocks: Optional[List[int]]) -> Tuple[Dict[str, Any], str]:
    num_heads = cfg.get("num_heads")
    selection, source = _explicit(cfg, pruning, kd, "selected_heads_per_layer")
    if selection is not None and pruning is not None and num_heads is None:
        num_heads = [len(heads) for heads in selection]  # the file decides the counts
    elif num_heads is None and kd.get("pruning_ratio") is not None:
        num_heads = kept_per_block(teacher_heads, check_pruning_ratio(kd["pruning_ratio"], "kd_config.pruning_ratio"))
    elif num_heads is None:
        num_heads = teacher_heads
    kept = range(depth) if blocks is None else blocks
    if selection is None:
        counts = [len(heads) for heads in resolve_head_selection(depth, teacher_heads, num_heads, None, blocks)]
        if kd.get("head_selection") == "magnitude":
            scores = magnitude_scores(backbone_state, depth, teacher_heads, label=teacher_path)
            selection, source = _by_magnitude(scores, counts, "q/k/v weight norms")
        elif all(counts[layer] == teacher_heads for layer in kept):
            selection, source = [list(range(teacher_heads)) for _ in range(depth)], "every head kept"
        else:
            raise ValueError(f"OrionStudent: img_backbone keeps {counts} of {teacher_heads} heads per block but "
                             f"nothing says which: set model.pruning_config to a file from `python "
                             f"tools/head_pruning_utils.py prune-config` or kd_config.head_selection='magnitude'")
    try:
        validate_pruning_config(selection, depth, teacher_heads, num_heads=num_heads,
                                pruning_ratio=kd.get("pruning_ratio"), selected_blocks=blocks)
    except ValueError as err:
        raise ValueError(f"OrionStudent: the head selection ({source}) does not fit img_backbone "
                         f"(num_heads={num_heads!r}, depth {depth}, {teacher_heads} teacher heads, "
                         f"kd_config.pruning_ratio={kd.get('pruning_ratio')!r}): {err}") from None
    return dict(num_heads=num_heads, teacher_num_heads=teacher_heads, selected_heads_per_layer=selection), source


def _resolve_channels(cfg: Mapping[str, Any], pruning: Optional[_Loaded], kd: Mapping[str, Any],
                      backbone_state: Mapping[str, torch.Tensor], teacher_path: str, depth: int, teacher_hidden: int,
                      blocks: Optional[List[int]]) -> Tuple[Dict[str, Any], str]:
    mlp_hidden = cfg.get("mlp_hidden")
    selection, source = _explicit(cfg, pruning, kd, "selected_channels_per_layer")
    if selection is not None and mlp_hidden is None:
        mlp_hidden = [len(channels) for channels in selection]
    if selection is None:
        counts = [len(c) for c in resolve_channel_selection(depth, teacher_hidden, mlp_hidden, None, blocks)]
        if all(counts[layer] == teacher_hidden for layer in (range(depth) if blocks is None else blocks)):
            if kd.get("mlp_pruning_ratio") not in (None, 0, 0.0):
                raise ValueError(f"OrionStudent: kd_config.mlp_pruning_ratio={kd['mlp_pruning_ratio']!r} but every "
                                 f"SwiGLU keeps its {teacher_hidden} channels (set img_backbone.mlp_hidden or a joint "
                                 f"model.pruning_config)")
            return {}, ""
        if kd.get("head_selection") != "magnitude":
            raise ValueError(f"OrionStudent: img_backbone.mlp_hidden keeps {sorted(set(counts))} of {teacher_hidden} "
                             f"SwiGLU channels per block but nothing says which: set model.pruning_config to a joint "
                             f"configuration (`tools/head_pruning_utils.py prune-config --channel-importance ...`) or "
                             f"kd_config.head_selection='magnitude'")
        scores = channel_magnitude_scores(backbone_state, depth, label=teacher_path)
        selection, source = _by_magnitude(scores, counts, "SwiGLU channel weight norms")
    try:
        validate_channel_selection(selection, depth, teacher_hidden, mlp_hidden=mlp_hidden,
                                   mlp_pruning_ratio=kd.get("mlp_pruning_ratio"), selected_blocks=blocks)
    except ValueError as err:
        raise ValueError(f"OrionStudent: the channel selection ({source}) does not fit img_backbone "
                         f"(mlp_hidden={mlp_hidden!r}, depth {depth}, teacher MLP width {teacher_hidden}, "
                         f"kd_config.mlp_pruning_ratio={kd.get('mlp_pruning_ratio')!r}): {err}") from None
    return dict(mlp_hidden=mlp_hidden, selected_channels_per_layer=selection), source


__all__ = ["teacher_mlp_width", "resolve_student_selection"]
