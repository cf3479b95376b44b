"""Shared model utilities (light core package marker; ORION has its own ``mmcv/models/utils``).

The plugin modules in this folder are imported by their full names and never through this
file, which the overlay does not copy.
"""
