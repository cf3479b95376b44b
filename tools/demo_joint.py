"""The demo's joint mode (``demo_kd_50_pruning.py --joint``): heads-only pruning at the joint student's measured speed.

Which heads-only student is "as fast" is measured, not computed: the teacher, the joint student and a
heads-only student for every head count (1..H-1 per block, uniform) run alternately on the same batch;
the heads-only student with the most heads whose measured speedup reaches the joint student's is
trained by the same KD run (same epochs, same schedule) and evaluated side by side. When no heads-only
student is that fast, the fastest one is used and the report says so. Copied into ORION with the demo
(whose pipeline needs the miniature world). Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Mapping

import torch

from tools.metric_direction import HEADLINE_METRICS


def heads_only_backbones(student_cfg: Mapping[str, Any], teacher_heads: int) -> Dict[int, Any]:
    """A backbone keeping ``k`` heads per block (full MLPs) for every ``k`` in 1..H-1 (weights do not matter)."""
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent

    base = {k: v for k, v in student_cfg.items() if k != "type"}
    base.update(selected_heads_per_layer=None, mlp_hidden=None, selected_channels_per_layer=None, selected_blocks=None,
                drop_path_rate=0.0)
    return {k: EVAViTStudent(**dict(base, num_heads=k)).eval() for k in range(1, teacher_heads)}


def measure_speedups(teacher: Any, joint: Any, candidates: Mapping[int, Any], image: torch.Tensor,
                     repeats: int) -> Dict[str, Any]:
    """Alternating timing (medians) of teacher, joint student and every heads-only candidate; speedups vs teacher."""
    from tools.benchmark_backbone import time_alternating

    runners = {"teacher": lambda: teacher(image), "joint": lambda: joint(image)}
    runners.update({f"heads_{k}": (lambda model=model: model(image)) for k, model in candidates.items()})
    with torch.no_grad():
        times = time_alternating(runners, repeats, 2, image.device)
    median = {name: statistics.median(values) for name, values in times.items()}
    hw = tuple(image.shape[-2:])
    return dict(median_s=median, joint_speedup=median["teacher"] / median["joint"],
                heads_only_speedup={k: median["teacher"] / median[f"heads_{k}"] for k in candidates},
                joint_ceiling=teacher.analytic_macs(hw) / joint.analytic_macs(hw),
                heads_only_ceiling={k: teacher.analytic_macs(hw) / m.analytic_macs(hw) for k, m in candidates.items()},
                batch=int(image.shape[0]), repeats=repeats)


def choose_heads(speed: Mapping[str, Any]) -> Dict[str, Any]:
    """The most heads whose measured speedup reaches the joint student's; else the fastest heads-only student."""
    by_k = speed["heads_only_speedup"]
    fast_enough = [k for k, value in by_k.items() if value >= speed["joint_speedup"]]
    if fast_enough:
        return dict(heads=max(fast_enough), matched=True)
    return dict(heads=max(by_k, key=lambda k: by_k[k]), matched=False)


def stage_equal_speed(run: Any) -> None:
    """Time, pick, train and evaluate the heads-only student at the joint student's measured speed."""
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from tools import head_pruning_utils as hpu
    from tools.demo_support import (ROOT, backbone_similarity, load_exported_student, retained, train_kd,
                                    write_kd_config)

    if run.args.skip_equal_speed:
        print("  skipped (--skip-equal-speed)")
        return
    teacher_heads = run.teacher.img_backbone.teacher_num_heads
    candidates = heads_only_backbones(run.before.student_backbone_cfg, teacher_heads)
    image = next(iter(run.loader))["img"].flatten(0, 1)
    speed = measure_speedups(run.teacher.img_backbone, run.student.img_backbone, candidates, image, repeats=30)
    choice = choose_heads(speed)
    k = choice["heads"]
    print(f"  measured speedup: joint {speed['joint_speedup']:.3f}x (ceiling {speed['joint_ceiling']:.3f}x); heads only "
          + ", ".join(f"{h}: {v:.3f}x" for h, v in sorted(speed["heads_only_speedup"].items())))
    print(f"  heads-only student: {k} of {teacher_heads} heads per block"
          + ("" if choice["matched"] else " (the fastest heads-only student; none reaches the joint student's speed)"))
    ratio = 1.0 - k / teacher_heads
    config = hpu.create_pruning_config(run.importance[run.args.method], pruning_ratio=ratio, strategy=run.args.strategy)
    pruning_path = run.work / "pruning_config_heads_only.json"
    config.save(pruning_path)
    kd_config = write_kd_config(ROOT / run.args.config, run.work / "orion_tiny_kd_heads_only_demo.py", pruning_path,
                                run.work / "heads_only", frames=run.args.train_frames)
    train_kd(kd_config, run.work / "heads_only", run.args.seed)
    student = load_exported_student(run.work / "heads_only" / "student_pruned.pth")
    metrics = evaluate(student, run.val_set)
    similarity = backbone_similarity(run.before.teacher_backbone, student.img_backbone, run.loader, 8)
    run.report["equal_speed"] = dict(speed, heads_only_heads=k, matched=choice["matched"], heads_only_metrics=metrics,
                                     heads_only_backbone=similarity,
                                     heads_only_retained=retained(metrics, run.report["teacher_metrics"]),
                                     heads_only_params=sum(p.numel() for p in student.img_backbone.parameters()))
    print(f"  heads only ({k} heads) after KD:", {m: round(v, 4) for m, v in metrics.items() if m in HEADLINE_METRICS},
          f"cosine {similarity['cosine']:.4f}")


def joint_targets(report: Mapping[str, Any]) -> Dict[str, Any]:
    """The issue's miniature-world comparison target, with the measured values."""
    equal = report.get("equal_speed")
    if not equal:
        return {}
    joint_kept = report["retained_after_kd"]
    heads_kept = equal["heads_only_retained"]
    joint_cos, heads_cos = report["after_kd_backbone"]["cosine"], equal["heads_only_backbone"]["cosine"]
    joint_mean, heads_mean = statistics.mean(joint_kept.values()), statistics.mean(heads_kept.values())
    name = (f"joint beats heads-only at equal measured speed ({equal['heads_only_heads']} heads"
            + ("" if equal["matched"] else ", the fastest heads-only student, still slower") + ")")
    return {name: dict(value=dict(joint_mean_kept=joint_mean, heads_only_mean_kept=heads_mean, joint_cosine=joint_cos,
                                  heads_only_cosine=heads_cos, joint_speedup=equal["joint_speedup"],
                                  heads_only_speedup=equal["heads_only_speedup"][equal["heads_only_heads"]]),
                       met=joint_mean > heads_mean and joint_cos > heads_cos)}


def joint_report_section(report: Mapping[str, Any]) -> str:
    """Markdown: the joint student against the heads-only student at its measured speed."""
    equal = report.get("equal_speed")
    if not equal:
        return ""
    k = equal["heads_only_heads"]
    rows: List[str] = ["| metric | teacher | joint after KD | heads only after KD |", "|---|---|---|---|"]
    for key in HEADLINE_METRICS:
        rows.append(f"| {key} | {report['teacher_metrics'][key]:.4f} | {report['after_kd_metrics'][key]:.4f} | "
                    f"{equal['heads_only_metrics'][key]:.4f} |")
    rows.append(f"| backbone cosine to teacher | 1.0000 | {report['after_kd_backbone']['cosine']:.4f} | "
                f"{equal['heads_only_backbone']['cosine']:.4f} |")
    rows.append(f"| measured speedup (median of {equal['repeats']}, batch {equal['batch']}) | 1.000x | "
                f"{equal['joint_speedup']:.3f}x | {equal['heads_only_speedup'][k]:.3f}x |")
    rows.append(f"| analytic ceiling | 1.000x | {equal['joint_ceiling']:.3f}x | {equal['heads_only_ceiling'][k]:.3f}x |")
    pruning = report["pruning_config"]
    return (f"\n## Joint vs heads-only at equal measured speed\n\nJoint: {pruning['num_heads'][0]} heads and "
            f"{min(pruning['mlp_hidden'])}-{max(pruning['mlp_hidden'])} of {pruning['teacher_mlp_hidden']} SwiGLU "
            f"channels per block. Heads only: {k} heads per block, "
            + ("the most heads whose measured speed reaches the joint student's" if equal["matched"] else
               "the fastest heads-only student (none reaches the joint student's measured speed)")
            + ". Both trained by the same 3-epoch KD run.\n\n" + "\n".join(rows) + "\n")


__all__ = ["heads_only_backbones", "measure_speedups", "choose_heads", "stage_equal_speed", "joint_targets",
           "joint_report_section"]
