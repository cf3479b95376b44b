"""Standalone model package: the registry plus every module that registers into it."""
from .builder import *  # noqa: F401,F403
from . import backbones, detectors, losses  # noqa: F401  (registration side effects)
