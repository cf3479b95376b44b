"""Side-by-side speed and memory of the 16-head teacher and a pruned student backbone (heads, MLP width, blocks).

Both models are built in one process at the ORION-L configuration (``--depth`` may shrink it on a CPU;
any multiple of 3 keeps ORION's 2:1 window/global mix and so the same ceiling) and timed in
alternating runs on the same input. The student is ``--student-heads`` heads per block (and
``--student-mlp-hidden`` SwiGLU channels), or what a pruning configuration file keeps
(``--pruning-config``, heads and channels per block; with ``--depth`` below the file's depth its first
blocks; a file that removes blocks is timed at its own depth), or what the budget chooses for
``--target-speedup`` (``tools/head_pruning/budget.py`` on the proxy's magnitude importance; the block
score is the mean magnitude of its heads; ``--save-config`` writes the configuration). Timing depends on
the kept counts, not on which units, so the models are built from the counts with random weights. Prints medians, the measured speedup next to the
analytic ceiling (MACs ratio) and efficiency = measured / ceiling, peak memory, sdpa vs math attention
for the teacher; writes everything to JSON. fp32 on CPU, bf16 on CUDA by default.

    python tools/benchmark_backbone.py --depth 6 --repeats 7 --out work_dirs/bench_backbone.json
    python tools/benchmark_backbone.py --depth 6 --student-heads 8 --student-mlp-hidden 1536
    python tools/benchmark_backbone.py --depth 6 --pruning-config work_dirs/joint_prune.json
    python tools/benchmark_backbone.py --depth 12 --target-speedup 3 --out work_dirs/budget_3x.json
    python tools/benchmark_backbone.py --depth 3 --unit-latency work_dirs/unit_latency.json   # measured unit costs
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.pruning_config import PruningConfig
from mmcv.models.utils.pruning_cost import UnitCosts
from tools.bench_record import BEYOND_CEILING, cpu_model, environment, load_average, rounds_record
from tools.head_pruning.timing import measure_block_costs, synchronize, time_alternating  # noqa: F401 (re-exported)

ORION_L = dict(img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024, num_heads=16,
               mlp_ratio=4 * 2 / 3, qkv_bias=True, drop_path_rate=0.0, teacher_num_heads=16)
TEACHER_HIDDEN = int(1024 * 4 * 2 / 3)  # 2730
Counts = Union[int, Sequence[int]]


def orion_window_blocks(depth: int) -> List[int]:
    """ORION's pattern: every third block (2, 5, ...) global, the others window blocks."""
    return [i for i in range(depth) if i % 3 != 2]


def orion_window_pattern(depth: int) -> List[int]:
    """The window size of every block in ORION's pattern (16, or 0 for a global block)."""
    return [16 if i % 3 != 2 else 0 for i in range(depth)]


def orion_l_config(depth: int, num_heads: Counts, attn_impl: str, img_size: int = 640,
                   mlp_hidden: Optional[Counts] = None, selected_blocks: Optional[Sequence[int]] = None) -> dict:
    """ORION's stage-3 EVAViT arguments at ``depth`` blocks, keeping ``num_heads`` / ``mlp_hidden`` per block
    (and only ``selected_blocks``, teacher indices, when given)."""
    cfg = dict(ORION_L, depth=depth, num_heads=num_heads, attn_impl=attn_impl, img_size=img_size,
               mlp_hidden=mlp_hidden, window_block_indexes=orion_window_blocks(depth))
    if selected_blocks is not None:
        cfg["selected_blocks"] = list(selected_blocks)
    return cfg


def build(depth: int, num_heads: Counts, attn_impl: str, device: torch.device, dtype: torch.dtype,
          img_size: int = 640, mlp_hidden: Optional[Counts] = None,
          selected_blocks: Optional[Sequence[int]] = None) -> EVAViTStudent:
    """A randomly initialised ORION-L-shaped backbone (timing does not depend on the weights)."""
    torch.manual_seed(0)
    cfg = orion_l_config(depth, num_heads, attn_impl, img_size, mlp_hidden, selected_blocks)
    return EVAViTStudent(**cfg).to(device=device, dtype=dtype).eval()


class StudentSpec(NamedTuple):
    """What the timed student keeps per teacher block (0 for a removed block), where that came from, the blocks
    it keeps (None: all), the file's full-depth ceiling, and the budget's record when the budget chose it."""

    heads: List[int]
    mlp_hidden: List[int]
    label: str
    full_depth_ceiling: Optional[float] = None
    blocks: Optional[List[int]] = None
    budget: Optional[Dict] = None


def orion_l_ceiling(heads: Sequence[int], mlp_hidden: Sequence[int], image_size: int) -> float:
    """Analytic MACs of the ORION-L teacher over those of a student at the same depth (ORION's window pattern;
    a removed block has 0 heads and 0 channels)."""
    depth = len(heads)
    geometry = dict(img_hw=(image_size, image_size), patch_size=16, in_chans=3, embed_dim=1024, head_dim=64,
                    window_per_block=orion_window_pattern(depth))
    return analytic_backbone_macs(mlp_hidden=TEACHER_HIDDEN, heads_per_block=[16] * depth, **geometry) / \
        analytic_backbone_macs(mlp_hidden=list(mlp_hidden), heads_per_block=list(heads), **geometry)


def spec_of_config(config: PruningConfig, label: str, depth: int, image_size: int) -> StudentSpec:
    """The counts per teacher block of a configuration (removed blocks: 0), its first ``depth`` blocks."""
    if config.teacher_num_heads != 16 or (config.teacher_mlp_hidden or TEACHER_HIDDEN) != TEACHER_HIDDEN:
        raise ValueError(f"{label}: made for a teacher with {config.teacher_num_heads} heads and MLP width "
                         f"{config.teacher_mlp_hidden}; this benchmark times ORION-L (16 heads, {TEACHER_HIDDEN})")
    blocks = config.selected_blocks
    if config.depth < depth or (blocks is not None and config.depth != depth):
        raise ValueError(f"{label}: {config.depth} blocks" + (f" of which it removes some: time it at its own "
                         f"depth, --depth {config.depth}" if blocks is not None else f", fewer than --depth {depth}"))
    kept = set(config.kept_blocks)
    heads = [len(h) if b in kept else 0 for b, h in enumerate(config.selected_heads_per_layer)]
    hidden = [(config.mlp_hidden[b] if config.prunes_channels else TEACHER_HIDDEN) if b in kept else 0
              for b in range(config.depth)]
    ceiling = orion_l_ceiling(heads, hidden, image_size) if config.depth % 3 == 0 else None
    part = "" if config.depth == depth else f", blocks 0-{depth - 1} of {config.depth}"
    return StudentSpec(heads[:depth], hidden[:depth], f"{label}{part}", ceiling,
                       None if blocks is None else list(blocks))


def student_spec(args: argparse.Namespace) -> StudentSpec:
    """The student's per-block counts: ``--target-speedup``, ``--pruning-config`` (its first ``--depth`` blocks)
    or the flags."""
    if args.target_speedup is not None:
        return budget_spec(args)
    if not args.pruning_config:
        hidden = args.student_mlp_hidden or TEACHER_HIDDEN
        if not 1 <= args.student_heads <= 16 or not 1 <= hidden <= TEACHER_HIDDEN:
            raise ValueError(f"--student-heads must lie in 1..16 and --student-mlp-hidden in 1..{TEACHER_HIDDEN}, got "
                             f"{args.student_heads} and {hidden}")
        label = f"{args.student_heads} heads" + (f" + MLP {hidden}" if hidden != TEACHER_HIDDEN else "")
        return StudentSpec([args.student_heads] * args.depth, [hidden] * args.depth, label)
    return spec_of_config(PruningConfig.load(args.pruning_config), os.path.basename(args.pruning_config), args.depth,
                          args.image_size)


def budget_spec(args: argparse.Namespace) -> StudentSpec:
    """What ``prune_to_budget`` chooses for ``--target-speedup`` on the proxy (magnitude importance, blocks scored
    by their heads' mean magnitude; analytic MACs, or ``--unit-costs``); ``--save-config`` writes the configuration."""
    from tools.head_pruning.budget import prune_to_budget
    from tools.head_pruning.channel_importance import compute_channel_importance_magnitude
    from tools.head_pruning.importance import compute_head_importance_magnitude
    from tools.head_pruning.sites import describe_backbone
    teacher = build(args.depth, 16, "sdpa", torch.device("cpu"), torch.float32, args.image_size)
    heads, channels = compute_head_importance_magnitude(teacher), compute_channel_importance_magnitude(teacher)
    result = prune_to_budget(args.target_speedup, heads, channels, heads.scores.mean(dim=1),
                             geometry=describe_backbone(teacher, args.image_size),
                             unit_costs=UnitCosts.load(args.unit_costs) if args.unit_costs else None,
                             channel_multiple=args.channel_multiple, min_global_blocks=args.min_global_blocks)
    if args.save_config:
        result.config.save(args.save_config)
    spec = spec_of_config(result.config, f"budget {args.target_speedup:g}x", args.depth, args.image_size)
    record = dict(target_speedup=args.target_speedup, predicted_speedup=result.predicted_speedup,
                  cost_model=result.cost_model, chosen=result.chosen, config_file=args.save_config,
                  fastest_reachable=result.fastest_reachable, floors=result.config.metadata["budget"]["floors"],
                  importance="magnitude of the random-init proxy; block score: mean head magnitude")
    print(f"[benchmark_backbone] budget {args.target_speedup:g}x: predicted {result.predicted_speedup:.3f}x "
          f"({result.cost_model}), blocks removed {result.chosen['removed_blocks']}"
          + (f" -> {args.save_config}" if args.save_config else ""), flush=True)
    return spec._replace(budget=record)


def cuda_peak_memory_mb(model: EVAViTStudent, image: torch.Tensor) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(image.device)
    with torch.no_grad():
        model(image)
    torch.cuda.synchronize(image.device)
    return torch.cuda.max_memory_allocated(image.device) / 2 ** 20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def cpu_forward_memory_mb(heads: Sequence[int], mlp_hidden: Sequence[int], image_size: int) -> Dict[str, float]:
    """Extra resident memory of one forward, measured in a fresh process (Linux).

    CPU tensors have no allocator statistics and freed memory stays resident, so a child
    process builds the model, resets the kernel's high-water mark (``clear_refs``), runs one
    forward and reports VmHWM minus the resident size before it.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{_csv(heads)}:{_csv(mlp_hidden)}",
           "--image-size", str(image_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return dict(model_rss_mb=float(out[0]), forward_extra_mb=float(out[1]))


def _memory_child(spec: str, image_size: int) -> None:
    heads, hidden = ([int(v) for v in part.split(",")] for part in spec.split(":"))
    kept = [b for b, count in enumerate(heads) if count > 0]  # a removed block has 0 heads
    model = build(len(heads), heads, "sdpa", torch.device("cpu"), torch.float32, image_size, hidden,
                  None if len(kept) == len(heads) else kept)
    image = torch.randn(1, 3, image_size, image_size)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    baseline = _status_mb("VmRSS")
    with torch.no_grad():
        model(image)
    print(baseline, _status_mb("VmHWM") - baseline)


def measure_unit_latency(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> UnitCosts:
    """Seconds one head, one SwiGLU channel and one whole block (beyond its units) cost, per block type, and the stem.

    One ORION-L window block and one global block run on the ``--image-size`` token grid at full width,
    with half the heads, with half the channels and at 1 head + 64 channels, alternating, ``--repeats``
    rounds (``timing.measure_block_costs``: slopes, overhead, what noise does to them).
    """
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    return measure_block_costs(lambda heads, hidden: build(3, heads, "sdpa", device, dtype, args.image_size, hidden),
                               image, 16, TEACHER_HIDDEN, args.repeats, args.warmup, device,
                               source=f"measured block latency, ORION-L width, {args.image_size}x{args.image_size}, "
                                      f"{str(dtype).replace('torch.', '')} on {device}",
                               metadata=dict(window_per_block=orion_window_pattern(24)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=24, help="blocks (24 = ORION-L; 6 is practical on a CPU)")
    parser.add_argument("--student-heads", type=int, default=8, help="heads kept per block (without --pruning-config)")
    parser.add_argument("--student-mlp-hidden", type=int, default=None,
                        help=f"SwiGLU channels kept per block (default: all {TEACHER_HIDDEN}; 1536 = 56%%)")
    parser.add_argument("--pruning-config", help="a pruning configuration (.json): time what it keeps per block")
    parser.add_argument("--target-speedup", type=float, default=None,
                        help="instead: time what prune_to_budget chooses for this target on the proxy (heads, channels "
                             "and blocks; its counts go to --out)")
    parser.add_argument("--save-config", help="--target-speedup: also write the chosen configuration here (.json)")
    parser.add_argument("--channel-multiple", type=int, default=64,
                        help="--target-speedup: every block keeps a multiple of this many channels (CPU GEMMs)")
    parser.add_argument("--unit-costs", help="--target-speedup: measured unit costs (--unit-latency) instead of "
                                             "analytic MACs")
    parser.add_argument("--min-global-blocks", type=int, default=None,
                        help="--target-speedup: global-attention blocks kept at least (default: half the proxy's, "
                             "rounded up; 0 allows removing every one)")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--skip-math", action="store_true", help="do not time the teacher's math attention")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure memory")
    parser.add_argument("--unit-latency", metavar="OUT.json",
                        help="instead: measure the latency of one head, one channel and a block's overhead per block "
                             "type, and the stem (unit costs for prune-config --unit-costs OUT.json)")
    parser.add_argument("--out", default="work_dirs/benchmark_backbone.json")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.target_speedup is not None and args.pruning_config:
        parser.error("--target-speedup and --pruning-config are exclusive (the budget chooses the configuration)")
    if args.memory_child is not None:
        return _memory_child(args.memory_child, args.image_size)
    if args.depth < 1 or args.image_size % 16 or args.repeats < 1:
        parser.error(f"--depth and --repeats must be >= 1 and --image-size a multiple of 16, got {args.depth}, "
                     f"{args.repeats}, {args.image_size}")
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[dtype_name]
    try:
        if args.unit_latency:
            costs = measure_unit_latency(args, device, dtype)
            costs.save(args.unit_latency)
            print(f"[benchmark_backbone] seconds per head {costs.head}, per channel {costs.channel}, per block "
                  f"{costs.block}, stem {costs.fixed:.4g} -> {args.unit_latency}")
            return costs.to_dict()
        spec = student_spec(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2)
    return run_benchmark(args, spec, device, dtype, dtype_name)


def run_benchmark(args: argparse.Namespace, spec: StudentSpec, device: torch.device, dtype: torch.dtype,
                  dtype_name: str) -> Dict:
    """Time teacher and student alternately; the ratios, the ceiling and memory; print and write the JSON."""
    teacher = build(args.depth, 16, "sdpa", device, dtype, args.image_size)
    student = build(args.depth, spec.heads, "sdpa", device, dtype, args.image_size, spec.mlp_hidden, spec.blocks)
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    runners = {"teacher_sdpa": lambda: teacher(image), "student_sdpa": lambda: student(image)}
    if not args.skip_math:
        teacher_math = build(args.depth, 16, "math", device, dtype, args.image_size)
        runners["teacher_math"] = lambda: teacher_math(image)
    before = environment()
    print(f"[benchmark_backbone] depth={args.depth}, teacher 16 heads + MLP {TEACHER_HIDDEN} vs student {spec.label}, "
          f"{args.image_size}x{args.image_size}, batch 1, {dtype_name} on {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternating rounds" + (f", load average {os.getloadavg()[0]:.2f}"
                                                  if hasattr(os, "getloadavg") else ""), flush=True)
    with torch.no_grad():
        times = time_alternating(runners, args.repeats, args.warmup, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    hw = (args.image_size, args.image_size)
    ceiling = teacher.analytic_macs(hw) / student.analytic_macs(hw)
    speedup = median["teacher_sdpa"] / median["student_sdpa"]
    pairs = dict(speedup=("teacher_sdpa", "student_sdpa"))
    if "teacher_math" in times:
        pairs["sdpa_vs_math_speedup"] = ("teacher_math", "teacher_sdpa")
    result = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
        cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__, environment=before,
        dtype=dtype_name, depth=args.depth, image_size=args.image_size, teacher_heads=16,
        teacher_mlp_hidden=TEACHER_HIDDEN, student=spec.label, student_heads=spec.heads,
        student_mlp_hidden=spec.mlp_hidden, repeats=args.repeats, median_s=median,
        **rounds_record(times, pairs), load_average=before["load_average"], load_average_after=load_average(),
        params_m=dict(teacher=sum(p.numel() for p in teacher.parameters()) / 1e6,
                      student=sum(p.numel() for p in student.parameters()) / 1e6),
        gmacs=dict(teacher=teacher.analytic_macs(hw) / 1e9, student=student.analytic_macs(hw) / 1e9),
        speedup=speedup, ceiling=ceiling, efficiency=speedup / ceiling, full_depth_ceiling=spec.full_depth_ceiling,
        beyond_ceiling=BEYOND_CEILING if speedup > ceiling else None, student_blocks=spec.blocks)
    if spec.budget is not None:
        result["budget"] = dict(spec.budget, measured_speedup=speedup,
                                measured_over_predicted=speedup / spec.budget["predicted_speedup"],
                                measured_over_analytic=speedup / ceiling)
    if "teacher_math" in median:
        result["sdpa_vs_math_speedup"] = median["teacher_math"] / median["teacher_sdpa"]
    if not args.skip_memory:
        result.update(_memory(args, spec, teacher, student, image, device))
    _print_result(result, device)
    print(f"  wrote {atomic_write_json(args.out, result)}")
    return result


def _memory(args: argparse.Namespace, spec: StudentSpec, teacher: EVAViTStudent, student: EVAViTStudent,
            image: torch.Tensor, device: torch.device) -> Dict:
    if device.type == "cuda":
        peak = dict(teacher=cuda_peak_memory_mb(teacher, image), student=cuda_peak_memory_mb(student, image))
        return dict(peak_memory_mb=peak, peak_memory_ratio=peak["student"] / peak["teacher"])
    forward = dict(teacher=cpu_forward_memory_mb([16] * args.depth, [TEACHER_HIDDEN] * args.depth, args.image_size),
                   student=cpu_forward_memory_mb(spec.heads, spec.mlp_hidden, args.image_size))
    return dict(forward_memory_mb=forward,
                peak_memory_ratio=forward["student"]["forward_extra_mb"] / forward["teacher"]["forward_extra_mb"])


def _print_result(result: Dict, device: torch.device) -> None:
    median, ceiling, speedup = result["median_s"], result["ceiling"], result["speedup"]
    print(f"  params        teacher {result['params_m']['teacher']:.1f} M   student {result['params_m']['student']:.1f} M")
    print(f"  analytic      teacher {result['gmacs']['teacher']:.1f} GMACs student {result['gmacs']['student']:.1f} "
          f"GMACs")
    for name, value in median.items():
        print(f"  median        {name:<13} {value * 1e3:9.1f} ms")
    rounds = result["ratio_spread"]["speedup"]
    print(f"  speedup       measured {speedup:.3f}x (per round {rounds['min']:.3f}-{rounds['max']:.3f}x) | analytic "
          f"ceiling {ceiling:.3f}x" + (f" | efficiency {speedup / ceiling:.1%} of the ceiling" if speedup <= ceiling
                                       else ""))
    if result.get("beyond_ceiling"):
        print(f"  note          {result['beyond_ceiling']}")
    if result.get("budget"):
        budget = result["budget"]
        print(f"  budget        target {budget['target_speedup']:g}x: predicted {budget['predicted_speedup']:.3f}x, "
              f"measured {speedup:.3f}x, measured / analytic {budget['measured_over_analytic']:.1%}")
    if result.get("full_depth_ceiling"):
        print(f"  full depth    analytic ceiling of the whole configuration {result['full_depth_ceiling']:.3f}x")
    if "sdpa_vs_math_speedup" in result:
        print(f"  sdpa vs math  {result['sdpa_vs_math_speedup']:.3f}x (teacher)")
    if "peak_memory_ratio" in result:
        what = "peak CUDA memory" if device.type == "cuda" else "forward activation peak (RSS)"
        print(f"  memory        student/teacher {what} = {result['peak_memory_ratio']:.3f}")


if __name__ == "__main__":
    main()
