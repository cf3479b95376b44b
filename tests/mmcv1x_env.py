"""Build the real mmcv 1.7.2 (pure Python) beside this project, for tests against ORION's runner family.

ORION's ``mmcv`` is a fork of mmcv 1.x; mmcv 1.7.2's runner, hooks, Config, collate and
(MM)DataParallel are the closest stand-in that runs on a CPU. It is built from the sdist with
``MMCV_WITH_OPS=0`` (no C++/CUDA ops), ``--no-build-isolation`` and ``setuptools<70`` (its
setup.py imports ``pkg_resources``), into folders of its own so that it never shadows this
project's ``mmcv`` package:

    .venv/mmcv1x/mmcv-1.7.2/   pip --target: the ``mmcv`` package (an ORION-shaped test tree copies it)
    .venv/mmcv1x/deps/         yapf 0.32 (mmcv 1.7.2's Config calls FormatCode(verify=True)) and a
                               ``torchvision`` stub (mmcv/runner/checkpoint.py imports torchvision only
                               for its model-zoo URLs; the torch CPU wheel has no torchvision)
    .venv/mmcv1x/build-tools/  setuptools<70 + wheel, used only while building

``python tests/mmcv1x_env.py`` builds it (``make test`` does this first; cached by a stamp file);
the test fixture calls :func:`ensure_mmcv1x`, which builds when missing and reports why not.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".venv" / "mmcv1x"
MMCV_DIR = HOME / "mmcv-1.7.2"
DEPS_DIR = HOME / "deps"
TOOLS_DIR = HOME / "build-tools"
STAMP = HOME / ".built"
MMCV_VERSION = "1.7.2"

TORCHVISION_STUB = '''"""torchvision stub for mmcv 1.7.2 on the torch CPU wheel (tests only).

mmcv/runner/checkpoint.py imports torchvision at module level to list model-zoo URLs; nothing
in the tests loads a torchvision model, so any real use fails loudly here (AttributeError, so that
hasattr() probes still work).
"""
__version__ = "0.0.0+orion-kd-stub"


def __getattr__(name):
    raise AttributeError("torchvision is stubbed for the mmcv 1.7.2 tests: torchvision.{} is not available"
                         .format(name))
'''


def _pip(args: list, env: dict) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--timeout", "30",
           "--retries", "1"] + args
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError("pip install {} failed: {}".format(" ".join(args), " | ".join(tail)))


def build() -> float:
    """Build mmcv 1.7.2 and its test dependencies into ``.venv/mmcv1x``; returns the seconds it took."""
    started = time.time()
    for folder in (MMCV_DIR, DEPS_DIR, TOOLS_DIR):
        shutil.rmtree(str(folder), ignore_errors=True)
    STAMP.unlink() if STAMP.exists() else None
    env = dict(os.environ)
    _pip(["--target", str(TOOLS_DIR), "setuptools<70", "wheel"], env)
    build_env = dict(env, MMCV_WITH_OPS="0", PYTHONPATH=str(TOOLS_DIR))
    _pip(["--no-build-isolation", "--no-deps", "--target", str(MMCV_DIR), "mmcv=={}".format(MMCV_VERSION)],
         build_env)
    _pip(["--no-deps", "--target", str(DEPS_DIR), "yapf==0.32.0"], env)
    (DEPS_DIR / "torchvision").mkdir(parents=True, exist_ok=True)
    (DEPS_DIR / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB)
    shutil.rmtree(str(TOOLS_DIR), ignore_errors=True)
    if not (MMCV_DIR / "mmcv" / "runner" / "iter_based_runner.py").is_file():
        raise RuntimeError("mmcv {} built, but {} has no mmcv/runner".format(MMCV_VERSION, MMCV_DIR))
    seconds = time.time() - started
    STAMP.write_text("mmcv {} built in {:.1f} s\n".format(MMCV_VERSION, seconds))
    return seconds


def ensure_mmcv1x() -> Tuple[Path, Path]:
    """``(mmcv_dir, deps_dir)``, building them first when the stamp is missing."""
    if not STAMP.is_file():
        build()
    return MMCV_DIR, DEPS_DIR


if __name__ == "__main__":
    if STAMP.is_file() and "--rebuild" not in sys.argv:
        print("mmcv {} for the tests: cached in {} ({})".format(MMCV_VERSION, HOME, STAMP.read_text().strip()))
        sys.exit(0)
    try:
        took = build()
    except RuntimeError as exc:
        print("mmcv {} for the tests could not be built (those tests will skip): {}".format(MMCV_VERSION, exc),
              file=sys.stderr)
        sys.exit(1)
    print("mmcv {} for the tests built into {} in {:.1f} s".format(MMCV_VERSION, HOME, took))
