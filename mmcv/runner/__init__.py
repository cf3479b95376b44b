"""ORION's ``mmcv.runner`` names that the plugin's hooks use (light core, standalone only).

In an ORION checkout the plugin's hooks register in ORION's own ``mmcv.runner.hooks.HOOKS``
and ORION's runner calls them; here the standalone loop (``adzoo/orion/apis/kd_loop.py``)
builds ``cfg.custom_hooks`` from the same registry and calls them at the same points.
"""
from .hooks import HOOKS, Hook  # noqa: F401

__all__ = ["HOOKS", "Hook"]
