"""Plots of head importance and pruning impact (PNG, written atomically, matplotlib's Agg backend).

Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from mmcv.models.utils.checkpoint_io import atomic_write
from mmcv.models.utils.head_importance import HeadImportance, ScoresLike
from mmcv.models.utils.pruning_config import PruningConfig


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: Any, path: Union[str, os.PathLike]) -> str:
    if os.path.splitext(os.fspath(path))[1].lower() != ".png":
        raise ValueError(f"{os.fspath(path)}: plots are written as .png")
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)


def plot_head_importance(importance: Union[HeadImportance, ScoresLike], path: Union[str, os.PathLike],
                         pruning_config: Optional[PruningConfig] = None, title: Optional[str] = None) -> str:
    """Heat map of the scores (blocks x heads); heads kept by ``pruning_config`` are outlined. PNG."""
    importance = HeadImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    depth, heads = scores.shape
    if pruning_config is not None and (pruning_config.depth, pruning_config.teacher_num_heads) != (depth, heads):
        raise ValueError(f"pruning_config is for {pruning_config.depth} x {pruning_config.teacher_num_heads} heads, "
                         f"the scores are {depth} x {heads}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, heads * 0.45 + 2), max(3.0, depth * 0.32 + 1.5)))
    try:
        image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=f"{method or 'importance'} score")
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(depth))
        ax.tick_params(labelsize=7)
        label = title or f"Head importance ({method or 'scores'})"
        if pruning_config is not None:
            from matplotlib.patches import Rectangle
            for l, hs in enumerate(pruning_config.selected_heads_per_layer):
                for h in hs:
                    ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
            label += f": kept heads outlined ({pruning_config.strategy}, ratio {pruning_config.pruning_ratio:g} removed)"
        ax.set_title(label, fontsize=9)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_fidelity_vs_ratio(analysis: Mapping[str, Any], path: Union[str, os.PathLike]) -> str:
    """Cosine similarity (or importance mass kept without fidelity) and speedup ceiling vs pruning ratio. PNG."""
    results = [r for r in analysis.get("results", []) if "error" not in r]
    if not results:
        raise ValueError("plot_fidelity_vs_ratio: the analysis holds no successful results")
    measured = all("cosine_similarity" in r for r in results)
    key, label = ("cosine_similarity", "feature cosine similarity") if measured else \
        ("importance_mass_kept", "importance mass kept")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        for strategy in sorted({r["strategy"] for r in results}):
            rows = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["pruning_ratio"])
            ratios = [r["pruning_ratio"] for r in rows]
            axes[0].plot(ratios, [r.get(key) for r in rows], marker="o", label=strategy)
            if all(r.get("speedup_ceiling") for r in rows):
                axes[1].plot(ratios, [r["speedup_ceiling"] for r in rows], marker="s", label=strategy)
        axes[0].set_xlabel("pruning ratio (fraction of heads removed)")
        axes[0].set_ylabel(label)
        axes[0].legend()
        axes[0].grid(alpha=0.3)
        axes[1].set_xlabel("pruning ratio (fraction of heads removed)")
        axes[1].set_ylabel("backbone speedup ceiling (analytic MACs)")
        axes[1].grid(alpha=0.3)
        fig.suptitle(f"Pruning impact ({analysis.get('method') or 'scores'})", fontsize=10)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


__all__ = ["plot_head_importance", "plot_fidelity_vs_ratio"]
