"""Attention-head importance, pruning configurations and pruning-impact analysis: the notebook entry.

    from tools.head_pruning_utils import compute_head_importance, create_pruning_config, analyze_pruning_impact

This file only gathers the toolkit's public names and runs its command line; each job lives in one
module:

- ``mmcv/models/utils/pruning_config.py``: the pruning policy shared with OrionStudent
  (:func:`create_pruning_config`, :func:`validate_pruning_config`, :class:`PruningConfig`; ``pruning_ratio``
  is the fraction REMOVED; ``global`` ranks block-normalised scores);
- ``mmcv/models/utils/head_importance.py``: :class:`HeadImportance` and its files;
- ``tools/head_pruning/importance.py``: magnitude, gradient (Michel et al.), entropy, activation (Minitron);
- ``tools/head_pruning/sites.py``: finding the backbone and its heads, head-mask hooks, geometry;
- ``tools/head_pruning/analysis.py`` and ``plots.py``: impact tables and figures;
- ``tools/head_pruning/cli.py``: the command line.

Command line (run from the repository root, standalone or inside ORION)::

    python tools/head_pruning_utils.py importance --config CFG --checkpoint CKPT --method magnitude --out imp.json
    python tools/head_pruning_utils.py prune-config --importance imp.json --pruning-ratio 0.5 --out prune.json
    python tools/head_pruning_utils.py analyze --importance imp.json --config CFG --checkpoint CKPT --out a.json
    python tools/head_pruning_utils.py plot --importance imp.json --pruning-config prune.json --out heads.png

This file is a plugin: it is copied into ORION (Python 3.8, torch 2.0-2.4, no mmengine).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmcv.models.utils.head_importance import HeadImportance  # noqa: E402
from mmcv.models.utils.pruning_config import (BLOCK_NORMALIZATIONS, STRATEGIES, PruningConfig,  # noqa: E402
                                              create_pruning_config, validate_pruning_config)
from tools.head_pruning.analysis import analyze_pruning_impact, format_impact_table  # noqa: E402
from tools.head_pruning.cli import main  # noqa: E402
from tools.head_pruning.importance import (METHODS, compute_head_importance,  # noqa: E402
                                           compute_head_importance_activation, compute_head_importance_entropy,
                                           compute_head_importance_gradient, compute_head_importance_magnitude)
from tools.head_pruning.plots import plot_fidelity_vs_ratio, plot_head_importance  # noqa: E402
from tools.head_pruning.sites import (AttentionSite, describe_backbone, find_attention_sites,  # noqa: E402
                                      find_backbone, head_mask_hooks)

__all__ = [
    "METHODS", "STRATEGIES", "BLOCK_NORMALIZATIONS", "HeadImportance", "PruningConfig", "AttentionSite",
    "find_backbone", "find_attention_sites", "compute_head_importance", "compute_head_importance_magnitude",
    "compute_head_importance_gradient", "compute_head_importance_entropy", "compute_head_importance_activation",
    "create_pruning_config", "validate_pruning_config", "describe_backbone", "analyze_pruning_impact",
    "format_impact_table", "plot_head_importance", "plot_fidelity_vs_ratio", "head_mask_hooks", "main",
]

if __name__ == "__main__":
    sys.exit(main())
