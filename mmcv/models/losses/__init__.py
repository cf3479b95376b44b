"""Distillation losses."""
from .kd_losses import (  # noqa: F401
    AttentionDistillLoss, CombinedKDLoss, FeatureDistillLoss, OutputDistillLoss, VLDistillLoss)
