"""ResumeCheckHook: a --resume-from that ORION's train.py dropped stops the run (or, when allowed, is logged)."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmcv.runner.hooks import HOOKS
from mmcv.runner.hooks.resume_check import ResumeCheckHook, requested_resume


def runner(tmp_path: Path, iteration: int = 0, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(iter=iteration, rank=rank, work_dir=str(tmp_path), logger=logging.getLogger("resume"))


@pytest.mark.parametrize("argv, expected", [
    (["cfg.py", "--launcher", "pytorch"], None),
    (["cfg.py", "--resume-from", "a.pth", "--deterministic"], "a.pth"),
    (["cfg.py", "--resume-from=b.pth"], "b.pth"),
    (["cfg.py", "--resume", "c.pth", "--work-dir", "w/"], "c.pth"),  # argparse prefix, as train.py accepts it
])
def test_requested_resume_reads_the_command_line_as_train_py_does(argv, expected) -> None:
    assert requested_resume(argv) == expected


def test_a_missing_resume_path_at_iteration_0_stops_with_one_line(tmp_path: Path) -> None:
    hook = HOOKS.build(dict(type="ResumeCheckHook", argv=["cfg.py", "--resume-from", "gone/iter_8.pth"]))
    with pytest.raises(SystemExit) as stop:
        hook.before_run(runner(tmp_path))
    text = str(stop.value.code)
    assert "\n" not in text and text.startswith("ResumeCheckHook: --resume-from gone/iter_8.pth is not a file")
    assert str(tmp_path) in text and "allow_fresh_start=True" in text
    with pytest.raises(SystemExit) as other_rank:
        hook.before_run(runner(tmp_path, rank=3))
    assert other_rank.value.code == 1  # only rank 0 prints the line


def test_a_resumed_run_an_existing_file_or_no_resume_pass(tmp_path: Path) -> None:
    ckpt = tmp_path / "iter_1.pth"
    ckpt.write_bytes(b"")
    ResumeCheckHook(argv=["--resume-from", "gone.pth"]).before_run(runner(tmp_path, iteration=4))
    ResumeCheckHook(argv=["--resume-from", str(ckpt)]).before_run(runner(tmp_path))  # iter_1.pth resumes at 0
    ResumeCheckHook(argv=["cfg.py"]).before_run(runner(tmp_path))


@pytest.mark.parametrize("hook_arg, argv", [
    (True, ["--resume-from", "gone.pth"]),
    (False, ["cfg.py", "--resume-from", "gone.pth", "--cfg-options", "runner.max_iters=4", "allow_fresh_start=True"]),
])
def test_allow_fresh_start_logs_the_line_and_trains(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    hook_arg: bool, argv: list) -> None:
    with caplog.at_level(logging.WARNING, logger="resume"):
        ResumeCheckHook(allow_fresh_start=hook_arg, argv=argv).before_run(runner(tmp_path))
    assert "is not a file" in caplog.text and "training from iteration 0" in caplog.text
