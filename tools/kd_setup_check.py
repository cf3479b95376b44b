"""Read-only checks that a KD run can start: environment, plugin, teacher checkpoint, data, disk.

Used by ``python demo_kd_50_pruning.py --check-setup [--config CFG]``. Every check prints one
PASS / WARN / FAIL line, with the fix when it is not PASS; nothing is written or changed. Runs
in both modes: standalone (light core) and inside an ORION checkout (Python 3.8, no mmengine).
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
PLUGIN_TYPES = ("EVAViTStudent", "OrionStudent", "CombinedKDLoss")
INSTALL_RECORD = ".orion_kd_install.json"


@dataclass
class Check:
    """One line of the setup report."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 8):
        return Check("python", FAIL, version, "use Python 3.8 or newer (ORION pins 3.8)")
    return Check("python", PASS, version)


def check_environment(root: str, orion_mode: bool) -> Optional[Check]:
    """One FAIL line when this interpreter lacks what every other check needs (torch; mmengine standalone)."""
    missing = []
    for name in ("torch",) if orion_mode else ("torch", "mmengine"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    detail = "{} (Python {}) cannot import {}".format(sys.executable, platform.python_version(), ", ".join(missing))
    if orion_mode:
        fix = "activate ORION's environment (conda activate orion, as ORION's README sets it up), then rerun"
    else:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        venv = os.path.relpath(os.path.join(repo, ".venv"))
        if os.path.isfile(os.path.join(venv, "bin", "python")):
            fix = "use the repository's environment: source {0}/bin/activate (or run {0}/bin/python)".format(venv)
        else:
            fix = "run make setup in {} (creates .venv with torch and mmengine), then source {}/bin/activate".format(
                os.path.relpath(repo), venv)
    return Check("environment", FAIL, detail, fix)


def check_torch(include_cuda: bool = True) -> List[Check]:
    import torch

    checks = []
    version = _version_tuple(torch.__version__)
    if version < (2, 0):
        checks.append(Check("torch", FAIL, torch.__version__, "ORION-KD needs torch >= 2.0"))
    elif version < (2, 1):
        checks.append(Check("torch", WARN, torch.__version__ + " (checkpoints cannot be memory-mapped)",
                            "torch >= 2.1 loads the teacher checkpoint with mmap=True"))
    else:
        checks.append(Check("torch", PASS, torch.__version__))
    if not include_cuda:
        return checks
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        checks.append(Check("cuda", PASS, f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}"))
    else:
        checks.append(Check("cuda", WARN, "no CUDA device: training runs on the CPU (Gloo)",
                            "fine for the miniature world; real ORION needs CUDA GPUs"))
    return checks


def check_libraries(orion_mode: bool) -> List[Check]:
    checks = []
    for name, needed in (("mmengine", not orion_mode), ("transformers", True)):
        try:
            module = importlib.import_module(name)
            checks.append(Check(name, PASS, getattr(module, "__version__", "installed")))
        except ImportError:
            if name == "mmengine" and orion_mode:
                checks.append(Check(name, PASS, "not needed inside ORION (ORION's own mmcv provides Config)"))
            else:
                status = FAIL if needed else WARN
                checks.append(Check(name, status, "not importable", f"pip install {name}"))
    return checks


def check_plugin(cfg: Any) -> Check:
    """Import ``custom_imports`` (or the standalone package) and look the plugin types up."""
    try:
        imports = list((cfg.get("custom_imports") or {}).get("imports", []))
        for name in imports:
            importlib.import_module(name)
        if not imports:
            importlib.import_module("mmcv.models")
        from mmcv.models.builder import MODELS
        from mmcv.runner.hooks import HOOKS
    except Exception as exc:  # any import failure is the finding itself
        return Check("plugin", FAIL, f"import failed: {type(exc).__name__}: {exc}",
                     "install the plugin: python tools/install_into_orion.py PATH/TO/Orion")
    hook_types = [hook["type"] for hook in (cfg.get("custom_hooks") or [])]
    missing = [name for name in PLUGIN_TYPES if MODELS.get(name) is None]
    missing += [name for name in hook_types if HOOKS.get(name) is None]
    if missing:
        return Check("plugin", FAIL, f"not registered: {missing}",
                     "add the plugin modules to custom_imports (see README_KD.md)")
    return Check("plugin", PASS, "registered: " + ", ".join(list(PLUGIN_TYPES) + hook_types))


def _teacher_backbone_cfg(cfg: Any) -> Dict[str, Any]:
    backbone = dict(cfg.model.get("img_backbone") or {})
    if backbone.get("type") == "EVAViTStudent":
        backbone.update(num_heads=backbone.get("teacher_num_heads", 16), selected_heads_per_layer=None,
                        mlp_hidden=None, selected_channels_per_layer=None, selected_blocks=None)
    backbone["type"] = "EVAViTStudent"
    backbone.setdefault("teacher_num_heads", backbone.get("num_heads", 16))
    return backbone


def teacher_path_of(cfg: Any) -> Optional[str]:
    model = cfg.get("model") or {}
    kd = model.get("kd_config") or {}
    return model.get("teacher_backbone_path") or kd.get("teacher_backbone_path") or cfg.get("load_from")


def check_teacher(cfg: Any, fix_hint: str) -> Check:
    """The teacher checkpoint exists, loads with ``weights_only=True`` and fits the config's backbone."""
    import torch

    path = teacher_path_of(cfg)
    if not path:
        return Check("teacher", FAIL, "the config names no teacher_backbone_path", "set model.kd_config.teacher_backbone_path")
    if not os.path.isfile(path):
        return unmaterialized_teacher(path) or Check("teacher", FAIL, f"Teacher model not found at {path}", fix_hint)
    try:
        from mmcv.models.backbones.eva_vit_student import EVAViTStudent
        from mmcv.models.utils.eva_surgery import extract_backbone_state_dict, is_selection_index_key
        teacher_state = extract_backbone_state_dict(path)
    except Exception as exc:
        return Check("teacher", FAIL, f"{path}: cannot be read with weights_only=True ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0]})", "re-save it as an ORION checkpoint of tensors")
    with torch.device("meta"):
        kwargs = {k: v for k, v in _teacher_backbone_cfg(cfg).items() if k != "type"}
        expected = EVAViTStudent(**kwargs).state_dict()
    expected = {k: v for k, v in expected.items() if not is_selection_index_key(k)}
    missing = [k for k in expected if k not in teacher_state]
    wrong = [f"{k}: expected {tuple(v.shape)}, got {tuple(teacher_state[k].shape)}" for k, v in expected.items()
             if k in teacher_state and tuple(teacher_state[k].shape) != tuple(v.shape)]
    if missing or wrong:
        detail = f"{path}: img_backbone does not match the config"
        detail += f"; missing {len(missing)} e.g. {missing[:2]}" if missing else ""
        detail += f"; mis-shaped {len(wrong)} e.g. {wrong[:2]}" if wrong else ""
        return Check("teacher", FAIL, detail, "use the checkpoint the config's img_backbone was trained with")
    from mmcv.models.utils.checkpoint_io import non_finite_tensors
    bad = non_finite_tensors(teacher_state)
    if bad:
        return Check("teacher", FAIL, f"{path}: {len(bad)} of {len(teacher_state)} img_backbone tensors hold NaN or "
                     f"infinite values (e.g. {bad[:2]})", "use the trained, finite ORION checkpoint")
    size_gb = os.path.getsize(path) / 2 ** 30
    return Check("teacher", PASS, f"{path} ({size_gb:.2f} GB): {len(expected)} img_backbone tensors fit the config")


def unmaterialized_teacher(path: str) -> Optional[Check]:
    """A WARN line when ``path`` is the miniature teacher that the demo writes from the shipped one; else None."""
    try:
        from tools.tiny_teacher_asset import (MATERIALIZED_CHECKPOINT, SHIPPED_TEACHER, TeacherAssetError,
                                              verify_shipped_teacher)
    except ImportError:  # inside ORION: no shipped miniature teacher
        return None
    if os.path.realpath(path) != os.path.realpath(MATERIALIZED_CHECKPOINT) or not SHIPPED_TEACHER.is_file():
        return None
    try:
        verify_shipped_teacher()
    except TeacherAssetError as exc:
        return Check("teacher", FAIL, f"{path} is not written yet and the shipped teacher is damaged: {exc}",
                     "restore it: git checkout -- ckpt/orion_tiny/")
    return Check("teacher", WARN, f"{path} is not written yet: the demo writes it from the shipped teacher "
                 f"({os.path.relpath(SHIPPED_TEACHER)}, sha256 checked)",
                 "nothing for the demo; before other commands: python tools/train_tiny_teacher.py --materialize")


def check_data(cfg: Any) -> Check:
    train = dict((cfg.get("data") or {}).get("train") or {})
    if not train:
        return Check("data", FAIL, "the config has no data.train", "add data.train")
    if train.get("type") == "SyntheticChatB2D":
        try:
            from mmcv.datasets import build_dataset
            sample = build_dataset(train)[0]
            return Check("data", PASS, f"synthetic Chat-B2D, generated on the fly (img {tuple(sample['img'].shape)})")
        except Exception as exc:
            return Check("data", FAIL, f"synthetic data failed: {type(exc).__name__}: {exc}", "see the traceback")
    roots = [train.get(key) for key in ("data_root", "ann_file") if train.get(key)]
    if not roots:
        roots = ["data/Chat-B2D/"]
    missing = [root for root in roots if not os.path.exists(root)]
    if missing:
        return Check("data", FAIL, f"not found: {missing}", "put the Chat-B2D dataset under data/Chat-B2D/ "
                     "(see ORION's data preparation guide) or fix data.train in the config")
    return Check("data", PASS, "found: " + ", ".join(roots))


def check_overlay(root: str) -> Check:
    record = os.path.join(root, INSTALL_RECORD)
    is_orion = os.path.isfile(os.path.join(root, "mmcv", "models", "detectors", "orion.py"))
    if is_orion and os.path.isfile(record):
        return Check("overlay", PASS, "ORION checkout with the ORION-KD plugin installed")
    if is_orion:
        return Check("overlay", FAIL, "ORION checkout without the plugin",
                     "python tools/install_into_orion.py . (from the ORION-KD repository)")
    return Check("overlay", PASS, "standalone ORION-KD (no ORION checkout here)")


def check_work_dir(work_dir: str, need_gb: float) -> List[Check]:
    existing = os.path.abspath(work_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    checks = []
    if os.access(existing, os.W_OK):
        checks.append(Check("work_dir", PASS, f"{work_dir} is writable"))
    else:
        checks.append(Check("work_dir", FAIL, f"{existing} is not writable", "pass --work-dir to a writable folder"))
    free_gb = shutil.disk_usage(existing).free / 2 ** 30
    status = PASS if free_gb >= need_gb else WARN
    checks.append(Check("disk", status, f"{free_gb:.1f} GB free (want >= {need_gb:g} GB)",
                        "" if status == PASS else "free disk space for checkpoints"))
    return checks


def run_setup_checks(config_path: str, root: str = ".") -> List[Check]:
    """All checks for ``config_path``; never raises for a finding (it becomes a FAIL line).

    Without torch (or, standalone, mmengine) the report is one FAIL line with the fix: nothing else can
    be checked. Inside an ORION checkout the config is loaded by ORION's own ``Config``.
    """
    orion_mode = os.path.isfile(os.path.join(root, "mmcv", "models", "detectors", "orion.py"))
    missing = check_environment(root, orion_mode)
    if missing is not None:
        return [check_python(), missing]
    checks = [check_python()] + check_torch(include_cuda=not orion_mode) + check_libraries(orion_mode)
    if not os.path.isfile(config_path):
        return checks + [Check("config", FAIL, f"not found: {config_path}", "pass --config PATH")]
    try:
        from mmcv.utils import Config
        cfg = Config.fromfile(config_path)
    except Exception as exc:
        return checks + [Check("config", FAIL, f"{config_path}: {type(exc).__name__}: {exc}",
                               "fix the config (ORION's base config must be present for the stage-3 config)")]
    try:
        from mmcv.models.utils.kd_config import check_kd_config_copies
        check_kd_config_copies(cfg)
    except (ImportError, ValueError) as exc:
        return checks + [Check("config", FAIL, f"{config_path}: {exc}", "give every KD setting once, in "
                               "model.kd_config")]
    checks.append(Check("config", PASS, config_path))
    checks.append(check_plugin(cfg))
    if orion_mode:
        return checks + orion_checks(cfg, config_path, root)
    tiny = (cfg.model.get("base_detector") == "TinyOrion"
            or ((cfg.get("data") or {}).get("train") or {}).get("type") == "SyntheticChatB2D")
    fix = ("python tools/train_tiny_teacher.py --materialize (writes it from the shipped teacher; the demo does it "
           "too)" if tiny else "put the fully trained ORION checkpoint at that path or set "
           "model.kd_config.teacher_backbone_path")
    checks.append(check_teacher(cfg, fix))
    checks.append(check_data(cfg))
    checks.append(check_overlay(root))
    checks.extend(check_work_dir(cfg.get("work_dir") or "work_dirs", 1.0 if tiny else 20.0))
    return checks


def orion_checks(cfg: Any, config_path: str, root: str) -> List[Check]:
    """What stops a run in an ORION checkout: teacher, every input path, plugin files, GPUs, flash-attn, launcher."""
    from tools import kd_setup_orion as orion

    checks = [check_teacher(cfg, "put ORION's released checkpoint (Orion.pth) there (ORION's layout: "
                                 "ckpts/Orion.pth) or set model.kd_config.teacher_backbone_path")]
    checks += orion.check_input_paths(cfg)
    checks.append(check_overlay(root))
    if os.path.isfile(os.path.join(root, INSTALL_RECORD)):
        checks.append(orion.check_installed_plugin(root))
    checks.append(orion.check_gpus(cfg))
    flash = orion.check_flash_attn(cfg)
    checks += [flash] if flash is not None else []
    checks += orion.check_launcher(root)
    work_dir = orion.launcher_work_dir(config_path)
    where = check_work_dir(work_dir, 20.0)
    where[0] = Check(where[0].name, where[0].status, f"{where[0].detail}: ORION's launcher sets it (after any "
                     "--work-dir of yours); checkpoints and student_pruned.pth land there, its console log in logs/",
                     where[0].fix)
    return checks + where


def format_checks(checks: List[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':6}{'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {len(checks) - failed - warned} PASS, {warned} WARN, {failed} FAIL")
    return "\n".join(lines)


def summary(checks: List[Check]) -> Mapping[str, int]:
    return {status: sum(c.status == status for c in checks) for status in (PASS, WARN, FAIL)}
