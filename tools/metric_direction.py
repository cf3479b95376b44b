"""Which way each task metric of the miniature world is better, in one place.

Every report that compares a student with the teacher, with chance or with another student asks
this: the plan errors (``plan_l2`` and its per-horizon and hidden-light variants) are better lower,
every other metric of ``mmcv/datasets/chat_b2d_metrics.py`` is better higher.
Standard library only (copied into ORION with the demo): Python 3.8, no torch needed.
"""
from __future__ import annotations

from typing import Dict, Iterable

#: The four headline metrics every report leads with (detection, lanes, QA, planning).
HEADLINE_METRICS = ("det_f1", "lane_iou", "qa_acc", "plan_l2")
_LOWER_IS_BETTER_PREFIX = "plan_l2"


def higher_is_better(metric: str) -> bool:
    """True unless ``metric`` is a plan error (metres: smaller is better)."""
    return not metric.startswith(_LOWER_IS_BETTER_PREFIX)


def directions(metrics: Iterable[str] = HEADLINE_METRICS) -> Dict[str, bool]:
    """``{metric: higher_is_better(metric)}`` in the given order."""
    return {key: higher_is_better(key) for key in metrics}


__all__ = ["HEADLINE_METRICS", "higher_is_better", "directions"]
