"""Execute the walkthrough notebook and keep its committed outputs honest.

    python tools/run_notebook.py            # execute notebooks/head_pruning_walkthrough.ipynb, rewrite its outputs
    python tools/run_notebook.py --check    # execute it and compare with the committed outputs; exit 1 if stale

The notebook runs in its own folder (as Jupyter runs it), one kernel, one thread. Its text outputs (tables,
printed numbers) are compared line by line with a fresh run; figures are not compared. The notebook fixes
its seeds and thread count, so a fresh run on the same CPU prints the same text; a decimal may differ
by one unit in its last printed digit (a value on a rounding boundary, another CPU's summation order),
any other difference means the committed outputs are stale. Standalone only (not copied into ORION).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOTEBOOK = ROOT / "notebooks" / "head_pruning_walkthrough.ipynb"
REGENERATE = "python tools/run_notebook.py"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Execution(NamedTuple):
    """An executed notebook (``nbformat`` node), its wall-clock seconds and the kernel's CPU seconds."""

    notebook: Any
    wall_seconds: float
    cpu_seconds: Optional[float]


def _children_cpu_seconds() -> Optional[float]:
    """CPU time of this process's finished (reaped) child processes; None where ``resource`` is missing."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def execute_notebook(path: Path = NOTEBOOK, timeout: int = 300) -> Execution:
    """Execute ``path`` in a fresh kernel; each cell may take ``timeout`` seconds.

    Runs in the notebook's folder (Jupyter's working directory) with ``OMP_NUM_THREADS=1`` for the kernel;
    no timing metadata is recorded, so that regenerating changes nothing but what the cells print and draw.
    The kernel's CPU time is read when it has exited (a busy shared machine stretches wall time, not CPU time).
    """
    import nbformat
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    # This interpreter's own kernel (ipykernel's spec), never another "python3" spec installed elsewhere.
    kernel = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(nb, km=kernel, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(Path(path).parent)}})
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernel inherits it: one thread before torch starts
    cpu_before, start = _children_cpu_seconds(), time.perf_counter()
    try:
        client.execute(cleanup_kc=True)  # shuts the kernel down and reaps it
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    wall, cpu_after = time.perf_counter() - start, _children_cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Execution(nb, wall, cpu)


def text_outputs(nb: Any) -> List[List[str]]:
    """Per code cell, the lines it printed (stdout) and its displayed text results; no figures, no stderr.

    The kernel cuts stdout into chunks wherever it happens to flush, so a cell's chunks are joined first.
    """
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        printed, shown = [], []
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stdout":
                printed.append(output.text)
            elif output.output_type in ("execute_result", "display_data") and "text/plain" in output.data \
                    and not any(key.startswith("image/") for key in output.data):
                shown.extend(output.data["text/plain"].splitlines())
        cells.append("".join(printed).splitlines() + shown)
    return cells


def _last_digit(token: str) -> float:
    """One unit in the last printed digit of a decimal token (``0.9805`` -> 0.0001, ``1.5e-03`` -> 1e-4)."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def lines_agree(committed: str, fresh: str) -> bool:
    """Same text and numbers; a decimal may be one unit apart in its last printed digit, a whole number may not."""
    if NUMBER.sub("#", committed) != NUMBER.sub("#", fresh):
        return False
    for old, new in zip(NUMBER.findall(committed), NUMBER.findall(fresh)):
        if old == new:
            continue
        rounded = "." in old and "." in new
        if not rounded or abs(float(old) - float(new)) > 1.000001 * max(_last_digit(old), _last_digit(new)):
            return False
    return True


def stale_outputs(committed: Sequence[Sequence[str]], fresh: Sequence[Sequence[str]]) -> List[str]:
    """One line per difference between the committed and the fresh text outputs (empty: up to date)."""
    if len(committed) != len(fresh):
        return [f"the committed notebook has {len(committed)} code cells, the fresh run {len(fresh)}"]
    problems = []
    for index, (old, new) in enumerate(zip(committed, fresh), 1):
        if len(old) != len(new):
            problems.append(f"code cell {index}: {len(old)} committed output lines, {len(new)} in the fresh run")
            continue
        problems.extend(f"code cell {index}: committed {a.strip()!r}, fresh run {b.strip()!r}"
                        for a, b in zip(old, new) if not lines_agree(a, b))
    return problems


def write_notebook(nb: Any, path: Path = NOTEBOOK) -> str:
    """Write the executed notebook atomically (temporary file, then rename)."""
    import nbformat

    from mmcv.models.utils.checkpoint_io import atomic_write_text

    return atomic_write_text(path, nbformat.writes(nb) + "\n")


def _took(run: Execution) -> str:
    cpu = "" if run.cpu_seconds is None else f", kernel CPU {run.cpu_seconds:.0f} s"
    return f"executed in {run.wall_seconds:.0f} s wall{cpu}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the walkthrough notebook: rewrite its outputs, or "
                                                 "--check them against a fresh run.")
    parser.add_argument("--notebook", type=Path, default=None,
                        help="the notebook to execute (default: notebooks/head_pruning_walkthrough.ipynb)")
    parser.add_argument("--check", action="store_true", help="compare with a fresh run; write nothing")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    args.notebook = args.notebook or NOTEBOOK
    import nbformat
    from nbclient.exceptions import CellExecutionError

    try:
        committed = nbformat.read(str(args.notebook), as_version=4)
        nbformat.validate(committed)
    except OSError as err:
        print(f"error: {args.notebook}: {err.strerror or err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, nbformat.ValidationError) as err:  # not JSON, or not a notebook's JSON
        got = " ".join(str(err).split())[:200]
        print(f"error: {args.notebook}: expected a Jupyter notebook (nbformat 4), got: {got}", file=sys.stderr)
        return 2
    try:
        run = execute_notebook(args.notebook, args.timeout)
    except CellExecutionError as err:
        print(f"error: {args.notebook}: a cell failed:\n{err}", file=sys.stderr)
        return 1
    if args.check:
        problems = stale_outputs(text_outputs(committed), text_outputs(run.notebook))
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            command = REGENERATE if args.notebook.resolve() == NOTEBOOK else f"{REGENERATE} --notebook {args.notebook}"
            print(f"error: {args.notebook}: the committed outputs are stale; regenerate them with `{command}`",
                  file=sys.stderr)
            return 1
        print(f"{args.notebook}: outputs up to date ({_took(run)})")
        return 0
    write_notebook(run.notebook, args.notebook)
    print(f"wrote {args.notebook} ({_took(run)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
