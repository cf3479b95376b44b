"""Import ORION's own modules from an ORION tree on a CPU, without running ORION's ``mmcv/__init__.py``.

Runs inside the tier's subprocesses (``scenarios.py``), never in the pytest process: this repository has
its own ``mmcv`` package. ORION's ``mmcv/__init__.py`` (and those of ``mmcv/core``, ``mmcv/datasets`` and
``mmcv/models``) import CUDA ops, the LLM stack and every dataset and head; here each of those packages is
a bare package object whose ``__path__`` is the tree's folder, and only the submodules a training run
needs are imported, from ORION's files. What cannot run here is replaced, and listed in ``STUBS``:
what ORION's file imports, why it cannot run, and what stands in.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types
from typing import Dict, Iterable, List

#: Every stub the tier may install: module -> why. ``installed_stubs()`` says which ones a run used.
STUBS: Dict[str, str] = {
    "peft": "the LLM stack (LoRA), imported by ORION's mmcv/utils/misc.py; no LLM runs here",
    "mmcv.utils.llava_llama": "ORION's LLaVA-LLaMA (mmcv/utils/llava_llama.py, transformers 4.45); no LLM runs here",
    "torchvision": "only if absent: mmcv/utils/checkpoint.py and visual.py use it for torchvision:// URLs "
                   "and image saving, neither of which the tier calls",
    "IPython": "only if absent: mmcv/datasets/samplers/group_sampler.py imports IPython.embed (a debugger)",
    "pycocotools": "only if absent: adzoo/orion/apis/test.py encodes mask results with it; the tier's "
                   "detector returns none",
    "cv2": "only if absent: mmcv/image reads and writes images with OpenCV; the tier's data are tensors",
    "mmcv.datasets.utils": "ORION's dataset helpers import every pipeline and mmcv.models' VGG; "
                           "adzoo/orion/apis/mmdet_train.py imports replace_ImageToTensor from it and calls "
                           "it only after an `assert False`",
}

#: Packages whose __init__.py is not run: they import CUDA ops, the LLM and every dataset and head.
BARE_PACKAGES = ("mmcv", "mmcv.core", "mmcv.core.evaluation", "mmcv.core.mask", "mmcv.datasets", "mmcv.models",
                 "mmcv.models.backbones", "mmcv.models.detectors", "mmcv.models.losses", "mmcv.models.utils")

_INSTALLED: List[str] = []


class _Unavailable(object):
    """Stands in for a class or function that cannot run here: calling it says so."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError("ORION-tree tier stub: {} is not available here ({})".format(
            self._name, _why(self._name.split(":")[0])))


def _why(module: str) -> str:
    return STUBS.get(module) or STUBS[module.split(".")[0]]


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that `import name.sub` finds the stubbed submodules too
    for attr, value in attrs.items():
        setattr(module, attr, value if value is not None else _Unavailable("{}:{}".format(name, attr)))
    sys.modules[name] = module
    _INSTALLED.append(name)
    return module


def _stub_if_absent(name: str, **attrs) -> None:
    if importlib.util.find_spec(name) is None:
        _stub(name, **attrs)


def _bare_package(name: str, root: str) -> types.ModuleType:
    folder = os.path.join(root, *name.split("."))
    module = types.ModuleType(name)
    module.__path__ = [folder]
    module.__file__ = os.path.join(folder, "__init__.py")
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _export(package: str, module_name: str, names: Iterable[str] = ()) -> None:
    """Do what the bare package's ``from .module import *`` (or ``import names``) would have done."""
    module = importlib.import_module(module_name)
    wanted = list(names) or getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in wanted:
        setattr(sys.modules[package], name, getattr(module, name))


def orion_version(root: str) -> str:
    """``__version__`` of the tree's mmcv (read, not imported)."""
    with open(os.path.join(root, "mmcv", "__init__.py")) as handle:
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", handle.read())
    return found.group(1) if found else "unknown"


def boot(root: str) -> None:
    """Make ``import mmcv...`` and ``import adzoo...`` load ORION's files under ``root`` (CPU stubs named)."""
    root = os.path.abspath(root)
    # ORION's environment does not have this repository installed: drop its editable-install finder.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path.insert(0, root)
    _stub("peft", LoraConfig=None, get_peft_model=None)
    _stub_if_absent("torchvision", models=None)
    if "torchvision" in _INSTALLED:
        _stub("torchvision.utils", make_grid=None, save_image=None)
    _stub_if_absent("IPython", embed=None)
    _stub_if_absent("pycocotools", mask=None)
    if "pycocotools" in _INSTALLED:
        _stub("pycocotools.mask", encode=None, decode=None)
    _stub_if_absent("cv2", imread=None, imwrite=None, resize=None)
    for name in BARE_PACKAGES:
        _bare_package(name, root)
    sys.modules["mmcv"].__version__ = orion_version(root)
    _stub("mmcv.utils.llava_llama", LlavaLlamaForCausalLM=None)
    _export("mmcv", "mmcv.fileio")
    _export("mmcv", "mmcv.utils")
    importlib.import_module("mmcv.runner")
    importlib.import_module("mmcv.optims")
    importlib.import_module("mmcv.models.builder")
    _export("mmcv.models", "mmcv.models.builder")
    importlib.import_module("mmcv.models.utils.layer_decay_optimizer_constructor")
    _export("mmcv.core.evaluation", "mmcv.core.evaluation.eval_hooks", ("DistEvalHook", "EvalHook",
                                                                       "CustomDistEvalHook"))
    _export("mmcv.core", "mmcv.core.evaluation.eval_hooks", ("DistEvalHook", "EvalHook", "CustomDistEvalHook"))
    _export("mmcv.core", "mmcv.core.mask.utils", ("encode_mask_results",))
    _export("mmcv.datasets", "mmcv.datasets.builder", ("DATASETS", "PIPELINES", "build_dataloader",
                                                       "build_dataset"))
    _stub("mmcv.datasets.utils", replace_ImageToTensor=None)
    sys.modules["mmcv.datasets"].replace_ImageToTensor = sys.modules["mmcv.datasets.utils"].replace_ImageToTensor


def installed_stubs() -> Dict[str, str]:
    """The stubs this process installed, with why."""
    return {name: _why(name) for name in _INSTALLED}
