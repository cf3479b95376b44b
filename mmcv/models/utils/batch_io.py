"""Batches as ORION's collate leaves them: unwrap mmcv ``DataContainer`` values and move tensors to a device.

One home for what the KD loop and the head-importance tools do with a batch before the model
sees it (the work ``MMDataParallel.scatter`` does in ORION for one device). DataContainers are
duck-typed (``.data`` plus ``.stack`` or ``.cpu_only``), so no mmcv import is needed.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import torch


def unwrap_data_container(value: Any) -> Tuple[Any, bool]:
    """An mmcv DataContainer's payload and its ``cpu_only`` flag; anything else comes back as is.

    ORION's collate groups samples per GPU, so ``.data`` is a one-element list in a process that
    drives one GPU; that element is returned.
    """
    if isinstance(value, torch.Tensor) or not hasattr(value, "data") or \
            not (hasattr(value, "stack") or hasattr(value, "cpu_only")):
        return value, False
    data = value.data
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    return data, bool(getattr(value, "cpu_only", False))


def move_batch_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors to ``device`` and unwrap DataContainers (cpu_only ones stay put)."""
    batch, cpu_only = unwrap_data_container(batch)
    if cpu_only:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_batch_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_batch_to_device(v, device) for v in batch]
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(move_batch_to_device(v, device) for v in batch)
    return batch


__all__ = ["unwrap_data_container", "move_batch_to_device"]
