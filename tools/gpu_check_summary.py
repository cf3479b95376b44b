"""Summarise what ``tools/gpu_check.sh`` measured into one JSON and a few lines.

    python tools/gpu_check_summary.py --out-dir work_dirs/gpu_check --ranks 2 --nccl-status 0

Reads the step files in ``--out-dir`` (``benchmark_backbone.json``: teacher vs heads-only student,
``benchmark_backbone_joint.json``: teacher vs joint student, ``benchmark_backbone_budget3x.json``: teacher vs
the student the budget chooses for a 3x target (heads, channels and blocks), ``benchmark_kd_step.json``, and
the NCCL run's work dir ``nccl_tiny_kd/``), writes ``gpu_check.json`` there atomically and prints each ratio.
Every ratio comes from one run that timed both sides alternately. Exit status 1 when a step left nothing to read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

from mmcv.models.utils.checkpoint_io import atomic_write_json  # noqa: E402

#: The file KDExportStudentHook writes in the tiny KD config's work dir.
EXPORTED = "student_pruned.pth"
#: The backbone benchmarks: summary key -> (step file, label of its line).
BACKBONE_STEPS = {
    "backbone_heads_only": ("benchmark_backbone.json", "heads-only student (8/16):"),
    "backbone_joint": ("benchmark_backbone_joint.json", "joint student (8 + MLP 1536):"),
    "backbone_budget_3x": ("benchmark_backbone_budget3x.json", "budgeted student (3x):"),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="gpu_check.sh's output folder")
    parser.add_argument("--ranks", type=int, required=True, help="processes of the NCCL run (0: not run)")
    parser.add_argument("--nccl-status", type=int, default=None, help="exit status of the NCCL run (none: not run)")
    return parser.parse_args(argv)


def _load(out_dir: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _backbone_line(label: str, result: Optional[Dict[str, Any]]) -> str:
    if result is None:
        return "  {:<28} missing: the step failed (see its output above)".format(label)
    memory = result.get("peak_memory_mb") or {}
    line = "  {:<28} {:.3f}x the teacher's speed (analytic ceiling {:.3f}x)".format(
        label, result["speedup"], result["ceiling"])
    if memory:
        line += "; peak memory {:.0f} MB vs {:.0f} MB (ratio {:.3f})".format(
            memory["student"], memory["teacher"], result["peak_memory_ratio"])
    budget = result.get("budget")
    if budget:
        removed = (budget.get("chosen") or {}).get("removed_blocks")
        line += "; the budget predicted {:.3f}x{}".format(
            budget["predicted_speedup"], ", teacher blocks removed: {}".format(removed) if removed else "")
    return line


def summarise(args: argparse.Namespace) -> Dict[str, Any]:
    """The summary dict (what gpu_check.json holds)."""
    backbones = {key: _load(args.out_dir, name) for key, (name, _) in BACKBONE_STEPS.items()}
    kd_step = _load(args.out_dir, "benchmark_kd_step.json")
    exported = os.path.join(args.out_dir, "nccl_tiny_kd", EXPORTED)
    nccl = dict(ranks=args.ranks, exit_status=args.nccl_status,
                exported=os.path.isfile(exported) if args.ranks else None, export_path=exported)
    device = next((r.get("device_name") for r in list(backbones.values()) + [kd_step] if r), None)
    return dict(device=device, kd_step=kd_step, nccl=nccl, **backbones)


def report(summary: Dict[str, Any]) -> List[str]:
    """The lines printed at the end of gpu_check.sh."""
    heads = summary["backbone_heads_only"]
    lines = ["gpu_check on {}: bf16, full ORION-L (24 blocks, 640x640), medians of alternating rounds".format(
        summary["device"] or "?")]
    lines += [_backbone_line(label, summary[key]) for key, (_, label) in BACKBONE_STEPS.items()]
    if heads and "sdpa_vs_math_speedup" in heads:
        lines.append("  {:<28} {:.3f}x (teacher)".format("sdpa vs math attention:", heads["sdpa_vs_math_speedup"]))
    kd = summary["kd_step"]
    for name, entry in sorted(((kd or {}).get("settings") or {}).items()):
        lines.append("  {:<28} {:.3f}x the student-only step's time, {:.3f}x its peak memory".format(
            "KD step ({}):".format(name), entry["time_ratio"], entry["memory_ratio"]))
    if kd is None:
        lines.append("  {:<28} missing: the step failed (see its output above)".format("KD step:"))
    nccl = summary["nccl"]
    if not nccl["ranks"]:
        lines.append("  {:<28} skipped: fewer than 2 GPUs visible".format("NCCL DDP smoke run:"))
    else:
        lines.append("  {:<28} {} rank(s), exit status {}, {} {}".format(
            "NCCL DDP smoke run:", nccl["ranks"], nccl["exit_status"], EXPORTED,
            "written: " + nccl["export_path"] if nccl["exported"] else "NOT written"))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    summary = summarise(args)
    atomic_write_json(os.path.join(args.out_dir, "gpu_check.json"), summary)
    print("\n".join(report(summary)))
    nccl = summary["nccl"]
    complete = all(summary[k] is not None for k in list(BACKBONE_STEPS) + ["kd_step"])
    return 0 if complete and (not nccl["ranks"] or (nccl["exit_status"] == 0 and nccl["exported"])) else 1


if __name__ == "__main__":
    sys.exit(main())
