"""The sampler registry with ORION's names (light core, standalone only).

ORION builds ``data.shuffler_sampler`` (and ``data.nonshuffler_sampler``) from
config dicts through ``build_sampler``; the miniature world does the same with
an mmengine ``Registry``, so the tiny configs use ORION's keys and type names.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from mmengine.registry import Registry

SAMPLER = Registry("sampler")


def build_sampler(cfg: Mapping[str, Any], default_args: Optional[Mapping[str, Any]] = None) -> Any:
    """Build a sampler from ``dict(type=..., **kwargs)``; ``default_args`` fill keys the config lacks."""
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise TypeError(f"build_sampler: expected a config dict with a 'type' key, got {cfg!r}")
    if cfg["type"] not in SAMPLER:
        raise KeyError(f"build_sampler: sampler type {cfg['type']!r} is not registered; known: "
                       f"{sorted(SAMPLER.module_dict)}")
    return SAMPLER.build(dict(cfg), default_args=dict(default_args or {}))


__all__ = ["SAMPLER", "build_sampler"]
