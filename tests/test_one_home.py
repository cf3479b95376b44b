"""Each small helper is defined once, the demo's helper modules import one way, dead code stays gone."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List

import pytest
from torch import nn

from mmcv.models.utils.unwrap import unwrap_model
from tools import plugin_manifest
from tools.metric_direction import HEADLINE_METRICS, directions, higher_is_better

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mmcv", "adzoo", "tools")


def _sources() -> List[Path]:
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")]
    return sorted(files + [ROOT / "demo_kd_50_pruning.py"])


def _definitions() -> Dict[str, List[str]]:
    """Top-level function / class / assignment names -> the files that define them."""
    found: Dict[str, List[str]] = {}
    for path in _sources():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name, home", [
    ("unwrap_model", "mmcv/models/utils/unwrap.py"),
    ("TRAINABLE_PREFIX", "mmcv/models/detectors/orion_student.py"),
    ("TRAINING_CHILDREN", "mmcv/models/detectors/orion_student.py"),
    ("HEADLINE_METRICS", "tools/metric_direction.py"),
    ("higher_is_better", "tools/metric_direction.py"),
    ("missing_sources", "tools/plugin_manifest.py"),
])
def test_helper_is_defined_once(name, home):
    assert _definitions().get(name) == [home]


@pytest.mark.parametrize("name", ["_unwrap", "_TRAINABLE_PREFIX", "_ALWAYS_TRAINING_CHILDREN", "_AUGMENTATION_CHILDREN",
                                  "LOWER_IS_BETTER", "load_head_selection", "_sync"])
def test_duplicates_and_dead_code_are_gone(name):
    assert name not in _definitions()


def test_shared_helpers_are_plugin_files():
    for rel in ("mmcv/models/utils/unwrap.py", "tools/metric_direction.py"):
        assert rel in plugin_manifest.PLUGIN_FILES


def test_installer_uses_the_manifest_missing_file_check():
    tree = ast.parse((ROOT / "tools" / "install_into_orion.py").read_text())
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert "missing_sources" in calls


def _imported_modules(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_demo_support_does_not_import_demo_joint():
    """demo_joint builds on demo_support, never the other way round (no import cycle)."""
    assert "tools.demo_joint" not in _imported_modules(ROOT / "tools" / "demo_support.py")


def test_the_loop_module_and_the_entry_point_have_different_names():
    assert not (ROOT / "adzoo" / "orion" / "apis" / "train_kd.py").exists()
    assert "adzoo.orion.apis.kd_loop" in _imported_modules(ROOT / "adzoo" / "orion" / "train_kd.py")


def test_sources_cite_no_file_outside_the_repository():
    # the background notes (split so that this file does not name them); ../shared/orion in test set-up is allowed
    words = ("ORION_" + "CONTRACT", "shared/" + "ORION_", "shared/" + "DESIGN", "shared/" + "STYLE",
             "ORIGINAL_KD_" + "GUIDE")
    offenders = [str(p.relative_to(ROOT)) for p in _sources() + sorted((ROOT / "tests").glob("*.py"))
                 if any(word in p.read_text() for word in words)]
    assert offenders == []


def test_unwrap_model_reaches_through_nested_wrappers():
    inner = nn.Linear(2, 2)
    wrapped = nn.DataParallel(nn.DataParallel(inner)) if hasattr(nn, "DataParallel") else inner
    assert unwrap_model(wrapped) is inner and unwrap_model(inner) is inner


def test_metric_direction():
    assert directions() == {"det_f1": True, "lane_iou": True, "qa_acc": True, "plan_l2": False}
    assert list(directions()) == list(HEADLINE_METRICS)
    assert not higher_is_better("plan_l2_3s") and not higher_is_better("plan_l2_light_hidden")
    assert higher_is_better("traffic_state_acc_hidden")
