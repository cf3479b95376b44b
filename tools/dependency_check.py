"""One line with the fix, instead of a traceback, when an entry point runs under a Python without torch.

The usual cause: a new shell where the repository's ``.venv`` (made by ``make setup`` / ``make demo``)
is not active, so ``python`` is the system interpreter. Every command-line entry point calls
:func:`require_dependencies` before importing torch. mmengine is required only next to ORION-KD's
light ``mmcv`` core (built on mmengine); in an ORION checkout ORION's own ``mmcv`` needs none.
Standard library only, Python 3.8 (copied into ORION with the demo and the importance command).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import List, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Exit status of an entry point that cannot import what it needs.
MISSING_DEPENDENCY_EXIT = 1


def uses_light_core(root: Path = REPO_ROOT) -> bool:
    """True in ORION-KD's own checkout, whose ``mmcv`` is the light core (the overlay never copies this marker)."""
    return (root / "mmcv" / "_install_check.py").is_file()


def missing_dependencies(names: Sequence[str]) -> List[str]:
    """The top-level packages of ``names`` that this interpreter cannot find (nothing is imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def environment_fix(root: Path = REPO_ROOT) -> str:
    """What to do about a missing package, for this checkout and this interpreter."""
    venv = root / ".venv"
    if not uses_light_core(root):
        return "activate the Python environment ORION runs in (ORION's README: conda activate orion)"
    if Path(sys.prefix).resolve() == venv.resolve():
        return "the repository's .venv is incomplete: rm -f .venv/.installed && make setup"
    if (venv / "bin" / "python").exists():
        return "activate the repository's environment (source .venv/bin/activate) or run it with .venv/bin/python"
    return ("create the repository's environment with `make setup` (torch CPU build, mmengine and this package into "
            ".venv), then source .venv/bin/activate")


def _shown(entry: str, root: Path) -> str:
    """``entry`` relative to the repository root when it lies inside it (``tools/x.py``), else as given."""
    try:
        return Path(entry).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return entry


def require_dependencies(entry: str, names: Sequence[str] = ("torch",), root: Path = REPO_ROOT) -> None:
    """Exit with one line naming ``entry``, the missing packages, the interpreter and the fix, if any is missing."""
    wanted = list(names) + (["mmengine"] if uses_light_core(root) and "mmengine" not in names else [])
    missing = missing_dependencies(wanted)
    if not missing:
        return
    sys.stderr.write("error: {} needs {}, which {} (Python {}) cannot import: {}\n".format(
        _shown(entry, root), " and ".join(missing), sys.executable, sys.version.split()[0], environment_fix(root)))
    raise SystemExit(MISSING_DEPENDENCY_EXIT)


__all__ = ["MISSING_DEPENDENCY_EXIT", "uses_light_core", "missing_dependencies", "environment_fix",
           "require_dependencies"]
