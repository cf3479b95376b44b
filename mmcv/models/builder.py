"""One model registry with ORION's aliases and ``build_*`` helpers (light core).

ORION keeps every model type in a single registry and exposes it under several
names; registering a type name twice is an error (no ``force``), exactly as
with mmengine's default behaviour.
"""
from __future__ import annotations

from typing import Any, Optional

from mmengine.registry import Registry

MODELS = Registry("models")
BACKBONES = MODELS
NECKS = MODELS
HEADS = MODELS
LOSSES = MODELS
DETECTORS = MODELS
SEGMENTORS = MODELS
FUSION_LAYERS = MODELS
MIDDLE_ENCODERS = MODELS
VOXEL_ENCODERS = MODELS
SHARED_HEADS = MODELS


def build_backbone(cfg: dict) -> Any:
    """Build a backbone from its config dict."""
    return MODELS.build(cfg)


def build_neck(cfg: dict) -> Any:
    """Build a neck from its config dict."""
    return MODELS.build(cfg)


def build_head(cfg: dict) -> Any:
    """Build a head from its config dict."""
    return MODELS.build(cfg)


def build_loss(cfg: dict) -> Any:
    """Build a loss module from its config dict."""
    return MODELS.build(cfg)


def build_model(cfg: dict, train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None) -> Any:
    """Build a detector; ``train_cfg``/``test_cfg`` are defaults the config may override."""
    return MODELS.build(cfg, default_args=dict(train_cfg=train_cfg, test_cfg=test_cfg))


def build_detector(cfg: dict, train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None) -> Any:
    """ORION's alias of :func:`build_model`."""
    return build_model(cfg, train_cfg, test_cfg)


__all__ = [
    "MODELS", "BACKBONES", "NECKS", "HEADS", "LOSSES", "DETECTORS", "SEGMENTORS",
    "FUSION_LAYERS", "MIDDLE_ENCODERS", "VOXEL_ENCODERS", "SHARED_HEADS",
    "build_backbone", "build_neck", "build_head", "build_loss", "build_model", "build_detector",
]
