"""Streaming samplers: ORION's InfiniteGroupEachSampleInBatchSampler semantics and the evaluation order."""
from __future__ import annotations

import itertools
from typing import List

import numpy as np
import pytest
import torch

from mmcv.datasets import SyntheticChatB2D, build_dataloader
from mmcv.datasets.samplers import (SAMPLER, GroupStreamBatchSampler, InfiniteGroupEachSampleInBatchSampler,
                                    build_sampler)


class Groups:
    """A dataset stand-in: ``flag`` from group sizes, samples of a group stored consecutively."""

    def __init__(self, sizes: List[int]) -> None:
        self.flag = np.concatenate([np.full(size, group) for group, size in enumerate(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.flag)


def take(sampler, steps: int) -> List[List[int]]:
    return list(itertools.islice(iter(sampler), steps))


def slot_streams(batches: List[List[int]]) -> List[List[int]]:
    return [[batch[slot] for batch in batches] for slot in range(len(batches[0]))]


def runs(stream: List[int], flag: np.ndarray) -> List[List[int]]:
    """Split a slot's index stream where the group changes or the frame order breaks."""
    pieces = [[stream[0]]]
    for prev, cur in zip(stream, stream[1:]):
        if flag[cur] == flag[prev] and cur == prev + 1:
            pieces[-1].append(cur)
        else:
            pieces.append([cur])
    return pieces


def test_each_slot_walks_whole_groups_in_frame_order_without_splits():
    ds = Groups([6] * 12)
    batches = take(InfiniteGroupEachSampleInBatchSampler(ds, samples_per_gpu=3, seed=4, seq_split_num=1), 40)
    assert all(len(b) == 3 for b in batches)
    for stream in slot_streams(batches):
        pieces = runs(stream, ds.flag)
        assert all(len(p) == 6 for p in pieces[:-1])  # whole scenes, frame by frame
        assert all(ds.flag[p[0]] != ds.flag[p[-1] + 1] if p[-1] + 1 < len(ds) else True for p in pieces[:-1])


def test_global_slot_s_takes_every_gth_group_of_one_seeded_permutation_stream():
    ds = Groups([5] * 9)
    ranks = [take(InfiniteGroupEachSampleInBatchSampler(ds, 2, num_replicas=2, rank=r, seed=7), 30) for r in (0, 1)]
    gen = torch.Generator().manual_seed(7)
    stream = [g for _ in range(4) for g in torch.randperm(9, generator=gen).tolist()]
    for rank in (0, 1):
        for slot, indices in enumerate(slot_streams(ranks[rank])):
            global_slot = rank * 2 + slot
            groups = [int(ds.flag[i]) for i in indices[::5]]  # a new group every 5 frames
            assert groups == stream[global_slot::4][:6]
    first_step = [int(ds.flag[i]) for i in ranks[0][0] + ranks[1][0]]
    assert len(set(first_step)) == 4  # one permutation: the four slots start on four different scenes


def test_sub_sequences_are_short_during_warmup_and_whole_after():
    ds = Groups([20] * 8)
    sampler = InfiniteGroupEachSampleInBatchSampler(ds, samples_per_gpu=2, seed=0, seq_split_num=2,
                                                    warmup_split_num=4, num_iters_to_seq=100)
    batches = take(sampler, 400)
    early = [len(p) for s in slot_streams(batches[:100]) for p in runs(s, ds.flag)[:-1]]
    late = [len(p) for s in slot_streams(batches[200:]) for p in runs(s, ds.flag)[1:-1]]
    assert max(early) < 20 and np.mean(early) < 6  # 4 cut points: up to 5 pieces per group
    assert np.mean(late) > 7  # 1 cut point: 2 pieces per group


def test_order_is_fixed_by_seed_and_rank():
    ds = Groups([4, 7, 3, 9, 5, 6])
    a = take(InfiniteGroupEachSampleInBatchSampler(ds, 2, 2, 1, seed=3, seq_split_num=2), 50)
    b = take(InfiniteGroupEachSampleInBatchSampler(ds, 2, 2, 1, seed=3, seq_split_num=2), 50)
    c = take(InfiniteGroupEachSampleInBatchSampler(ds, 2, 2, 1, seed=4, seq_split_num=2), 50)
    d = take(InfiniteGroupEachSampleInBatchSampler(ds, 2, 2, 0, seed=3, seq_split_num=2), 50)
    assert a == b and a != c and a != d


@pytest.mark.parametrize("start", [0, 1, 17, 64])
def test_start_iter_reproduces_the_uninterrupted_batches(start):
    ds = Groups([3, 8, 5, 12, 2, 9, 4])
    kw = dict(samples_per_gpu=2, num_replicas=2, rank=1, seed=11, seq_split_num=3, warmup_split_num=2,
              num_iters_to_seq=30)
    full = take(InfiniteGroupEachSampleInBatchSampler(ds, **kw), 100)
    assert take(InfiniteGroupEachSampleInBatchSampler(ds, start_iter=start, **kw), 100 - start) == full[start:]


def test_iterating_again_continues_the_stream():
    ds = Groups([4] * 6)
    sampler = InfiniteGroupEachSampleInBatchSampler(ds, 2, seed=1)
    first, second = take(sampler, 5), take(sampler, 5)
    assert first + second == take(InfiniteGroupEachSampleInBatchSampler(ds, 2, seed=1), 10)


def test_bad_setups_are_explained():
    with pytest.raises(ValueError, match="3 groups .* 4 batch slots"):
        InfiniteGroupEachSampleInBatchSampler(Groups([2, 2, 2]), samples_per_gpu=2, num_replicas=2, rank=0)
    with pytest.raises(AttributeError, match="no 'flag'"):
        InfiniteGroupEachSampleInBatchSampler(list(range(8)), samples_per_gpu=1)
    with pytest.raises(KeyError, match="InfiniteGroupEachSampleInBatchSampler"):
        build_sampler(dict(type="DistributedGroupSamplr"), dict(dataset=Groups([2] * 4)))


def test_registry_builds_orion_type_names_with_default_args():
    assert {"InfiniteGroupEachSampleInBatchSampler", "GroupStreamBatchSampler"} <= set(SAMPLER.module_dict)
    sampler = build_sampler(dict(type="InfiniteGroupEachSampleInBatchSampler", seq_split_num=2),
                            dict(dataset=Groups([3] * 4), samples_per_gpu=2, num_replicas=1, rank=0, seed=5))
    assert sampler.seq_split_num == 2 and sampler.batch_size == 2 and sampler.seed == 5


def test_evaluation_order_streams_every_scene_once_and_shrinks_only_at_the_end():
    ds = Groups([8, 8, 8, 8, 8, 3])
    batches = list(GroupStreamBatchSampler(ds, samples_per_gpu=4))
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    sizes = [len(b) for b in batches]
    assert sizes == sorted(sizes, reverse=True)
    streams = GroupStreamBatchSampler(ds, samples_per_gpu=4).streams
    for stream in streams:  # whole groups, each in frame order, one after the other
        assert all(b == a + 1 for a, b in zip(stream, stream[1:]) if ds.flag[a] == ds.flag[b])
        assert len(runs(stream, ds.flag)) == len(set(ds.flag[stream].tolist()))
    subset = list(GroupStreamBatchSampler(ds, samples_per_gpu=2, indices=range(10)))
    assert sorted(i for b in subset for i in b) == list(range(10))


def test_dataloader_from_shuffler_sampler_streams_scenes_and_resumes():
    ds = SyntheticChatB2D("val", num_samples=32, scene_len=4, img_size=(32, 32))
    cfg = dict(type="InfiniteGroupEachSampleInBatchSampler", seq_split_num=1)
    loader = build_dataloader(ds, samples_per_gpu=2, seed=0, shuffler_sampler=cfg)
    batches = list(itertools.islice(iter(loader), 6))
    tokens = [[m["scene_token"] for m in b["img_metas"]] for b in batches]
    frames = [[m["frame_idx"] for m in b["img_metas"]] for b in batches]
    for slot in range(2):
        assert [f[slot] for f in frames[:4]] == [0, 1, 2, 3] and len({t[slot] for t in tokens[:4]}) == 1
    assert tokens[0][0] != tokens[0][1]
    resumed = build_dataloader(ds, samples_per_gpu=2, seed=0, shuffler_sampler=cfg, start_iter=4)
    again = next(iter(resumed))
    assert [m["sample_idx"] for m in again["img_metas"]] == [m["sample_idx"] for m in batches[4]["img_metas"]]
    assert torch.equal(again["img"], batches[4]["img"])
