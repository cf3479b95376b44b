"""The demo's setup check, the benchmark scripts (smoke, not timing) and the end-to-end demo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcv.models  # noqa: F401
from mmcv import Config
from mmcv.models.builder import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_KD = ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"


def run_demo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "demo_kd_50_pruning.py"), *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def config_with_teacher(tmp_path: Path, teacher: Path) -> Path:
    cfg = tmp_path / "kd.py"
    cfg.write_text(f"_base_ = [{str(TINY_KD)!r}]\n"
                   f"model = dict(teacher_backbone_path={str(teacher)!r}, kd_config=dict("
                   f"teacher_backbone_path={str(teacher)!r}))\nwork_dir = {str(tmp_path / 'work')!r}\n")
    return cfg


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"meta": {}, "state_dict": build_model(base.model.to_dict()).state_dict()}, path)
    return path


def test_check_setup_passes_with_a_fitting_teacher_and_changes_nothing(tmp_path, random_teacher):
    cfg = config_with_teacher(tmp_path, random_teacher)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_demo("--check-setup", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("PASS  plugin", "PASS  teacher", "PASS  data", "WARN  cuda"):
        assert line in proc.stdout.replace("  ", "  "), proc.stdout
    assert "0 FAIL" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_setup_reports_a_missing_teacher_with_its_fix(tmp_path):
    cfg = config_with_teacher(tmp_path, tmp_path / "ckpt/orion/orion.pth")
    proc = run_demo("--check-setup", "--config", str(cfg))
    assert proc.returncode == 1
    assert f"Teacher model not found at {tmp_path / 'ckpt/orion/orion.pth'}" in proc.stdout
    assert "fix: python tools/train_tiny_teacher.py" in proc.stdout


def test_check_setup_reports_a_teacher_of_another_architecture(tmp_path):
    torch.manual_seed(0)
    base = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py"))
    base.model.img_backbone.depth = 3
    base.model.img_backbone.window_block_indexes = [0]
    teacher = tmp_path / "shallow.pth"
    torch.save({"state_dict": build_model(base.model.to_dict()).state_dict()}, teacher)
    proc = run_demo("--check-setup", "--config", str(config_with_teacher(tmp_path, teacher)))
    assert proc.returncode == 1
    assert "img_backbone does not match the config; missing 21" in proc.stdout


def test_benchmark_backbone_writes_ratios(tmp_path):
    from tools.benchmark_backbone import main
    out = tmp_path / "bench.json"
    result = main(["--depth", "3", "--image-size", "64", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("speedup", "ceiling", "efficiency", "sdpa_vs_math_speedup", "peak_memory_ratio"):
        assert key in saved and saved[key] > 0, key
    assert saved["params_m"]["student"] < saved["params_m"]["teacher"]
    assert result["ceiling"] == pytest.approx(saved["gmacs"]["teacher"] / saved["gmacs"]["student"])


def test_benchmark_kd_step_writes_ratios(tmp_path):
    from tools.benchmark_kd_step import main
    out = tmp_path / "kd.json"
    main(["--settings", "orion-l", "--depth", "3", "--image-size", "64", "--repeats", "1", "--out", str(out)])
    entry = json.loads(out.read_text())["settings"]["orion-l"]
    assert entry["time_ratio"] > 0 and entry["memory_ratio"] > 0
    assert set(entry["peak_memory_mb"]) == {"kd", "student_only"}


def test_demo_end_to_end(tmp_path):
    """The whole pipeline (trains the tiny teacher first when it is missing): report, plots, export."""
    work = tmp_path / "demo"
    proc = run_demo("--work-dir", str(work), "--skip-benchmark", "--random-draws", "2", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    for name in ("report.md", "importance_heatmap.png", "fidelity_vs_ratio.png", "loss_curves.png",
                 "pruning_config.json", "kd/student_export.pth"):
        assert (work / name).is_file(), name
    assert report["pruning_config"]["num_heads"] == [8, 8, 8, 8]
    assert set(report["after_kd_metrics"]) >= {"det_f1", "lane_iou", "qa_acc", "plan_l2"}
    assert report["after_kd_backbone"]["cosine"] > report["before_kd_backbone"]["cosine"]
    # the control really trained without distillation (alpha comes from the model's kd_config)
    assert report["task_only_backbone"]["cosine"] != report["after_kd_backbone"]["cosine"]
    assert "| metric | chance | teacher |" in proc.stdout
