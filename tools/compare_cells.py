"""How far two runs of the same study cell (or of the demo) differ: every metric, the retention and the cosine.

Used to state what may vary between runs of the same command (e.g. 1 vs 2 torch threads, whose float
reductions add in a different order):

    python tools/kd_study.py --out work_dirs/t1 --seeds 0 --ratios 0.5 --selections magnitude --trainings kd \\
        --label-fractions 0.1 --threads 1
    python tools/kd_study.py --out work_dirs/t2 ... --threads 2
    python tools/compare_cells.py work_dirs/t1/cells/NAME.json work_dirs/t2/cells/NAME.json --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> Dict[str, Any]:
    """B - A for every numeric metric both cells have, the retentions and the backbone cosine; the largest |B - A|."""
    if a["name"] != b["name"]:
        raise ValueError(f"compare_cells: different cells {a['name']!r} and {b['name']!r}")
    metrics = {k: b["metrics"][k] - v for k, v in a["metrics"].items()
               if isinstance(v, (int, float)) and isinstance(b["metrics"].get(k), (int, float))}
    retained = {k: b["retained"][k] - v for k, v in a["retained"].items()}
    cosine = b["backbone_cosine"] - a["backbone_cosine"]
    every = list(metrics.values()) + list(retained.values()) + [cosine]
    return dict(cell=a["name"], metrics=metrics, retained=retained, backbone_cosine=cosine,
                largest_abs_difference=max(abs(v) for v in every), identical=all(v == 0 for v in every))


def as_record(loaded: Mapping[str, Any]) -> Mapping[str, Any]:
    """A study cell as is; a demo report.json as a cell: every metric of every stage, fidelity, cosines."""
    if "targets" not in loaded:
        return loaded
    metrics: Dict[str, Any] = {}
    for stage in ("teacher_metrics", "before_kd_metrics", "after_kd_metrics", "task_only_metrics"):
        metrics.update({f"{stage}.{k}": v for k, v in loaded.get(stage, {}).items()})
    fidelity = loaded["fidelity_before_kd"]
    metrics.update({f"fidelity.{k}": v for k, v in fidelity["by_method"].items()})
    metrics.update({f"fidelity.random_{i}": v for i, v in enumerate(fidelity["random_draws"])})
    for stage in ("before_kd_backbone", "task_only_backbone"):
        metrics.update({f"{stage}.{k}": v for k, v in loaded.get(stage, {}).items()})
    return dict(name="demo", metrics=metrics, retained=loaded["retained_after_kd"],
                backbone_cosine=loaded["after_kd_backbone"]["cosine"], seconds=loaded.get("total_seconds"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mmcv.models.utils.checkpoint_io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="a cell record (<study>/cells/<name>.json) or a demo report.json")
    parser.add_argument("b", help="the same cell from another run")
    parser.add_argument("--out", help="write the comparison as JSON")
    args = parser.parse_args(argv)
    try:
        records = [as_record(json.loads(Path(p).read_text())) for p in (args.a, args.b)]
        result = differences(*records)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update(a=args.a, b=args.b, seconds=[r.get("seconds") for r in records])
    print(f"{result['cell']}: largest |B - A| {result['largest_abs_difference']:.3g}"
          + (" (identical)" if result["identical"] else ""))
    if args.out:
        print(f"wrote {atomic_write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
