"""Draw the figures of the guide into ``docs/figures/`` (matplotlib only).

    python tools/draw_doc_figures.py                      # all three
    python tools/draw_doc_figures.py --only kd_step       # one (kd_step, orion_overlay, head_importance_heatmap)

* ``kd_step.png``: one KD training step of ``OrionStudent`` (``mmcv/models/detectors/orion_student.py``):
  the frozen teacher and the pruned student backbone see the same images, the frozen neck, heads and LLM
  give the task loss, and ``CombinedKDLoss`` (``mmcv/models/losses/kd_losses.py``) compares the backbones'
  taps; the weights are the defaults of ``mmcv/models/utils/kd_config.py``.
* ``orion_overlay.png``: an ORION checkout with the files ``tools/install_into_orion.py`` adds, listed from
  the plugin manifest (``tools/plugin_manifest.py``); ``orion_overlay.json`` records which files were drawn.
* ``head_importance_heatmap.png``: the guide's importance commands on the shipped tiny teacher: gradient
  importance on 8 batches of training frames, a uniform 50% configuration, the heat map with the removed
  heads crossed out (``tools/head_pruning_utils.py importance / prune-config / plot``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

from tools import plugin_manifest  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
NAMES = ("kd_step", "orion_overlay", "head_importance_heatmap")
TINY_CONFIG = "adzoo/orion/configs/orion_tiny_train.py"

_FROZEN, _TRAINS, _LOSS, _DATA = "#d9d9d9", "#9ecae1", "#fdd0a2", "#ffffff"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, color: str, size: float = 8.5,
         bold: bool = False, dashed: bool = False) -> Tuple[float, float, float, float]:
    """A rounded box centred at ``(x, y)``; returns its (left, right, bottom, top)."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="black", linewidth=1.0, linestyle="--" if dashed else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight="bold" if bold else "normal")
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def _arrow(ax: Any, start: Tuple[float, float], end: Tuple[float, float], color: str = "black",
           style: str = "-|>", dashed: bool = False, label: Optional[str] = None) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=color, lw=1.2,
                                                          linestyle="--" if dashed else "-", shrinkA=0, shrinkB=0))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", fontsize=7, color=color)


def _kd_weights() -> Dict[str, float]:
    from mmcv.models.utils.kd_config import KD_CONFIG_KEYS

    return {k: float(KD_CONFIG_KEYS[k]) for k in ("feature_distill_weight", "attention_distill_weight",
                                                  "output_distill_weight", "vl_distill_weight",
                                                  "warmup_alpha", "finetune_alpha", "distillation_temperature")}


def draw_kd_step(path: Path) -> str:
    """One KD training step: where the task loss and each distillation term are taken."""
    from tools.head_pruning.plots import save_figure

    w = _kd_weights()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 7))
    try:
        ax.set_xlim(0, 12)
        ax.set_ylim(0.4, 7.2)
        ax.axis("off")
        ax.text(6.0, 6.95, "total_loss = (1 - alpha) x task loss + alpha x backbone distill loss", fontsize=11,
                ha="center", fontweight="bold")
        ax.text(6.0, 6.55, f"alpha: {w['warmup_alpha']:g} in the warm-up epoch, then {w['finetune_alpha']:g} "
                f"(KDAlphaScheduleHook); gradients reach only img_backbone.*", fontsize=9, ha="center")
        _box(ax, 0.85, 3.4, 1.4, 1.1, "camera images\n(GridMask while\ntraining)", _DATA)
        _box(ax, 3.6, 5.45, 3.4, 0.95, "teacher backbone (EVA-02)\n16 heads per block\nfrozen, eval mode, no grad",
             _FROZEN)
        _box(ax, 3.6, 1.3, 3.4, 0.95, "student backbone\n8 of 16 heads per block\n(+ SwiGLU width): TRAINS",
             _TRAINS, bold=True)
        _arrow(ax, (1.55, 3.7), (1.9, 5.2))
        _arrow(ax, (1.55, 3.1), (1.9, 1.55))
        taps = [f"feature\nhidden states,\nlast block of\neach quarter,\nLN-MSE x {w['feature_distill_weight']:g}",
                f"attention\nlogits, same\nblocks, sampled\nqueries, KL at\nT={w['distillation_temperature']:g}"
                f" x {w['attention_distill_weight']:g}",
                f"output\nfinal feature\nmap, MSE\n(or CWD)\nx {w['output_distill_weight']:g}"]
        for x, text in zip((2.45, 3.6, 4.75), taps):
            _box(ax, x, 3.4, 1.1, 1.6, text, _LOSS, size=7)
            _arrow(ax, (x, 4.97), (x, 4.2), dashed=True)  # the teacher's tap
            _arrow(ax, (x, 1.78), (x, 2.6))  # the student's tap
        _box(ax, 6.75, 3.4, 1.6, 1.1, "backbone distill\nloss: weighted sum\n(CombinedKDLoss)", _LOSS, size=8)
        _arrow(ax, (5.3, 3.4), (5.95, 3.4))
        _box(ax, 9.2, 3.4, 2.0, 1.1, f"VL: the LLM's visual\ntokens, teacher vs\nstudent, weight "
                                     f"{w['vl_distill_weight']:g}\n(off by default)", _LOSS, size=7.5, dashed=True)
        _arrow(ax, (8.2, 3.4), (7.55, 3.4))
        _arrow(ax, (5.3, 5.45), (9.2, 3.95), dashed=True)
        ax.text(7.9, 4.9, "teacher features through\nthe same frozen parts", fontsize=7.5, ha="left")
        _box(ax, 6.75, 1.3, 1.8, 0.95, "neck + detection,\nmap and planning\nheads: frozen", _FROZEN)
        _box(ax, 9.2, 1.3, 1.8, 0.95, "visual tokens ->\nLLM (QA, plan):\nfrozen", _FROZEN)
        _box(ax, 11.1, 1.3, 1.5, 0.95, "task loss\n(labelled frames:\nlabel_fraction)", _LOSS, size=7.5)
        _arrow(ax, (5.3, 1.3), (5.85, 1.3))
        _arrow(ax, (7.65, 1.3), (8.3, 1.3))
        _arrow(ax, (10.1, 1.3), (10.35, 1.3))
        _arrow(ax, (9.2, 1.78), (9.2, 2.85), dashed=True)
        _legend(ax)
        return save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def _legend(ax: Any) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_TRAINS, edgecolor="black", label="trains"),
               Patch(facecolor=_FROZEN, edgecolor="black", label="frozen"),
               Patch(facecolor=_LOSS, edgecolor="black", label="loss term"),
               Patch(facecolor="white", edgecolor="black", linestyle="--", label="teacher side / optional")]
    ax.legend(handles=handles, loc="upper right", fontsize=8, frameon=False, bbox_to_anchor=(1.0, 0.86))


def overlay_tree(files: Sequence[str] = plugin_manifest.PLUGIN_FILES) -> Dict[str, List[str]]:
    """Manifest files grouped by folder (``''`` for the checkout's root), folders and names sorted."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for rel in files:
        folder, _, name = rel.rpartition("/")
        groups[folder].append(name)
    return {folder: sorted(groups[folder]) for folder in sorted(groups)}


#: A few of ORION's own entries per folder, drawn in grey for orientation (the overlay never touches them);
#: a folder of the manifest that is not a key here does not exist in ORION (the installer creates it).
ORION_OWN = {"": ["adzoo/", "mmcv/", "data/", "docs/", "team_code/", "README.md", "setup.py"],
             "adzoo/orion/configs": ["orion_stage3.py", "..."], "mmcv/models/backbones": ["eva_vit.py", "..."],
             "mmcv/models/detectors": ["orion.py", "..."], "mmcv/models/losses": ["focal_loss.py", "..."],
             "mmcv/models/utils": ["builder.py", "..."], "mmcv/runner/hooks": ["hook.py", "..."]}


def _tree_lines(groups: Dict[str, List[str]]) -> List[Tuple[str, str]]:
    """``(text, kind)`` lines: kind is 'folder', 'new_folder', 'added' or 'orion'."""
    lines: List[Tuple[str, str]] = []
    for folder, names in groups.items():
        if not folder:
            lines.append(("ORION checkout (root)", "folder"))
        else:
            lines.append((f"{folder}/" if folder in ORION_OWN else f"+ {folder}/  (new folder)",
                          "folder" if folder in ORION_OWN else "new_folder"))
        indent = "    " if folder else ""
        lines += [(f"{indent}{name}", "orion") for name in ORION_OWN.get(folder, [])]
        lines += [(f"{indent}+ {name}", "added") for name in names]
    return lines


def draw_orion_overlay(path: Path) -> str:
    """The ORION checkout with the files the overlay adds (green), next to some of ORION's own (grey).

    The files drawn are also written to ``<path>.json``, so a test can tell when the picture is stale.
    """
    from mmcv.models.utils.checkpoint_io import atomic_write_json
    from tools.head_pruning.plots import save_figure

    groups = overlay_tree()
    groups.setdefault("", [])
    groups[""] = sorted(groups[""] + [plugin_manifest.RECORD_NAME + "  (install record)"])
    lines = _tree_lines(dict(sorted(groups.items())))
    half = (len(lines) + 1) // 2
    split = next((i for i in range(half, len(lines)) if lines[i][1].endswith("folder")), half)
    columns = [lines[:split], lines[split:]]
    rows = max(len(c) for c in columns)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 0.2 * rows + 1.1))
    try:
        ax.axis("off")
        ax.set_xlim(0, 2)
        ax.set_ylim(-rows - 1, 1.5)
        colors = {"folder": "black", "new_folder": "#1a7f37", "added": "#1a7f37", "orion": "#8c8c8c"}
        for col, column in enumerate(columns):
            for row, (text, kind) in enumerate(column):
                ax.text(col * 1.02, -row, text, fontsize=8, family="monospace", color=colors[kind],
                        fontweight="bold" if kind.endswith("folder") else "normal", va="center")
        ax.text(0, 1.0, f"python tools/install_into_orion.py PATH/TO/Orion adds {len(plugin_manifest.PLUGIN_FILES)} "
                "files (green, +) and never overwrites ORION's own (grey)", fontsize=9.5, fontweight="bold")
        atomic_write_json(Path(path).with_suffix(".json"), dict(files=sorted(plugin_manifest.PLUGIN_FILES)))
        return save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def draw_head_importance_heatmap(path: Path, num_batches: int = 8) -> str:
    """The guide's importance commands on the shipped tiny teacher, scored on training frames."""
    from tools.head_pruning.cli import main as hpu_main
    from tools.tiny_teacher_asset import materialize_teacher_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = materialize_teacher_checkpoint(work / "orion_tiny.pth", verbose=False)
        steps = [["importance", "--config", str(ROOT / TINY_CONFIG), "--checkpoint", checkpoint, "--split", "train",
                  "--method", "gradient", "--num-batches", str(num_batches), "--out", str(work / "imp.json")],
                 ["prune-config", "--importance", str(work / "imp.json"), "--pruning-ratio", "0.5", "--strategy",
                  "uniform", "--out", str(work / "prune.json")],
                 ["plot", "--importance", str(work / "imp.json"), "--pruning-config", str(work / "prune.json"),
                  "--out", str(path)]]
        for argv in steps:
            if hpu_main(argv) != 0:
                raise RuntimeError(f"tools/head_pruning_utils.py {' '.join(argv[:1])} failed")
    return str(path)


DRAW = {"kd_step": draw_kd_step, "orion_overlay": draw_orion_overlay,
        "head_importance_heatmap": draw_head_importance_heatmap}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the guide's figures into docs/figures/.")
    parser.add_argument("--only", choices=NAMES, action="append", help="draw only this figure (repeatable)")
    parser.add_argument("--out-dir", default=str(FIGURES), help="folder of the PNG files (default: docs/figures)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or NAMES:
        print(f"[draw_doc_figures] {DRAW[name](out / f'{name}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
