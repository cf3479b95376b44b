"""ORION-KD demo: prune half of the EVA-02 attention heads and recover accuracy by distillation.

    python demo_kd_50_pruning.py --check-setup [--config CFG]   # read-only setup report
    python demo_kd_50_pruning.py                                # the whole pipeline, miniature world
    python demo_kd_50_pruning.py --joint                        # heads + SwiGLU width (see README_KD.md)

The pipeline runs end to end on the built-in miniature ORION (TinyOrion on synthetic
Chat-B2D-shaped data) in a few minutes on a CPU: teacher (the shipped, checksummed one) -> head importance
by every method -> a 50% pruning configuration -> impact analysis (and random-head baselines) ->
KD training for 3 epochs through the launcher's training loop -> evaluation -> export ->
benchmark. It writes report.md, report.json and PNG plots to work_dirs/demo_kd_50_pruning/.
``--joint`` also removes SwiGLU hidden channels (``--mlp-pruning-ratio``, default 0.4375 as ORION-L's
2730 -> 1536) and ends with the heads-only student that runs at the joint student's measured speed,
trained and evaluated the same way (``tools/demo_joint.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.dependency_check import require_dependencies  # noqa: E402  (standard library only)
from tools.demo_support import (HIGHER_IS_BETTER, backbone_similarity, evaluate_targets,  # noqa: E402
                                 importance_loader, load_exported_student, plot_loss_curves, retained,
                                 shipped_study_lines, spearman, time_backbones, train_kd, val_loader,
                                 write_kd_config, write_report)

TINY_KD_CONFIG = "adzoo/orion/configs/orion_tiny_kd_train.py"
METHODS = ("magnitude", "gradient", "entropy", "activation")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-setup", action="store_true", help="print the setup report and exit")
    parser.add_argument("--config", default=TINY_KD_CONFIG, help="KD config (for --check-setup and the pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruning-ratio", type=float, default=0.5, help="fraction of heads REMOVED")
    parser.add_argument("--strategy", choices=("uniform", "global", "cost"), default="uniform",
                        help="allocation (cost: analytic MACs per unit; see README_KD.md)")
    parser.add_argument("--method", choices=METHODS, default="magnitude",
                        help="importance used to prune (default: magnitude, the original guide's method)")
    parser.add_argument("--work-dir", default="work_dirs/demo_kd_50_pruning")
    parser.add_argument("--random-draws", type=int, default=5, help="random head selections for the baseline")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2): the metrics are reproduced exactly at the same thread count "
                             "on the same kind of CPU")
    parser.add_argument("--train-frames", type=int, default=None,
                        help="training frames per epoch for KD and the control (default: the config's 512, i.e. "
                             "64 iterations of 8); fewer make a quick, less accurate run")
    parser.add_argument("--skip-ablation", action="store_true",
                        help="skip the task-loss-only fine-tuning of the pruned student (the KD-vs-no-KD control)")
    joint = parser.add_argument_group("joint head + SwiGLU-width pruning (README_KD.md)")
    joint.add_argument("--joint", action="store_true",
                       help="prune SwiGLU hidden channels as well, then compare with heads-only pruning at the joint "
                            "student's measured speed")
    joint.add_argument("--mlp-pruning-ratio", type=float, default=0.4375,
                       help="with --joint: fraction of SwiGLU channels REMOVED (0.4375: ORION-L's 2730 -> 1536)")
    joint.add_argument("--channel-method", choices=("magnitude", "gradient", "activation"), default=None,
                       help="with --joint: channel importance (default: --method)")
    joint.add_argument("--skip-equal-speed", action="store_true",
                       help="with --joint: skip the heads-only student at equal measured speed")
    args = parser.parse_args(argv)
    if not 0.0 <= args.pruning_ratio < 1.0:
        parser.error(f"--pruning-ratio is the fraction of heads removed, in [0, 1); got {args.pruning_ratio}")
    if not 0.0 <= args.mlp_pruning_ratio < 1.0:
        parser.error(f"--mlp-pruning-ratio is the fraction of channels removed, in [0, 1); got {args.mlp_pruning_ratio}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.train_frames is not None and (args.train_frames < 64 or args.train_frames % 8):
        parser.error("--train-frames must be a multiple of the tiny config's batch of 8 and at least one batch of "
                     f"8-frame scenes (64); got {args.train_frames}")
    if args.joint and args.channel_method is None:
        if args.method == "entropy":
            parser.error("--joint --method entropy: entropy scores heads only; give --channel-method")
        args.channel_method = args.method
    return args


def check_setup(config: str) -> int:
    from tools.kd_setup_check import FAIL, format_checks, run_setup_checks

    print(f"ORION-KD setup check for {config}")
    checks = run_setup_checks(config, root=os.getcwd())
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


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


# ----------------------------------------------------------------------------- pipeline


@dataclass
class DemoRun:
    """What the stages share: settings, config, data, models and the report being written."""

    args: argparse.Namespace
    cfg: Any
    work: Path
    report: Dict[str, Any]
    importance: Dict[str, Any] = field(default_factory=dict)
    channel_importance: Any = None
    teacher: Any = None
    val_set: Any = None
    loader: Any = None
    importance_loader: Any = None
    pruning: Any = None
    kd_config: Optional[Path] = None
    before: Any = None
    student: Any = None


def run_pipeline(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    import mmcv.models  # noqa: F401  (registers the standalone world)
    from mmcv import Config
    from tools.demo_joint import joint_report_section, joint_targets, stage_equal_speed

    started = time.time()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report: Dict[str, Any] = dict(seed=args.seed, pruning_ratio=args.pruning_ratio, strategy=args.strategy,
                                  method=args.method, config=args.config, torch=torch.__version__,
                                  threads=torch.get_num_threads(), joint=bool(args.joint))
    run = DemoRun(args, Config.fromfile(str(ROOT / args.config)), work, report)
    what = f"{args.pruning_ratio:.0%} of the heads" + (f" + {args.mlp_pruning_ratio:.1%} of the SwiGLU channels"
                                                      if args.joint else "")
    stages = [("teacher", stage_teacher), ("importance by every method", stage_importance),
              (f"pruning configuration: {what} ({args.strategy}, {args.method})", stage_pruning_config),
              ("impact analysis and random baselines", stage_impact), ("pruned student before KD", stage_before_kd),
              ("KD training, 3 epochs (adzoo/orion/train_kd.py, the launcher's loop)", stage_kd),
              ("evaluate the exported student", stage_evaluate),
              ("control: the same 3 epochs with the task loss only (alpha = 0, no distillation)", stage_control),
              ("benchmark", stage_benchmark)]
    if args.joint:
        stages.append(("heads-only pruning at the joint student's measured speed, KD, evaluation", stage_equal_speed))
    for index, (title, stage) in enumerate(stages, 1):
        with Stage(index, len(stages), title):
            stage(run)
    report["retained_after_kd"] = retained(report["after_kd_metrics"], report["teacher_metrics"])
    report["retained_before_kd"] = retained(report["before_kd_metrics"], report["teacher_metrics"])
    report["stage_seconds"] = dict(Stage.timings)
    report["total_seconds"] = time.time() - started
    report["targets"] = {**evaluate_targets(report), **joint_targets(report)}
    report["shipped_study"] = shipped_study_lines(report)
    write_report(report, work, joint_report_section(report))
    return report


def stage_teacher(run: DemoRun) -> None:
    from mmcv.datasets import build_dataset
    from mmcv.datasets.chat_b2d_baseline import chance_levels
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from tools.train_tiny_teacher import ensure_tiny_teacher, load_tiny_teacher

    teacher_path = run.cfg.model.kd_config.teacher_backbone_path
    ensure_tiny_teacher(teacher_path, seed=run.args.seed)  # the default path: written from the shipped teacher
    run.teacher = load_tiny_teacher(teacher_path)
    run.val_set = build_dataset(run.cfg.data.val)
    train_set = build_dataset(run.cfg.data.train)
    run.loader = val_loader(run.val_set, batch_size=8)
    run.importance_loader = importance_loader(run.cfg.data.train)
    metrics = evaluate(run.teacher, run.val_set)
    run.report.update(teacher_checkpoint=teacher_path, teacher_metrics=metrics,
                      chance_metrics=chance_levels(train_set, run.val_set))
    print("  teacher:", {k: round(v, 4) for k, v in metrics.items() if k in HIGHER_IS_BETTER})


def stage_importance(run: DemoRun) -> None:
    from tools import head_pruning_utils as hpu

    for method in METHODS:
        t0 = time.time()
        if method == "magnitude":
            result = hpu.compute_head_importance_magnitude(run.teacher)
        else:
            fn = getattr(hpu, f"compute_head_importance_{method}")
            result = fn(run.teacher, run.importance_loader, num_batches=8, progress=False)
        result.save(run.work / f"importance_{method}.json")
        run.importance[method] = result
        print(f"  {method:<10} {time.time() - t0:5.1f}s")
    ranks = {m: float(spearman(run.importance[m].numpy().ravel(), run.importance[run.args.method].numpy().ravel()))
             for m in METHODS}
    run.report["importance_rank_correlation_to_chosen"] = ranks
    if run.args.joint:
        method = run.args.channel_method
        kwargs = {} if method == "magnitude" else dict(dataloader=run.importance_loader, num_batches=8,
                                                       progress=False)
        run.channel_importance = hpu.compute_channel_importance(run.teacher, method, **kwargs)
        run.channel_importance.save(run.work / f"channel_importance_{method}.npz")
        print(f"  channels ({method}) {run.channel_importance.metadata.get('seconds', 0):5.1f}s")


def stage_pruning_config(run: DemoRun) -> None:
    from tools import head_pruning_utils as hpu

    args = run.args
    joint = dict(channel_importance=run.channel_importance, mlp_pruning_ratio=args.mlp_pruning_ratio) \
        if args.joint else {}
    run.pruning = hpu.create_pruning_config(run.importance[args.method], pruning_ratio=args.pruning_ratio,
                                            strategy=args.strategy, **joint)
    run.pruning.save(run.work / "pruning_config.json")
    hpu.plot_head_importance(run.importance[args.method], run.work / "importance_heatmap.png", pruning_config=run.pruning)
    if args.joint:
        hpu.plot_channel_importance(run.channel_importance, run.work / "channel_importance_heatmap.png",
                                    pruning_config=run.pruning)
        print(f"  SwiGLU channels kept per block: {run.pruning.mlp_hidden} of {run.pruning.teacher_mlp_hidden}")
    print(f"  heads kept per block: {run.pruning.num_heads}")
    run.report["pruning_config"] = run.pruning.to_dict()
    run.kd_config = write_kd_config(ROOT / run.args.config, run.work / "orion_tiny_kd_demo.py",
                                    run.work / "pruning_config.json", run.work / "kd", frames=run.args.train_frames)


def stage_impact(run: DemoRun) -> None:
    import torch

    from tools import head_pruning_utils as hpu

    args, chosen = run.args, run.importance[run.args.method]
    joint = dict(channel_importance=run.channel_importance, mlp_pruning_ratios=(args.mlp_pruning_ratio,)) \
        if args.joint else {}
    analysis = hpu.analyze_pruning_impact(chosen, pruning_ratios=(0.25, 0.5, 0.75), model=run.teacher,
                                          dataloader=run.loader, num_batches=4,
                                          save_path=run.work / "impact_analysis.json", **joint)
    hpu.plot_fidelity_vs_ratio(analysis, run.work / "fidelity_vs_ratio.png")

    def fidelity(heads: Any, channels: Any = None) -> float:
        extra = dict(channel_importance=channels, mlp_pruning_ratios=(args.mlp_pruning_ratio,)) if args.joint else {}
        draw = hpu.analyze_pruning_impact(heads, pruning_ratios=(args.pruning_ratio,), model=run.teacher,
                                          dataloader=run.loader, strategies=(args.strategy,), num_batches=4,
                                          verbose=False, **extra)
        return draw["results"][0]["cosine_similarity"]

    generator = torch.Generator().manual_seed(args.seed)
    random_fidelity = []
    for _ in range(args.random_draws):
        scores = torch.rand(chosen.scores.shape, generator=generator, dtype=torch.float64)
        channels = torch.rand(run.channel_importance.scores.shape, generator=generator, dtype=torch.float64) \
            if args.joint else None
        random_fidelity.append(fidelity(hpu.HeadImportance(scores=scores, method="random", source="random"), channels))
    by_method = {method: fidelity(run.importance[method], run.channel_importance) for method in METHODS}
    run.report["fidelity_before_kd"] = dict(by_method=by_method, random_mean=statistics.mean(random_fidelity),
                                            random_draws=random_fidelity)
    print("  cosine to the full backbone at this ratio: " + ", ".join(f"{m} {v:.4f}" for m, v in by_method.items())
          + f"; random {'heads and channels' if args.joint else 'heads'} (mean of {len(random_fidelity)}) "
          f"{statistics.mean(random_fidelity):.4f}")


def stage_before_kd(run: DemoRun) -> None:
    from mmcv import Config
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from mmcv.models.builder import build_model

    run.before = build_model(Config.fromfile(str(run.kd_config)).model).eval()
    metrics = evaluate(run.before, run.val_set)
    similarity = backbone_similarity(run.before.teacher_backbone, run.before.img_backbone, run.loader, 8)
    run.report.update(before_kd_metrics=metrics, before_kd_backbone=similarity)
    print("  before KD:", {k: round(v, 4) for k, v in metrics.items() if k in HIGHER_IS_BETTER},
          f"cosine {similarity['cosine']:.4f}")


def stage_kd(run: DemoRun) -> None:
    rows = train_kd(run.kd_config, run.work / "kd", run.args.seed)
    if rows:
        plot_loss_curves(rows, run.work / "loss_curves.png")
    logs = sorted((run.work / "kd").glob("*.log.json"))
    run.report["kd_log"] = str(logs[-1]) if logs else None


def stage_evaluate(run: DemoRun) -> None:
    from mmcv.datasets.chat_b2d_metrics import evaluate

    export = run.work / "kd" / "student_pruned.pth"
    run.student = load_exported_student(export)
    metrics = evaluate(run.student, run.val_set)
    similarity = backbone_similarity(run.before.teacher_backbone, run.student.img_backbone, run.loader, 8)
    run.report.update(after_kd_metrics=metrics, after_kd_backbone=similarity, export=str(export))
    print("  after KD:", {k: round(v, 4) for k, v in metrics.items() if k in HIGHER_IS_BETTER},
          f"cosine {similarity['cosine']:.4f}")


def stage_control(run: DemoRun) -> None:
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from mmcv.models.utils.checkpoint_io import atomic_write_text

    if run.args.skip_ablation:
        print("  skipped (--skip-ablation)")
        return
    task_dir = run.work / "task_only"
    task_config = run.work / "orion_tiny_task_only_demo.py"
    atomic_write_text(task_config, "\n".join([
        "# Written by demo_kd_50_pruning.py: the demo's KD run with alpha = 0 (task loss only), as a control.",
        f"_base_ = [{str(run.kd_config.resolve())!r}]",
        "model = dict(kd_config=dict(alpha_schedule='constant', distillation_alpha=0.0))",
        f"work_dir = {str(task_dir)!r}", ""]))
    train_kd(task_config, task_dir, run.args.seed)
    control = load_exported_student(task_dir / "student_pruned.pth")
    run.report["task_only_metrics"] = evaluate(control, run.val_set)
    run.report["task_only_backbone"] = backbone_similarity(run.before.teacher_backbone, control.img_backbone,
                                                           run.loader, 8)
    print("  task loss only:", {k: round(v, 4) for k, v in run.report["task_only_metrics"].items()
                                if k in HIGHER_IS_BETTER}, f"cosine {run.report['task_only_backbone']['cosine']:.4f}")


def stage_benchmark(run: DemoRun) -> None:
    teacher, student = run.teacher.img_backbone, run.student.img_backbone
    params = dict(teacher=sum(p.numel() for p in teacher.parameters()),
                  student=sum(p.numel() for p in student.parameters()))
    image = next(iter(run.loader))["img"].flatten(0, 1)
    speed: Dict[str, Any] = {}
    if not run.args.skip_benchmark:
        medians = time_backbones(dict(teacher=teacher, student=student), image)
        hw = tuple(image.shape[-2:])
        from tools.bench_record import environment
        speed = dict(median_s=medians, speedup=medians["teacher"] / medians["student"],
                     ceiling=teacher.analytic_macs(hw) / student.analytic_macs(hw), batch=int(image.shape[0]),
                     environment=environment())
        print(f"  tiny backbone: teacher {medians['teacher'] * 1e3:.1f} ms, student {medians['student'] * 1e3:.1f}"
              f" ms per {image.shape[0]} images, speedup {speed['speedup']:.3f}x (analytic ceiling "
              f"{speed['ceiling']:.3f}x)")
    run.report.update(backbone_params=params, backbone_speed=speed)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.check_setup:
        return check_setup(args.config)
    if not (ROOT / "mmcv/models/detectors/tiny_orion.py").is_file():
        print("error: the demo pipeline needs the miniature ORION of the standalone ORION-KD repository; inside an "
              "ORION checkout run `python demo_kd_50_pruning.py --check-setup --config "
              "adzoo/orion/configs/orion_stage3_kd_train.py`", file=sys.stderr)
        return 2
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing
    from tools.tiny_teacher_asset import TeacherAssetError

    try:
        run_pipeline(args)
    except TeacherAssetError as err:  # a damaged shipped teacher or a stale cached one: one line with the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
