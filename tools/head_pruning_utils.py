"""Attention-head, SwiGLU-channel and block importance, pruning configurations and impact analysis: the notebook entry.

    from tools.head_pruning_utils import compute_head_importance, create_pruning_config, analyze_pruning_impact
    from tools.head_pruning_utils import compute_channel_importance   # joint heads + MLP width
    from tools.head_pruning_utils import compute_block_importance     # whole blocks (depth)

This file only gathers the toolkit's public names and runs its command line; each job lives in one
module:

- ``mmcv/models/utils/pruning_config.py``: the pruning policy shared with OrionStudent
  (:func:`create_pruning_config`, :func:`validate_pruning_config`, :class:`PruningConfig`; ``pruning_ratio``
  is the fraction REMOVED; ``global`` ranks block-normalised scores);
- ``mmcv/models/utils/head_importance.py``: :class:`HeadImportance`, :class:`ChannelImportance`,
  :class:`BlockImportance` and their files;
- ``mmcv/models/utils/pruning_cost.py``: unit costs (analytic MACs or measured latency) for ``strategy='cost'``;
- ``tools/head_pruning/importance.py``: magnitude, gradient (Michel et al.), entropy, activation (Minitron);
- ``tools/head_pruning/channel_importance.py``: the same for SwiGLU channels (magnitude, gradient, activation);
- ``tools/head_pruning/block_importance.py``: whole blocks skipped (KD loss, ShortGPT cosine), skip fidelity;
- ``tools/head_pruning/sites.py``: finding the backbone, its heads and MLPs, mask and pruning hooks, geometry;
- ``tools/head_pruning/analysis.py`` and ``plots.py``: impact tables and figures;
- ``tools/head_pruning/budget.py``: :func:`prune_to_budget`, heads, channels and whole blocks for a target speedup;
- ``tools/head_pruning/cli.py``: the command line.

Command line (run from the repository root, standalone or inside ORION)::

    python tools/head_pruning_utils.py importance --config CFG --checkpoint CKPT --method magnitude --out imp.json
    python tools/head_pruning_utils.py prune-config --importance imp.json --pruning-ratio 0.5 --out prune.json
    python tools/head_pruning_utils.py importance --unit channels --config CFG --checkpoint CKPT --out ch.json
    python tools/head_pruning_utils.py importance --unit blocks --method kd_loss --config CFG --out blocks.json
    python tools/head_pruning_utils.py prune-config --importance imp.json --pruning-ratio 0.5 \
        --channel-importance ch.json --mlp-hidden 1536 --out joint.json
    python tools/head_pruning_utils.py prune-config --importance imp.json --channel-importance ch.json \
        --block-importance blocks.json --target-speedup 2 --config CFG --checkpoint CKPT --out budget.json
    python tools/head_pruning_utils.py analyze --importance imp.json --config CFG --checkpoint CKPT --out a.json \
        [--block-importance blocks.json]
    python tools/head_pruning_utils.py plot --importance imp.json --pruning-config prune.json --out heads.png \
        [--block-importance blocks.json]

This file is a plugin: it is copied into ORION (Python 3.8, torch 2.0-2.4, no mmengine).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

from mmcv.models.utils.head_importance import (BlockImportance, ChannelImportance, HeadImportance,  # noqa: E402
                                               load_importance)
from mmcv.models.utils.pruning_config import (BLOCK_NORMALIZATIONS, STRATEGIES, PruningConfig,  # noqa: E402
                                              create_pruning_config, validate_channel_selection,
                                              validate_pruning_config)
from mmcv.models.utils.pruning_cost import UnitCosts, analytic_unit_costs  # noqa: E402
from tools.head_pruning.analysis import analyze_pruning_impact, format_impact_table  # noqa: E402
from tools.head_pruning.budget import BudgetResult, UnreachableTargetError, prune_to_budget  # noqa: E402
from tools.head_pruning.block_importance import (BLOCK_METHODS, analyze_block_importance,  # noqa: E402
                                                 compute_block_importance, compute_block_importance_cosine,
                                                 compute_block_importance_kd_loss, format_block_table, skipped_blocks)
from tools.head_pruning.channel_importance import (CHANNEL_METHODS, compute_channel_importance,  # noqa: E402
                                                   compute_channel_importance_activation,
                                                   compute_channel_importance_gradient,
                                                   compute_channel_importance_magnitude)
from tools.head_pruning.cli import main  # noqa: E402
from tools.head_pruning.importance import (METHODS, compute_head_importance,  # noqa: E402
                                           compute_head_importance_activation, compute_head_importance_entropy,
                                           compute_head_importance_gradient, compute_head_importance_magnitude)
from tools.head_pruning.plots import (plot_block_importance, plot_channel_importance,  # noqa: E402
                                      plot_fidelity_vs_ratio, plot_head_importance)
from tools.head_pruning.sites import (AttentionSite, MLPSite, channel_mask_hooks, channel_prune_hooks,  # noqa: E402
                                      describe_backbone, find_attention_sites, find_backbone, find_mlp_sites,
                                      head_mask_hooks)

__all__ = [
    "METHODS", "CHANNEL_METHODS", "BLOCK_METHODS", "STRATEGIES", "BLOCK_NORMALIZATIONS", "HeadImportance",
    "ChannelImportance", "BlockImportance", "load_importance", "PruningConfig", "UnitCosts", "analytic_unit_costs", "AttentionSite", "MLPSite",
    "find_backbone", "find_attention_sites", "find_mlp_sites", "compute_head_importance",
    "compute_head_importance_magnitude", "compute_head_importance_gradient", "compute_head_importance_entropy",
    "compute_head_importance_activation", "compute_channel_importance", "compute_channel_importance_magnitude",
    "compute_channel_importance_gradient", "compute_channel_importance_activation", "create_pruning_config",
    "validate_pruning_config", "validate_channel_selection", "describe_backbone", "analyze_pruning_impact",
    "format_impact_table", "plot_head_importance", "plot_channel_importance", "plot_fidelity_vs_ratio",
    "head_mask_hooks", "channel_mask_hooks", "channel_prune_hooks", "compute_block_importance",
    "compute_block_importance_kd_loss", "compute_block_importance_cosine", "analyze_block_importance",
    "format_block_table", "plot_block_importance", "skipped_blocks", "prune_to_budget", "BudgetResult",
    "UnreachableTargetError", "main",
]

if __name__ == "__main__":
    sys.exit(main())
