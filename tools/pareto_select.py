"""What each family of the Pareto sweep keeps at a target speedup, and pruning a pruned student further.

Families (``tools/pareto_sweep.py``):

- ``heads``, ``heads_width``, ``heads_width_depth``: the budget's choice (``tools/head_pruning/budget.py``,
  :func:`budget_choice`) on the axes heads / heads + SwiGLU channels / heads + channels + whole blocks, from
  importance scored on training frames (block importance: the KD-loss increase when a block is skipped,
  :func:`block_importance`);
- ``random``: the per-block counts and the number of removed blocks of the ``heads_width_depth`` choice at
  the same target, with the blocks, heads and channels drawn at random by seed (:func:`random_like`).

Selections stay in TEACHER indices throughout: a removed block keeps an entry ``[]`` in the per-block
lists. :func:`narrow_student` cuts an already pruned student down to a sub-selection (the iterative
schedule prunes its trained student further), copying the student's own weights.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

FAMILY_AXES: Dict[str, Tuple[str, ...]] = {"heads": ("heads",), "heads_width": ("heads", "channels"),
                                           "heads_width_depth": ("heads", "channels", "blocks")}
#: The random family copies the counts of this family's choice.
RANDOM_MATCHES = "heads_width_depth"
FAMILIES: Tuple[str, ...] = tuple(FAMILY_AXES) + ("random",)


@dataclass
class Choice:
    """One family's selection at one target: the configuration, or why there is none."""

    family: str
    target: float
    config: Any = None  # PruningConfig; None when the target is out of reach
    predicted_speedup: Optional[float] = None
    fastest_reachable: Optional[float] = None  # where the family's curve ends (unreachable targets)
    seed: Optional[int] = None  # random family only
    note: str = ""
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return self.config is not None

    @property
    def name(self) -> str:
        seed = "" if self.seed is None else f"_s{self.seed}"
        return f"{self.family}_t{self.target:g}{seed}"


# --------------------------------------------------------------------------- the budget and block importance
# The two call sites of the budget and block-importance modules: everything else calls these.


def block_importance(model: Any, dataloader: Any, model_cfg: Mapping[str, Any]) -> Any:
    """Per teacher block: the increase of the KD loss the students train on (``model_cfg``'s ``kd_config`` and
    ``distillation_loss``) when the block is skipped, on ``dataloader`` (training frames)."""
    from mmcv.models.utils.kd_config import distillation_loss_config, resolve_kd_config
    from tools.head_pruning.block_importance import compute_block_importance

    kd_cfg = dict(model_cfg.get("kd_config") or {})
    loss = distillation_loss_config(resolve_kd_config(dict(kd_cfg)), kd_cfg,
                                    dict(model_cfg.get("distillation_loss") or {}))
    return compute_block_importance(model, dataloader, method="kd_loss", num_batches=None, kd_loss=loss,
                                    progress=False)


def budget_choice(family: str, target: float, importances: Mapping[str, Any], geometry: Mapping[str, Any],
                  unit_costs: Any = None) -> Choice:
    """The budget's selection for ``family`` at ``target`` (its predicted speedup), or an unreachable record.

    Costs: ``unit_costs`` (measured on the machine) or, when None, the analytic MACs of ``geometry``.
    """
    from tools.head_pruning.budget import UnreachableTargetError, prune_to_budget

    axes = FAMILY_AXES[family]
    try:
        result = prune_to_budget(target, importances["heads"],
                                 importances.get("channels") if "channels" in axes else None,
                                 importances.get("blocks") if "blocks" in axes else None,
                                 geometry=dict(geometry), unit_costs=unit_costs, axes=axes)
    except UnreachableTargetError as err:
        return Choice(family, target, fastest_reachable=fastest_of(err), note=str(err))
    return Choice(family, target, config=result.config, predicted_speedup=float(result.predicted_speedup),
                  fastest_reachable=float(result.fastest_reachable))


def measured_unit_costs(make_backbone: Any, image: Any, teacher_heads: int, teacher_hidden: int, repeats: int) -> Any:
    """Seconds per head, channel, block overhead and stem on this machine (``make_backbone(heads, hidden)``)."""
    from tools.head_pruning.timing import measure_block_costs

    return measure_block_costs(make_backbone, image, teacher_heads, teacher_hidden, repeats, 2, image.device,
                               source="measured block latency, miniature world")


def fastest_of(err: Exception) -> Optional[float]:
    """The fastest reachable speedup an ``UnreachableTargetError`` names."""
    value = getattr(err, "fastest_reachable", None)
    return float(value) if isinstance(value, (int, float)) else None


# --------------------------------------------------------------------------- reading and writing selections


def teacher_blocks(config: Any) -> int:
    """The teacher's block count (one entry per teacher block in every per-block list)."""
    return len(config.selected_heads_per_layer)


def kept_blocks(config: Any) -> List[int]:
    """Teacher indices of the blocks ``config`` keeps (all when it selects none)."""
    blocks = getattr(config, "selected_blocks", None)
    return list(range(teacher_blocks(config))) if blocks is None else sorted(int(b) for b in blocks)


def channel_lists(config: Any) -> Optional[List[List[int]]]:
    """Per teacher block, the channels kept (None when the configuration keeps every channel)."""
    channels = getattr(config, "selected_channels_per_layer", None)
    return None if channels is None else [list(c) for c in channels]


def kept_counts(config: Any) -> List[Tuple[int, Optional[int]]]:
    """(heads, channels or None) of every KEPT block, in teacher order."""
    channels = channel_lists(config)
    return [(len(config.selected_heads_per_layer[t]), None if channels is None else len(channels[t]))
            for t in kept_blocks(config)]


def make_config(template: Any, heads: Sequence[Sequence[int]], channels: Optional[Sequence[Sequence[int]]],
                blocks: Optional[Sequence[int]], method: str, metadata: Mapping[str, Any]) -> Any:
    """A PruningConfig like ``template`` (teacher sizes, strategy) with these selections, in teacher indices.

    ``heads`` / ``channels``: one list per teacher block (``[]`` for a removed block); ``blocks``: the kept
    teacher blocks, None for all. The ratios are the fractions of units the selection removes.
    """
    from mmcv.models.utils.pruning_config import PruningConfig

    depth, full_heads = len(heads), int(template.teacher_num_heads)
    kwargs: Dict[str, Any] = dict(
        selected_heads_per_layer=[sorted(int(h) for h in units) for units in heads], teacher_num_heads=full_heads,
        pruning_ratio=1.0 - sum(len(h) for h in heads) / (depth * full_heads), strategy=template.strategy,
        method=method, min_heads_per_layer=template.min_heads_per_layer, metadata=dict(metadata))
    if channels is not None:
        hidden = int(template.teacher_mlp_hidden)
        kwargs.update(selected_channels_per_layer=[sorted(int(c) for c in units) for units in channels],
                      teacher_mlp_hidden=hidden, channel_method=method,
                      mlp_pruning_ratio=1.0 - sum(len(c) for c in channels) / (depth * hidden),
                      min_channels_per_layer=int(getattr(template, "min_channels_per_layer", 1)))
    if blocks is not None and len(blocks) < depth:
        kwargs["selected_blocks"] = sorted(int(b) for b in blocks)
    return PruningConfig(**kwargs)


def random_like(config: Any, seed: int, target: float) -> Any:
    """Random blocks, heads and channels with ``config``'s counts: as many blocks removed, and the j-th kept
    block keeping as many heads (channels) as ``config``'s j-th kept block. Drawn by ``seed`` and ``target``."""
    rng = random.Random(seed * 100003 + int(round(target * 1000)))
    depth, counts = teacher_blocks(config), kept_counts(config)
    blocks = sorted(rng.sample(range(depth), len(counts)))
    heads: List[List[int]] = [[] for _ in range(depth)]
    channels: Optional[List[List[int]]] = None if counts[0][1] is None else [[] for _ in range(depth)]
    for block, (num_heads, num_channels) in zip(blocks, counts):
        heads[block] = sorted(rng.sample(range(int(config.teacher_num_heads)), num_heads))
        if channels is not None:
            channels[block] = sorted(rng.sample(range(int(config.teacher_mlp_hidden)), int(num_channels)))
    return make_config(config, heads, channels, blocks if len(blocks) < depth else None, "random",
                       dict(family="random", seed=seed, target=target, counts_of=config.metadata.get("family", "")))


def union(a: Any, b: Any) -> Any:
    """The smallest selection holding both ``a`` and ``b`` (per block: the union of their heads and channels)."""
    depth = teacher_blocks(a)
    blocks = sorted(set(kept_blocks(a)) | set(kept_blocks(b)))
    heads = [sorted(set(a.selected_heads_per_layer[t]) | set(b.selected_heads_per_layer[t])) if t in blocks else []
             for t in range(depth)]
    ca, cb = channel_lists(a), channel_lists(b)
    template = a if ca is not None or cb is None else b
    channels = None
    if ca is not None or cb is not None:
        every = list(range(int(template.teacher_mlp_hidden)))
        ca, cb = ca or [every] * depth, cb or [every] * depth
        channels = [sorted(set(ca[t]) | set(cb[t])) if t in blocks else [] for t in range(depth)]
    return make_config(template, heads, channels, blocks if len(blocks) < depth else None, "union",
                       dict(union_of=[a.metadata.get("name", ""), b.metadata.get("name", "")]))


def is_subselection(sub: Any, sup: Any) -> bool:
    """Whether every block, head and channel ``sub`` keeps is kept by ``sup`` (teacher indices)."""
    if not set(kept_blocks(sub)) <= set(kept_blocks(sup)):
        return False
    cs, cp = channel_lists(sub), channel_lists(sup)
    hidden = int((sub if cs is not None else sup).teacher_mlp_hidden or 0) if cs or cp else 0
    for t in kept_blocks(sub):
        if not set(sub.selected_heads_per_layer[t]) <= set(sup.selected_heads_per_layer[t]):
            return False
        if cp is not None and not set(range(hidden) if cs is None else cs[t]) <= set(cp[t]):
            return False  # None: every channel
    return True


def describe(config: Any) -> Dict[str, Any]:
    """What a configuration keeps, for the sweep's JSON: blocks, heads and channels per kept block."""
    counts = kept_counts(config)
    return dict(blocks=kept_blocks(config), removed_blocks=teacher_blocks(config) - len(counts),
                heads_per_kept_block=[h for h, _ in counts],
                channels_per_kept_block=None if counts[0][1] is None else [c for _, c in counts])


# --------------------------------------------------------------------------- pruning a pruned student further


def _positions(kept: Sequence[int], wanted: Iterable[int], what: str) -> List[int]:
    """Where each of ``wanted`` (teacher indices) sits among ``kept``; a unit not kept is an error naming it."""
    kept = list(kept)
    missing = [u for u in wanted if u not in kept]
    if missing:
        raise ValueError(f"narrow_student: {what}: {missing} were already removed (kept: {kept}); a further pruning "
                         f"can only remove units")
    return [kept.index(u) for u in wanted]


def narrow_student(backbone: Any, backbone_cfg: Mapping[str, Any], config: Any) -> Tuple[Any, Dict[str, Any]]:
    """A new EVAViTStudent keeping ``config``'s sub-selection, with ``backbone``'s OWN (trained) weights.

    ``backbone``: a pruned EVAViTStudent; ``backbone_cfg``: the config it was built from (the exported
    checkpoint's ``meta['img_backbone']``); ``config``: a selection in teacher indices whose blocks, heads
    and channels ``backbone`` all keeps. Returns the new backbone and its config.
    """
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent
    from mmcv.models.utils.eva_surgery import (apply_slice_plan, channel_slice_plan, head_slice_plan,
                                               is_selection_index_key)

    cfg = {k: v for k, v in backbone_cfg.items() if k not in ("mlp_hidden", "selected_channels_per_layer",
                                                               "selected_blocks")}
    cfg.update(config.to_model_kwargs())
    if getattr(config, "selected_blocks", None) is not None:
        cfg["selected_blocks"] = list(config.selected_blocks)
    new = EVAViTStudent(**{k: v for k, v in cfg.items() if k != "type"})
    source_blocks = list(getattr(backbone, "kept_blocks", range(len(backbone.blocks))))
    target_blocks = list(getattr(new, "kept_blocks", range(len(new.blocks))))
    src = backbone.state_dict()
    state = {key: value for key, value in src.items() if not key.startswith("blocks.")}
    plans: Dict[int, Dict[str, Any]] = {}
    for j, block in enumerate(target_blocks):
        i = _positions(source_blocks, [block], "blocks")[0]
        state.update({f"blocks.{j}.{key[len(f'blocks.{i}.'):]}": value for key, value in src.items()
                      if key.startswith(f"blocks.{i}.")})
        heads = backbone.selected_heads[i]
        plans[j] = head_slice_plan([_positions(heads, new.selected_heads[j], f"block {block} heads")],
                                   new.head_dim, len(heads))[0]
        channels = backbone.selected_channels[i]
        plans[j].update(channel_slice_plan([_positions(channels, new.selected_channels[j], f"block {block} channels")],
                                           len(channels))[0])
    apply_slice_plan(state, plans, label="narrow_student")
    own = new.state_dict()
    state.update({key: value for key, value in own.items() if is_selection_index_key(key) or key == "kept_blocks"})
    missing = [key for key in own if key not in state]
    if missing:
        raise ValueError(f"narrow_student: the source backbone has no {missing[:4]} (expected an EVAViTStudent "
                         f"like the one {backbone_cfg.get('type', 'EVAViTStudent')} config builds)")
    new.load_state_dict({key: state[key] for key in own}, strict=True)
    return new.train(backbone.training), cfg


__all__ = ["FAMILY_AXES", "FAMILIES", "RANDOM_MATCHES", "Choice", "block_importance", "budget_choice",
           "measured_unit_costs",
           "fastest_of", "teacher_blocks", "kept_blocks", "channel_lists", "kept_counts", "make_config", "random_like",
           "union", "is_subselection", "describe", "narrow_student"]
