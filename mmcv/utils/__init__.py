"""ORION's ``mmcv.utils`` names that the plugin uses, for the standalone mode."""
from __future__ import annotations

import importlib
import random
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction


def get_dist_info() -> Tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def import_modules_from_strings(imports: Union[str, Sequence[str]], allow_failed_imports: bool = False) -> List:
    """Import every module named in ``imports`` (ORION's ``custom_imports`` semantics)."""
    single = isinstance(imports, str)
    names = [imports] if single else list(imports)
    modules = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"custom_imports: expected module names (str), got {type(name).__name__}: {name!r}")
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            if not allow_failed_imports:
                raise
            modules.append(None)
    return modules[0] if single else modules


__all__ = [
    "Config",
    "ConfigDict",
    "DictAction",
    "get_dist_info",
    "set_random_seed",
    "import_modules_from_strings",
]
