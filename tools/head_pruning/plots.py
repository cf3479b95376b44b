"""Plots of head, SwiGLU-channel and block importance and of pruning impact (PNG, written atomically, Agg backend).

Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np

from mmcv.models.utils.checkpoint_io import atomic_write
from mmcv.models.utils.head_importance import BlockImportance, ChannelImportance, HeadImportance, ScoresLike
from mmcv.models.utils.pruning_config import PruningConfig


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: Union[str, os.PathLike], dpi: int = 120) -> str:
    """Write ``fig`` to the ``.png`` file ``path`` atomically (temporary file, then rename).

    The one figure writer of the project: the demo, the study report and the teacher curve use it too.
    """
    if os.path.splitext(os.fspath(path))[1].lower() != ".png":
        raise ValueError(f"{os.fspath(path)}: plots are written as .png")
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), binary=True)


def _removed_blocks(pruning_config: Optional[PruningConfig], depth: int) -> List[int]:
    """Teacher blocks a configuration removes (``selected_blocks``; none when it keeps every block)."""
    kept = getattr(pruning_config, "selected_blocks", None)
    return [] if kept is None else sorted(set(range(depth)) - {int(b) for b in kept})


def _block_kinds(importance: BlockImportance) -> Optional[Sequence[int]]:
    geometry = importance.metadata.get("backbone")
    windows = geometry.get("window_per_block") if isinstance(geometry, Mapping) else None
    return windows if isinstance(windows, list) and len(windows) == importance.num_blocks else None


def _block_bars(ax: Any, importance: BlockImportance, removed: Sequence[int] = (), values: Optional[Any] = None,
                label: Optional[str] = None) -> None:
    """Horizontal bars, one per block (block 0 on top), window blocks light and global blocks dark; the
    blocks in ``removed`` hatched."""
    scores = importance.scores.numpy() if values is None else np.asarray(values, dtype=float)
    kinds = _block_kinds(importance)
    colors = ["#9ecae1" if kinds and kinds[b] else "#3182bd" for b in range(len(scores))]
    bars = ax.barh(range(len(scores)), scores, color=colors, height=0.8)
    for b in removed:
        bars[b].set_hatch("xx")
        bars[b].set_edgecolor("red")
    ax.set_ylim(len(scores) - 0.5, -0.5)
    ax.set_xlabel(label or f"{importance.method or 'block'} score", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def plot_head_importance(importance: Union[HeadImportance, ScoresLike], path: Union[str, os.PathLike],
                         pruning_config: Optional[PruningConfig] = None, title: Optional[str] = None,
                         block_importance: Optional[BlockImportance] = None) -> str:
    """Heat map of the scores (blocks x heads); heads ``pruning_config`` removes are crossed out. PNG.

    The removed heads are marked rather than the kept ones: outlines of adjacent kept heads share edges, so a
    row of them reads as one block, while each crossed cell stands on its own. With ``block_importance`` a
    bar per block stands beside the rows (what skipping the whole block costs).
    """
    importance = HeadImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    depth, heads = scores.shape
    if pruning_config is not None and (pruning_config.depth, pruning_config.teacher_num_heads) != (depth, heads):
        raise ValueError(f"pruning_config is for {pruning_config.depth} x {pruning_config.teacher_num_heads} heads, "
                         f"the scores are {depth} x {heads}")
    blocks = None if block_importance is None else BlockImportance.coerce(block_importance)
    if blocks is not None and blocks.num_blocks != depth:
        raise ValueError(f"block importance has {blocks.num_blocks} blocks, the head scores {depth}")
    plt = _pyplot()
    size = (max(4.0, heads * 0.45 + 2) + (2.5 if blocks else 0), max(3.0, depth * 0.32 + 1.5))
    fig, axes = plt.subplots(1, 2 if blocks else 1, figsize=size, squeeze=False,
                             gridspec_kw=dict(width_ratios=[heads, max(3, heads // 4)]) if blocks else None)
    ax = axes[0][0]
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
            for layer, kept in enumerate(pruning_config.selected_heads_per_layer):
                for head in sorted(set(range(heads)) - set(kept)):
                    ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="red",
                                           linewidth=0.0))
            label += (f": removed heads crossed out ({pruning_config.strategy}, ratio "
                      f"{pruning_config.pruning_ratio:g} removed)")
        ax.set_title(label, fontsize=9)
        if blocks is not None:
            _block_bars(axes[0][1], blocks, _removed_blocks(pruning_config, depth))
            axes[0][1].set_yticks(range(depth))
            axes[0][1].set_title(f"block importance ({blocks.method or 'scores'})\nlight: window, dark: global",
                                 fontsize=8)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_block_importance(importance: Union[BlockImportance, Sequence[float]], path: Union[str, os.PathLike],
                          pruning_config: Optional[PruningConfig] = None, title: Optional[str] = None) -> str:
    """Bars of the block scores (window blocks light, global dark; blocks ``pruning_config`` removes hatched).

    A ``kd_loss`` record that carries the cosine of its frames (``metadata['cosine']``) gets a second
    panel with it, so the two rankings read side by side. PNG.
    """
    importance = BlockImportance.coerce(importance)
    depth = importance.num_blocks
    cosine = importance.metadata.get("cosine") if importance.method == "kd_loss" else None
    panels = 2 if isinstance(cosine, list) and len(cosine) == depth else 1
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(3.5 * panels + 1, max(2.5, depth * 0.3 + 1.2)), squeeze=False)
    try:
        removed = _removed_blocks(pruning_config, depth)
        _block_bars(axes[0][0], importance, removed)
        if panels == 2:
            _block_bars(axes[0][1], importance, removed, values=cosine, label="cosine score (same frames)")
        for row in axes:
            for ax in row:
                ax.set_yticks(range(depth))
                ax.set_ylabel("block")
        fig.suptitle(title or f"Block importance ({importance.method or 'scores'}; light: window, dark: global"
                     + ("; removed blocks hatched" if removed else "") + ")", fontsize=9)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_channel_importance(importance: Union[ChannelImportance, ScoresLike], path: Union[str, os.PathLike],
                            pruning_config: Optional[PruningConfig] = None, title: Optional[str] = None) -> str:
    """Heat map of SwiGLU channel scores (blocks x channels, each block's row divided by its maximum, so that
    blocks of different scale read alike); with ``pruning_config`` a second panel shows the kept channels. PNG."""
    importance = ChannelImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    depth, hidden = scores.shape
    if pruning_config is not None and (not pruning_config.prunes_channels or pruning_config.depth != depth
                                       or pruning_config.teacher_mlp_hidden != hidden):
        raise ValueError(f"pruning_config does not select channels of {depth} blocks x {hidden}: it is for "
                         f"{pruning_config.depth} blocks, MLP width {pruning_config.teacher_mlp_hidden}")
    panels = 2 if pruning_config is not None else 1
    plt = _pyplot()
    fig, axes = plt.subplots(panels, 1, figsize=(10, max(2.5, depth * 0.28 + 1.2) * panels), squeeze=False)
    try:
        scaled = scores / scores.abs().max(dim=1, keepdim=True).values.clamp_min(1e-30)
        image = axes[0][0].imshow(scaled.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=axes[0][0], label=f"{method or 'importance'} score / block max")
        axes[0][0].set_title(title or f"SwiGLU channel importance ({method or 'scores'})", fontsize=9)
        if pruning_config is not None:
            kept = np.zeros((depth, hidden))
            for layer, channels in enumerate(pruning_config.selected_channels_per_layer):
                kept[layer, channels] = 1.0
            axes[1][0].imshow(kept, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            axes[1][0].set_title(f"kept channels (black; {pruning_config.strategy}, MLP ratio "
                                 f"{pruning_config.mlp_pruning_ratio:g} removed; per block "
                                 f"{min(pruning_config.mlp_hidden)}-{max(pruning_config.mlp_hidden)})", fontsize=9)
        for row in axes:
            row[0].set_xlabel("hidden channel")
            row[0].set_ylabel("block")
            row[0].tick_params(labelsize=7)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_fidelity_vs_ratio(analysis: Mapping[str, Any], path: Union[str, os.PathLike]) -> str:
    """Cosine similarity (or importance mass kept without fidelity) and speedup ceiling vs pruning ratio. PNG.

    Joint analyses (rows with an MLP ratio) get one line per strategy and MLP ratio, and the left panel
    plots fidelity against the speedup ceiling, the trade-off that matters when both units are pruned.
    """
    results = [r for r in analysis.get("results", []) if "error" not in r]
    if not results:
        raise ValueError("plot_fidelity_vs_ratio: the analysis holds no successful results")
    measured = all("cosine_similarity" in r for r in results)
    key, label = ("cosine_similarity", "feature cosine similarity") if measured else \
        ("importance_mass_kept", "importance mass kept")
    joint = any("mlp_pruning_ratio" in r for r in results)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        groups = sorted({(r["strategy"], r.get("mlp_pruning_ratio")) for r in results}, key=lambda g: (g[0], g[1] or 0))
        for strategy, mlp_ratio in groups:
            rows = sorted((r for r in results if (r["strategy"], r.get("mlp_pruning_ratio")) == (strategy, mlp_ratio)),
                          key=lambda r: r["pruning_ratio"])
            name = strategy if mlp_ratio is None else f"{strategy}, MLP -{mlp_ratio:.0%}"
            ratios = [r["pruning_ratio"] for r in rows]
            has_ceiling = all(r.get("speedup_ceiling") for r in rows)
            x = [r["speedup_ceiling"] for r in rows] if joint and has_ceiling else ratios
            axes[0].plot(x, [r.get(key) for r in rows], marker="o", label=name)
            if has_ceiling:
                axes[1].plot(ratios, [r["speedup_ceiling"] for r in rows], marker="s", label=name)
        axes[0].set_xlabel("speedup ceiling (analytic MACs)" if joint else "pruning ratio (fraction of heads removed)")
        axes[0].set_ylabel(label)
        axes[0].legend(fontsize=7)
        axes[0].grid(alpha=0.3)
        axes[1].set_xlabel("pruning ratio (fraction of heads removed)")
        axes[1].set_ylabel("backbone speedup ceiling (analytic MACs)")
        axes[1].grid(alpha=0.3)
        fig.suptitle(f"Pruning impact ({analysis.get('method') or 'scores'})", fontsize=10)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


__all__ = ["plot_head_importance", "plot_block_importance", "plot_channel_importance", "plot_fidelity_vs_ratio"]
