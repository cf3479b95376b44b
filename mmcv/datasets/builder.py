"""Dataset registry and builders with ORION's names (light core, standalone only).

ORION builds datasets from config dicts through ``mmcv.datasets.build_dataset``
and loaders through ``build_dataloader``; the miniature world offers the same
two calls on top of an mmengine ``Registry``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from mmengine.registry import Registry
from torch.utils.data import DataLoader, Dataset

DATASETS = Registry("datasets")


def build_dataset(cfg: dict, default_args: Optional[dict] = None) -> Any:
    """Build a dataset from a config dict such as ``dict(type='SyntheticChatB2D', split='val')``."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"build_dataset: expected a config dict with a 'type' key, got {cfg!r}")
    return DATASETS.build(cfg, default_args=default_args)


def build_dataloader(dataset: Dataset, samples_per_gpu: int = 1, workers_per_gpu: int = 0,
                     shuffle: bool = True, seed: Optional[int] = None, drop_last: bool = False,
                     collate_fn: Optional[Callable] = None) -> DataLoader:
    """A single-process ``DataLoader`` using the dataset's own ``collate_fn`` when it has one.

    With ``shuffle`` the order comes from a generator seeded with ``seed`` (0
    when None), so a seed fixes the whole sequence of batches.
    """
    if samples_per_gpu < 1:
        raise ValueError(f"build_dataloader: samples_per_gpu must be >= 1, got {samples_per_gpu}")
    collate = collate_fn or getattr(dataset, "collate_fn", None)
    generator = torch.Generator()
    generator.manual_seed(0 if seed is None else int(seed))
    return DataLoader(dataset, batch_size=samples_per_gpu, shuffle=shuffle, num_workers=workers_per_gpu,
                      collate_fn=collate, drop_last=drop_last, generator=generator)


__all__ = ["DATASETS", "build_dataset", "build_dataloader"]
