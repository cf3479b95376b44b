"""GridMask augmentation for the miniature ORION (standalone world only).

ORION hides a regular grid of squares in the camera images during training
(``grid_mask`` applied inside ``extract_img_feat``). This module does the same
on a [B, C, H, W] batch: with probability ``prob`` it draws a period ``d`` and
a random offset, and zeroes the squares of side ``d - l`` (``l = ratio * d``)
that lie between the kept stripes, so about ``(1 - ratio) ** 2`` of the image
is hidden. Randomness comes from torch's global generator, so a seeded run is
reproducible. In eval mode the module is the identity.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class GridMask(nn.Module):
    """Zero a random grid of squares in training images.

    Args:
        prob: probability of masking a given call's batch.
        ratio: kept stripe width as a fraction of the period.
        d_min, d_max: range of the grid period in pixels (``d_max`` None: half the shorter side).
        per_image: draw a separate grid for every image instead of one per batch.
    """

    def __init__(self, prob: float = 0.7, ratio: float = 0.5, d_min: int = 8, d_max: Optional[int] = None,
                 per_image: bool = False) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"GridMask: prob must lie in [0, 1], got {prob}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"GridMask: ratio must lie in (0, 1), got {ratio}")
        if d_min < 2:
            raise ValueError(f"GridMask: d_min must be >= 2, got {d_min}")
        self.prob = float(prob)
        self.ratio = float(ratio)
        self.d_min = int(d_min)
        self.d_max = None if d_max is None else int(d_max)
        self.per_image = per_image

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        d_max = self.d_max if self.d_max is not None else max(min(h, w) // 2, self.d_min + 1)
        d = int(torch.randint(self.d_min, max(d_max, self.d_min + 1), (1,)))
        keep = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        oy, ox = (int(v) for v in torch.randint(0, d, (2,)))
        rows = ((torch.arange(h, device=device) + oy) % d) >= keep
        cols = ((torch.arange(w, device=device) + ox) % d) >= keep
        return (~(rows[:, None] & cols[None, :])).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the same batch with grid squares zeroed (training only)."""
        if not self.training or self.prob == 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(f"GridMask: expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if float(torch.rand(())) >= self.prob:
            return x
        h, w = x.shape[-2:]
        if self.per_image:
            mask = torch.stack([self._mask(h, w, x.device) for _ in range(x.shape[0])])[:, None]
        else:
            mask = self._mask(h, w, x.device)[None, None]
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, ratio={self.ratio}, d_min={self.d_min}, d_max={self.d_max}"


__all__ = ["GridMask"]
