"""tools/gpu_check.sh on a machine without a GPU: its one line, its python steps' arguments, its summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from tools import gpu_check_summary, train_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools/gpu_check.sh"


def python_steps(out_dir: str) -> List[List[str]]:
    """Every ``"$PYTHON" tools/X.py ARGS`` command of the script, continuation lines joined, $OUT_DIR filled in."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        found = re.search(r'"\$PYTHON" (tools/\S+\.py)(.*?)(?:\|\||>|$)', line)
        if found:
            args = found.group(2).replace('"$OUT_DIR', '"' + out_dir).replace('"$ranks"', "2")
            args = re.sub(r'\$\{nccl\[@\]\+"\$\{nccl\[@\]\}"\}', "--nccl-status 0", args)
            steps.append([found.group(1)] + [a.strip('"') for a in args.split()])
    return steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_measures_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OUT_DIR=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu_check: no CUDA GPU visible to ")
    assert not (tmp_path / "out").exists()


def test_its_python_steps_materialise_the_teacher_and_parse_their_arguments(tmp_path: Path) -> None:
    steps = python_steps(str(tmp_path))
    assert [s[0] for s in steps] == ["tools/train_tiny_teacher.py", "tools/benchmark_backbone.py",
                                     "tools/benchmark_backbone.py", "tools/benchmark_backbone.py",
                                     "tools/benchmark_kd_step.py", "tools/gpu_check_summary.py"]
    assert train_tiny_teacher.parse_args(steps[0][1:]).materialize  # the shipped teacher, not a retraining
    assert gpu_check_summary.parse_args(steps[-1][1:]).ranks == 2
    for step in steps[1:5]:  # the benchmarks parse inside main(): every option the script passes is theirs
        usage = subprocess.run([sys.executable, step[0], "--help"], cwd=str(ROOT), stdout=subprocess.PIPE,
                               universal_newlines=True, timeout=120).stdout
        assert all(opt in usage for opt in step[1:] if opt.startswith("--")), (step, usage)
    assert "--dtype bf16" in " ".join(steps[1]) and "--student-mlp-hidden 1536" in " ".join(steps[2])
    budget = " ".join(steps[3])  # the budget chooses heads, channels and blocks for 3x at full ORION-L
    assert "--target-speedup 3 " in budget and "--depth 24 " in budget and "--dtype bf16" in budget
    assert "--save-config {}".format(os.path.join(str(tmp_path), "budget3x_config.json")) in budget
    outs = {step[step.index("--out") + 1] for step in steps[1:4]}
    assert {os.path.join(str(tmp_path), f) for f, _ in gpu_check_summary.BACKBONE_STEPS.values()} == outs


def test_its_steps_fit_in_eight_minutes_on_one_gpu() -> None:
    """Every step runs under `timeout N`; with one GPU (no NCCL run) they add up to less than 8 minutes."""
    one_gpu = SCRIPT.read_text().split('if [ "$GPUS" -ge 2 ]')[0]
    limits = [int(n) for n in re.findall(r"\btimeout (\d+) ", one_gpu)]
    assert len(limits) == 5 and sum(limits) <= 470


def test_its_nccl_run_passes_arguments_the_training_entry_point_takes(tmp_path: Path) -> None:
    from adzoo.orion.train_kd import parse_args

    text = SCRIPT.read_text().replace("\\\n", " ")
    found = re.search(r"bash adzoo/orion/orion_dist_train\.sh\s+(\S+) 2 (.*?) >", text)
    assert found, "the NCCL step must start the tiny KD config on 2 ranks with the repository's launcher"
    extra = [a.strip('"').replace("$OUT_DIR", str(tmp_path)) for a in found.group(2).split()]
    args = parse_args([found.group(1), "--launcher", "pytorch"] + extra)
    assert args.work_dir == str(tmp_path / "nccl_tiny_kd") and (ROOT / found.group(1)).is_file()
    assert gpu_check_summary.EXPORTED == "student_pruned.pth"


def _fake_results(out: Path) -> None:
    backbone = dict(device_name="NVIDIA H100", speedup=1.25, ceiling=1.29, peak_memory_ratio=0.9,
                    peak_memory_mb=dict(teacher=1000.0, student=900.0), sdpa_vs_math_speedup=2.0)
    (out / "benchmark_backbone.json").write_text(json.dumps(backbone))
    (out / "benchmark_backbone_joint.json").write_text(json.dumps(dict(backbone, speedup=1.9, ceiling=2.1)))
    budget = dict(target_speedup=3.0, predicted_speedup=3.02, chosen=dict(removed_blocks=[2, 5, 8, 11]))
    (out / "benchmark_backbone_budget3x.json").write_text(json.dumps(dict(backbone, speedup=2.87, ceiling=3.02,
                                                                          budget=budget)))
    kd = dict(settings={"tiny": dict(time_ratio=1.2, memory_ratio=1.1)})
    (out / "benchmark_kd_step.json").write_text(json.dumps(kd))


def test_summary_reports_each_ratio_and_the_exported_student(tmp_path: Path, capsys) -> None:
    _fake_results(tmp_path)
    assert gpu_check_summary.main(["--out-dir", str(tmp_path), "--ranks", "2", "--nccl-status", "0"]) == 1
    assert "student_pruned.pth NOT written" in capsys.readouterr().out
    (tmp_path / "nccl_tiny_kd").mkdir()
    (tmp_path / "nccl_tiny_kd/student_pruned.pth").write_bytes(b"")
    assert gpu_check_summary.main(["--out-dir", str(tmp_path), "--ranks", "2", "--nccl-status", "0"]) == 0
    out = capsys.readouterr().out
    assert "1.250x the teacher's speed (analytic ceiling 1.290x)" in out and "1.900x" in out
    assert "budgeted student (3x):" in out and "2.870x the teacher's speed (analytic ceiling 3.020x)" in out
    assert "the budget predicted 3.020x, teacher blocks removed: [2, 5, 8, 11]" in out
    assert "KD step (tiny):" in out and "1.200x the student-only step's time" in out
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["nccl"]["exported"] is True and summary["device"] == "NVIDIA H100"
    assert gpu_check_summary.main(["--out-dir", str(tmp_path), "--ranks", "0"]) == 0
    assert "skipped: fewer than 2 GPUs visible" in capsys.readouterr().out
    (tmp_path / "benchmark_backbone_budget3x.json").unlink()
    assert gpu_check_summary.main(["--out-dir", str(tmp_path), "--ranks", "0"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if "budgeted student (3x):" in line)
    assert line.split(":", 1)[1].strip().startswith("missing: the step failed")
    (tmp_path / "benchmark_kd_step.json").unlink()
    assert gpu_check_summary.main(["--out-dir", str(tmp_path), "--ranks", "0"]) == 1
