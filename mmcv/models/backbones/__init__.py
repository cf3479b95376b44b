"""Backbones: ORION-KD's EVAViTStudent and, standalone only, the teacher alias EVAViT."""
from .eva_vit_student import EVAViTStudent  # noqa: F401
from .eva_vit import EVAViT  # noqa: F401
