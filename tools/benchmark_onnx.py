"""Speed of the pruned student against the teacher in ONNX Runtime, next to the same models in PyTorch.

The models are those of ``tools/benchmark_backbone.py`` (ORION-L width, ORION's window/global pattern
at ``--depth`` blocks, random weights: timing depends on the kept counts, not on the values). A student
keeps the same heads and SwiGLU channels in every block, optionally only some teacher blocks
(``--student HEADS:MLP@BLOCKS``), or exactly what a pruning configuration keeps per block, blocks included
(``--pruning-config``, e.g. one written by ``prune-config --target-speedup``, made for ``--depth`` blocks).
Each is exported with ``tools/export_onnx.py`` (so checked against PyTorch first). One loop then times every
model in ONNX Runtime (CPU) and in PyTorch, alternating, ``--repeats`` rounds on the same image, so
load and drift hit all of them alike. Per round the teacher/student time ratio is taken in each
runtime; the JSON keeps every round, min/median/max, the analytic ceiling (MACs ratio), threads,
versions, the CPU model and the load average before and after.

    python tools/benchmark_onnx.py --depth 6 --repeats 5 --out docs/bench/onnx_orion_l_depth6.json
    python tools/benchmark_onnx.py --depth 3 --student 8 --student 8:1536 --student 12:2048
    python tools/benchmark_onnx.py --depth 6 --student 8:1024@0,1,3,5 --pruning-config work_dirs/budget_3x.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.pruning_config import PruningConfig
from tools.benchmark_backbone import TEACHER_HIDDEN, orion_l_config, time_alternating
from tools.export_onnx import OnnxExportError, export_backbone_onnx, onnx_runtime_session, require_onnx_runtime

DEFAULT_STUDENTS = ("8", "8:1536")


class Student(NamedTuple):
    """A timed student: its name in the JSON and its ``EVAViTStudent`` arguments beyond ORION-L's."""

    name: str
    kwargs: Dict[str, Any]


def parse_student(text: str) -> Student:
    """``HEADS[:MLP_HIDDEN][@BLOCKS]``: heads (and SwiGLU channels) kept per block, and the teacher blocks kept
    (comma-separated indices; default all), e.g. ``8:1024@0,1,3,5``."""
    counts, _, blocks = text.partition("@")
    heads, _, hidden = counts.partition(":")
    try:
        numbers = int(heads), int(hidden) if hidden else TEACHER_HIDDEN
        kept = [int(b) for b in blocks.split(",")] if blocks else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--student: expected HEADS, HEADS:MLP_HIDDEN or HEADS:MLP_HIDDEN@B0,B1,.. "
                                         f"(kept teacher blocks), got {text!r}") from None
    if not 1 <= numbers[0] <= 16 or not 1 <= numbers[1] <= TEACHER_HIDDEN:
        raise argparse.ArgumentTypeError(f"--student {text}: heads must lie in 1..16 and MLP width in "
                                         f"1..{TEACHER_HIDDEN}")
    kwargs: Dict[str, Any] = dict(num_heads=numbers[0], mlp_hidden=numbers[1] if hidden else None)
    if kept is not None:
        kwargs["selected_blocks"] = kept
    return Student(label(numbers[0], numbers[1], kept), kwargs)


def label(heads: int, hidden: int, blocks: Optional[Sequence[int]] = None) -> str:
    """``8h``, ``8h_mlp1536``, ``8h_mlp1024_blocks0-1-3-5``."""
    return (f"{heads}h" + (f"_mlp{hidden}" if hidden != TEACHER_HIDDEN else "")
            + (f"_blocks{'-'.join(str(b) for b in blocks)}" if blocks is not None else ""))


def config_student(path: str, depth: int) -> Student:
    """What a pruning configuration keeps per block (heads, channels, blocks), for ORION-L at ``depth`` blocks."""
    config = PruningConfig.load(path)
    if config.teacher_num_heads != 16 or (config.teacher_mlp_hidden or TEACHER_HIDDEN) != TEACHER_HIDDEN:
        raise ValueError(f"{path}: made for a teacher with {config.teacher_num_heads} heads and MLP width "
                         f"{config.teacher_mlp_hidden}; this benchmark times ORION-L (16 heads, {TEACHER_HIDDEN})")
    if config.depth != depth:
        raise ValueError(f"{path}: made for {config.depth} blocks, the benchmark builds --depth {depth}; "
                         f"run with --depth {config.depth}")
    return Student(Path(path).stem, config.to_model_kwargs())


def build_model(depth: int, image_size: int, kwargs: Dict[str, Any]) -> EVAViTStudent:
    """ORION-L at ``depth`` blocks (random weights, fp32, eval) with ``kwargs`` overriding what is kept."""
    torch.manual_seed(0)
    cfg = orion_l_config(depth, 16, "sdpa", image_size)
    cfg.update(kwargs)
    return EVAViTStudent(**cfg).eval()


def _uniform(values: Sequence[int]) -> Any:
    """The value every kept block shares, else the list (one entry per kept block)."""
    return values[0] if len(set(values)) == 1 else list(values)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def spread(values: Sequence[float]) -> Dict[str, float]:
    return dict(min=min(values), median=statistics.median(values), max=max(values))


def export_models(args: argparse.Namespace, folder: str) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Build teacher and students, export each (parity-checked); returns models, ONNX sessions, sidecars."""
    specs = {"teacher": {}}
    specs.update({student.name: student.kwargs for student in args.students})
    models, sessions, sidecars = {}, {}, {}
    for name, kwargs in specs.items():
        try:
            models[name] = build_model(args.depth, args.image_size, kwargs)
        except ValueError as err:
            raise OnnxExportError(f"student {name} at --depth {args.depth}: {err}") from None
        path = os.path.join(folder, f"{name}.onnx")
        sidecars[name] = export_backbone_onnx(models[name], path, opset=args.opset)
        # no busy-waiting ONNX Runtime threads: PyTorch's rounds alternate with them in this process
        sessions[name] = onnx_runtime_session(path, threads=torch.get_num_threads(), spin=False)
        model = models[name]
        print(f"  exported {name}: {model.num_blocks} of {model.depth} blocks, {_uniform(model.num_heads_per_layer)} "
              f"heads, MLP {_uniform(model.mlp_hidden_per_layer)}, ONNX Runtime vs PyTorch max |diff| "
              f"{max(r['max_abs_diff'] for r in sidecars[name]['parity']['inputs'].values()):.1e}", flush=True)
    return models, sessions, sidecars


def runners_for(models: Dict[str, Any], sessions: Dict[str, Any], image: torch.Tensor) -> Dict[str, Callable]:
    """One callable per (model, runtime): ``<name>/onnxruntime`` and ``<name>/pytorch``."""
    feed = {"img": image.numpy()}
    runners: Dict[str, Callable[[], Any]] = {}
    for name in models:
        runners[f"{name}/onnxruntime"] = lambda s=sessions[name]: s.run(None, feed)
        runners[f"{name}/pytorch"] = lambda m=models[name]: m(image)
    return runners


def summarise(times: Dict[str, List[float]], models: Dict[str, Any], image_size: int) -> Dict[str, Any]:
    """Per-round teacher/student ratios in each runtime, their spread, and the analytic ceilings."""
    hw = (image_size, image_size)
    teacher_macs = models["teacher"].analytic_macs(hw)
    students = {}
    for name, model in models.items():
        if name == "teacher":
            continue
        entry: Dict[str, Any] = dict(heads=_uniform(model.num_heads_per_layer),
                                     mlp_hidden=_uniform(model.mlp_hidden_per_layer),
                                     kept_blocks=list(model.kept_blocks),
                                     ceiling=teacher_macs / model.analytic_macs(hw))
        for runtime in ("onnxruntime", "pytorch"):
            rounds = [t / s for t, s in zip(times[f"teacher/{runtime}"], times[f"{name}/{runtime}"])]
            entry[runtime] = dict(ratio_per_round=rounds, ratio=spread(rounds),
                                  ratio_of_medians=statistics.median(times[f"teacher/{runtime}"]) /
                                  statistics.median(times[f"{name}/{runtime}"]))
        students[name] = entry
    return dict(times_s=times, time_s={name: spread(values) for name, values in times.items()}, students=students)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=6, help="blocks (a multiple of 3 keeps ORION's pattern; 24 = "
                                                             "ORION-L)")
    parser.add_argument("--student", type=parse_student, action="append", default=None,
                        help=f"HEADS, HEADS:MLP_HIDDEN kept per block, optionally @B0,B1,.. the teacher blocks kept; "
                             f"repeatable (default without --pruning-config: {' and '.join(DEFAULT_STUDENTS)})")
    parser.add_argument("--pruning-config", action="append", default=[], metavar="FILE.json",
                        help="a pruning configuration for --depth blocks: time what it keeps per block (heads, "
                             "channels, blocks); repeatable")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--out", default="work_dirs/benchmark_onnx.json")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.depth < 1 or args.image_size % 16 or args.repeats < 1:
        parser.error(f"--depth and --repeats must be >= 1 and --image-size a multiple of 16, got {args.depth}, "
                     f"{args.repeats}, {args.image_size}")
    if args.student is None and not args.pruning_config:
        args.student = [parse_student(s) for s in DEFAULT_STUDENTS]
    try:
        args.students = list(args.student or []) + [config_student(p, args.depth) for p in args.pruning_config]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2)
    names = [student.name for student in args.students]
    if len(set(names)) != len(names) or "teacher" in names:
        parser.error(f"two students share a name (or one is called teacher): {names}")
    try:
        onnx_module, ort = require_onnx_runtime()
        load_before = load_average()
        print(f"[benchmark_onnx] ORION-L width, depth {args.depth}, {args.image_size}x{args.image_size}, batch 1, fp32 "
              f"on CPU, {torch.get_num_threads()} threads, {args.repeats} alternating rounds, load {load_before}",
              flush=True)
        with tempfile.TemporaryDirectory() as folder:
            models, sessions, sidecars = export_models(args, folder)
            image = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                times = time_alternating(runners_for(models, sessions, image), args.repeats, args.warmup,
                                         torch.device("cpu"))
    except OnnxExportError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    result = dict(
        what="ONNX Runtime (CPU) and PyTorch, teacher vs students, alternating rounds in one process",
        depth=args.depth, image_size=args.image_size, batch=1, dtype="fp32", opset=args.opset,
        pruning_configs=list(args.pruning_config),
        repeats=args.repeats, warmup=args.warmup, threads=torch.get_num_threads(),
        onnxruntime_intra_op_threads=torch.get_num_threads(), onnxruntime_thread_spinning=False, cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        load_average_before=load_before, load_average_after=load_average(),
        versions=dict(torch=torch.__version__, onnx=onnx_module.__version__, onnxruntime=ort.__version__,
                      python=platform.python_version()),
        parity_max_abs_diff={name: max(r["max_abs_diff"] for r in s["parity"]["inputs"].values())
                             for name, s in sidecars.items()},
        **summarise(times, models, args.image_size))
    _print(result)
    print(f"  wrote {atomic_write_json(args.out, result)}")
    return result


def _print(result: Dict[str, Any]) -> None:
    for name, spread_s in result["time_s"].items():
        print(f"  median {name:<28} {spread_s['median'] * 1e3:9.1f} ms")
    for name, entry in result["students"].items():
        ort_ratio, torch_ratio = entry["onnxruntime"]["ratio"], entry["pytorch"]["ratio"]
        print(f"  {name:<12} speedup median {ort_ratio['median']:.3f}x in ONNX Runtime "
              f"[{ort_ratio['min']:.3f}, {ort_ratio['max']:.3f}], {torch_ratio['median']:.3f}x in PyTorch "
              f"[{torch_ratio['min']:.3f}, {torch_ratio['max']:.3f}], analytic ceiling {entry['ceiling']:.3f}x")
    print(f"  load average before {result['load_average_before']}, after {result['load_average_after']}")


if __name__ == "__main__":
    main()
