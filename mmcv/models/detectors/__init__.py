"""Detectors registered in the standalone world."""
from .orion_student import OrionStudent  # noqa: F401
