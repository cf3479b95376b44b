"""Which training frames count as labelled when only a fraction of the labels may be used.

Distillation needs no labels; the task loss does. With ``kd_config.label_fraction = f`` every
training frame is distilled, while the task loss trains the student backbone only through the
frames drawn as labelled: a fixed hash of the frame's identity (its scene token and frame index,
else its ``sample_idx``) decides, so the same frames are labelled in every epoch, every run and
every process, whatever the sampling order. The hash is BLAKE2b: scene tokens often differ only
in a few characters, and an affine checksum such as CRC-32 maps such keys onto correlated values
(whole frame positions or scenes would be labelled together).

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch

_HASH_BYTES = 8
_HASH_RANGE = float(2 ** (8 * _HASH_BYTES))


def frame_key(img_meta: Mapping[str, Any]) -> str:
    """A frame's identity: ``'<scene_token>/<frame_idx>'`` when both exist, else ``str(sample_idx)``."""
    if "scene_token" in img_meta and "frame_idx" in img_meta:
        return "{}/{}".format(img_meta["scene_token"], img_meta["frame_idx"])
    if "sample_idx" in img_meta:
        return str(img_meta["sample_idx"])
    raise KeyError("label_fraction: img_metas must hold 'scene_token' and 'frame_idx', or 'sample_idx', to decide "
                   "which frames are labelled; got keys {}".format(sorted(img_meta)))


def is_labelled(img_meta: Mapping[str, Any], fraction: float) -> bool:
    """True for the frames in the labelled ``fraction``: :func:`frame_draw` below ``fraction``."""
    if fraction >= 1.0:
        return True
    return frame_draw(img_meta) < fraction


def frame_draw(img_meta: Mapping[str, Any]) -> float:
    """The frame's draw in [0, 1): the first 8 bytes of BLAKE2b(:func:`frame_key`) as a fraction of 2**64.

    Fractions are nested: a frame labelled at 10% is labelled at every larger fraction.
    """
    digest = hashlib.blake2b(frame_key(img_meta).encode("utf-8"), digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "big") / _HASH_RANGE


def labelled_mask(img_metas: Sequence[Mapping[str, Any]], fraction: float, device: Any = None) -> torch.Tensor:
    """``[B]`` bool: which samples of a batch are labelled."""
    return torch.tensor([is_labelled(meta, fraction) for meta in img_metas], dtype=torch.bool, device=device)


def detach_unlabelled(features: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """``features`` ([B*N, ...], N camera images per sample) whose task-loss gradient comes from labelled samples only.

    The values are unchanged: the heads still see every frame (their temporal memory walks the
    whole scene). The unlabelled samples' rows are detached, and the labelled rows' gradient is
    scaled by B / (labelled samples in the batch), so the task loss, averaged over the batch by
    the heads, trains the backbone as the mean over the labelled frames: fewer labels do not
    also mean a smaller task-loss weight. A batch without a labelled frame passes no gradient.
    """
    if features.shape[0] % labelled.numel():
        raise ValueError("label_fraction: {} backbone outputs do not split into {} samples".format(
            features.shape[0], labelled.numel()))
    count = int(labelled.sum())
    scale = labelled.numel() / count if count else 0.0
    rows = labelled.repeat_interleave(features.shape[0] // labelled.numel()).to(features.device)
    rows = rows.view(-1, *([1] * (features.dim() - 1)))
    frozen = features.detach()
    return torch.where(rows, frozen + scale * (features - frozen), frozen)


__all__ = ["frame_key", "frame_draw", "is_labelled", "labelled_mask", "detach_unlabelled"]
