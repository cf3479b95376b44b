"""Helpers of the demo (``demo_kd_50_pruning.py``): similarity, timing, logs, plots, training runs, the report.

Split out of the demo so that each file keeps one job; the demo's stages call these. Copied into ORION
with the demo (the pipeline itself needs the miniature world and refuses to run there).
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tools.metric_direction import directions

ROOT = Path(__file__).resolve().parents[1]
HIGHER_IS_BETTER = directions()


#: Training frames the data-driven importance is scored on: the first 8 scenes of the training split,
#: which every training run of the demo and the study includes; the students are judged on the validation split.
IMPORTANCE_FRAMES = 64


def val_loader(dataset: Any, batch_size: int):
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate_fn)


def importance_loader(train_cfg: Any, frames: int = IMPORTANCE_FRAMES, batch_size: int = 8) -> Any:
    """The first ``frames`` training frames (whole scenes, in order): the fixed slice importance is scored on.

    Scoring on the validation frames would let the selection see the frames it is judged on.
    """
    from mmcv.datasets import build_dataset

    return val_loader(build_dataset(dict(train_cfg, num_samples=frames)), batch_size)


def backbone_similarity(reference: Any, candidate: Any, loader: Any, num_batches: int) -> Dict[str, float]:
    """Cosine similarity / relative L2 of ``candidate``'s backbone output to ``reference``'s (eval, no grad)."""
    import torch
    cos, rel = [], []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            img = batch["img"].flatten(0, 1)
            a = reference(img)[0].flatten(1)
            b = candidate(img)[0].flatten(1)
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item())
            rel.append(((a - b).norm(dim=1) / a.norm(dim=1)).mean().item())
    return dict(cosine=statistics.mean(cos), rel_l2=statistics.mean(rel))


def time_backbones(models: Dict[str, Any], image: Any, repeats: int = 20) -> Dict[str, float]:
    """Median forward time of each backbone, alternating runs."""
    import torch
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(image)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(image)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def read_json_lines(path: Path) -> List[Dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_loss_curves(rows: List[Dict[str, Any]], path: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.head_pruning.plots import save_figure

    train = [r for r in rows if r.get("mode", "train") == "train" and "total_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r.get("iter", i) for i, r in enumerate(train)]
    for key in ("total_loss", "task_loss", "backbone_distill_loss", "feature_distill_loss",
                "attention_distill_loss", "output_distill_loss"):
        if any(key in r for r in train):
            ax.plot(steps, [r.get(key) for r in train], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("KD training (student backbone only)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def retained(student: Dict[str, float], teacher: Dict[str, float]) -> Dict[str, float]:
    """Per metric: student value as a fraction of the teacher's (for plan L2, teacher / student)."""
    out = {}
    for key, higher in HIGHER_IS_BETTER.items():
        s, t = student[key], teacher[key]
        out[key] = (s / t if t else float("nan")) if higher else (t / s if s else float("nan"))
    return out


def train_kd(config: Path, work_dir: Path, seed: int) -> List[Dict[str, Any]]:
    """One run of the launcher's training loop; the rows of its JSON log."""
    from adzoo.orion.train_kd import main as train_main

    status = train_main([str(config), "--work-dir", str(work_dir), "--seed", str(seed)])
    if status:
        raise RuntimeError(f"training with {config} failed with status {status}")
    logs = sorted(work_dir.glob("*.log.json"))
    return read_json_lines(logs[-1]) if logs else []


def write_kd_config(base_config: Path, path: Path, pruning_path: Path, work_dir: Path,
                    frames: Optional[int] = None, epochs: Optional[int] = None) -> Path:
    """The tiny KD config with a pruning configuration (its counts and ratios checked by OrionStudent).

    ``frames`` / ``epochs`` shorten or lengthen training (see :func:`training_length_lines`).
    """
    from mmcv.models.utils.checkpoint_io import atomic_write_text
    from mmcv.models.utils.pruning_config import PruningConfig

    config = PruningConfig.load(pruning_path)
    backbone = dict(num_heads=config.num_heads)
    kd = dict(pruning_ratio=config.pruning_ratio, head_selection=None)
    if config.prunes_channels:
        backbone["mlp_hidden"] = config.mlp_hidden
        kd["mlp_pruning_ratio"] = config.mlp_pruning_ratio
    length = training_length_lines(base_config, frames, epochs) if frames is not None or epochs is not None else []
    atomic_write_text(path, "\n".join([
        "# Written by demo_kd_50_pruning.py: the tiny KD config with the demo's pruning configuration.",
        f"_base_ = [{str(base_config)!r}]",
        f"model = dict(pruning_config={str(pruning_path.resolve())!r}, img_backbone=dict(**{backbone!r}), "
        f"kd_config=dict(**{kd!r}))",
        *length,
        f"work_dir = {str(work_dir)!r}", ""]))
    return path


def training_length_lines(base_config: Path, frames: Optional[int], epochs: Optional[int]) -> List[str]:
    """Config lines for ``frames`` training frames per epoch and ``epochs`` epochs (None: the base config's).

    The epoch length lives in three places of the tiny KD config (the dataset size, the streaming
    sampler's warm-up length and the alpha schedule's ``iters_per_epoch``); they change together here.
    """
    from mmcv import Config

    cfg = Config.fromfile(str(base_config))
    lines = [] if epochs is None else [f"runner = dict(max_epochs={int(epochs)})"]
    if frames is None:
        return lines
    batch = int(cfg.data.samples_per_gpu)
    if frames <= 0 or frames % batch:
        raise ValueError(f"{base_config}: training frames per epoch must be a positive multiple of "
                         f"data.samples_per_gpu={batch}, got {frames}")
    iters = frames // batch
    hooks = [dict(hook) for hook in cfg.get("custom_hooks", [])]
    for hook in hooks:
        if hook.get("type") == "KDAlphaScheduleHook":
            hook["iters_per_epoch"] = iters
    return lines + [f"data = dict(train=dict(num_samples={frames}), shuffler_sampler=dict(num_iters_to_seq={iters}))",
                    f"num_iters_per_epoch = {iters}",
                    f"custom_hooks = {hooks!r}"]


def load_exported_student(path: Path) -> Any:
    """TinyOrion with the exported pruned backbone (the base detector, no OrionStudent), loaded strictly."""
    from mmcv import Config
    from mmcv.models.builder import build_model
    from mmcv.models.utils.checkpoint_io import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
    cfg.model.img_backbone = ckpt["meta"]["img_backbone"]
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def spearman(a: Any, b: Any) -> float:
    import numpy as np
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate_targets(report: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's quality targets, each with the measured value and whether it is met."""
    kept = report["retained_after_kd"]
    worst = min(kept.values())
    before_cos = report["before_kd_backbone"]["cosine"]
    after_cos = report["after_kd_backbone"]["cosine"]
    chosen = report["fidelity_before_kd"]["by_method"][report["method"]]
    random_mean = report["fidelity_before_kd"]["random_mean"]
    gains = {k: report["after_kd_metrics"][k] - report["before_kd_metrics"][k] for k in HIGHER_IS_BETTER}
    better_after = sum((gains[k] > 0) == HIGHER_IS_BETTER[k] for k in gains)
    targets = {
        "student keeps >= 98% of the teacher on every metric": dict(value=worst, met=worst >= 0.98),
        "KD matters: after KD clearly better than before": dict(
            value=dict(cosine_before=before_cos, cosine_after=after_cos, metrics_improved=better_after),
            met=after_cos > before_cos and better_after >= 3),
        "importance beats random heads (fidelity)": dict(value=dict(importance=chosen, random_mean=random_mean),
                                                         met=chosen > random_mean),
    }
    if not report.get("joint"):
        targets["demo within 5 minutes"] = dict(value=report["total_seconds"], met=report["total_seconds"] <= 300)
    if "task_only_metrics" in report:
        kd_ahead = [k for k in HIGHER_IS_BETTER if (report["after_kd_metrics"][k] > report["task_only_metrics"][k])
                    == HIGHER_IS_BETTER[k] and report["after_kd_metrics"][k] != report["task_only_metrics"][k]]
        targets[f"KD ahead of task-loss-only training on most task metrics in this run (seed {report['seed']}, "
                f"one run: no verdict over seeds)"] = dict(
            value=dict(kd_ahead_on=f"{len(kd_ahead)} of {len(HIGHER_IS_BETTER)} ({', '.join(kd_ahead) or 'none'})",
                       cosine_kd=after_cos, cosine_task_only=report["task_only_backbone"]["cosine"]),
            met=len(kd_ahead) > len(HIGHER_IS_BETTER) / 2)
    return targets


SHIPPED_STUDIES = (ROOT / "docs" / "kd_study" / "study.json", ROOT / "docs" / "kd_study_joint" / "study.json")


def shipped_study_lines(report: Dict[str, Any], study_paths: Any = SHIPPED_STUDIES) -> List[str]:
    """What the shipped studies say at the demo's ratio and mode, quoted as such (the demo did not measure it).

    Each line is one paired comparison over seeds from a study's ``comparisons`` (``tools/kd_study_report.py``).
    """
    from tools.kd_study_report import describe_comparison

    modes = ("joint", "heads_at_joint_speed") if report.get("joint") else ("heads",)
    lines = []
    for path in study_paths:
        if not Path(path).is_file():
            continue
        study = json.loads(Path(path).read_text())
        for comparison in study.get("comparisons", []):
            if comparison["a"]["ratio"] == report["pruning_ratio"] and comparison["a"].get("mode", "heads") in modes:
                lines.append(f"- from the shipped study, {len(comparison['seeds'])} seeds "
                             f"({os.path.relpath(path, ROOT)}): " + describe_comparison(comparison)[2:])
    return lines


def write_report(report: Dict[str, Any], work: Path, extra_section: str = "") -> None:
    """report.md (the table, the targets, ``extra_section`` appended) and report.json, atomically."""
    from mmcv.models.utils.checkpoint_io import atomic_write_json, atomic_write_text

    rows = []
    control = report.get("task_only_metrics")
    for key in HIGHER_IS_BETTER:
        arrow = "higher" if HIGHER_IS_BETTER[key] else "lower"
        rows.append(f"| {key} ({arrow} is better) | {report['chance_metrics'][key]:.4f} | "
                    f"{report['teacher_metrics'][key]:.4f} | {report['before_kd_metrics'][key]:.4f} | "
                    f"{f'{control[key]:.4f}' if control else 'skipped'} | "
                    f"{report['after_kd_metrics'][key]:.4f} | {report['retained_after_kd'][key]:.1%} |")
    params = report["backbone_params"]
    speed = report["backbone_speed"]
    control_cos = f"{report['task_only_backbone']['cosine']:.4f}" if control else "skipped"
    rows.append(f"| backbone cosine to teacher | - | 1.0000 | {report['before_kd_backbone']['cosine']:.4f} | "
                f"{control_cos} | {report['after_kd_backbone']['cosine']:.4f} | - |")
    rows.append(f"| backbone parameters | - | {params['teacher'] / 1e6:.3f} M | {params['student'] / 1e6:.3f} M | "
                f"{params['student'] / 1e6:.3f} M | {params['student'] / 1e6:.3f} M | "
                f"{params['student'] / params['teacher']:.1%} |")
    if speed:
        rows.append(f"| backbone speedup (median, CPU) | - | 1.000x | {speed['speedup']:.3f}x | {speed['speedup']:.3f}x "
                    f"| {speed['speedup']:.3f}x | ceiling {speed['ceiling']:.3f}x |")
    beyond = ""
    if speed and speed["speedup"] > speed["ceiling"]:
        from tools.bench_record import BEYOND_CEILING
        beyond = f"\nSpeedup: {BEYOND_CEILING}.\n"
    table = "\n".join(["| metric | chance | teacher | pruned, before KD | task loss only (3 ep.) | "
                       "student after KD (3 ep.) | kept by KD |", "|---|---|---|---|---|---|---|"] + rows)
    fid = report["fidelity_before_kd"]
    targets = "\n".join(f"- {'MET' if t['met'] else 'MISSED'}: {name} (measured: {_fmt(t['value'])})"
                        for name, t in report["targets"].items())
    pruning = report["pruning_config"]
    mlp = (f" and {1 - sum(pruning['mlp_hidden']) / (len(pruning['mlp_hidden']) * pruning['teacher_mlp_hidden']):.1%}"
           f" of the SwiGLU hidden channels ({pruning['channel_method']} channel importance)"
           if pruning.get("selected_channels_per_layer") else "")
    shipped = "\n".join(report.get("shipped_study", [])) or "- no shipped study covers this ratio and mode"
    text = f"""# ORION-KD demo report

Miniature ORION (TinyOrion, synthetic Chat-B2D-shaped data), seed {report['seed']}: {report['pruning_ratio']:.0%} of
the attention heads{mlp} removed ({report['strategy']} allocation, {report['method']} importance), student backbone
trained by KD for 3 epochs, everything else frozen. torch {report['torch']}, {report['threads']} threads.
"task loss only" is the control: the same pruned student trained for the same 3 epochs with alpha = 0 (no
distillation). "kept by KD" is the KD student's value as a fraction of the teacher's (teacher / student for
plan L2). Metrics on {report['teacher_metrics'].get('num_samples', 'the')} validation samples.

{table}
{beyond}
Backbone fidelity right after pruning (cosine of the output feature map to the full backbone, before KD):
{', '.join(f"{m} {v:.4f}" for m, v in fid['by_method'].items())}; random {'heads and channels' if mlp else 'heads'}
{fid['random_mean']:.4f} (mean of {len(fid['random_draws'])} draws).
{extra_section}
## Targets (what this run measured)
{targets}

## From the shipped studies (not measured by this run)
{shipped}

## Files
importance_*.json, pruning_config.json, impact_analysis.json, importance_heatmap.png, fidelity_vs_ratio.png,
loss_curves.png, kd/ (training logs, checkpoints, student_pruned.pth); with --joint also channel_importance_*.npz,
channel_importance_heatmap.png, pruning_config_heads_only.json and heads_only/.

Stage times (s): {', '.join(f"{k}: {v:.1f}" for k, v in report['stage_seconds'].items())}; total
{report['total_seconds']:.1f}s.
"""
    atomic_write_text(work / "report.md", text)
    atomic_write_json(work / "report.json", json.loads(json.dumps(report, default=str)))
    print("\n" + table)
    print("\nTargets (what this run measured):\n" + targets)
    print("\nFrom the shipped studies (not measured by this run):\n" + shipped)
    print(f"\nReport: {work / 'report.md'} (total {report['total_seconds']:.0f}s)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)
