"""ORION-KD demo: prune half of the EVA-02 attention heads and recover accuracy by distillation.

    python demo_kd_50_pruning.py --check-setup [--config CFG]   # read-only setup report
    python demo_kd_50_pruning.py                                # the whole pipeline, miniature world

The pipeline runs end to end on the built-in miniature ORION (TinyOrion on synthetic
Chat-B2D-shaped data) in a few minutes on a CPU: teacher (trained if missing) -> head importance
by every method -> a 50% pruning configuration -> impact analysis (and random-head baselines) ->
KD training for 3 epochs through the launcher's training loop -> evaluation -> export ->
benchmark. It writes report.md, report.json and PNG plots to work_dirs/demo_kd_50_pruning/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_KD_CONFIG = "adzoo/orion/configs/orion_tiny_kd_train.py"
METHODS = ("magnitude", "gradient", "entropy", "activation")
HIGHER_IS_BETTER = {"det_f1": True, "lane_iou": True, "qa_acc": True, "plan_l2": False}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-setup", action="store_true", help="print the setup report and exit")
    parser.add_argument("--config", default=TINY_KD_CONFIG, help="KD config (for --check-setup and the pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruning-ratio", type=float, default=0.5, help="fraction of heads REMOVED")
    parser.add_argument("--strategy", choices=("uniform", "global"), default="uniform")
    parser.add_argument("--method", choices=METHODS, default="magnitude",
                        help="importance used to prune (default: magnitude, the original guide's method)")
    parser.add_argument("--work-dir", default="work_dirs/demo_kd_50_pruning")
    parser.add_argument("--random-draws", type=int, default=5, help="random head selections for the baseline")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true",
                        help="skip the task-loss-only fine-tuning of the pruned student (the KD-vs-no-KD control)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.pruning_ratio < 1.0:
        parser.error(f"--pruning-ratio is the fraction of heads removed, in [0, 1); got {args.pruning_ratio}")
    return args


def check_setup(config: str) -> int:
    from tools.kd_setup_check import FAIL, format_checks, run_setup_checks

    print(f"ORION-KD setup check for {config}")
    checks = run_setup_checks(config, root=os.getcwd())
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


# ----------------------------------------------------------------------------- pipeline helpers


class Stage:
    """Prints a numbered stage header and its duration."""

    timings: Dict[str, float] = {}

    def __init__(self, index: int, total: int, title: str) -> None:
        self.label, self.title = f"[{index}/{total}]", title

    def __enter__(self) -> "Stage":
        print(f"\n{self.label} {self.title}", flush=True)
        self.start = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        elapsed = time.time() - self.start
        Stage.timings[self.title] = elapsed
        print(f"{self.label} done in {elapsed:.1f}s", flush=True)


def val_loader(dataset: Any, batch_size: int):
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate_fn)


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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def retained(student: Dict[str, float], teacher: Dict[str, float]) -> Dict[str, float]:
    """Per metric: student value as a fraction of the teacher's (for plan L2, teacher / student)."""
    out = {}
    for key, higher in HIGHER_IS_BETTER.items():
        s, t = student[key], teacher[key]
        out[key] = (s / t if t else float("nan")) if higher else (t / s if s else float("nan"))
    return out


# ----------------------------------------------------------------------------- pipeline


def run_pipeline(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    import mmcv.models  # noqa: F401  (registers the standalone world)
    from mmcv.models.utils.checkpoint_io import atomic_write_text
    from mmcv import Config
    from mmcv.datasets import build_dataset
    from mmcv.datasets.chat_b2d_baseline import chance_levels
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from mmcv.models.builder import build_model
    from tools import head_pruning_utils as hpu
    from tools.train_tiny_teacher import ensure_tiny_teacher, load_tiny_teacher

    started = time.time()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = Config.fromfile(str(ROOT / args.config))
    teacher_path = cfg.model.teacher_backbone_path
    total = 9
    report: Dict[str, Any] = dict(seed=args.seed, pruning_ratio=args.pruning_ratio, strategy=args.strategy,
                                  method=args.method, config=args.config, torch=torch.__version__,
                                  threads=torch.get_num_threads())

    with Stage(1, total, "teacher"):
        ensure_tiny_teacher(teacher_path, seed=args.seed)
        teacher = load_tiny_teacher(teacher_path)
        val_set = build_dataset(cfg.data.val)
        train_set = build_dataset(cfg.data.train)
        teacher_metrics = evaluate(teacher, val_set)
        chance = chance_levels(train_set, val_set)
        report.update(teacher_checkpoint=teacher_path, teacher_metrics=teacher_metrics, chance_metrics=chance)
        print("  teacher:", {k: round(v, 4) for k, v in teacher_metrics.items() if k in HIGHER_IS_BETTER})

    loader = val_loader(val_set, batch_size=8)
    with Stage(2, total, "head importance by every method"):
        importance = {}
        for method in METHODS:
            t0 = time.time()
            if method == "magnitude":
                result = hpu.compute_head_importance_magnitude(teacher)
            else:
                fn = getattr(hpu, f"compute_head_importance_{method}")
                result = fn(teacher, loader, num_batches=8, progress=False)
            result.save(work / f"importance_{method}.json")
            importance[method] = result
            print(f"  {method:<10} {time.time() - t0:5.1f}s")
        hpu.plot_head_importance(importance[args.method], work / "importance_heatmap.png")
        ranks = {}
        for method in METHODS:
            a = importance[method].numpy().ravel()
            b = importance[args.method].numpy().ravel()
            ranks[method] = float(_spearman(a, b))
        report["importance_rank_correlation_to_chosen"] = ranks

    with Stage(3, total, f"{args.pruning_ratio:.0%} pruning configuration ({args.strategy}, {args.method})"):
        pruning = hpu.create_pruning_config(importance[args.method], pruning_ratio=args.pruning_ratio,
                                            strategy=args.strategy)
        pruning_path = work / "pruning_config.json"
        pruning.save(pruning_path)
        hpu.plot_head_importance(importance[args.method], work / "importance_heatmap.png", pruning_config=pruning)
        print(f"  heads kept per block: {pruning.num_heads}")
        report["pruning_config"] = pruning.to_dict()

    with Stage(4, total, "impact analysis and random-head baselines"):
        analysis = hpu.analyze_pruning_impact(importance[args.method], pruning_ratios=(0.25, 0.5, 0.75),
                                              model=teacher, dataloader=loader, num_batches=4,
                                              save_path=work / "impact_analysis.json")
        hpu.plot_fidelity_vs_ratio(analysis, work / "fidelity_vs_ratio.png")
        generator = torch.Generator().manual_seed(args.seed)
        random_fidelity = []
        for _ in range(args.random_draws):
            scores = torch.rand(importance[args.method].scores.shape, generator=generator, dtype=torch.float64)
            random_scores = hpu.HeadImportance(scores=scores, method="random", num_samples=0, source="random")
            draw = hpu.analyze_pruning_impact(random_scores, pruning_ratios=(args.pruning_ratio,), model=teacher,
                                              dataloader=loader, strategies=(args.strategy,), num_batches=4,
                                              verbose=False)
            random_fidelity.append(draw["results"][0]["cosine_similarity"])
        by_method = {}
        for method in METHODS:
            res = hpu.analyze_pruning_impact(importance[method], pruning_ratios=(args.pruning_ratio,), model=teacher,
                                             dataloader=loader, strategies=(args.strategy,), num_batches=4,
                                             verbose=False)
            by_method[method] = res["results"][0]["cosine_similarity"]
        report["fidelity_before_kd"] = dict(by_method=by_method, random_mean=statistics.mean(random_fidelity),
                                            random_draws=random_fidelity)
        print("  cosine to the full backbone at this ratio: " +
              ", ".join(f"{m} {v:.4f}" for m, v in by_method.items()) +
              f"; random heads (mean of {len(random_fidelity)}) {statistics.mean(random_fidelity):.4f}")

    kd_dir = work / "kd"
    kd_config = work / "orion_tiny_kd_demo.py"
    atomic_write_text(kd_config, "\n".join([
        "# Written by demo_kd_50_pruning.py: the tiny KD config with the demo's pruning configuration.",
        f"_base_ = [{str(ROOT / args.config)!r}]",
        f"model = dict(pruning_config={str(pruning_path.resolve())!r}, img_backbone=dict("
        f"num_heads={pruning.num_heads!r}), kd_config=dict(pruning_ratio={args.pruning_ratio!r}, "
        f"head_selection=None))",
        f"work_dir = {str(kd_dir)!r}", ""]))
    with Stage(5, total, "pruned student before KD"):
        kd_cfg = Config.fromfile(str(kd_config))
        before = build_model(kd_cfg.model).eval()
        before_metrics = evaluate(before, val_set)
        before_similarity = backbone_similarity(before.teacher_backbone, before.img_backbone, loader, 8)
        report.update(before_kd_metrics=before_metrics, before_kd_backbone=before_similarity)
        print("  before KD:", {k: round(v, 4) for k, v in before_metrics.items() if k in HIGHER_IS_BETTER},
              f"cosine {before_similarity['cosine']:.4f}")

    with Stage(6, total, "KD training, 3 epochs (adzoo/orion/train_kd.py, the launcher's loop)"):
        from adzoo.orion.train_kd import main as train_main
        status = train_main([str(kd_config), "--work-dir", str(kd_dir), "--seed", str(args.seed)])
        if status:
            raise RuntimeError(f"KD training failed with status {status}")
        logs = sorted(kd_dir.glob("*.log.json"))
        rows = read_json_lines(logs[-1]) if logs else []
        if rows:
            plot_loss_curves(rows, work / "loss_curves.png")
        report["kd_log"] = str(logs[-1]) if logs else None

    with Stage(7, total, "evaluate the exported student"):
        export = export_final_student(kd_config, kd_dir)
        student = load_exported_student(export)
        after_metrics = evaluate(student, val_set)
        after_similarity = backbone_similarity(before.teacher_backbone, student.img_backbone, loader, 8)
        report.update(after_kd_metrics=after_metrics, after_kd_backbone=after_similarity, export=str(export))
        print("  after KD:", {k: round(v, 4) for k, v in after_metrics.items() if k in HIGHER_IS_BETTER},
              f"cosine {after_similarity['cosine']:.4f}")

    with Stage(8, total, "control: the same 3 epochs with the task loss only (alpha = 0, no distillation)"):
        if args.skip_ablation:
            print("  skipped (--skip-ablation)")
        else:
            task_dir = work / "task_only"
            task_config = work / "orion_tiny_task_only_demo.py"
            atomic_write_text(task_config, "\n".join([
                "# Written by demo_kd_50_pruning.py: the demo's KD run with alpha = 0 (task loss only), as a control.",
                f"_base_ = [{str(kd_config.resolve())!r}]",
                "model = dict(kd_config=dict(alpha_schedule='constant', distillation_alpha=0.0))",
                f"work_dir = {str(task_dir)!r}", ""]))
            status = train_main([str(task_config), "--work-dir", str(task_dir), "--seed", str(args.seed)])
            if status:
                raise RuntimeError(f"task-only training failed with status {status}")
            control = load_exported_student(export_final_student(task_config, task_dir))
            report["task_only_metrics"] = evaluate(control, val_set)
            report["task_only_backbone"] = backbone_similarity(before.teacher_backbone, control.img_backbone, loader, 8)
            print("  task loss only:", {k: round(v, 4) for k, v in report["task_only_metrics"].items()
                                        if k in HIGHER_IS_BETTER},
                  f"cosine {report['task_only_backbone']['cosine']:.4f}")

    with Stage(9, total, "benchmark"):
        params = dict(teacher=sum(p.numel() for p in teacher.img_backbone.parameters()),
                      student=sum(p.numel() for p in student.img_backbone.parameters()))
        image = next(iter(loader))["img"].flatten(0, 1)
        speed = {}
        if not args.skip_benchmark:
            medians = time_backbones(dict(teacher=teacher.img_backbone, student=student.img_backbone), image)
            hw = tuple(image.shape[-2:])
            speed = dict(median_s=medians, speedup=medians["teacher"] / medians["student"],
                         ceiling=teacher.img_backbone.analytic_macs(hw) / student.img_backbone.analytic_macs(hw),
                         batch=int(image.shape[0]))
            print(f"  tiny backbone: teacher {medians['teacher'] * 1e3:.1f} ms, student {medians['student'] * 1e3:.1f}"
                  f" ms per {image.shape[0]} images, speedup {speed['speedup']:.3f}x (analytic ceiling "
                  f"{speed['ceiling']:.3f}x)")
        report.update(backbone_params=params, backbone_speed=speed)

    report["retained_after_kd"] = retained(after_metrics, teacher_metrics)
    report["retained_before_kd"] = retained(before_metrics, teacher_metrics)
    report["stage_seconds"] = dict(Stage.timings)
    report["total_seconds"] = time.time() - started
    report["targets"] = evaluate_targets(report)
    write_report(report, work)
    return report


def export_final_student(config: Path, work_dir: Path) -> Path:
    """The student that the config's ``KDExportStudentHook`` exported at the end of the run.

    The training loop only trains; exporting is the hook's job, as in ORION.
    """
    path = work_dir / "student_pruned.pth"
    if not path.is_file():
        raise RuntimeError(f"{config}: the run ended without {path}; its custom_hooks need "
                           "dict(type='KDExportStudentHook', filename='student_pruned.pth')")
    return path


def load_exported_student(path: Path) -> Any:
    """TinyOrion with the exported pruned backbone (the base detector, no OrionStudent), loaded strictly."""
    import torch
    from mmcv import Config
    from mmcv.models.builder import build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
    cfg.model.img_backbone = ckpt["meta"]["img_backbone"]
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def _spearman(a: Any, b: Any) -> float:
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
        "demo within 5 minutes": dict(value=report["total_seconds"], met=report["total_seconds"] <= 300),
    }
    if "task_only_backbone" in report:
        control_cos = report["task_only_backbone"]["cosine"]
        targets["KD beats task-loss-only training at equal cost (backbone cosine)"] = dict(
            value=dict(kd=after_cos, task_only=control_cos), met=after_cos > control_cos)
    return targets


def write_report(report: Dict[str, Any], work: Path) -> None:
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
    table = "\n".join(["| metric | chance | teacher | pruned, before KD | task loss only (3 ep.) | "
                       "student after KD (3 ep.) | kept by KD |", "|---|---|---|---|---|---|---|"] + rows)
    fid = report["fidelity_before_kd"]
    targets = "\n".join(f"- {'MET' if t['met'] else 'MISSED'}: {name} (measured: {_fmt(t['value'])})"
                        for name, t in report["targets"].items())
    text = f"""# ORION-KD demo report

Miniature ORION (TinyOrion, synthetic Chat-B2D-shaped data), seed {report['seed']}: {report['pruning_ratio']:.0%} of
the attention heads removed ({report['strategy']} allocation, {report['method']} importance), student backbone
trained by KD for 3 epochs, everything else frozen. torch {report['torch']}, {report['threads']} threads.
"task loss only" is the control: the same pruned student trained for the same 3 epochs with alpha = 0 (no
distillation). "kept by KD" is the KD student's value as a fraction of the teacher's (teacher / student for
plan L2). Metrics on {report['teacher_metrics'].get('num_samples', 'the')} validation samples.

{table}

Backbone fidelity right after pruning (cosine of the output feature map to the full backbone, before KD):
{', '.join(f"{m} {v:.4f}" for m, v in fid['by_method'].items())}; random heads {fid['random_mean']:.4f}
(mean of {len(fid['random_draws'])} draws).

## Targets
{targets}

## Files
importance_*.json, pruning_config.json, impact_analysis.json, importance_heatmap.png, fidelity_vs_ratio.png,
loss_curves.png, kd/ (training logs, checkpoints, student_pruned.pth).

Stage times (s): {', '.join(f"{k}: {v:.1f}" for k, v in report['stage_seconds'].items())}; total
{report['total_seconds']:.1f}s.
"""
    atomic_write_text(work / "report.md", text)
    atomic_write_json(work / "report.json", json.loads(json.dumps(report, default=str)))
    print("\n" + table)
    print("\nTargets:\n" + targets)
    print(f"\nReport: {work / 'report.md'} (total {report['total_seconds']:.0f}s)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.check_setup:
        return check_setup(args.config)
    if not (ROOT / "mmcv/models/detectors/tiny_orion.py").is_file():
        print("error: the demo pipeline needs the miniature ORION of the standalone ORION-KD repository; inside an "
              "ORION checkout run `python demo_kd_50_pruning.py --check-setup --config "
              "adzoo/orion/configs/orion_stage3_kd_train.py`", file=sys.stderr)
        return 2
    run_pipeline(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
