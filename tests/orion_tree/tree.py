"""The ORION tree the tier runs against, a private installed copy of it, and the tier's subprocesses.

``ORION_ROOT`` names the tree; without it, ``../shared/orion`` beside this repository is used when it
exists (CI has it there). The tree is never written: the plugin goes into a copy with
``tools/install_into_orion.py``. Each scenario of ``scenarios.py`` runs in its own process, as ORION's
environment would run it: without this repository on the import path.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = REPO.parent / "shared" / "orion"
#: What makes a folder an ORION tree for the tier.
ORION_MARKERS = ("mmcv/runner/iter_based_runner.py", "adzoo/orion/apis/mmdet_train.py",
                 "adzoo/orion/configs/orion_stage3_train.py", "adzoo/orion/orion_dist_train.sh")
CODE_FOLDERS = ("mmcv", "adzoo")
SKIPPED_FOLDERS = {".git", "__pycache__", "work_dirs", "logs"}
SKIPPED_SUFFIXES = (".pyc", ".pth", ".pt", ".safetensors", ".pkl")


def orion_root_setting() -> Tuple[Optional[Path], str]:
    """(tree, "") when there is one to test against, else (None, why): the one line a skip or failure gives."""
    given = os.environ.get("ORION_ROOT")
    root = Path(given).expanduser().resolve() if given else DEFAULT_ROOT.resolve()
    if not given and not root.is_dir():
        return None, "no ORION tree: set ORION_ROOT=PATH/TO/Orion (default {} does not exist)".format(DEFAULT_ROOT)
    missing = [m for m in ORION_MARKERS if not (root / m).is_file()]
    if missing:
        return None, "ORION_ROOT={}: not an ORION tree (expected {}, missing)".format(root, missing[0])
    return root, ""


def code_files(root: Path) -> List[str]:
    """ORION's code (``CODE_FOLDERS``, the top-level files), relative to ``root``, without run outputs.

    A user's checkout also holds ``data/``, ``ckpts/`` (tens of GB) and work dirs: the tier copies and
    checks only the code it imports.
    """
    files = sorted(p.name for p in root.iterdir() if p.is_file())
    for folder in CODE_FOLDERS:
        for dirpath, dirs, names in os.walk(str(root / folder)):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
            files += sorted(os.path.relpath(os.path.join(dirpath, n), str(root)) for n in names
                            if not n.endswith(SKIPPED_SUFFIXES))
    return files


def code_copy(root: Path, dest: Path) -> Path:
    """A copy of ORION's code (``code_files``) at ``dest``; modes are kept."""
    for rel in code_files(root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(str(root / rel), str(dest / rel))
    return dest


def installed_copy(root: Path, dest: Path) -> Path:
    """Copy ORION's code to ``dest`` and install the plugin there (ORION's own import runs in the scenarios)."""
    return install_plugin(code_copy(root, dest))


def install_plugin(dest: Path) -> Path:
    """Install this repository's plugin into the ORION copy ``dest`` (its import check needs CUDA: skipped)."""
    proc = subprocess.run([sys.executable, "-B", str(REPO / "tools/install_into_orion.py"), str(dest),
                           "--skip-import-check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError("install_into_orion.py {} failed: {}".format(dest, proc.stderr.strip()))
    return dest


def run_scenarios(copy: Path, out: Path, names: Sequence[str], timeout: int = 420) -> str:
    """Run scenarios of scenarios.py, in order, in one process in ORION's copy; its output."""
    env = dict(os.environ, PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-B", str(HERE / "scenarios.py"), str(copy), str(out)] + list(names),
                          cwd=str(copy), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout)
    return proc.stdout


def scenario_result(out: Path, name: str) -> Tuple[Dict[str, Any], str]:
    """(the scenario's JSON, "") or ({}, its traceback)."""
    path, error = out / (name + ".json"), out / (name + ".error")
    if path.is_file():
        return json.loads(path.read_text()), ""
    return {}, error.read_text() if error.is_file() else "scenario {} did not run".format(name)
