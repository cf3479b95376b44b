"""Dataset registry and builders with ORION's names (light core, standalone only).

ORION builds datasets from config dicts through ``mmcv.datasets.build_dataset``
and loaders through ``build_dataloader``, whose training order comes from
``data.shuffler_sampler`` (ORION's stage 3: ``InfiniteGroupEachSampleInBatchSampler``);
the miniature world offers the same calls on top of mmengine registries.
"""
from __future__ import annotations

import random
from functools import partial
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from mmengine.registry import Registry
from torch.utils.data import DataLoader, Dataset

DATASETS = Registry("datasets")


def build_dataset(cfg: dict, default_args: Optional[dict] = None) -> Any:
    """Build a dataset from a config dict such as ``dict(type='SyntheticChatB2D', split='val')``."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"build_dataset: expected a config dict with a 'type' key, got {cfg!r}")
    return DATASETS.build(cfg, default_args=default_args)


def _seed_worker(worker_id: int, num_workers: int, rank: int, seed: int) -> None:
    """ORION's worker seeding: ``num_workers * rank + worker_id + seed`` for numpy and random."""
    worker_seed = num_workers * rank + worker_id + seed
    np.random.seed(worker_seed % 2 ** 32)
    random.seed(worker_seed)


def build_dataloader(dataset: Dataset, samples_per_gpu: int = 1, workers_per_gpu: int = 0, shuffle: bool = True,
                     seed: Optional[int] = None, drop_last: bool = False, collate_fn: Optional[Callable] = None,
                     shuffler_sampler: Optional[Mapping[str, Any]] = None, rank: int = 0, world_size: int = 1,
                     start_iter: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` using the dataset's own ``collate_fn`` when it has one.

    With ``shuffler_sampler`` (a config dict such as ORION's ``data.shuffler_sampler``)
    the batches come from that registered batch sampler, built with this rank's
    ``samples_per_gpu``, ``world_size``, ``rank``, ``seed`` and ``start_iter`` (the
    number of batches an interrupted run already drew). Without it, ``shuffle``
    draws a random order from a generator seeded with ``seed`` (0 when None).
    """
    from .samplers import build_sampler

    if samples_per_gpu < 1:
        raise ValueError(f"build_dataloader: samples_per_gpu must be >= 1, got {samples_per_gpu}")
    collate = collate_fn or getattr(dataset, "collate_fn", None)
    seed = 0 if seed is None else int(seed)
    init_fn = partial(_seed_worker, num_workers=workers_per_gpu, rank=rank, seed=seed) if workers_per_gpu else None
    # The loader's own generator: starting an iterator then draws nothing from the global RNG (exact resume).
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    if shuffle and shuffler_sampler is not None:
        batch_sampler = build_sampler(shuffler_sampler, dict(dataset=dataset, samples_per_gpu=samples_per_gpu,
                                                             num_replicas=world_size, rank=rank, seed=seed,
                                                             start_iter=start_iter))
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers_per_gpu, collate_fn=collate,
                          worker_init_fn=init_fn, generator=generator)
    return DataLoader(dataset, batch_size=samples_per_gpu, shuffle=shuffle, num_workers=workers_per_gpu,
                      collate_fn=collate, drop_last=drop_last, generator=generator, worker_init_fn=init_fn)


__all__ = ["DATASETS", "build_dataset", "build_dataloader"]
