"""Detectors registered in the standalone world."""
from .orion_student import OrionStudent  # noqa: F401
from .tiny_orion import TinyOrion  # noqa: F401
