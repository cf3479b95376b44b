"""``prune-config --target-speedup X``: the budget on the command line, with the speedup measured on the machine.

Reads the importances (heads; channels and blocks when given), takes the cost model from ``--unit-costs``,
``--measure`` (block latencies of ``--config``'s backbone on this machine) or analytic MACs, scores the
candidates with the feature distance of the untrained pruned student to the teacher on a few training
frames when ``--config`` is given (else by kept importance mass), writes the configuration and prints its
predicted speedup and the speedup measured by timing teacher and student in alternating rounds.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mmcv.models.utils.head_importance import BlockImportance
from mmcv.models.utils.pruning_config import PruningConfig
from mmcv.models.utils.pruning_cost import UnitCosts
from tools.bench_record import spread
from tools.head_pruning.batches import features_of, images_of, take_batches
from tools.head_pruning.budget import AXES, BudgetResult, format_candidates, prune_to_budget
from tools.head_pruning.sites import describe_backbone
from tools.head_pruning.timing import measure_block_costs, time_alternating


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """The budget's options of ``prune-config`` (``--target-speedup`` excludes ``--pruning-ratio``)."""
    p.add_argument("--block-importance", help="block importance file (.json): whole blocks may be removed")
    p.add_argument("--axes", help=f"what the budget may prune, comma-separated from {','.join(AXES)} (default: heads, "
                                  f"and channels / blocks when their importance is given)")
    p.add_argument("--min-blocks", type=int, help="--target-speedup: blocks kept at least (default: two thirds)")
    p.add_argument("--min-global-blocks", type=int,
                   help="--target-speedup: global-attention blocks kept at least (default: half the teacher's, rounded "
                        "up; 0 allows removing every one)")
    p.add_argument("--measure", action="store_true", help="--target-speedup: costs measured on this machine on "
                                                          "--config's backbone (default: analytic MACs)")
    p.add_argument("--calibrate-batches", type=int, default=4,
                   help="--target-speedup with --config: training batches on which each candidate's untrained student "
                        "is compared with the teacher (0: rank by kept importance mass)")
    p.add_argument("--repeats", type=int, default=5, help="--target-speedup: alternating timing rounds")


def _block_scores(path: str) -> BlockImportance:
    """A block importance file (``importance --unit blocks``)."""
    return BlockImportance.load(path)


def _axes(text: Optional[str]) -> Optional[Tuple[str, ...]]:
    if text is None:
        return None
    axes = tuple(a.strip() for a in text.split(",") if a.strip())
    if not axes or any(a not in AXES for a in axes):
        raise ValueError(f"--axes: expected names from {','.join(AXES)} separated by commas, got {text!r}")
    return axes


class _Teacher:
    """The ``--config`` teacher backbone, its EVAViTStudent arguments and geometry (built once)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tools.head_pruning import cli
        cfg = cli._load_config(args.config)
        self.kwargs = {k: v for k, v in cli._teacher_backbone_cfg(cfg).items() if k != "type"}
        self.device = torch.device(args.device)
        self.model = cli._build_backbone_from(cfg, cli._checkpoint_path(args, cfg)).to(self.device).eval()
        self.geometry = describe_backbone(self.model)
        self.kwargs["teacher_num_heads"] = int(self.geometry["num_heads"])
        self.cfg, self.args = cfg, args

    def student(self, config: Optional[PruningConfig] = None, **counts: Any) -> nn.Module:
        """An EVAViTStudent with the teacher's arguments and ``config``'s selection (or ``counts``)."""
        from mmcv.models.backbones.eva_vit_student import EVAViTStudent
        kwargs = dict(self.kwargs, **(config.to_model_kwargs() if config is not None else counts))
        return EVAViTStudent(**kwargs).to(self.device).eval()

    def image(self) -> torch.Tensor:
        hw = self.geometry["img_hw"]
        return torch.randn(1, int(self.geometry.get("in_chans") or 3), hw[0], hw[1], device=self.device)


def _calibration(teacher: _Teacher, batches: int) -> Callable[[PruningConfig], float]:
    """``calibrate(config)``: relative squared distance of the untrained student's features to the teacher's."""
    from tools.head_pruning import cli
    dtype = next(teacher.model.parameters()).dtype
    loader = cli._build_loader(teacher.cfg, teacher.args, teacher.model)
    images = [images_of(b, dtype, teacher.device) for b in take_batches(loader, batches, "calibration", False)]
    with torch.no_grad():
        targets = [features_of(teacher.model(x)).double() for x in images]
    state = teacher.model.state_dict()

    def calibrate(config: PruningConfig) -> float:
        student = teacher.student(config)
        student.load_from_teacher(state)
        with torch.no_grad():
            error = sum(float((features_of(student(x)).double() - t).pow(2).sum()) for x, t in zip(images, targets))
        return error / sum(float(t.pow(2).sum()) for t in targets)

    return calibrate


def measure_speedup(teacher: _Teacher, config: PruningConfig, repeats: int, round_seconds: float = 0.2
                    ) -> Dict[str, Any]:
    """Teacher and the configuration's student, batch 1, timed in alternating rounds: median and spread.

    A small model's forward takes milliseconds, where one busy moment of the machine decides a round, so
    each round runs each model as many times as the teacher needs for ``round_seconds`` (at least once);
    the times are per forward.
    """
    student = teacher.student(config)
    image = teacher.image()
    with torch.no_grad():
        once = time_alternating(dict(teacher=lambda: teacher.model(image)), 1, 1, teacher.device)["teacher"][0]
        count = max(1, min(1000, int(math.ceil(round_seconds / max(once, 1e-6)))))
        times = time_alternating(dict(teacher=lambda: [teacher.model(image) for _ in range(count)],
                                      student=lambda: [student(image) for _ in range(count)]),
                                 repeats, 1, teacher.device)
    times = {name: [t / count for t in values] for name, values in times.items()}
    ratios = [t / s for t, s in zip(times["teacher"], times["student"])]
    return dict(speedup=statistics.median(times["teacher"]) / statistics.median(times["student"]),
                per_round=ratios, per_round_spread=spread(ratios), times_s=times, repeats=repeats,
                forwards_per_round=count, device=str(teacher.device), threads=torch.get_num_threads(),
                image_hw=list(teacher.geometry["img_hw"]))


def _unit_costs(args: argparse.Namespace, teacher: Optional[_Teacher]) -> Optional[UnitCosts]:
    if args.unit_costs and args.measure:
        raise ValueError("--unit-costs and --measure are exclusive (a cost file, or costs measured now)")
    if args.unit_costs:
        return UnitCosts.load(args.unit_costs)
    if not args.measure:
        return None
    if teacher is None:
        raise ValueError("--measure times --config's backbone on this machine: pass --config")
    geometry = teacher.geometry
    windows = list(geometry["window_per_block"])
    kinds = {("window" if w > 0 else "global"): b for b, w in reversed(list(enumerate(windows)))}
    timed = sorted(kinds.values())  # the first block of each kind is all the measurement runs

    def make(heads: int, hidden: int) -> nn.Module:
        return teacher.student(num_heads=heads, mlp_hidden=hidden, selected_blocks=timed)

    return measure_block_costs(make, teacher.image(), int(geometry["num_heads"]), int(geometry["mlp_hidden"]),
                               max(args.repeats, 3), 1, teacher.device, min_channels=max(args.channel_multiple, 1),
                               source=f"measured block latency of {args.config} on {teacher.device}",
                               metadata=dict(window_per_block=geometry["window_per_block"]))


def run_budget(args: argparse.Namespace) -> BudgetResult:
    """``prune-config --target-speedup``: choose, measure, write, print (a user error raises ValueError)."""
    from tools.head_pruning import cli
    if args.mlp_pruning_ratio is not None or args.mlp_hidden is not None:
        raise ValueError("--target-speedup chooses the SwiGLU width itself: drop --mlp-pruning-ratio / --mlp-hidden")
    axes = _axes(args.axes)
    heads = cli._importance_from_args(args)
    channels = None
    if args.channel_importance or (axes is not None and "channels" in axes):
        channels = cli._channel_importance_from_args(args, args.channel_method or args.method)
    blocks = _block_scores(args.block_importance) if args.block_importance else None
    teacher = _Teacher(args) if args.config else None
    calibrate = _calibration(teacher, args.calibrate_batches) if teacher and args.calibrate_batches > 0 else None
    result = prune_to_budget(args.target_speedup, heads, channels, blocks, axes=axes,
                             geometry=teacher.geometry if teacher else None, unit_costs=_unit_costs(args, teacher),
                             min_heads_per_layer=args.min_heads_per_layer,
                             min_channels_per_layer=args.min_channels_per_layer, min_blocks=args.min_blocks,
                             min_global_blocks=args.min_global_blocks,
                             channel_multiple=args.channel_multiple, calibrate=calibrate)
    measured = measure_speedup(teacher, result.config, args.repeats) if teacher else None
    result.config.metadata["budget"]["measured"] = measured
    result.config.save(args.out)
    _print(args, result, measured)
    return result


def _print(args: argparse.Namespace, result: BudgetResult, measured: Optional[Dict[str, Any]]) -> None:
    config, chosen = result.config, result.chosen
    kept: List[int] = [len(h) for h in config.selected_heads_per_layer]
    channels = f", SwiGLU channels per block {config.mlp_hidden}" if config.prunes_channels else ""
    print(format_candidates(result, limit=6))
    print(f"budget {args.target_speedup:g}x: blocks removed {chosen['removed_blocks']}, heads per block {kept}"
          f"{channels} -> {args.out}")
    print(f"predicted speedup {result.predicted_speedup:.3f}x ({result.cost_model})")
    if measured is None:
        print("measured speedup: not measured (no --config: the backbone to time is unknown)")
    else:
        rounds = measured["per_round_spread"]
        print(f"measured speedup {measured['speedup']:.3f}x (median of {measured['repeats']} alternating rounds of "
              f"{measured['forwards_per_round']} forward(s), {rounds['min']:.3f}-{rounds['max']:.3f}x per round, "
              f"batch 1, {measured['device']}, {measured['threads']} threads)")


__all__ = ["add_budget_options", "measure_speedup", "run_budget"]
