"""Head and SwiGLU-channel surgery on ORION's EVA-02 backbone layout: which rows and columns a unit owns.

Head ``h`` of a block (``head_dim`` channels per head) owns channels ``[h * head_dim, (h + 1) * head_dim)``
of every tensor in :data:`HEAD_SLICES`: the output rows of ``q_proj/k_proj/v_proj``, the entries of
``q_bias/v_bias`` (k has no bias) and of ``inner_attn_ln`` (``subln=True`` only), and the input
columns of ``proj``. Hidden channel ``c`` of a SwiGLU MLP owns entry ``c`` of every tensor in
:data:`CHANNEL_SLICES`: row ``c`` of ``mlp.w1``/``mlp.w2`` and of their biases, entry ``c`` of
``mlp.ffn_ln``'s weight and bias, column ``c`` of ``mlp.w3``. Everything else (``proj.bias``,
``w3.bias``, the block norms, the rotary tables) is shared.

Slicing is planned per block as ``{key suffix: SlicePlan(axis, index, full)}``; heads and channels
join one plan (:func:`pruning_slice_plan`) and :func:`apply_slice_plan` cuts both. A pruned block
records what it kept in two buffers, ``attn.head_index`` and ``mlp.channel_index``. One home for this
arithmetic, used by ``EVAViTStudent.load_from_teacher``, OrionStudent's load hook, magnitude
importance and the tools.

A depth-pruned backbone keeps a sorted subset of the teacher's blocks, recorded in the root buffer
``kept_blocks``; its compact ``blocks.j.*`` keys hold teacher block ``kept_blocks[j]``
(:func:`select_teacher_blocks` renames a teacher's keys that way).

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mmcv.models.utils.checkpoint_io import load_checkpoint_file, state_dict_of

#: Buffer (per attention block) that records the teacher heads a pruned block keeps.
HEAD_INDEX_KEY = "head_index"
#: Buffer (per SwiGLU MLP) that records the teacher hidden channels a pruned MLP keeps.
CHANNEL_INDEX_KEY = "channel_index"
#: Key suffixes (relative to ``blocks.N.``) of the two selection records.
HEAD_INDEX_SUFFIX = "attn." + HEAD_INDEX_KEY
CHANNEL_INDEX_SUFFIX = "mlp." + CHANNEL_INDEX_KEY
#: Buffer (at the backbone root) that records the teacher blocks a depth-pruned backbone keeps.
KEPT_BLOCKS_KEY = "kept_blocks"
#: Prefix of the backbone's keys in an ORION detector checkpoint.
BACKBONE_PREFIX = "img_backbone."


class OwnedSlice(NamedTuple):
    """A tensor (key relative to ``blocks.N.``) whose ``axis`` is split into equal per-unit slices."""

    suffix: str
    axis: int


class SlicePlan(NamedTuple):
    """Keep ``index`` along ``axis`` of a tensor holding ``full`` channels there: units of ``width`` channels."""

    axis: int
    index: torch.Tensor
    full: int
    width: int
    unit: str = "heads"


#: What an attention head owns (rows = axis 0, columns = axis 1).
HEAD_SLICES: Tuple[OwnedSlice, ...] = (
    OwnedSlice("attn.q_proj.weight", 0), OwnedSlice("attn.k_proj.weight", 0), OwnedSlice("attn.v_proj.weight", 0),
    OwnedSlice("attn.q_bias", 0), OwnedSlice("attn.v_bias", 0),
    OwnedSlice("attn.inner_attn_ln.weight", 0), OwnedSlice("attn.inner_attn_ln.bias", 0),
    OwnedSlice("attn.proj.weight", 1),
)

#: What a SwiGLU hidden channel owns (unit width 1).
CHANNEL_SLICES: Tuple[OwnedSlice, ...] = (
    OwnedSlice("mlp.w1.weight", 0), OwnedSlice("mlp.w1.bias", 0), OwnedSlice("mlp.w2.weight", 0),
    OwnedSlice("mlp.w2.bias", 0), OwnedSlice("mlp.ffn_ln.weight", 0), OwnedSlice("mlp.ffn_ln.bias", 0),
    OwnedSlice("mlp.w3.weight", 1),
)

BlockPlan = Dict[str, SlicePlan]


def describe_indices(indices: Sequence[int], limit: int = 16) -> str:
    """Unit indices for a message: in full when short, else count, ends and sum (a channel list is long)."""
    indices = list(indices)
    if len(indices) <= limit:
        return str(indices)
    return f"{len(indices)} indices [{indices[0]}, {indices[1]}, ..., {indices[-1]}] (sum {sum(indices)})"


def is_selection_index_key(key: str) -> bool:
    """Whether ``key`` is a selection record (``...attn.head_index``, ``...mlp.channel_index`` or the root's
    ``kept_blocks``), not a weight."""
    return key.endswith("." + HEAD_INDEX_KEY) or key.endswith("." + CHANNEL_INDEX_KEY) or \
        key == KEPT_BLOCKS_KEY or key.endswith("." + KEPT_BLOCKS_KEY)


def resolve_block_selection(depth: int, selected_blocks: Optional[Sequence[int]],
                            name: str = "selected_blocks") -> List[int]:
    """The kept teacher blocks: every block for ``None``, else checked (sorted, unique, in range, not empty)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: expected a positive int, got {depth!r}")
    if selected_blocks is None:
        return list(range(depth))
    if isinstance(selected_blocks, (str, bytes)) or not isinstance(selected_blocks, Sequence):
        raise ValueError(f"{name}: expected a sorted list of teacher block indices or None, got "
                         f"{type(selected_blocks).__name__}")
    blocks = list(selected_blocks)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
        raise ValueError(f"{name}: expected integer block indices, got {blocks!r}")
    if not blocks:
        raise ValueError(f"{name}: at least one block must be kept, got []")
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"{name}: expected indices in [0, {depth}) (the teacher's depth), got {bad}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{name}: duplicate block indices in {blocks}")
    if blocks != sorted(blocks):
        raise ValueError(f"{name}: expected sorted indices, got {blocks}")
    return [int(b) for b in blocks]


def teacher_block_count(state: Mapping[str, Any], prefix: str = "") -> int:
    """Number of blocks of a backbone state dict (1 + the highest ``blocks.N`` index; 0 when none)."""
    indices = [split_block_key(k[len(prefix):])[0] for k in state if k.startswith(prefix)]
    return max(indices, default=-1) + 1


def select_teacher_blocks(state: Mapping[str, Any], kept_blocks: Sequence[int], prefix: str = ""
                          ) -> Dict[str, Any]:
    """A teacher state dict with the kept blocks renumbered compactly (``blocks.t`` -> ``blocks.j`` for
    ``t = kept_blocks[j]``) and the other blocks dropped; keys outside ``prefix + 'blocks.'`` stay."""
    position = {int(t): j for j, t in enumerate(kept_blocks)}
    out: Dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        layer, suffix = split_block_key(key[len(prefix):])
        if layer < 0:
            out[key] = value
        elif layer in position:
            out[f"{prefix}blocks.{position[layer]}.{suffix}"] = value
    return out


def unit_channels(units: Sequence[int], width: int) -> torch.Tensor:
    """Channel indices owned by ``units`` (each ``width`` channels wide), in the order given."""
    kept = torch.as_tensor(list(units), dtype=torch.long)
    return (kept[:, None] * width + torch.arange(width)).reshape(-1)


def head_slice_plan(selected_heads_per_layer: Sequence[Sequence[int]], head_dim: int,
                    teacher_num_heads: int) -> Dict[int, BlockPlan]:
    """Per block: how every head-owned tensor is cut to the kept heads (the teacher order of heads)."""
    full = teacher_num_heads * head_dim
    plans: Dict[int, BlockPlan] = {}
    for layer, heads in enumerate(selected_heads_per_layer):
        index = unit_channels(heads, head_dim)
        plans[layer] = {rule.suffix: SlicePlan(rule.axis, index, full, head_dim) for rule in HEAD_SLICES}
    return plans


def channel_slice_plan(selected_channels_per_layer: Sequence[Sequence[int]], teacher_hidden: int
                       ) -> Dict[int, BlockPlan]:
    """Per block: how every channel-owned tensor is cut to the kept hidden channels (teacher order)."""
    plans: Dict[int, BlockPlan] = {}
    for layer, channels in enumerate(selected_channels_per_layer):
        index = torch.as_tensor(list(channels), dtype=torch.long)
        plans[layer] = {rule.suffix: SlicePlan(rule.axis, index, teacher_hidden, 1, "channels")
                        for rule in CHANNEL_SLICES}
    return plans


def pruning_slice_plan(selected_heads_per_layer: Sequence[Sequence[int]], head_dim: int, teacher_num_heads: int,
                       selected_channels_per_layer: Optional[Sequence[Sequence[int]]] = None,
                       teacher_hidden: Optional[int] = None) -> Dict[int, BlockPlan]:
    """The joint plan: the head cuts of every block, plus its channel cuts when channels are selected."""
    plans = head_slice_plan(selected_heads_per_layer, head_dim, teacher_num_heads)
    if selected_channels_per_layer is not None:
        if teacher_hidden is None:
            raise ValueError("pruning_slice_plan: channel cuts need teacher_hidden (the teacher's MLP width)")
        for layer, plan in channel_slice_plan(selected_channels_per_layer, teacher_hidden).items():
            plans.setdefault(layer, {}).update(plan)
    return plans


def split_block_key(key: str) -> Tuple[int, str]:
    """``'blocks.3.attn.q_bias'`` -> ``(3, 'attn.q_bias')``; ``(-1, key)`` outside the blocks."""
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return -1, key


def cut(value: torch.Tensor, plan: SlicePlan, key: str, label: str) -> torch.Tensor:
    """``value`` restricted to ``plan.index`` along ``plan.axis``; a tensor not in the teacher layout is an error."""
    if value.ndim <= plan.axis or value.shape[plan.axis] != plan.full:
        layout = f"{plan.full} {plan.unit}" if plan.width == 1 else \
            f"{plan.full} = {plan.full // plan.width} {plan.unit} x {plan.width}"
        raise ValueError(f"{label}: {key}: expected {layout} along dim {plan.axis} (teacher layout), "
                         f"got shape {tuple(value.shape)}")
    return value.index_select(plan.axis, plan.index.to(value.device))


def apply_slice_plan(state: Dict[str, torch.Tensor], plans: Mapping[int, BlockPlan], prefix: str = "",
                     label: str = "state dict", teacher_shaped_only: bool = False) -> List[str]:
    """Cut, in place, the keys ``prefix + 'blocks.N.' + suffix`` that ``plans`` names; return the cut keys.

    With ``teacher_shaped_only`` a tensor that does not have the teacher size along its axis is left
    alone (it is already pruned, or wrong, and the caller's strict load will say so).
    """
    sliced = []
    for layer, plan in plans.items():
        for suffix, rule in plan.items():
            key = f"{prefix}blocks.{layer}.{suffix}"
            value = state.get(key)
            if value is None or int(rule.index.numel()) == rule.full:
                continue
            if teacher_shaped_only and (value.ndim <= rule.axis or value.shape[rule.axis] != rule.full):
                continue
            state[key] = cut(value, rule, key, label)
            sliced.append(key)
    return sliced


def head_weight_norms(q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor, num_heads: int,
                      proj_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Magnitude importance of one block: ``sqrt(||Wq[h]||^2 + ||Wk[h]||^2 + ||Wv[h]||^2 (+ ||Wproj[:, h]||^2))``.

    ``W*[h]`` are head ``h``'s output rows of q/k/v, ``Wproj[:, h]`` its input columns of ``proj``
    (Frobenius norms, float64, biases not counted). Returns ``[num_heads]``.
    """
    total = torch.zeros(num_heads, dtype=torch.float64)
    with torch.no_grad():
        for weight in (q_weight, k_weight, v_weight):
            total += weight.detach().double().reshape(num_heads, -1).pow(2).sum(dim=1).cpu()
        if proj_weight is not None:
            cols = proj_weight.detach().double().reshape(proj_weight.shape[0], num_heads, -1)
            total += cols.pow(2).sum(dim=(0, 2)).cpu()
    return total.sqrt()


def magnitude_scores(backbone_state: Mapping[str, torch.Tensor], depth: int, num_heads: int,
                     include_proj: bool = False, label: str = "teacher backbone") -> torch.Tensor:
    """:func:`head_weight_norms` of every block of an unpruned backbone state dict: ``[depth, num_heads]``."""
    rows = []
    for layer in range(depth):
        names = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"]
        names += ["attn.proj.weight"] if include_proj else []
        keys = [f"blocks.{layer}.{name}" for name in names]
        absent = [key for key in keys if key not in backbone_state]
        if absent:
            raise ValueError(f"{label}: no {BACKBONE_PREFIX}{absent[0]}; expected an unpruned backbone of depth "
                             f"{depth} with {num_heads} heads")
        tensors = [backbone_state[key] for key in keys]
        for key, tensor in zip(keys, tensors):
            rows_axis = 1 if key.endswith("attn.proj.weight") else 0
            if tensor.ndim != 2 or tensor.shape[rows_axis] % num_heads:
                raise ValueError(f"{label}: {BACKBONE_PREFIX}{key} has shape {tuple(tensor.shape)}; expected a 2-D "
                                 f"weight whose {'columns' if rows_axis else 'rows'} split into {num_heads} heads "
                                 f"(the unpruned backbone the config describes)")
        rows.append(head_weight_norms(*tensors[:3], num_heads=num_heads,
                                      proj_weight=tensors[3] if include_proj else None))
    return torch.stack(rows)


def channel_weight_norms(w1_weight: torch.Tensor, w2_weight: torch.Tensor, w3_weight: torch.Tensor,
                         ffn_ln_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Magnitude importance of one SwiGLU's hidden channels: ``||W1[c]|| * ||W2[c]|| * ||g_c W3[:, c]||``.

    ``W1[c]``, ``W2[c]`` are channel ``c``'s input rows (its gate and value), ``W3[:, c]`` its output
    column, ``g_c`` its ``ffn_ln`` scale (the LayerNorm multiplies the channel by ``g_c`` before ``w3``,
    so ``g_c W3[:, c]`` is the column the channel really writes with; without ``ffn_ln_weight`` g = 1).
    The product follows the channel's path, gate x value -> output. L2 norms, float64, biases not
    counted. Returns ``[hidden]``.
    """
    with torch.no_grad():
        rows1 = w1_weight.detach().double().norm(dim=1).cpu()
        rows2 = w2_weight.detach().double().norm(dim=1).cpu()
        cols = w3_weight.detach().double().norm(dim=0).cpu()
        if ffn_ln_weight is not None:
            cols = cols * ffn_ln_weight.detach().double().abs().cpu()
    return rows1 * rows2 * cols


def channel_magnitude_scores(backbone_state: Mapping[str, torch.Tensor], depth: int,
                             label: str = "teacher backbone") -> torch.Tensor:
    """:func:`channel_weight_norms` of every block of an unpruned backbone state dict: ``[depth, hidden]``."""
    rows = []
    for layer in range(depth):
        keys = [f"blocks.{layer}.mlp.{name}.weight" for name in ("w1", "w2", "w3", "ffn_ln")]
        absent = [key for key in keys if key not in backbone_state]
        if absent:
            raise ValueError(f"{label}: no {BACKBONE_PREFIX}{absent[0]}; expected an unpruned backbone of depth {depth}")
        rows.append(channel_weight_norms(*(backbone_state[key] for key in keys)))
    if len({row.numel() for row in rows}) != 1:
        raise ValueError(f"{label}: the MLPs have different widths {[row.numel() for row in rows]}; expected the "
                         f"unpruned teacher")
    return torch.stack(rows)


def backbone_subdict(state: Mapping[str, Any], prefix: str = BACKBONE_PREFIX) -> Dict[str, Any]:
    """The entries of a detector state dict under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def extract_backbone_state_dict(source: Union[str, "os.PathLike[str]", Mapping[str, Any]],
                                prefix: str = BACKBONE_PREFIX) -> Dict[str, torch.Tensor]:
    """Backbone tensors from a checkpoint path, a checkpoint dict (``state_dict``) or a state dict.

    Strips DDP's ``module.``; when keys carry ``prefix`` only those are kept (prefix removed).
    """
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
    ckpt = load_checkpoint_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = state_dict_of(ckpt, label)
    if any(k.startswith(prefix) for k in state):
        state = backbone_subdict(state, prefix)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{label}: no tensors found (expected '{prefix}*' keys or a backbone state dict)")
    return tensors


__all__ = [
    "HEAD_INDEX_KEY", "CHANNEL_INDEX_KEY", "KEPT_BLOCKS_KEY", "resolve_block_selection", "teacher_block_count",
    "select_teacher_blocks", "HEAD_INDEX_SUFFIX", "CHANNEL_INDEX_SUFFIX", "BACKBONE_PREFIX", "OwnedSlice",
    "SlicePlan", "HEAD_SLICES", "CHANNEL_SLICES", "describe_indices", "is_selection_index_key", "unit_channels", "head_slice_plan",
    "channel_slice_plan", "pruning_slice_plan", "split_block_key", "cut", "apply_slice_plan", "head_weight_norms",
    "magnitude_scores", "channel_weight_norms", "channel_magnitude_scores", "backbone_subdict",
    "extract_backbone_state_dict",
]
