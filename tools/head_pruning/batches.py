"""From dataloader batches to what the importance methods need: images, model inputs, a scalar loss.

A batch is an image tensor ``[B, 3, H, W]`` / ``[B, N, 3, H, W]``, or an ORION-style dict with
``img`` (possibly in mmcv DataContainers, unwrapped by ``mmcv/models/utils/batch_io.py``).
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from mmcv.models.utils.batch_io import move_batch_to_device


def progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool) -> Iterable:
    """``iterable`` with a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def take_batches(dataloader: Iterable, num_batches: Optional[int], desc: str, show_progress: bool) -> Iterator[Any]:
    """The first ``num_batches`` batches (all with None); an empty loader is an error."""
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches: expected >= 1 (or None for the whole loader), got {num_batches}")
    total = num_batches
    if total is None:
        with contextlib.suppress(TypeError):
            total = len(dataloader)  # type: ignore[arg-type]
    seen = 0
    for batch in progress(dataloader, total, desc, show_progress):
        if num_batches is not None and seen >= num_batches:
            break
        seen += 1
        yield batch
    if seen == 0:
        raise ValueError(f"{desc}: the dataloader yielded no batches")


def images_of(batch: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Backbone input from a batch: a tensor or a dict with 'img'; [B, N, 3, H, W] flattened to [B*N, 3, H, W]."""
    batch = move_batch_to_device(batch, device)
    img = batch.get("img") if isinstance(batch, Mapping) else batch
    if isinstance(img, (list, tuple)) and len(img) == 1 and isinstance(img[0], torch.Tensor):
        img = img[0]
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"expected batches that are image tensors or dicts with an 'img' tensor, "
                         f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    if img.ndim == 5:
        img = img.flatten(0, 1)
    if img.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W] or [B, N, 3, H, W], got shape {tuple(img.shape)}")
    return img.to(device=device, dtype=dtype)


def features_of(output: Any) -> torch.Tensor:
    """The backbone's output feature map (ORION returns a list with one tensor)."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"expected the backbone to return a tensor or a list of tensors, got {type(output).__name__}")
    return output


def loss_of(output: Any) -> torch.Tensor:
    """The scalar loss from a detector's output: ``output['loss']``, else the sum of keys containing 'loss'."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("loss"), torch.Tensor):
            return output["loss"]
        parts = []
        for key, value in output.items():
            if "loss" in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                parts.extend(v for v in values if isinstance(v, torch.Tensor))
        if parts:
            return sum(p.sum() for p in parts)
    raise ValueError(f"expected the model to return a dict with a 'loss' tensor, got "
                     f"{sorted(output) if isinstance(output, Mapping) else type(output).__name__}")


def batch_size_of(data: Any) -> int:
    """Samples in a detector batch: the leading size of ``img`` (1 when there is none)."""
    img = data.get("img") if isinstance(data, Mapping) else data
    if isinstance(img, (list, tuple)) and img and isinstance(img[0], torch.Tensor):
        img = img[0]
    return int(img.shape[0]) if isinstance(img, torch.Tensor) and img.ndim >= 1 else 1


__all__ = ["progress", "take_batches", "images_of", "features_of", "loss_of", "batch_size_of"]
