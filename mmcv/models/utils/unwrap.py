"""The model inside (MM)DataParallel / DistributedDataParallel wrappers, found one way everywhere.

Hooks, the training loop and the importance tools all receive a possibly wrapped model; they
unwrap it with this one function. Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside any number of wrappers that keep the wrapped model in ``.module``."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


__all__ = ["unwrap_model"]
