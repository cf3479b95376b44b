"""Side-by-side speed and memory of the 16-head teacher and the head-pruned student backbone.

Both models are built in one process at the ORION-L configuration (``--depth`` may shrink it
on a CPU; any multiple of 3 keeps ORION's 2:1 window/global mix and so the same ceiling) and
timed in alternating runs on the same input. Prints medians, the measured speedup, the analytic
ceiling (MACs ratio), efficiency = measured / ceiling, peak memory, and sdpa vs math attention
for the teacher; writes everything to JSON. fp32 on CPU, bf16 on CUDA by default.

    python tools/benchmark_backbone.py --depth 6 --repeats 7 --out work_dirs/bench_backbone.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.checkpoint_io import atomic_write_json

ORION_L = dict(img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024, num_heads=16,
               mlp_ratio=4 * 2 / 3, qkv_bias=True, drop_path_rate=0.0, teacher_num_heads=16)


def orion_l_config(depth: int, num_heads: int, attn_impl: str, img_size: int = 640) -> dict:
    """ORION's stage-3 EVAViT arguments at ``depth`` blocks (every third block global)."""
    return dict(ORION_L, depth=depth, num_heads=num_heads, attn_impl=attn_impl, img_size=img_size,
                window_block_indexes=[i for i in range(depth) if i % 3 != 2])


def build(depth: int, num_heads: int, attn_impl: str, device: torch.device, dtype: torch.dtype,
          img_size: int = 640) -> EVAViTStudent:
    """A randomly initialised ORION-L-shaped backbone (timing does not depend on the weights)."""
    torch.manual_seed(0)
    return EVAViTStudent(**orion_l_config(depth, num_heads, attn_impl, img_size)).to(device=device, dtype=dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runners: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Run each callable in turn, ``repeats`` rounds, so drift and noise hit all of them alike."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    synchronize(device)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


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


def cpu_forward_memory_mb(depth: int, num_heads: int, image_size: int) -> Dict[str, float]:
    """Extra resident memory of one forward, measured in a fresh process (Linux).

    CPU tensors have no allocator statistics and freed memory stays resident, so a child
    process builds the model, resets the kernel's high-water mark (``clear_refs``), runs one
    forward and reports VmHWM minus the resident size before it.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(num_heads), "--depth", str(depth),
           "--image-size", str(image_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return dict(model_rss_mb=float(out[0]), forward_extra_mb=float(out[1]))


def _memory_child(depth: int, num_heads: int, image_size: int) -> None:
    model = build(depth, num_heads, "sdpa", torch.device("cpu"), torch.float32, image_size)
    image = torch.randn(1, 3, image_size, image_size)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    baseline = _status_mb("VmRSS")
    with torch.no_grad():
        model(image)
    print(baseline, _status_mb("VmHWM") - baseline)


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=24, help="blocks (24 = ORION-L; 6 is practical on a CPU)")
    parser.add_argument("--student-heads", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--skip-math", action="store_true", help="do not time the teacher's math attention")
    parser.add_argument("--out", default="work_dirs/benchmark_backbone.json")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        return _memory_child(args.depth, args.memory_child, args.image_size)
    if args.depth < 1 or args.image_size % 16:
        parser.error(f"--depth must be >= 1 and --image-size a multiple of 16, got {args.depth}, {args.image_size}")
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[dtype_name]

    teacher = build(args.depth, 16, "sdpa", device, dtype, args.image_size)
    student = build(args.depth, args.student_heads, "sdpa", device, dtype, args.image_size)
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    runners = {"teacher_sdpa": lambda: teacher(image), "student_sdpa": lambda: student(image)}
    if not args.skip_math:
        teacher_math = build(args.depth, 16, "math", device, dtype, args.image_size)
        runners["teacher_math"] = lambda: teacher_math(image)
    print(f"[benchmark_backbone] depth={args.depth} heads 16 vs {args.student_heads}, {args.image_size}x"
          f"{args.image_size}, batch 1, {dtype_name} on {device}, {args.repeats} alternating rounds", flush=True)
    with torch.no_grad():
        times = time_alternating(runners, args.repeats, args.warmup, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    hw = (args.image_size, args.image_size)
    ceiling = teacher.analytic_macs(hw) / student.analytic_macs(hw)
    speedup = median["teacher_sdpa"] / median["student_sdpa"]
    result = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
        dtype=dtype_name, depth=args.depth, image_size=args.image_size, teacher_heads=16,
        student_heads=args.student_heads, repeats=args.repeats, times_s=times, median_s=median,
        params_m=dict(teacher=sum(p.numel() for p in teacher.parameters()) / 1e6,
                      student=sum(p.numel() for p in student.parameters()) / 1e6),
        gmacs=dict(teacher=teacher.analytic_macs(hw) / 1e9, student=student.analytic_macs(hw) / 1e9),
        speedup=speedup, ceiling=ceiling, efficiency=speedup / ceiling)
    if "teacher_math" in median:
        result["sdpa_vs_math_speedup"] = median["teacher_math"] / median["teacher_sdpa"]
    if device.type == "cuda":
        result["peak_memory_mb"] = dict(teacher=cuda_peak_memory_mb(teacher, image),
                                        student=cuda_peak_memory_mb(student, image))
        mem_ratio = result["peak_memory_mb"]["student"] / result["peak_memory_mb"]["teacher"]
    else:
        forward = dict(teacher=cpu_forward_memory_mb(args.depth, 16, args.image_size),
                       student=cpu_forward_memory_mb(args.depth, args.student_heads, args.image_size))
        result["forward_memory_mb"] = forward
        mem_ratio = forward["student"]["forward_extra_mb"] / forward["teacher"]["forward_extra_mb"]
    result["peak_memory_ratio"] = mem_ratio

    print(f"  params        teacher {result['params_m']['teacher']:.1f} M   student {result['params_m']['student']:.1f} M")
    print(f"  analytic      teacher {result['gmacs']['teacher']:.1f} GMACs student {result['gmacs']['student']:.1f} "
          f"GMACs  ceiling {ceiling:.3f}x")
    for name, value in median.items():
        print(f"  median        {name:<13} {value * 1e3:9.1f} ms")
    print(f"  speedup       {speedup:.3f}x  (efficiency {speedup / ceiling:.1%} of the ceiling)")
    if "sdpa_vs_math_speedup" in result:
        print(f"  sdpa vs math  {result['sdpa_vs_math_speedup']:.3f}x (teacher)")
    what = "peak CUDA memory" if device.type == "cuda" else "forward activation peak (RSS)"
    print(f"  memory        student/teacher {what} = {mem_ratio:.3f}")
    print(f"  wrote {atomic_write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
