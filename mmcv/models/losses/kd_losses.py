"""Knowledge-distillation losses between a pruned student backbone and its teacher.

Plugin module (copied into ORION by ``tools/install_into_orion.py``): Python 3.8
syntax, torch 2.0-2.4 APIs, no mmengine. The losses only consume tensors that
the backbone taps recorded (``BackboneTaps``: ``features``, ``hidden_states``,
``attn_logits``, ``query_index``); recording them is the backbone's job.

Every loss is computed in float32 with autocast disabled, whatever the dtype
of its inputs, detaches the teacher's tensors, and is exactly zero when the
student's tensors equal the teacher's.

Reductions (all documented here once):

* ``FeatureDistillLoss``: per block, ``mse`` is the mean over every element of
  ``(LN(s) - LN(t))**2`` with LN a LayerNorm over channels without affine;
  ``cosine`` is the mean over tokens of ``1 - cos(s, t)``. Blocks are combined
  by a weighted mean (uniform by default).
* ``AttentionDistillLoss``: per block, ``T**2 * KL(p_t || p_s)`` where
  ``p = softmax(logits / T)`` over keys, summed over keys and averaged over
  every query row of every window and paired head ("batchmean" over rows).
* ``OutputDistillLoss``: ``mse`` is the element mean; ``cwd`` (channel-wise
  distillation) is, per channel, ``T**2 * KL`` between softmax over spatial
  positions, averaged over channels and batch.
* ``VLDistillLoss``: ``mse`` element mean or ``cosine`` mean over tokens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping as _MappingABC
from typing import Any, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmcv.models.builder import LOSSES

__all__ = [
    "FeatureDistillLoss", "AttentionDistillLoss", "OutputDistillLoss", "VLDistillLoss",
    "CombinedKDLoss", "default_distill_blocks",
]

TensorOrBlocks = Union[Tensor, Mapping[int, Tensor]]
BlockWeights = Union[Sequence[float], Mapping[int, float], None]
HeadMap = Union[Sequence[Sequence[int]], Mapping[int, Sequence[int]]]

_LN_EPS = 1e-5
_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------- helpers
def _fp32_region(device: torch.device) -> ContextManager[Any]:
    """A context that turns autocast off on ``device`` so the loss math stays in fp32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()


def _pair(student: Tensor, teacher: Tensor, what: str) -> Tuple[Tensor, Tensor]:
    """Check that ``student`` and ``teacher`` have one shape; return both in fp32, teacher detached."""
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(f"{what}: expected tensors, got {type(student).__name__} and "
                        f"{type(teacher).__name__}")
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student and teacher shapes differ: expected teacher shape "
                         f"{tuple(student.shape)} (the student's), got {tuple(teacher.shape)}")
    return student.float(), teacher.detach().float()


def _unit(x: Tensor) -> Tensor:
    """``x`` scaled to unit L2 norm along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _one_minus_cosine(s: Tensor, t: Tensor) -> Tensor:
    """Mean over tokens of ``1 - cos(s, t)`` along the last dimension.

    Computed as ``0.5 * ||s/|s| - t/|t|||**2``, which equals ``1 - cos`` for
    non-zero vectors, is exactly zero for identical inputs and avoids the
    cancellation of ``1 - dot``.
    """
    return 0.5 * (_unit(s) - _unit(t)).pow(2).sum(dim=-1).mean()


def _kl_from_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                    dim: int = -1) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` along ``dim`` from log-softmax (never log of probabilities).

    Returns the per-row KL (``dim`` summed out). Teacher entries with zero
    probability (``-inf`` logits) contribute zero.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=dim)
    # a finite floor makes exp(log_t) * (log_t - log_s) exactly 0 where the teacher has -inf logits
    log_t = F.log_softmax(teacher_logits / temperature, dim=dim).clamp_min(torch.finfo(log_s.dtype).min)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=dim)


def _check_modes(mode: str, allowed: Sequence[str], owner: str) -> str:
    if mode not in allowed:
        raise ValueError(f"{owner}: mode must be one of {list(allowed)}, got {mode!r}")
    return mode


def _check_temperature(temperature: float, owner: str) -> float:
    if not float(temperature) > 0:
        raise ValueError(f"{owner}: temperature must be > 0, got {temperature!r}")
    return float(temperature)


def _check_blocks(blocks: Optional[Sequence[int]], owner: str) -> Optional[List[int]]:
    """Validate a configured block list (non-negative, unique ints); ``None`` stays ``None``."""
    if blocks is None:
        return None
    out = [int(b) for b in blocks]
    if any(b < 0 for b in out) or len(set(out)) != len(out) or any(
            int(b) != b for b in blocks):
        raise ValueError(f"{owner}: blocks must be unique non-negative block indices, got {list(blocks)}")
    return out


def _weighted_block_mean(per_block: Dict[int, Tensor], block_weights: BlockWeights,
                         blocks_cfg: Optional[List[int]], owner: str) -> Tensor:
    """Weighted mean of per-block losses; weights by block id (mapping) or aligned with the configured blocks."""
    if block_weights is None:
        weights = {b: 1.0 for b in per_block}
    elif isinstance(block_weights, _MappingABC):
        missing = [b for b in per_block if b not in block_weights]
        if missing:
            raise ValueError(f"{owner}: block_weights has no weight for blocks {missing}")
        weights = {b: float(block_weights[b]) for b in per_block}
    else:
        if blocks_cfg is None or len(blocks_cfg) != len(block_weights):
            raise ValueError(f"{owner}: a block_weights sequence needs explicit blocks of the same "
                             f"length; got blocks={blocks_cfg}, block_weights={list(block_weights)}")
        by_block = dict(zip(blocks_cfg, (float(w) for w in block_weights)))
        weights = {b: by_block[b] for b in per_block}
    total = sum(weights.values())
    if any(w < 0 for w in weights.values()) or total <= 0:
        raise ValueError(f"{owner}: block weights must be >= 0 with a positive sum, got {weights}")
    return sum(per_block[b] * (weights[b] / total) for b in per_block)


def _select_blocks(student: Mapping[int, Tensor], teacher: Mapping[int, Tensor],
                   blocks: Optional[List[int]], what: str) -> List[int]:
    """The blocks to compare: the configured ones, or every block the student recorded."""
    chosen = sorted(student.keys()) if blocks is None else list(blocks)
    if not chosen:
        raise ValueError(f"{what}: no blocks to distil (the student recorded none and none were "
                         f"configured)")
    for b in chosen:
        if b not in student:
            raise ValueError(f"{what}: block {b} was not recorded for the student "
                             f"(recorded: {sorted(student.keys())})")
        if b not in teacher:
            raise ValueError(f"{what}: block {b} was not recorded for the teacher "
                             f"(recorded: {sorted(teacher.keys())})")
    return chosen


def default_distill_blocks(depth: int) -> List[int]:
    """The last block of each quarter of the network: ``[d/4-1, d/2-1, 3d/4-1, d-1]`` (deduplicated).

    For ORION's depth 24 this is ``[5, 11, 17, 23]``, all global-attention
    blocks; for depth < 4 fewer blocks are returned.
    """
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    depth = int(depth)
    return sorted({max(0, (depth * q) // 4 - 1) for q in (1, 2, 3, 4)})


def _taps_field(taps: Any, name: str) -> Any:
    """Read ``name`` from a taps object (attribute) or a dict (key)."""
    if isinstance(taps, _MappingABC):
        return taps.get(name)
    return getattr(taps, name, None)


# ----------------------------------------------------------------------------- losses
@LOSSES.register_module()
class FeatureDistillLoss(nn.Module):
    """Hidden states after chosen blocks, student block l against teacher block l.

    Args:
        blocks: block indices to compare; ``None`` compares every block in the
            student's input mapping.
        mode: ``'mse'`` on LayerNorm-normalised features (over channels, no
            affine: the student matches the teacher's direction and relative
            scale per token, not outliers of the residual stream), or
            ``'cosine'``: mean over tokens of ``1 - cos``.
        block_weights: per-block weights (mapping block -> weight, or a
            sequence aligned with ``blocks``); the result is their weighted mean.
        loss_weight: multiplier on the result.
    """

    def __init__(self, blocks: Optional[Sequence[int]] = None, mode: str = "mse",
                 block_weights: BlockWeights = None, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.blocks = _check_blocks(blocks, "FeatureDistillLoss")
        self.mode = _check_modes(mode, ("mse", "cosine"), "FeatureDistillLoss")
        self.block_weights = block_weights
        self.loss_weight = float(loss_weight)
        if block_weights is not None and not isinstance(block_weights, _MappingABC):
            if self.blocks is None or len(self.blocks) != len(block_weights):
                raise ValueError("FeatureDistillLoss: a block_weights sequence needs explicit blocks "
                                 f"of the same length; got blocks={blocks}, block_weights={block_weights}")

    def block_loss(self, student: Tensor, teacher: Tensor, block: Optional[int] = None) -> Tensor:
        """Loss of one block; tensors ``[B, Hp, Wp, C]`` (any ``[..., C]``) of one shape."""
        what = f"FeatureDistillLoss (block {block})" if block is not None else "FeatureDistillLoss"
        with _fp32_region(student.device):
            s, t = _pair(student, teacher, what)
            if s.dim() < 2:
                raise ValueError(f"{what}: expected [B, Hp, Wp, C] features, got shape {tuple(s.shape)}")
            if self.mode == "mse":
                c = s.shape[-1]
                return F.mse_loss(F.layer_norm(s, (c,), eps=_LN_EPS), F.layer_norm(t, (c,), eps=_LN_EPS))
            return _one_minus_cosine(s, t)

    def forward(self, student: TensorOrBlocks, teacher: TensorOrBlocks) -> Tensor:
        """Weighted mean over blocks of :meth:`block_loss`; mappings block -> tensor, or one tensor each."""
        if isinstance(student, Tensor):
            return self.loss_weight * self.block_loss(student, teacher)
        blocks = _select_blocks(student, teacher, self.blocks, "FeatureDistillLoss")
        per_block = {b: self.block_loss(student[b], teacher[b], b) for b in blocks}
        return self.loss_weight * _weighted_block_mean(per_block, self.block_weights, self.blocks,
                                                       "FeatureDistillLoss")


@LOSSES.register_module()
class AttentionDistillLoss(nn.Module):
    """KL(teacher || student) between attention distributions of sampled query rows.

    Inputs per block: student logits ``[B', h_s, Q, K]``, teacher logits
    ``[B', h_t, Q, K]`` (pre-softmax, already scaled by ``head_dim**-0.5``) and
    the head map: student head ``j`` is compared with teacher head
    ``head_map[j]`` (the head it was sliced from). Per block the loss is
    ``T**2 * sum_k p_t log(p_t / p_s)`` with ``p = softmax(logits / T)`` over
    keys, averaged over every query row of every window/image and head
    (batchmean over rows); blocks are combined by a weighted mean.

    Args:
        temperature: softmax temperature ``T``.
        blocks: blocks to compare; ``None`` = every block the student recorded.
        block_weights: as in :class:`FeatureDistillLoss`.
        loss_weight: multiplier on the result.
    """

    def __init__(self, temperature: float = 3.0, blocks: Optional[Sequence[int]] = None,
                 block_weights: BlockWeights = None, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature, "AttentionDistillLoss")
        self.blocks = _check_blocks(blocks, "AttentionDistillLoss")
        self.block_weights = block_weights
        self.loss_weight = float(loss_weight)

    def block_loss(self, student: Tensor, teacher: Tensor, heads: Optional[Sequence[int]],
                   block: Optional[int] = None) -> Tensor:
        """Loss of one block; ``heads=None`` pairs heads one to one (only when the head counts match)."""
        what = f"AttentionDistillLoss (block {block})" if block is not None else "AttentionDistillLoss"
        for name, x in (("student", student), ("teacher", teacher)):
            if not isinstance(x, Tensor) or x.dim() != 4:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{what}: expected {name} logits [B', heads, Q, K], got {shape}")
        b_s, h_s, q_s, k_s = student.shape
        b_t, h_t, q_t, k_t = teacher.shape
        if (b_s, q_s, k_s) != (b_t, q_t, k_t):
            raise ValueError(f"{what}: teacher logits must match the student's [B', *, Q, K]: "
                             f"expected [{b_s}, {h_t}, {q_s}, {k_s}], got {list(teacher.shape)}")
        if heads is None:
            if h_s != h_t:
                raise ValueError(f"{what}: student has {h_s} heads and teacher {h_t}; a head map "
                                 f"(teacher head of each student head) is required")
            heads = list(range(h_s))
        heads = [int(h) for h in heads]
        if len(heads) != h_s:
            raise ValueError(f"{what}: head map has {len(heads)} entries, expected one per student "
                             f"head ({h_s})")
        if any(h < 0 or h >= h_t for h in heads):
            raise ValueError(f"{what}: head map {heads} holds indices outside the teacher's "
                             f"{h_t} heads")
        with _fp32_region(student.device):
            s = student.float()
            index = torch.as_tensor(heads, dtype=torch.long, device=teacher.device)
            t = teacher.detach().float().index_select(1, index)
            kl_rows = _kl_from_logits(s, t, self.temperature, dim=-1)  # [B', h_s, Q]
            return kl_rows.mean() * (self.temperature ** 2)

    def forward(self, student: TensorOrBlocks, teacher: TensorOrBlocks,
                head_map: Union[HeadMap, Sequence[int], None] = None) -> Tensor:
        """Weighted mean over blocks of :meth:`block_loss`.

        With mappings block -> logits, ``head_map`` is indexed by block
        (``List[List[int]]`` over all blocks, or a mapping); with one tensor
        each, ``head_map`` is that block's ``List[int]``. ``None``: one to one.
        """
        if isinstance(student, Tensor):
            return self.loss_weight * self.block_loss(student, teacher, head_map)  # type: ignore[arg-type]
        blocks = _select_blocks(student, teacher, self.blocks, "AttentionDistillLoss")
        per_block = {}
        for b in blocks:
            heads = None
            if head_map is not None:
                if isinstance(head_map, _MappingABC):
                    if b not in head_map:
                        raise ValueError(f"AttentionDistillLoss (block {b}): head map has no entry "
                                         f"for this block")
                    heads = head_map[b]
                else:
                    if b >= len(head_map):
                        raise ValueError(f"AttentionDistillLoss (block {b}): head map covers "
                                         f"{len(head_map)} blocks")
                    heads = head_map[b]
            per_block[b] = self.block_loss(student[b], teacher[b], heads, b)
        return self.loss_weight * _weighted_block_mean(per_block, self.block_weights, self.blocks,
                                                       "AttentionDistillLoss")


@LOSSES.register_module()
class OutputDistillLoss(nn.Module):
    """The backbone's final feature map ``[B, C, H, W]`` (what the frozen neck/heads receive).

    ``mode='mse'``: mean squared error over all elements. ``mode='cwd'``
    (channel-wise distillation): each channel is turned into a distribution
    over its ``H*W`` positions by a softmax with temperature ``T``; the loss
    is ``T**2 * KL(teacher || student)`` per channel, averaged over channels
    and batch. A list of levels is averaged over levels.
    """

    def __init__(self, mode: str = "mse", temperature: float = 1.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.mode = _check_modes(mode, ("mse", "cwd"), "OutputDistillLoss")
        self.temperature = _check_temperature(temperature, "OutputDistillLoss")
        self.loss_weight = float(loss_weight)

    def level_loss(self, student: Tensor, teacher: Tensor, level: Optional[int] = None) -> Tensor:
        """Loss of one feature map."""
        what = f"OutputDistillLoss (level {level})" if level is not None else "OutputDistillLoss"
        with _fp32_region(student.device):
            s, t = _pair(student, teacher, what)
            if self.mode == "mse":
                return F.mse_loss(s, t)
            if s.dim() != 4:
                raise ValueError(f"{what}: cwd expects [B, C, H, W] feature maps, got {tuple(s.shape)}")
            kl = _kl_from_logits(s.flatten(2), t.flatten(2), self.temperature, dim=-1)  # [B, C]
            return kl.mean() * (self.temperature ** 2)

    def forward(self, student: Union[Tensor, Sequence[Tensor]],
                teacher: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """Loss of one map, or the mean over a list of levels (as the backbone's ``forward`` returns)."""
        if isinstance(student, Tensor):
            return self.loss_weight * self.level_loss(student, teacher)  # type: ignore[arg-type]
        student, teacher = list(student), list(teacher)
        if len(student) != len(teacher) or not student:
            raise ValueError(f"OutputDistillLoss: expected the same non-zero number of feature "
                             f"levels, got {len(student)} (student) and {len(teacher)} (teacher)")
        parts = [self.level_loss(s, t, i) for i, (s, t) in enumerate(zip(student, teacher))]
        return self.loss_weight * torch.stack(parts).mean()


@LOSSES.register_module()
class VLDistillLoss(nn.Module):
    """The visual tokens ``[B, T, D]`` that the language model receives.

    ``mode='mse'``: element mean; ``mode='cosine'``: mean over tokens of ``1 - cos``.
    """

    def __init__(self, mode: str = "mse", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.mode = _check_modes(mode, ("mse", "cosine"), "VLDistillLoss")
        self.loss_weight = float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Loss between student and teacher visual tokens of one shape."""
        with _fp32_region(student.device):
            s, t = _pair(student, teacher, "VLDistillLoss")
            loss = F.mse_loss(s, t) if self.mode == "mse" else _one_minus_cosine(s, t)
            return self.loss_weight * loss


@LOSSES.register_module()
class CombinedKDLoss(nn.Module):
    """Feature, attention, output (and VL) distillation from backbone taps, and their weighted sum.

    Args:
        feature_distill_weight, attention_distill_weight, output_distill_weight,
        vl_distill_weight: weights of the parts in ``backbone_distill_loss``;
            0 disables a part (it is neither tapped nor computed).
        temperature: attention softmax temperature (and the CWD temperature
            unless ``output_temperature`` is given).
        feature_blocks: blocks whose hidden states are distilled; ``None`` =
            :func:`default_distill_blocks` (last block of each quarter).
        attention_blocks: blocks whose attention is distilled; ``None`` = the
            same default (for ORION these are global-attention blocks).
        num_query_samples: query rows sampled per attention block.
        feature_mode: ``'mse'`` or ``'cosine'`` (see :class:`FeatureDistillLoss`).
        feature_block_weights: per-block weights of the feature part.
        output_mode: ``'mse'`` or ``'cwd'``.
        output_temperature: CWD temperature; ``None`` = ``temperature``.
        vl_mode: ``'mse'`` or ``'cosine'``.

    ``forward`` returns the unweighted parts ``feature_distill_loss``,
    ``attention_distill_loss``, ``output_distill_loss`` (a zero constant when
    the part is disabled, so the keys never change), ``vl_distill_loss``
    (only when its weight is > 0) and ``backbone_distill_loss`` = the weighted
    sum, all fp32 scalars.
    """

    def __init__(self, feature_distill_weight: float = 0.5, attention_distill_weight: float = 0.3,
                 output_distill_weight: float = 0.2, vl_distill_weight: float = 0.0,
                 temperature: float = 3.0, feature_blocks: Optional[Sequence[int]] = None,
                 attention_blocks: Optional[Sequence[int]] = None, num_query_samples: int = 64,
                 feature_mode: str = "mse", feature_block_weights: BlockWeights = None,
                 output_mode: str = "mse", output_temperature: Optional[float] = None,
                 vl_mode: str = "mse") -> None:
        super().__init__()
        weights = dict(feature_distill_weight=feature_distill_weight,
                       attention_distill_weight=attention_distill_weight,
                       output_distill_weight=output_distill_weight,
                       vl_distill_weight=vl_distill_weight)
        for name, w in weights.items():
            if not float(w) >= 0:
                raise ValueError(f"CombinedKDLoss: {name} must be >= 0, got {w!r}")
        self.feature_distill_weight = float(feature_distill_weight)
        self.attention_distill_weight = float(attention_distill_weight)
        self.output_distill_weight = float(output_distill_weight)
        self.vl_distill_weight = float(vl_distill_weight)
        self.temperature = _check_temperature(temperature, "CombinedKDLoss")
        if int(num_query_samples) < 1:
            raise ValueError(f"CombinedKDLoss: num_query_samples must be >= 1, got {num_query_samples!r}")
        self.num_query_samples = int(num_query_samples)
        self.feature_blocks = _check_blocks(feature_blocks, "CombinedKDLoss feature_blocks")
        self.attention_blocks = _check_blocks(attention_blocks, "CombinedKDLoss attention_blocks")
        # With blocks=None the parts compare every block the taps recorded,
        # i.e. the blocks tap_request() asked the backbone for.
        self.feature_loss = FeatureDistillLoss(self.feature_blocks, feature_mode, feature_block_weights)
        self.attention_loss = AttentionDistillLoss(self.temperature, self.attention_blocks)
        self.output_loss = OutputDistillLoss(
            output_mode, self.temperature if output_temperature is None else output_temperature)
        self.vl_loss = VLDistillLoss(vl_mode)

    @property
    def output_keys(self) -> List[str]:
        """Keys that :meth:`forward` returns with this configuration (the same on every call)."""
        keys = ["feature_distill_loss", "attention_distill_loss", "output_distill_loss"]
        if self.vl_distill_weight > 0:
            keys.append("vl_distill_loss")
        return keys + ["backbone_distill_loss"]

    def tap_request(self, depth: int) -> Tuple[List[int], List[int], int]:
        """What the backbone must record: ``(hidden_blocks, attn_blocks, num_query_samples)``.

        ``hidden_blocks`` are the feature blocks (configured, else
        :func:`default_distill_blocks`), empty when the feature weight is 0;
        ``attn_blocks`` likewise for attention. The output part needs no tap
        (it uses the backbone's returned features). Configured blocks must be
        ``< depth``. ``depth`` is the TEACHER's: blocks are teacher indices, and a
        depth-pruned student records them at its kept blocks (``eva_taps``).
        """
        default = default_distill_blocks(depth)

        def resolve(blocks: Optional[List[int]], weight: float, name: str) -> List[int]:
            if weight <= 0:
                return []
            chosen = default if blocks is None else blocks
            bad = [b for b in chosen if b >= depth]
            if bad:
                raise ValueError(f"CombinedKDLoss: {name} {bad} out of range for a backbone of "
                                 f"depth {depth}")
            return sorted(chosen)

        return (resolve(self.feature_blocks, self.feature_distill_weight, "feature_blocks"),
                resolve(self.attention_blocks, self.attention_distill_weight, "attention_blocks"),
                self.num_query_samples)

    def _attention_part(self, student_taps: Any, teacher_taps: Any,
                        head_map: Union[HeadMap, None]) -> Tensor:
        s_logits = _taps_field(student_taps, "attn_logits") or {}
        t_logits = _taps_field(teacher_taps, "attn_logits") or {}
        if not s_logits and self.attention_blocks is None:
            raise ValueError("CombinedKDLoss: attention_distill_weight > 0 but the student taps hold "
                             "no attention logits; record tap_request(depth)[1] on the backbone")
        blocks = _select_blocks(s_logits, t_logits, self.attention_blocks, "CombinedKDLoss attention")
        s_index = _taps_field(student_taps, "query_index") or {}
        t_index = _taps_field(teacher_taps, "query_index") or {}
        for b in blocks:
            if b in s_index and b in t_index and not torch.equal(
                    s_index[b].to(t_index[b].device), t_index[b]):
                raise ValueError(f"CombinedKDLoss attention (block {b}): teacher and student sampled "
                                 f"different query rows; pass the student's query_index to the teacher")
        if head_map is None:
            head_map = self._head_map_from_taps(student_taps, teacher_taps, blocks)
        return self.attention_loss(s_logits, t_logits, head_map)

    @staticmethod
    def _head_map_from_taps(student_taps: Any, teacher_taps: Any,
                            blocks: List[int]) -> Optional[Dict[int, List[int]]]:
        """Pairing from the taps' own ``head_map`` (original head index of each recorded head).

        Student head ``j`` of block ``l`` is paired with the teacher head that
        carries the same original index; ``None`` when the student taps have
        no head map (then heads pair one to one).
        """
        s_map = _taps_field(student_taps, "head_map")
        if not s_map:
            return None
        t_map = _taps_field(teacher_taps, "head_map")
        pairing = {}  # type: Dict[int, List[int]]
        for b in blocks:
            if b >= len(s_map):
                raise ValueError(f"CombinedKDLoss attention (block {b}): the student taps' head_map "
                                 f"covers {len(s_map)} blocks")
            heads = [int(h) for h in s_map[b]]
            if t_map:
                position = {int(h): i for i, h in enumerate(t_map[b])}
                missing = [h for h in heads if h not in position]
                if missing:
                    raise ValueError(f"CombinedKDLoss attention (block {b}): student heads {missing} "
                                     f"are not among the teacher's heads {list(t_map[b])}")
                heads = [position[h] for h in heads]
            pairing[b] = heads
        return pairing

    def forward(self, student_taps: Any, teacher_taps: Any, head_map: Union[HeadMap, None] = None,
                student_vl_tokens: Optional[Tensor] = None,
                teacher_vl_tokens: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Distillation parts and ``backbone_distill_loss`` from two ``BackboneTaps``.

        ``head_map[l][j]`` is the teacher head (index into the teacher logits'
        head dimension) of student head ``j`` in block ``l``: the student
        backbone's ``selected_heads`` when the teacher keeps all heads. With
        ``None`` the pairing comes from the taps' own ``head_map`` (student head
        ``j`` <-> the teacher head with the same original index) and, when the
        taps carry none, heads pair one to one (only if the head counts match).
        """
        s_feats = _taps_field(student_taps, "features")
        t_feats = _taps_field(teacher_taps, "features")
        device = s_feats[0].device if s_feats else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        out = {}  # type: Dict[str, Tensor]
        total = zero

        if self.feature_distill_weight > 0:
            s_hidden = _taps_field(student_taps, "hidden_states") or {}
            t_hidden = _taps_field(teacher_taps, "hidden_states") or {}
            if not s_hidden and self.feature_blocks is None:
                raise ValueError("CombinedKDLoss: feature_distill_weight > 0 but the student taps hold "
                                 "no hidden states; record tap_request(depth)[0] on the backbone")
            out["feature_distill_loss"] = self.feature_loss(s_hidden, t_hidden)
            total = total + self.feature_distill_weight * out["feature_distill_loss"]
        else:
            out["feature_distill_loss"] = zero

        if self.attention_distill_weight > 0:
            out["attention_distill_loss"] = self._attention_part(student_taps, teacher_taps, head_map)
            total = total + self.attention_distill_weight * out["attention_distill_loss"]
        else:
            out["attention_distill_loss"] = zero

        if self.output_distill_weight > 0:
            if not s_feats or not t_feats:
                raise ValueError("CombinedKDLoss: output_distill_weight > 0 but the taps hold no "
                                 "backbone features")
            out["output_distill_loss"] = self.output_loss(s_feats, t_feats)
            total = total + self.output_distill_weight * out["output_distill_loss"]
        else:
            out["output_distill_loss"] = zero

        if self.vl_distill_weight > 0:
            if student_vl_tokens is None or teacher_vl_tokens is None:
                raise ValueError(
                    "CombinedKDLoss: vl_distill_weight > 0 but the base detector provides no "
                    "side-effect-free vl_tokens (ORION's heads keep temporal memory, so they cannot "
                    "be run a second time on teacher features); set vl_distill_weight=0 or pass "
                    "student_vl_tokens and teacher_vl_tokens")
            out["vl_distill_loss"] = self.vl_loss(student_vl_tokens, teacher_vl_tokens)
            total = total + self.vl_distill_weight * out["vl_distill_loss"]

        out["backbone_distill_loss"] = total
        return out
