"""One KD training step vs one student-only step: time (alternating, medians) and peak memory.

Two settings, both measured side by side in one run:
  * ``tiny``: the miniature ORION world (OrionStudent on TinyOrion, one real batch); the
    student-only step is the base detector's task forward/backward/step on the same model.
  * ``orion-l``: ORION-L backbones (``--depth`` may shrink them on a CPU), 8 of 16 heads, with
    ORION's activation checkpointing; the student-only step is forward + a feature regression
    loss + backward + AdamW, the KD step adds the frozen teacher and CombinedKDLoss.
Peak memory: CUDA allocator peak, or (CPU) the resident high-water mark of a child process
that runs the steady-state step. bf16 autocast on CUDA, fp32 on CPU.

    python tools/benchmark_kd_step.py --depth 3 --image-size 320 --out work_dirs/bench_kd_step.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch

from mmcv.models.utils.checkpoint_io import atomic_write_json
from tools.bench_record import cpu_model, environment, load_average, rounds_record
from tools.benchmark_backbone import _status_mb, time_alternating

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def build_tiny(device: torch.device, teacher_ckpt: str) -> Tuple[Callable[[], None], Callable[[], None]]:
    """KD and student-only step closures for OrionStudent on TinyOrion."""
    import mmcv.models  # noqa: F401
    from mmcv import Config
    from mmcv.datasets import build_dataset
    from mmcv.models.builder import build_model
    from mmcv.models.detectors.orion_student import OrionStudent

    cfg = Config.fromfile(str(TINY_CONFIG))
    cfg.model.teacher_backbone_path = teacher_ckpt
    cfg.model.kd_config.teacher_backbone_path = teacher_ckpt
    torch.manual_seed(0)
    model = build_model(cfg.model.to_dict()).to(device).train()
    dataset = build_dataset(cfg.data.train.to_dict())
    batch = dataset.collate_fn([dataset[i] for i in range(cfg.data.samples_per_gpu)])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def kd_step() -> None:
        with _autocast(device):
            loss = model(batch, return_loss=True)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def student_step() -> None:
        with _autocast(device):
            losses = super(OrionStudent, model).forward_train(**batch)
            loss = sum(v for k, v in losses.items() if "loss" in k)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return kd_step, student_step


def build_orion_l(device: torch.device, depth: int, image_size: int, batch: int
                  ) -> Tuple[Callable[[], None], Callable[[], None]]:
    """KD and student-only step closures for ORION-L-shaped backbones."""
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent
    from mmcv.models.losses.kd_losses import CombinedKDLoss
    from tools.benchmark_backbone import orion_l_config

    torch.manual_seed(0)
    teacher = EVAViTStudent(**orion_l_config(depth, 16, "sdpa", image_size)).to(device).eval().requires_grad_(False)
    student_cfg = orion_l_config(depth, 8, "sdpa", image_size)
    student_cfg.update(with_cp=True, drop_path_rate=0.3)
    student = EVAViTStudent(**student_cfg).to(device).train()
    student.load_from_teacher(teacher.state_dict())
    loss_fn = CombinedKDLoss()
    hidden, attn, queries = loss_fn.tap_request(depth)
    image = torch.randn(batch, 3, image_size, image_size, device=device)
    target = torch.randn(batch, 1024, image_size // 16, image_size // 16, device=device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)

    def task_loss(features: torch.Tensor) -> torch.Tensor:
        return (features.float() - target).pow(2).mean()

    def kd_step() -> None:
        with _autocast(device):
            s_taps = student.forward_with_taps(image, hidden, attn, queries)
            with torch.no_grad():
                t_taps = teacher.forward_with_taps(image, hidden, attn, queries, query_index=s_taps.query_index)
            parts = loss_fn(s_taps, t_taps)
            loss = 0.4 * task_loss(s_taps.features[0]) + 0.6 * parts["backbone_distill_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def student_step() -> None:
        with _autocast(device):
            loss = task_loss(student(image)[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return kd_step, student_step


def peak_memory_mb(args: argparse.Namespace, setting: str, mode: str, device: torch.device) -> float:
    """Peak memory of a steady-state step: CUDA allocator peak, or a child process's VmHWM on CPU."""
    if device.type == "cuda":
        kd_step, student_step = build_setting(args, setting, device)
        step = kd_step if mode == "kd" else student_step
        step()
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        del kd_step, student_step, step
        torch.cuda.empty_cache()
        return peak
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{setting}:{mode}", "--depth",
           str(args.depth), "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--teacher-ckpt", args.teacher_ckpt]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def build_setting(args: argparse.Namespace, setting: str, device: torch.device):
    if setting == "tiny":
        return build_tiny(device, args.teacher_ckpt)
    return build_orion_l(device, args.depth, args.image_size, args.batch)


def _memory_child(args: argparse.Namespace) -> None:
    setting, mode = args.memory_child.split(":")
    kd_step, student_step = build_setting(args, setting, torch.device("cpu"))
    step = kd_step if mode == "kd" else student_step
    step()
    step()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    step()
    print(_status_mb("VmHWM"))


def ensure_teacher(path: str) -> str:
    """The miniature teacher checkpoint; trained (about 1-2 minutes) when missing."""
    if not os.path.isfile(path):
        from tools.train_tiny_teacher import ensure_tiny_teacher
        ensure_tiny_teacher(path)
    return path


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="tiny,orion-l", help="comma list of: tiny, orion-l")
    parser.add_argument("--depth", type=int, default=24, help="ORION-L blocks (3-6 is practical on a CPU)")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-ckpt", default=str(ROOT / "ckpt/orion_tiny/orion_tiny.pth"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="work_dirs/benchmark_kd_step.json")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return _memory_child(args)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - {"tiny", "orion-l"})
    if unknown:
        parser.error(f"--settings: unknown {unknown}; expected tiny and/or orion-l")
    device = torch.device(args.device)
    if "tiny" in settings:
        ensure_teacher(args.teacher_ckpt)
    results = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                   precision="bf16 autocast" if device.type == "cuda" else "fp32",
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
                   environment=environment(), settings={})
    for setting in settings:
        label = setting if setting == "tiny" else f"orion-l depth={args.depth} {args.image_size}px batch {args.batch}"
        print(f"[benchmark_kd_step] {label}: {args.repeats} alternating rounds on {device}", flush=True)
        kd_step, student_step = build_setting(args, setting, device)
        # two warm-up rounds of both steps: AdamW state is allocated before timing
        times = time_alternating(dict(kd=kd_step, student_only=student_step), args.repeats, 2, device)
        del kd_step, student_step
        median = {k: statistics.median(v) for k, v in times.items()}
        memory = {mode: peak_memory_mb(args, setting, mode, device) for mode in ("kd", "student_only")}
        entry = dict(label=label, median_s=median, time_ratio=median["kd"] / median["student_only"],
                     **rounds_record(times, dict(time_ratio=("kd", "student_only"))),
                     peak_memory_mb=memory, memory_ratio=memory["kd"] / memory["student_only"],
                     load_average_after=load_average())
        results["settings"][setting] = entry
        rounds = entry["ratio_spread"]["time_ratio"]
        print(f"  median step   kd {median['kd'] * 1e3:8.1f} ms   student-only {median['student_only'] * 1e3:8.1f} ms"
              f"   ratio {entry['time_ratio']:.3f} (per round {rounds['min']:.3f}-{rounds['max']:.3f}; target <= 1.35)")
        print(f"  peak memory   kd {memory['kd']:8.0f} MB   student-only {memory['student_only']:8.0f} MB"
              f"   ratio {entry['memory_ratio']:.3f} (target <= 1.25)", flush=True)
    print(f"  wrote {atomic_write_json(args.out, results)}")
    return results


if __name__ == "__main__":
    main()
