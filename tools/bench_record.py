"""What a timing run ships with its numbers: every round, per-round ratios, min / median / max, the machine.

Used by ``tools/benchmark_backbone.py`` and ``tools/benchmark_kd_step.py``: their JSON holds each
alternating round's times, the per-round ratios of the pairs they compare, the spread of both, and
the conditions of the run (threads, torch version, CPU model, load average before and after), so a
quoted median can be checked against its rounds and two runs compared knowing how busy the machine was.
"""
from __future__ import annotations

import os
import platform
import statistics
from typing import Dict, List, Mapping, Optional, Sequence, Tuple


def spread(values: Sequence[float]) -> Dict[str, float]:
    """min / median / max of ``values``."""
    return dict(min=min(values), median=statistics.median(values), max=max(values))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> Dict[str, object]:
    """The conditions of a timing run: torch version and threads, CPU model and core count, load average."""
    import torch

    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_model=cpu_model(),
                cpu_count=os.cpu_count(), python=platform.python_version(), load_average=load_average())


def rounds_record(times: Mapping[str, Sequence[float]], ratios: Mapping[str, Tuple[str, str]]) -> Dict[str, object]:
    """Per-round times and ratios with their spreads; ``ratios`` maps a name to (numerator, denominator) runners.

    Round ``i``'s ratio divides the two runners' times of that round: they ran back to back, so the
    ratio is less exposed to drift in the machine's load than a ratio of medians.
    """
    per_round = {name: [a / b for a, b in zip(times[num], times[den])] for name, (num, den) in ratios.items()}
    return dict(times_s=dict(times), time_spread_s={name: spread(v) for name, v in times.items()},
                ratio_per_round=per_round, ratio_spread={name: spread(v) for name, v in per_round.items()})


#: Why a measured speedup can exceed the analytic MAC ceiling (the ceiling counts matmul MACs only).
BEYOND_CEILING = ("the measured speedup exceeds the analytic MAC ceiling: the MAC count covers the matmuls and the "
                  "patch convolution only; it leaves out the softmax, rotary embedding, norms, reshapes and "
                  "per-head kernel launches, whose cost scales with the heads, the memory traffic of q/k/v and "
                  "the attention maps, and the GEMM shape efficiency (the 2730-wide SwiGLU and narrower q/k/v "
                  "matmuls run at different rates); pruning removes those costs as well")


__all__ = ["spread", "cpu_model", "load_average", "environment", "rounds_record", "BEYOND_CEILING"]
