"""The ORION-KD plugin manifest: the one list of files the overlay copies into ORION.

Everything that decides *what* goes into an ORION checkout lives here, so the
installer, the setup check and the Python-3.8 compatibility tests agree. This
module is standalone-only, imports nothing but the standard library, and must
stay importable without any plugin file existing (they are checked when used).
Python 3.8 compatible: the installer may run under ORION's own interpreter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

#: Root of the ORION-KD checkout that holds this file (``tools/..``).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Files copied into ORION, as POSIX paths relative to the repository root.
#: The same relative path is used inside the ORION checkout; ORION has none of them (the
#: installer only adds files). Standalone-only files stay out: in ORION, ORION's own launcher,
#: train.py and runner train, so the standalone loop (adzoo/orion/apis/kd_loop.py,
#: adzoo/orion/train_kd.py) and its launcher (adzoo/orion/orion_dist_train.sh) are not copied.
PLUGIN_FILES: Tuple[str, ...] = (
    "mmcv/models/utils/checkpoint_io.py",
    "mmcv/models/utils/user_errors.py",
    "mmcv/models/utils/unwrap.py",
    "mmcv/models/utils/batch_io.py",
    "mmcv/models/utils/eva_surgery.py",
    "mmcv/models/utils/eva_cost.py",
    "mmcv/models/utils/head_importance.py",
    "mmcv/models/utils/pruning_cost.py",
    "mmcv/models/utils/selection_checks.py",
    "mmcv/models/utils/pruning_config.py",
    "mmcv/models/utils/kd_config.py",
    "mmcv/models/utils/label_subset.py",
    "mmcv/models/utils/student_selection.py",
    "mmcv/models/backbones/eva_layers.py",
    "mmcv/models/backbones/eva_taps.py",
    "mmcv/models/backbones/eva_vit_student.py",
    "mmcv/models/detectors/orion_student.py",
    "mmcv/models/losses/kd_losses.py",
    "mmcv/runner/hooks/nonfinite_guard.py",
    "mmcv/runner/hooks/kd_hooks.py",
    "mmcv/runner/hooks/resume_check.py",
    "adzoo/orion/configs/orion_stage3_kd_train.py",
    "adzoo/orion/configs/orion_stage3_kd_infer.py",
    "tools/__init__.py",
    "tools/head_pruning_utils.py",
    "tools/head_pruning/__init__.py",
    "tools/head_pruning/sites.py",
    "tools/head_pruning/batches.py",
    "tools/head_pruning/importance.py",
    "tools/head_pruning/channel_importance.py",
    "tools/head_pruning/block_importance.py",
    "tools/head_pruning/analysis.py",
    "tools/head_pruning/plots.py",
    "tools/head_pruning/cli.py",
    "tools/head_pruning/timing.py",
    "tools/head_pruning/budget.py",
    "tools/head_pruning/budget_cli.py",
    "tools/kd_setup_check.py",
    "tools/dependency_check.py",
    "tools/kd_setup_orion.py",
    "tools/export_onnx.py",
    "demo_kd_50_pruning.py",
    "tools/metric_direction.py",
    "tools/demo_support.py",
    "tools/demo_joint.py",
    "tools/bench_record.py",
)

#: Modules the KD config registers through ``custom_imports`` (in this order).
CUSTOM_IMPORTS: Tuple[str, ...] = (
    "mmcv.models.backbones.eva_vit_student",
    "mmcv.models.detectors.orion_student",
    "mmcv.models.losses.kd_losses",
    "mmcv.runner.hooks.kd_hooks",
    "mmcv.runner.hooks.resume_check",
)

#: Registry type names each custom-import module must register.
REGISTERED_TYPES: Dict[str, Tuple[str, ...]] = {
    "mmcv.models.backbones.eva_vit_student": ("EVAViTStudent",),
    "mmcv.models.detectors.orion_student": ("OrionStudent",),
    "mmcv.models.losses.kd_losses": ("CombinedKDLoss",),
    "mmcv.runner.hooks.kd_hooks": ("KDAlphaScheduleHook", "KDCheckHook", "KDExportStudentHook", "KDLrLogHook"),
    "mmcv.runner.hooks.resume_check": ("ResumeCheckHook",),
}

#: The registry (``module:NAME``) a module's types land in; ORION's model registry by default.
MODEL_REGISTRY = "mmcv.models.builder:MODELS"
REGISTRIES: Dict[str, str] = {
    "mmcv.runner.hooks.kd_hooks": "mmcv.runner.hooks:HOOKS",
    "mmcv.runner.hooks.resume_check": "mmcv.runner.hooks:HOOKS",
}

#: Files that must exist in a checkout for it to count as ORION.
ORION_MARKERS: Tuple[str, ...] = ("mmcv/models/builder.py", "adzoo")

#: Name of the install record written into the ORION root.
RECORD_NAME = ".orion_kd_install.json"


def registry_of(module: str) -> str:
    """``module:NAME`` of the registry that ``module`` registers its types in."""
    return REGISTRIES.get(module, MODEL_REGISTRY)


def module_to_path(module: str) -> str:
    """Relative source path of a dotted module name (``a.b.c`` -> ``a/b/c.py``)."""
    return module.replace(".", "/") + ".py"


def plugin_python_files() -> List[str]:
    """Manifest entries that are Python files (the ones checked for Python 3.8)."""
    return [p for p in PLUGIN_FILES if p.endswith(".py")]


def custom_imports_line(modules: Tuple[str, ...] = CUSTOM_IMPORTS) -> str:
    """The ``custom_imports`` line an ORION config needs to register the plugin."""
    names = ", ".join(repr(m) for m in modules)
    return "custom_imports = dict(imports=[{}], allow_failed_imports=False)".format(names)


def missing_sources(source_root: Path = REPO_ROOT, files: Sequence[str] = PLUGIN_FILES) -> List[str]:
    """Manifest entries that do not exist as regular files under ``source_root`` (the installer refuses then)."""
    return [rel for rel in files if not (Path(source_root) / rel).is_file()]


def _self_check() -> None:
    """Fail at import if the manifest contradicts itself (a custom import not shipped)."""
    for module in CUSTOM_IMPORTS:
        if module_to_path(module) not in PLUGIN_FILES:
            raise RuntimeError(
                "plugin manifest: custom import {!r} expects file {!r} in PLUGIN_FILES, "
                "which does not list it".format(module, module_to_path(module)))
        if module not in REGISTERED_TYPES:
            raise RuntimeError("plugin manifest: no REGISTERED_TYPES entry for {!r}".format(module))
    if len(set(PLUGIN_FILES)) != len(PLUGIN_FILES):
        raise RuntimeError("plugin manifest: PLUGIN_FILES lists a file twice")


_self_check()

__all__ = [
    "REPO_ROOT", "PLUGIN_FILES", "CUSTOM_IMPORTS", "REGISTERED_TYPES", "ORION_MARKERS",
    "RECORD_NAME", "MODEL_REGISTRY", "REGISTRIES", "registry_of", "module_to_path", "plugin_python_files",
    "custom_imports_line", "missing_sources",
]
