"""The demo's setup check, the benchmark scripts (smoke, not timing) and the end-to-end demo."""
from __future__ import annotations

import json
import statistics
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
        assert line in proc.stdout, proc.stdout
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


def test_benchmark_backbone_reports_its_raw_times_and_the_architecture_ceiling(tmp_path):
    from tests.eva_reference import reference_macs, reference_param_count
    from tools.benchmark_backbone import main
    out = tmp_path / "bench.json"
    result = main(["--depth", "3", "--image-size", "64", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for name, values in saved["times_s"].items():  # the medians and ratios are those of the raw times
        assert len(values) == 2 and saved["median_s"][name] == statistics.median(values)
    median = saved["median_s"]
    assert saved["speedup"] == median["teacher_sdpa"] / median["student_sdpa"]
    assert saved["sdpa_vs_math_speedup"] == median["teacher_math"] / median["teacher_sdpa"]
    times = saved["times_s"]  # every round's ratio, and the spreads, from the raw times
    assert saved["ratio_per_round"]["speedup"] == [t / s for t, s in zip(times["teacher_sdpa"], times["student_sdpa"])]
    assert saved["time_spread_s"]["student_sdpa"] == dict(min=min(times["student_sdpa"]), max=max(times["student_sdpa"]),
                                                          median=median["student_sdpa"])
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    assert saved["environment"]["cpu_model"] == names[0] and saved["environment"]["threads"] == torch.get_num_threads()
    assert len(saved["load_average"]) == 3 and saved["environment"]["torch"] == torch.__version__
    assert (saved["beyond_ceiling"] is None) == (saved["speedup"] <= saved["ceiling"])
    # the ceiling and sizes of ORION-L at depth 3 (windows 0, 1; global 2), 64 px, from the architecture
    geometry = dict(patch_size=16, in_chans=3, embed_dim=1024, mlp_hidden=2730, head_dim=64,
                    window_per_block=[16, 16, 0])
    teacher_macs = reference_macs(img_hw=(64, 64), heads_per_block=[16] * 3, **geometry)
    student_macs = reference_macs(img_hw=(64, 64), heads_per_block=[8] * 3, **geometry)
    assert saved["ceiling"] == pytest.approx(teacher_macs / student_macs, rel=1e-12)
    assert saved["efficiency"] == pytest.approx(saved["speedup"] / saved["ceiling"], rel=1e-12)
    for role, heads in (("teacher", 16), ("student", 8)):
        params = reference_param_count(embed_dim=1024, depth=3, heads_per_block=[heads] * 3, head_dim=64,
                                       mlp_hidden=2730, patch_size=16, pos_tokens=197)
        assert saved["params_m"][role] * 1e6 == pytest.approx(params, rel=1e-12)
    memory = saved["forward_memory_mb"]
    assert saved["peak_memory_ratio"] == memory["student"]["forward_extra_mb"] / memory["teacher"]["forward_extra_mb"]


def test_benchmark_backbone_times_a_budget_and_a_depth_pruned_configuration(tmp_path, capsys):
    from mmcv.models.utils.pruning_config import PruningConfig
    from tools.benchmark_backbone import main, orion_l_ceiling
    out = tmp_path / "budget.json"
    common = ["--depth", "3", "--image-size", "64", "--repeats", "2", "--warmup", "0", "--skip-math"]
    result = main([*common, "--skip-memory", "--target-speedup", "1.4", "--out", str(out),
                   "--save-config", str(tmp_path / "chosen.json")])
    budget = result["budget"]
    config = PruningConfig.load(tmp_path / "chosen.json")
    assert budget["config_file"] == str(tmp_path / "chosen.json") and budget["target_speedup"] == 1.4
    assert budget["predicted_speedup"] >= 1.4 and budget["predicted_speedup"] == pytest.approx(result["ceiling"])
    assert budget["measured_speedup"] == result["speedup"] and len(result["ratio_per_round"]["speedup"]) == 2
    assert budget["measured_over_analytic"] == pytest.approx(result["speedup"] / result["ceiling"])
    assert result["student_heads"] == [len(h) if b in config.kept_blocks else 0
                                       for b, h in enumerate(config.selected_heads_per_layer)]
    assert budget["floors"]["global_blocks"] == 1 and 2 in config.kept_blocks  # the proxy's one global block stays
    assert "measured / analytic" in capsys.readouterr().out
    # a configuration without block 2: timed at its own depth, memory measured in a child that drops it too
    removed = PruningConfig([[0, 1], [2, 3, 4], []], 16, 0.8, num_heads=[2, 3, 0], selected_blocks=[0, 1])
    removed.save(tmp_path / "removed.json")
    result = main([*common, "--pruning-config", str(tmp_path / "removed.json"), "--out", str(tmp_path / "r.json")])
    assert result["student_blocks"] == [0, 1] and result["student_heads"] == [2, 3, 0]
    assert result["ceiling"] == pytest.approx(orion_l_ceiling([2, 3, 0], [2730, 2730, 0], 64), rel=1e-12)
    assert result["params_m"]["student"] < result["params_m"]["teacher"] / 2
    assert result["forward_memory_mb"]["student"]["model_rss_mb"] < result["forward_memory_mb"]["teacher"]["model_rss_mb"]
    with pytest.raises(SystemExit):
        main(["--depth", "6", "--image-size", "64", "--pruning-config", str(tmp_path / "removed.json")])
    assert "time it at its own depth, --depth 3" in capsys.readouterr().err


def test_benchmark_kd_step_reports_its_raw_times_and_memory(tmp_path):
    from tools.benchmark_kd_step import main
    out = tmp_path / "kd.json"
    main(["--settings", "orion-l", "--depth", "3", "--image-size", "64", "--repeats", "2", "--out", str(out)])
    entry = json.loads(out.read_text())["settings"]["orion-l"]
    assert set(entry["times_s"]) == {"kd", "student_only"}
    for name, values in entry["times_s"].items():
        assert len(values) == 2 and entry["median_s"][name] == statistics.median(values)
    assert entry["time_ratio"] == entry["median_s"]["kd"] / entry["median_s"]["student_only"]
    kd, alone = entry["times_s"]["kd"], entry["times_s"]["student_only"]
    assert entry["ratio_per_round"]["time_ratio"] == [a / b for a, b in zip(kd, alone)]
    assert entry["ratio_spread"]["time_ratio"]["max"] == max(a / b for a, b in zip(kd, alone))
    memory = entry["peak_memory_mb"]
    assert set(memory) == {"kd", "student_only"} and entry["memory_ratio"] == memory["kd"] / memory["student_only"]


def test_demo_end_to_end(tmp_path):
    """The whole pipeline, every stage, with 16 iterations per epoch (--train-frames 128): report, plots, export."""
    work = tmp_path / "demo"
    proc = run_demo("--work-dir", str(work), "--skip-benchmark", "--random-draws", "2", "--train-frames", "128",
                    timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    for name in ("report.md", "importance_heatmap.png", "fidelity_vs_ratio.png", "loss_curves.png",
                 "pruning_config.json", "kd/student_pruned.pth"):
        assert (work / name).is_file(), name
    assert report["pruning_config"]["num_heads"] == [8, 8, 8, 8]
    assert set(report["after_kd_metrics"]) >= {"det_f1", "lane_iou", "qa_acc", "plan_l2"}
    assert report["after_kd_backbone"]["cosine"] > report["before_kd_backbone"]["cosine"]

    def train_rows(run: str) -> list:
        rows = [json.loads(line) for line in sorted((work / run).glob("*.log.json"))[-1].read_text().splitlines()
                if line.strip()]
        return [row for row in rows if row.get("mode") == "train"]

    # 3 epochs of 128 frames / 8 = 16 iterations, logged every 16; the KD run followed the step schedule
    # (alpha 0.8 in the first epoch, then 0.6); the control trained on the task loss alone
    kd_rows = train_rows("kd")
    assert [(row["epoch"], row["iter"]) for row in kd_rows] == [(1, 16), (2, 32), (3, 48)]
    assert [round(row["alpha"], 6) for row in kd_rows] == [0.8, 0.6, 0.6]  # logged from float32
    assert {round(row["alpha"], 6) for row in train_rows("task_only")} == {0.0}
    assert "| metric | chance | teacher |" in proc.stdout


def test_training_length_changes_dataset_sampler_and_alpha_schedule_together(tmp_path):
    from mmcv import Config
    from tools.demo_support import training_length_lines

    base = Config.fromfile(str(TINY_KD))
    (tmp_path / "short.py").write_text("\n".join([f"_base_ = [{str(TINY_KD)!r}]",
                                                  *training_length_lines(TINY_KD, 128, 2), ""]))
    cfg = Config.fromfile(str(tmp_path / "short.py"))
    assert cfg.data.train.num_samples == 128 and cfg.num_iters_per_epoch == 16 and cfg.runner.max_epochs == 2
    assert cfg.data.shuffler_sampler.num_iters_to_seq == 16
    assert cfg.data.shuffler_sampler.type == base.data.shuffler_sampler.type  # merged, not replaced
    assert [h["type"] for h in cfg.custom_hooks] == [h["type"] for h in base.custom_hooks]
    (schedule,) = [h for h in cfg.custom_hooks if h["type"] == "KDAlphaScheduleHook"]
    assert schedule["iters_per_epoch"] == 16
    (base_schedule,) = [h for h in base.custom_hooks if h["type"] == "KDAlphaScheduleHook"]
    assert "iters_per_epoch" not in base_schedule  # the shipped config counts the run's epochs
    with pytest.raises(ValueError, match=r"multiple of data.samples_per_gpu=8, got 100"):
        training_length_lines(TINY_KD, 100, None)


def test_demo_refuses_train_frames_that_are_not_whole_batches():
    proc = run_demo("--train-frames", "100")
    assert proc.returncode == 2 and "--train-frames must be a multiple of the tiny config's batch of 8" in proc.stderr
