"""The guide's figures: drawn by tools/draw_doc_figures.py, small, and the heat map marks the removed heads."""
from __future__ import annotations

from pathlib import Path

import torch

from tools import draw_doc_figures, plugin_manifest
from tools.head_pruning import plots
from tools.head_pruning_utils import HeadImportance, create_pruning_config, plot_head_importance

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000


def test_the_heat_map_crosses_out_exactly_the_removed_heads(tmp_path, monkeypatch):
    scores = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8) % 7
    importance = HeadImportance(scores, method="magnitude")
    config = create_pruning_config(importance, pruning_ratio=0.5)
    drawn = {}

    def keep_figure(fig, path, dpi=120):
        drawn["axes"] = fig.axes[0]
        return str(path)

    monkeypatch.setattr(plots, "save_figure", keep_figure)
    plot_head_importance(importance, tmp_path / "heat.png", pruning_config=config)
    marked = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in drawn["axes"].patches if p.get_hatch()}
    removed = {(layer, head) for layer, kept in enumerate(config.selected_heads_per_layer)
               for head in range(8) if head not in kept}
    assert marked == removed and len(removed) == 3 * 4
    assert all(p.get_hatch() for p in drawn["axes"].patches)  # nothing else is drawn over the cells


def test_the_overlay_picture_lists_every_manifest_file():
    groups = draw_doc_figures.overlay_tree()
    listed = {f"{folder}/{name}" if folder else name for folder, names in groups.items() for name in names}
    assert listed == set(plugin_manifest.PLUGIN_FILES)


def test_the_shipped_overlay_picture_shows_the_current_manifest():
    import json

    drawn = json.loads((ROOT / "docs" / "figures" / "orion_overlay.json").read_text())["files"]
    assert drawn == sorted(plugin_manifest.PLUGIN_FILES), \
        "the plugin manifest changed: redraw with `python tools/draw_doc_figures.py --only orion_overlay`"


def test_the_kd_step_and_overlay_figures_are_drawn_small(tmp_path):
    assert draw_doc_figures.main(["--only", "kd_step", "--only", "orion_overlay", "--out-dir", str(tmp_path)]) == 0
    for name in ("kd_step", "orion_overlay"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < MAX_BYTES


def test_the_shipped_figures_exist_and_are_small():
    for name in draw_doc_figures.NAMES:
        png = ROOT / "docs" / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size < MAX_BYTES, png
