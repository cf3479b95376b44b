"""Which training frames count as labelled when only a fraction of the labels may be used.

Distillation needs no labels; the task loss does. With ``kd_config.label_fraction = f`` every
training frame is distilled, while the task loss trains the student backbone only through the
frames drawn as labelled: a fixed hash of the frame's identity (its scene token and frame index,
else its ``sample_idx``) decides, so the same frames are labelled in every epoch, every run and
every process, whatever the sampling order.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import torch

_HASH_RANGE = float(2 ** 32)


def frame_key(img_meta: Mapping[str, Any]) -> str:
    """A frame's identity: ``'<scene_token>/<frame_idx>'`` when both exist, else ``str(sample_idx)``."""
    if "scene_token" in img_meta and "frame_idx" in img_meta:
        return "{}/{}".format(img_meta["scene_token"], img_meta["frame_idx"])
    if "sample_idx" in img_meta:
        return str(img_meta["sample_idx"])
    raise KeyError("label_fraction: img_metas must hold 'scene_token' and 'frame_idx', or 'sample_idx', to decide "
                   "which frames are labelled; got keys {}".format(sorted(img_meta)))


def is_labelled(img_meta: Mapping[str, Any], fraction: float) -> bool:
    """True for the frames in the labelled ``fraction`` (a CRC-32 of :func:`frame_key`, uniform in [0, 1))."""
    if fraction >= 1.0:
        return True
    return zlib.crc32(frame_key(img_meta).encode("utf-8")) / _HASH_RANGE < fraction


def labelled_mask(img_metas: Sequence[Mapping[str, Any]], fraction: float, device: Any = None) -> torch.Tensor:
    """``[B]`` bool: which samples of a batch are labelled."""
    return torch.tensor([is_labelled(meta, fraction) for meta in img_metas], dtype=torch.bool, device=device)


def detach_unlabelled(features: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """``features`` ([B*N, ...], N camera images per sample) with the unlabelled samples' rows detached.

    The heads still see every frame (their temporal memory walks the whole scene), but the task
    loss's gradient reaches the backbone only through the labelled frames.
    """
    if features.shape[0] % labelled.numel():
        raise ValueError("label_fraction: {} backbone outputs do not split into {} samples".format(
            features.shape[0], labelled.numel()))
    rows = labelled.repeat_interleave(features.shape[0] // labelled.numel()).to(features.device)
    rows = rows.view(-1, *([1] * (features.dim() - 1)))
    return torch.where(rows, features, features.detach())


__all__ = ["frame_key", "is_labelled", "labelled_mask", "detach_unlabelled"]
