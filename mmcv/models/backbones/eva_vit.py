"""Standalone stand-in for ORION's ``EVAViT`` (light core, never copied into ORION).

It is :class:`EVAViTStudent` keeping every head, with exactly ORION's arguments and
state-dict keys (no head or channel selection entries), so the miniature ORION and the tests can
build ``type='EVAViT'`` as ORION's configs do.
"""
from __future__ import annotations

from typing import Any

from mmcv.models.builder import BACKBONES

from .eva_vit_student import EVAViTStudent


@BACKBONES.register_module()
class EVAViT(EVAViTStudent):
    """ORION's EVA-02 backbone: all ``num_heads`` heads, ORION's 511-key layout at depth 24."""

    def __init__(self, num_heads: int = 12, **kwargs: Any) -> None:
        for key in ("teacher_num_heads", "selected_heads_per_layer", "mlp_hidden", "selected_channels_per_layer",
                    "selected_blocks"):
            if key in kwargs:
                raise TypeError(f"EVAViT (the unpruned teacher) takes no {key!r}; use EVAViTStudent")
        if not isinstance(num_heads, int):
            raise TypeError(f"EVAViT: num_heads must be one int, got {num_heads!r}")
        super().__init__(num_heads=num_heads, teacher_num_heads=num_heads, **kwargs)

    def _records_selection_index(self) -> bool:
        return False
