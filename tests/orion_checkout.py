"""An installed copy of ORION's real tree for tests, and a way to run this repository's entry points in it.

The tree is the suite's ``orion_root`` fixture (``ORION_ROOT``, else ``../shared/orion``; ``tests/conftest.py``).
It is never written: it is copied to a temporary folder (without the executable bits, as ORION's
repository stores its scripts) and the plugin is installed there (``tests/orion_tree/tree.py``).

ORION's ``mmcv/__init__.py`` imports CUDA ops, OpenCV and the LLM stack. ``BOOT`` runs a script in the
copy with the packages ``mmcv`` and ``mmcv.models`` (and the plugin's subpackages) as bare package objects
over the tree's folders, so that only the modules a script imports run; it stubs ``peft`` (LoRA, imported
by ORION's ``mmcv/utils/misc.py``), ``mmcv.utils.llava_llama`` (the LLM) and, when absent, ``torchvision``,
``cv2`` and ``IPython``: nothing the setup check or the config calls.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from tests.orion_tree.tree import install_plugin

REPO = Path(__file__).resolve().parents[1]

BOOT = r"""
import importlib.machinery, importlib.util, os, re, runpy, sys, types
root = os.getcwd()
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [root] + [p for p in sys.path[1:] if os.path.realpath(p) != os.path.realpath(os.environ["REPO"])]
def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__path__, module.__spec__ = [], importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__dict__.update(attrs)
    sys.modules[name] = module
stub("peft", LoraConfig=None, get_peft_model=None)
if importlib.util.find_spec("torchvision") is None:
    stub("torchvision", models=None)
    stub("torchvision.utils", make_grid=None, save_image=None)
for name in ("cv2", "IPython"):
    if importlib.util.find_spec(name) is None:
        stub(name)
for name in ("mmcv", "mmcv.models", "mmcv.models.backbones", "mmcv.models.detectors", "mmcv.models.losses",
             "mmcv.models.utils"):
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = module
with open(os.path.join(root, "mmcv", "__init__.py")) as handle:
    sys.modules["mmcv"].__version__ = re.search(r"__version__ = '([^']+)'", handle.read()).group(1)
stub("mmcv.utils.llava_llama", LlavaLlamaForCausalLM=None)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def installed_orion_copy(tree: Path, dest: Path) -> Path:
    """Copy ``tree`` to ``dest`` (files mode 0644/0755 dirs, as git checks ORION out) and install the plugin."""
    shutil.copytree(str(tree), str(dest), ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    for folder, dirs, files in os.walk(str(dest)):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return install_plugin(dest)


def run_in_orion(copy: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in the ORION copy, as ORION's environment runs it (``BOOT``, no bytecode)."""
    env = dict(os.environ, PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", REPO=str(REPO))
    return subprocess.run([sys.executable, "-B", "-c", BOOT] + list(args), cwd=str(copy), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
