"""Head importance on the miniature teacher: each method x allocation, scored on training frames, judged on validation.

For every importance method (magnitude, entropy, activation, gradient) and allocation (uniform; global
with each block's scores L2-normalised; global on raw scores), the teacher's heads are scored on the
fixed training slice (``tools/demo_support.importance_loader``: the first 8 training scenes) and the
cosine of the masked backbone's features to the full backbone's is measured on validation frames.
One measurement per cell (nothing here is random); differences in the fourth decimal are within what
other validation frames would change.

    python tools/fidelity_table.py --out docs/head_importance/fidelity.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

METHODS = ("magnitude", "entropy", "activation", "gradient")
ALLOCATIONS = (("uniform", "uniform", "l2"), ("global, L2 per block", "global", "l2"),
               ("global, raw scores", "global", "none"))


def measure(ratio: float, val_samples: int, importance_batches: int) -> Dict[str, Any]:
    """Cosine fidelity and heads per block of every (method, allocation)."""
    from mmcv import Config
    from mmcv.datasets import build_dataset
    from tools import head_pruning_utils as hpu
    from tools.demo_support import IMPORTANCE_FRAMES, importance_loader, val_loader
    from tools.train_tiny_teacher import DEFAULT_CHECKPOINT, ensure_tiny_teacher, load_tiny_teacher

    teacher = load_tiny_teacher(ensure_tiny_teacher(DEFAULT_CHECKPOINT, verbose=False))
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"))
    scoring = importance_loader(cfg.data.train)
    judged = val_loader(build_dataset(dict(cfg.data.val, num_samples=val_samples)), 8)
    rows: Dict[str, Dict[str, Any]] = {}
    for method in METHODS:
        if method == "magnitude":
            importance = hpu.compute_head_importance_magnitude(teacher)
        else:
            importance = getattr(hpu, f"compute_head_importance_{method}")(teacher, scoring,
                                                                           num_batches=importance_batches,
                                                                           progress=False)
        rows[method] = {}
        for label, strategy, normalization in ALLOCATIONS:
            result = hpu.analyze_pruning_impact(importance, pruning_ratios=(ratio,), model=teacher, dataloader=judged,
                                                strategies=(strategy,), num_batches=None, verbose=False,
                                                block_normalization=normalization)["results"][0]
            rows[method][label] = dict(cosine=result["cosine_similarity"], heads_per_block=result["heads_per_block"])
    return dict(settings=dict(pruning_ratio=ratio, importance_frames=IMPORTANCE_FRAMES, importance_split="train",
                              importance_batches=importance_batches, validation_samples=val_samples),
                rows=rows, table=markdown(rows))


def markdown(rows: Dict[str, Dict[str, Any]]) -> str:
    """method x allocation: cosine (and the heads per block where they differ between blocks)."""
    labels = [label for label, _, _ in ALLOCATIONS]
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for method, cells in rows.items():
        out: List[str] = []
        for label in labels:
            heads = cells[label]["heads_per_block"]
            spread = "" if min(heads) == max(heads) else f" ({min(heads)}-{max(heads)} per block)"
            out.append(f"{cells[label]['cosine']:.4f}{spread}")
        lines.append(f"| {method} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from mmcv.models.utils.checkpoint_io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work_dirs/head_importance_fidelity.json")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of heads removed")
    parser.add_argument("--val-samples", type=int, default=64, help="validation frames the fidelity is measured on")
    parser.add_argument("--importance-batches", type=int, default=8, help="batches of 8 training frames scored")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0.0 < args.ratio < 1.0 or args.val_samples < 8 or args.val_samples % 8:
        parser.error(f"--ratio must lie in (0, 1) and --val-samples be a multiple of 8, got {args.ratio}, "
                     f"{args.val_samples}")
    torch.set_num_threads(args.threads)
    result = measure(args.ratio, args.val_samples, args.importance_batches)
    result["settings"]["command"] = "python tools/fidelity_table.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(result["table"])
    print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
