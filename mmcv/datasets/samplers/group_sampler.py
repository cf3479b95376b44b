"""Streaming batch samplers: each batch slot walks one scene (group) in frame order.

ORION's heads keep a temporal memory per batch slot that survives only while
consecutive samples of that slot share a scene and lie less than 2 s apart, so
ORION trains with ``InfiniteGroupEachSampleInBatchSampler`` and tests scene by
scene. Written here from the behaviour of ORION's sampler (light core,
standalone only):

* a dataset's ``flag`` gives the group (scene) of every sample; samples of a
  group are visited in dataset order;
* every batch slot of every rank (global slot ``rank * samples_per_gpu + j``)
  takes whole groups from one shared, seeded, endless stream of group
  permutations: global slot ``s`` takes stream entries ``s, s + G, s + 2G, ...``
  (``G`` = global batch size), so slots that start together take different
  entries of one permutation;
* each group is cut at random positions into sub-sequences that are handed
  out one per visit in a random order; while fewer than ``num_iters_to_seq``
  batches have been drawn, a cut uses ``warmup_split_num`` cut points (ORION's
  short warm-up sequences: up to ``warmup_split_num + 1`` pieces), afterwards
  ``seq_split_num - 1`` cut points (``seq_split_num`` pieces);
* the cuts come from a generator seeded with ``seed + rank``; the group stream
  from one seeded with ``seed`` (the same on every rank);
* it never ends (``__iter__`` continues from the current state).

Resuming is exact: ``start_iter=k`` replays the first ``k`` batches of index
bookkeeping (no data is loaded), so batch ``k`` onwards equals those of an
uninterrupted run.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from mmcv.utils import get_dist_info

from .sampler import SAMPLER


def group_flags(dataset: Any) -> np.ndarray:
    """The dataset's ``flag`` (group id per sample) as int64, with a clear error when it is missing."""
    flag = getattr(dataset, "flag", None)
    if flag is None:
        raise AttributeError(f"{type(dataset).__name__} has no 'flag' attribute (the scene/group id of every "
                             f"sample) that streaming samplers need; ORION's datasets set it with seq_mode=True")
    flag = np.asarray(flag, dtype=np.int64)
    if flag.ndim != 1 or len(flag) != len(dataset):
        raise ValueError(f"{type(dataset).__name__}.flag must hold one group id per sample ({len(dataset)}), "
                         f"got shape {flag.shape}")
    return flag


def _members_of_groups(flag: np.ndarray) -> List[List[int]]:
    """Sample indices of every group id ``0 .. max(flag)``, each in dataset order."""
    order = np.argsort(flag, kind="stable")
    bounds = np.cumsum(np.bincount(flag, minlength=int(flag.max()) + 1))
    return [order[start:end].tolist() for start, end in zip(np.concatenate([[0], bounds[:-1]]), bounds)]


@SAMPLER.register_module()
class InfiniteGroupEachSampleInBatchSampler(Sampler):
    """Endless batches of sample indices for one rank, one scene per batch slot (see the module docstring).

    Args:
        dataset: has ``flag`` (group id per sample) and ``__len__``.
        samples_per_gpu: batch slots of this rank.
        num_replicas, rank: world size and rank (default: torch.distributed's, else 1 and 0).
        seed: the run's seed (must be the same on every rank).
        seq_split_num: pieces per group once sequential training starts.
        warmup_split_num: cut points per group during the first ``num_iters_to_seq`` batches.
        num_iters_to_seq: batches drawn with warm-up cuts.
        start_iter: batches already drawn by an interrupted run (exact resume).
    """

    def __init__(self, dataset: Any, samples_per_gpu: int = 1, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: Optional[int] = 0, seq_split_num: int = 1,
                 warmup_split_num: int = 1, num_iters_to_seq: int = 0, start_iter: int = 0) -> None:
        dist_rank, dist_world = get_dist_info()
        self.num_replicas = dist_world if num_replicas is None else int(num_replicas)
        self.rank = dist_rank if rank is None else int(rank)
        self.batch_size = int(samples_per_gpu)
        self.seed = 0 if seed is None else int(seed)
        self.seq_split_num = int(seq_split_num)
        self.warmup_split_num = int(warmup_split_num)
        self.num_iters_to_seq = int(num_iters_to_seq)
        if self.batch_size < 1 or self.seq_split_num < 1 or self.warmup_split_num < 0 or start_iter < 0:
            raise ValueError(f"InfiniteGroupEachSampleInBatchSampler: need samples_per_gpu >= 1, seq_split_num >= 1, "
                             f"warmup_split_num >= 0 and start_iter >= 0, got {samples_per_gpu}, {seq_split_num}, "
                             f"{warmup_split_num}, {start_iter}")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"InfiniteGroupEachSampleInBatchSampler: rank {self.rank} outside [0, {self.num_replicas})")
        self.size = len(dataset)
        self.groups = _members_of_groups(group_flags(dataset))
        self.global_batch_size = self.batch_size * self.num_replicas
        if len(self.groups) < self.global_batch_size:
            raise ValueError(f"InfiniteGroupEachSampleInBatchSampler: {len(self.groups)} groups (scenes) for "
                             f"{self.global_batch_size} batch slots (samples_per_gpu x world size); every slot "
                             f"needs its own group: use more scenes or a smaller batch")
        self._stream_gen = torch.Generator().manual_seed(self.seed)
        self._cut_gen = torch.Generator().manual_seed(self.seed + self.rank)
        self._stream: Dict[int, List[int]] = {}  # permutation number -> permutation of group ids
        self._permutations_made = 0
        self._draws = [0] * self.batch_size  # groups taken so far by each local slot
        self._pending: Dict[int, Deque[List[int]]] = {}  # group -> pieces of its current cut, in visit order
        self._buffers: List[List[int]] = [[] for _ in range(self.batch_size)]
        self._iters = 0
        for _ in range(start_iter):
            self._next_batch()

    # ------------------------------------------------------------------ state
    def _stream_entry(self, position: int) -> int:
        """Entry ``position`` of the endless concatenation of seeded group permutations."""
        number, offset = divmod(position, len(self.groups))
        while number >= self._permutations_made:
            self._stream[self._permutations_made] = torch.randperm(len(self.groups), generator=self._stream_gen).tolist()
            self._permutations_made += 1
        return self._stream[number][offset]

    def _forget_used_permutations(self) -> None:
        first_needed = (self.rank * self.batch_size + min(self._draws) * self.global_batch_size) // len(self.groups)
        for number in [n for n in self._stream if n < first_needed]:
            del self._stream[number]

    def _cut(self, members: Sequence[int]) -> Deque[List[int]]:
        """Cut one group at random positions and return its pieces in a random visiting order."""
        cuts = self.warmup_split_num if self._iters < self.num_iters_to_seq else self.seq_split_num - 1
        positions = [p for p in torch.randperm(len(members), generator=self._cut_gen).tolist() if p != 0]
        bounds = [0] + sorted(positions[:cuts]) + [len(members)]
        pieces = [list(members[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        order = torch.randperm(len(pieces), generator=self._cut_gen).tolist()
        return deque(pieces[i] for i in order)

    def _refill(self, slot: int) -> None:
        global_slot = self.rank * self.batch_size + slot
        group = self._stream_entry(global_slot + self._draws[slot] * self.global_batch_size)
        self._draws[slot] += 1
        self._forget_used_permutations()
        if not self._pending.get(group):
            self._pending[group] = self._cut(self.groups[group])
        self._buffers[slot] = list(self._pending[group].popleft())

    def _next_batch(self) -> List[int]:
        batch = []
        for slot in range(self.batch_size):
            if not self._buffers[slot]:
                self._refill(slot)
            batch.append(self._buffers[slot].pop(0))
        self._iters += 1
        return batch

    # ------------------------------------------------------------------ Sampler API
    def __iter__(self) -> Iterator[List[int]]:
        while True:
            yield self._next_batch()

    def __len__(self) -> int:
        """The dataset's length, as ORION's sampler reports (the batches never end)."""
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Accepted for runner compatibility; the stream does not depend on epochs."""


@SAMPLER.register_module()
class GroupStreamBatchSampler(Sampler):
    """Finite evaluation batches in streaming order: every slot walks whole groups, each in frame order.

    Groups (in id order) are dealt to ``samples_per_gpu`` slots, each to the slot
    with the fewest samples so far; step ``t`` yields frame ``t`` of every slot
    that still has one. Slots are ordered longest first, so a batch only ever
    shrinks at its end and slot ``b`` is the same stream from start to finish.
    ``indices`` restricts the evaluation to a subset (e.g. the first N samples).
    """

    def __init__(self, dataset: Any, samples_per_gpu: int = 1, indices: Optional[Sequence[int]] = None) -> None:
        if samples_per_gpu < 1:
            raise ValueError(f"GroupStreamBatchSampler: samples_per_gpu must be >= 1, got {samples_per_gpu}")
        flag = group_flags(dataset)
        chosen = np.arange(len(flag)) if indices is None else np.asarray(list(indices), dtype=np.int64)
        streams: List[List[int]] = [[] for _ in range(samples_per_gpu)]
        for members in _members_of_groups(flag[chosen]):
            if members:
                shortest = min(range(samples_per_gpu), key=lambda s: (len(streams[s]), s))
                streams[shortest].extend(int(chosen[i]) for i in members)
        self.streams = sorted((s for s in streams if s), key=len, reverse=True)

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(len(self)):
            yield [stream[step] for stream in self.streams if step < len(stream)]

    def __len__(self) -> int:
        return len(self.streams[0]) if self.streams else 0


__all__ = ["InfiniteGroupEachSampleInBatchSampler", "GroupStreamBatchSampler", "group_flags"]
