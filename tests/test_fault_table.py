"""Issue 11's fault table: every bad input or fault, run as a user would, ends in one line and leaves nothing half-written.

Each row runs one command in a subprocess (the training entry point, the launcher, the importance
CLI or ``--check-setup``) and asserts its exit status, its one ``error:`` line (a regex), that no
traceback was printed, and that no partial file (``.*.tmp.*``, or the row's own) was left behind.
Rows run two at a time in one module fixture (they share nothing but read-only inputs), so the
table costs about as much as its slowest rows; a regression is one failing row.

Case numbers in the row ids are the issue's: 1 non-finite, 2 settings, 3 tracebacks, 4 hints,
5 temp files, 6 new inputs of the same families.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

from mmcv.models.utils.checkpoint_io import non_finite_tensors
from tests.test_train_kd_orion_student import save_random_teacher

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "adzoo" / "orion" / "train_kd.py"
LAUNCHER = ROOT / "adzoo" / "orion" / "orion_dist_train.sh"
CLI = ROOT / "tools" / "head_pruning_utils.py"
DEMO = ROOT / "demo_kd_50_pruning.py"
TINY_KD = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_kd_train.py"
TEACHER_MARK = "[OrionStudent]"  # printed once the teacher has loaded


@dataclass
class Row:
    """One fault: the command (``{d}`` = the shared inputs folder, ``{w}`` = this row's folder), what must come out."""

    id: str
    argv: Sequence[str]
    status: int
    message: str  # regex searched in the output; it must be on an ``error:`` (or FAIL) line
    absent: Sequence[str] = ()  # globs under the row's folder that must not exist afterwards
    before_teacher: bool = False  # the error must come before the teacher loads
    env: Dict[str, str] = field(default_factory=dict)
    limit_file_size: Optional[int] = None  # RLIMIT_FSIZE for the command: a file system that fills up
    check: Optional[Callable[[Path, str], None]] = None  # further assertions on (row folder, output)


def train(*args: str) -> List[str]:
    return [sys.executable, str(ENTRY), "{d}/kd.py", "--work-dir", "{w}/wd", *args]


def cli(*args: str) -> List[str]:
    return [sys.executable, str(CLI), *args]


def launcher(gpus: str, *args: str, config: str = "{d}/kd.py") -> List[str]:
    return ["bash", str(LAUNCHER), config, gpus, "--work-dir", "{w}/wd", *args]


def _latest_is_finite_and_nothing_exported(row_dir: Path, output: str) -> None:
    latest = row_dir / "wd" / "latest.pth"
    assert latest.is_file(), output[-2000:]
    state = torch.load(str(latest), map_location="cpu", weights_only=True)["state_dict"]
    assert not non_finite_tensors(state)


def _both_ranks_stopped(row_dir: Path, output: str) -> None:
    assert re.search(r"\[rank 0\] error: non-finite training", output) and \
        re.search(r"\[rank 1\] error: non-finite training", output), output[-3000:]
    _latest_is_finite_and_nothing_exported(row_dir, output)


def _stale_temp_removed(row_dir: Path, output: str) -> None:
    assert not list((row_dir / "wd").glob(".*.tmp.*"))
    assert "left by an interrupted run" in output


NO_EXPORT = ("wd/student_pruned*", "wd/**/.*.tmp.*")
PORT_BUSY = "PORT_BUSY"

ROWS: List[Row] = [
    # 1: non-finite training stops, never saves or exports non-finite weights; a non-finite teacher is refused
    Row("1-nan-loss-stops-with-the-iteration-and-terms", train("--cfg-options", "optimizer.lr=1000000.0"), 1,
        r"^error: non-finite training at iteration \d+: loss terms \[.*'total_loss'.*\], gradient norm nan; 2 "
        r"consecutive step\(s\) skipped \(limit NonFiniteGuardHook.max_consecutive_skips=1\)", NO_EXPORT,
        check=_latest_is_finite_and_nothing_exported),
    Row("1-nan-under-ddp-all-ranks-stop-together", launcher("2", "--cfg-options", "optimizer.lr=1000000.0"), 1,
        r"^\[rank \d\] error: non-finite training at iteration \d+", NO_EXPORT, check=_both_ranks_stopped),
    Row("1-nan-teacher-refused-at-load", train("--cfg-options", "model.kd_config.teacher_backbone_path={d}/nan.pth"),
        2, r"^error: teacher .*nan.pth \(img_backbone\): \d+ of \d+ tensors hold NaN or infinite values", NO_EXPORT),
    Row("1-nan-teacher-fails-check-setup", [sys.executable, str(DEMO), "--check-setup", "--config", "{d}/nan_kd.py"], 1,
        r"^FAIL\s+teacher\s+.*nan.pth: \d+ of \d+ img_backbone tensors hold NaN or infinite values"),
    # 2: one source of truth per setting
    Row("2-distillation-loss-disagreeing-with-kd-config",
        [sys.executable, str(ENTRY), "{d}/loss_twice.py", "--work-dir", "{w}/wd"], 2, r"^error: model.distillation_loss.temperature=2.0 but model.kd_config.distillation_temperature=3.0: give "
           r"the value once"),
    Row("2-top-level-kd-config-disagreeing-with-the-model",
        [sys.executable, str(ENTRY), "{d}/top_kd.py", "--work-dir", "{w}/wd"], 2,
        r"^error: kd_config.pruning_ratio=0.3 but model.kd_config.pruning_ratio=0.5: the model reads model.kd_config "
        r"only", before_teacher=True),
    Row("2-top-level-kd-config-override-is-not-dropped", train("--cfg-options", "kd_config.pruning_ratio=0.3"), 2,
        r"^error: --cfg-options kd_config.pruning_ratio: unknown key 'kd_config'.*--cfg-options "
        r"model.kd_config.pruning_ratio=", before_teacher=True),
    Row("2-kd-config-temperature-is-honoured", train("--cfg-options", "model.kd_config.distillation_temperature=0.0"),
        2, r"^error: CombinedKDLoss: temperature must be > 0, got 0.0"),
    # 3: one line instead of a traceback
    *[Row("3-teacher-" + name, train("--cfg-options", "model.kd_config.teacher_backbone_path={d}/" + name + ".pth"),
          2, r"^error: .*" + name + r".pth: " + reason, NO_EXPORT)
      for name, reason in (("empty", r"the file is empty \(0 bytes"), ("text", r"not a torch checkpoint"),
                           ("truncated", r"truncated or corrupted"), ("bare", r"expected a dict .* got Tensor"),
                           ("emptydict", r"no 'img_backbone\.\*' keys"),
                           ("shapes", r"img_backbone.blocks.0.attn.q_proj.weight has shape \(3,\)"),
                           ("pickled", r"refused to unpickle"))],
    *[Row("3-resume-" + name, train("--resume-from", "{d}/" + name + ".pth"), 2,
          r"^error: .*" + name + r".pth: " + reason, NO_EXPORT)
      for name, reason in (("empty", r"the file is empty"), ("text", r"not a torch checkpoint"),
                           ("truncated", r"truncated or corrupted"), ("bare", r"expected a dict"))],
    Row("3-resume-every-shape-wrong", train("--resume-from", "{d}/shapes.pth"), 2,
        r"^error: checkpoint .*shapes.pth does not fit the model: img_backbone.blocks.0.attn.head_index: the checkpoint "
        r"holds img_backbone.blocks.0.attn.\* tensors without", NO_EXPORT),
    Row("3-cli-missing-config", cli("importance", "--config", "{d}/nope.py", "--out", "{w}/imp.json"), 2,
        r"^error: config file not found: .*nope.py", ("imp.json",)),
    Row("3-cli-config-syntax-error", cli("importance", "--config", "{d}/syntax.py", "--out", "{w}/imp.json"), 2,
        r"^error: .*syntax.py: syntax error at line 2: ", ("imp.json",)),
    Row("3-cli-ratio-out-of-range", cli("prune-config", "--importance", "{d}/imp.json", "--pruning-ratio", "1.5",
                                        "--out", "{w}/prune.json"), 2,
        r"^error: pruning_ratio: expected the fraction of heads REMOVED in \[0, 1\) \(0.5 keeps half\), got 1.5",
        ("prune.json",)),
    Row("3-cli-text-checkpoint", cli("importance", "--config", str(TINY_KD), "--checkpoint", "{d}/text.pth", "--out",
                                     "{w}/imp.json"), 2, r"^error: .*text.pth: not a torch checkpoint", ("imp.json",)),
    Row("3-cli-pickled-checkpoint", cli("importance", "--config", str(TINY_KD), "--checkpoint", "{d}/pickled.pth",
                                        "--out", "{w}/imp.json"), 2, r"^error: .*pickled.pth: refused to unpickle",
        ("imp.json",)),
    Row("3-cli-unwritable-output", cli("importance", "--config", str(TINY_KD), "--checkpoint", "{d}/teacher.pth",
                                       "--out", "{d}/teacher.pth/imp.json"), 2,
        r"^error: --out: the folder of .*teacher.pth is a file, not a folder"),
    Row("3-config-syntax-error", [sys.executable, str(ENTRY), "{d}/syntax.py", "--work-dir", "{w}/wd"], 2,
        r"^error: .*syntax.py: syntax error at line 2: ", before_teacher=True),
    Row("3-work-dir-not-writable", [sys.executable, str(ENTRY), "{d}/kd.py", "--work-dir", "{d}/teacher.pth/wd"], 2,
        r"^error: work dir .*teacher.pth/wd: .*teacher.pth is a file, not a folder", before_teacher=True),
    Row("3-disk-full-during-a-save", train(), 2, r"^error: .*iter_1.pth.*: File too large; the file system refuses",
        ("wd/iter_*.pth", "wd/latest.pth") + NO_EXPORT, limit_file_size=2 * 2 ** 20),
    Row("3-checkpoint-interval-zero", train("--cfg-options", "checkpoint_config.interval=0"), 2,
        r"^error: checkpoint_config.interval must be a positive integer, got 0", before_teacher=True),
    Row("3-log-interval-negative", train("--cfg-options", "log_config.interval=-1"), 2,
        r"^error: log_config.interval must be positive, got -1", before_teacher=True),
    Row("3-port-in-use", launcher("1", config="{d}/kd.py"), 2,
        r"^error: MASTER_PORT \d+ on 127.0.0.1 is already in use \(another job\?\): set MASTER_PORT to a free port",
        env={"MASTER_PORT": PORT_BUSY}, before_teacher=True),
    Row("3-launcher-user-error-is-exit-2-with-usage", launcher("1", "--cfg-options", "checkpoint_config.interval=0"), 2,
        r"^error: checkpoint_config.interval must be a positive integer", before_teacher=True),
    Row("3-launcher-passes-a-rank-s-user-error-through",
        launcher("1", "--cfg-options", "model.kd_config.teacher_backbone_path={d}/bare.pth"), 2,
        r"^error: .*bare.pth: expected a dict"),
    Row("3-malformed-pruning-json", [sys.executable, str(ENTRY), "{d}/pc_bad.py", "--work-dir", "{w}/wd"], 2,
        r"^error: .*bad_prune.json: not valid JSON \(Expecting"),
    Row("3-pruning-ratio-half-in-a-file", [sys.executable, str(ENTRY), "{d}/pc_half.py", "--work-dir", "{w}/wd"], 2,
        r"^error: .*half_prune.json: key 'pruning_ratio' must be a number, got 'half'"),
    Row("3-check-setup-on-an-empty-teacher",
        [sys.executable, str(DEMO), "--check-setup", "--config", "{d}/emptydict_kd.py"], 1,
        r"^FAIL\s+teacher\s+.*emptydict.pth: .*no tensors found"),
    # 4: hints that fit the mistake
    Row("4-num-heads-zero", train("--cfg-options", "model.img_backbone.num_heads=0"), 2,
        r"^error: num_heads\[0\]: expected 1..16 \(teacher_num_heads\), got 0"),
    Row("4-num-heads-seventeen", train("--cfg-options", "model.img_backbone.num_heads=17"), 2,
        r"^error: num_heads\[0\]: expected 1..16 \(teacher_num_heads\), got 17"),
    Row("4-num-heads-wrong-total", train("--cfg-options", "model.img_backbone.num_heads=6"), 2,
        r"^error: .*pruning_ratio 0.5 is the fraction of heads REMOVED: it keeps 8 of 16 .*but the selection keeps 24 "
        r".*fix: keep 8 heads per block \(num_heads\), or set pruning_ratio to 0.625"),
    # (num_heads given: without it, pruning_ratio 0 keeps every head, a valid student)
    Row("4-pruning-ratio-zero-does-not-suggest-one",
        train("--cfg-options", "model.kd_config.pruning_ratio=0.0", "model.img_backbone.num_heads=8"), 2,
        r"^error: .*pruning_ratio 0 is the fraction of heads REMOVED: it keeps 16 of 16 .*set pruning_ratio to 0.5, "
        r"the fraction this selection removes"),
    # 5: temporary files of a killed run are removed when a run starts
    Row("5-stale-temp-files-removed-at-start", train("--resume-from", "{d}/bare.pth"), 2, r"^error: .*bare.pth",
        ("wd/.*.tmp.*",), check=_stale_temp_removed),
    # 6: more inputs of the same families
    Row("6-max-iters-zero", train("--cfg-options", "runner.max_iters=0"), 2,
        r"^error: runner.max_iters must be a positive integer, got 0", before_teacher=True),
    Row("6-samples-per-gpu-zero", train("--cfg-options", "data.samples_per_gpu=0"), 2,
        r"^error: data.samples_per_gpu must be > 0", before_teacher=True),
    Row("6-guard-limit-negative", train("--cfg-options", "custom_hooks.2.max_consecutive_skips=-1"), 2,
        r"^error: NonFiniteGuardHook: max_consecutive_skips must be an integer >= 0, got -1", before_teacher=True),
    Row("6-resume-file-missing", train("--resume-from", "{d}/nope.pth"), 2,
        r"^error: --resume-from: checkpoint not found: .*nope.pth", before_teacher=True),
    Row("6-unknown-cfg-option", train("--cfg-options", "optimizer.lrr=0.1"), 2,
        r"^error: --cfg-options optimizer.lrr: unknown key 'lrr' under 'optimizer'", before_teacher=True),
    Row("6-launcher-gpus-zero", launcher("0"), 2, r"^error: GPUS must be a positive integer, got '0'",
        before_teacher=True),
    Row("6-config-missing-base", [sys.executable, str(ENTRY), "{d}/nobase.py", "--work-dir", "{w}/wd"], 2,
        r"^error: .*nobase.py: a file it names does not exist: .*missing_base.py", before_teacher=True),
]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_inputs(folder: Path) -> None:
    """The tiny teacher, broken copies of it, configs and pruning files that every row reads (never writes)."""
    teacher = save_random_teacher(folder / "teacher.pth", 0)
    state = torch.load(str(teacher), map_location="cpu", weights_only=True)["state_dict"]
    torch.save(dict(state_dict={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                for k, v in state.items()}), str(folder / "nan.pth"))
    torch.save(dict(state_dict={k: torch.zeros(3) for k in state}), str(folder / "shapes.pth"))
    torch.save(torch.zeros(3), str(folder / "bare.pth"))
    torch.save({}, str(folder / "emptydict.pth"))
    (folder / "empty.pth").write_bytes(b"")
    (folder / "text.pth").write_text("hello, not a checkpoint\n")
    (folder / "truncated.pth").write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    with open(folder / "pickled.pth", "wb") as handle:
        torch.save({"x": _Pickled()}, handle)
    (folder / "syntax.py").write_text("model = dict(\n    type='OrionStudent'\n    base_detector='TinyOrion')\n")
    (folder / "nobase.py").write_text("_base_ = ['./missing_base.py']\n")
    kd = "\n".join([
        "_base_ = [{!r}]".format(str(TINY_KD)),
        "model = dict(kd_config=dict(teacher_backbone_path={!r}))".format(str(teacher)),
        "data = dict(samples_per_gpu=2, train=dict(num_samples=32))",
        "runner = dict(_delete_=True, type='IterBasedRunner', max_iters=6)",
        "checkpoint_config = dict(_delete_=True, interval=1, max_keep_ckpts=2)",
        "log_config = dict(_delete_=True, interval=1, hooks=[dict(type='TextLoggerHook')])",
        "custom_hooks = [dict(type='KDCheckHook', priority='VERY_HIGH'),",
        "                dict(type='KDAlphaScheduleHook'),",
        "                dict(type='NonFiniteGuardHook', priority='ABOVE_NORMAL', max_consecutive_skips=1),",
        "                dict(type='KDExportStudentHook', filename='student_pruned.pth')]",
        "seed = 0", ""])
    (folder / "kd.py").write_text(kd)
    base = "_base_ = [{!r}]\n".format(str(folder / "kd.py"))
    for name in ("nan", "emptydict"):
        (folder / "{}_kd.py".format(name)).write_text(
            base + "model = dict(kd_config=dict(teacher_backbone_path={!r}))\n".format(str(folder / (name + ".pth"))))
    (folder / "loss_twice.py").write_text(base + "model = dict(distillation_loss=dict(temperature=2.0))\n")
    (folder / "top_kd.py").write_text(base + "kd_config = dict(pruning_ratio=0.3)\n")
    subprocess.run(cli("importance", "--config", str(folder / "kd.py"), "--checkpoint", str(teacher), "--out",
                       str(folder / "imp.json")), check=True, capture_output=True, env=_env())
    subprocess.run(cli("prune-config", "--importance", str(folder / "imp.json"), "--pruning-ratio", "0.5", "--out",
                       str(folder / "prune.json")), check=True, capture_output=True, env=_env())
    payload = json.loads((folder / "prune.json").read_text())
    payload["pruning_ratio"] = "half"
    (folder / "half_prune.json").write_text(json.dumps(payload))
    (folder / "bad_prune.json").write_text((folder / "prune.json").read_text()[:40])
    for name in ("bad", "half"):
        (folder / "pc_{}.py".format(name)).write_text(
            base + "model = dict(pruning_config={!r}, kd_config=dict(head_selection=None))\n".format(
                str(folder / "{}_prune.json".format(name))))


class _Pickled:
    """An arbitrary object: a checkpoint holding it needs unpickling, which is refused."""


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("ORION_KD_DEBUG", None)
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", ORION_KD_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_row(row: Row, inputs: Path, row_dir: Path) -> subprocess.CompletedProcess:
    row_dir.mkdir(parents=True)
    if row.id.startswith("5-"):
        (row_dir / "wd").mkdir()
        for name in ("latest.pth", "iter_4.pth"):  # what a kill during a save leaves (its pid is gone)
            (row_dir / "wd" / ".{}.tmp.{}".format(name, _dead_pid())).write_bytes(b"\0" * 1024)
    argv = [a.replace("{d}", str(inputs)).replace("{w}", str(row_dir)) for a in row.argv]
    busy: Optional[socket.socket] = None
    env = _env(MASTER_PORT=str(_free_port()))
    if row.env.get("MASTER_PORT") == PORT_BUSY:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["MASTER_PORT"] = str(busy.getsockname()[1])

    def limit() -> None:
        if row.limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (row.limit_file_size, row.limit_file_size))

    try:
        return subprocess.run(argv, cwd=row_dir, env=env, capture_output=True, text=True, timeout=240,
                              preexec_fn=limit)
    finally:
        if busy is not None:
            busy.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Dict[str, tuple]:
    inputs = tmp_path_factory.mktemp("fault_inputs")
    _write_inputs(inputs)
    rows_dir = tmp_path_factory.mktemp("fault_rows")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {row.id: pool.submit(_run_row, row, inputs, rows_dir / row.id) for row in ROWS}
        return {row_id: (future.result(), rows_dir / row_id) for row_id, future in futures.items()}


def test_every_numbered_case_of_the_issue_has_a_row() -> None:
    assert {row.id.split("-")[0] for row in ROWS} == {"1", "2", "3", "4", "5", "6"}
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_fault_row(row: Row, results: Dict[str, tuple]) -> None:
    proc, row_dir = results[row.id]
    output = proc.stdout + proc.stderr
    assert proc.returncode == row.status, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    assert re.search(row.message, output, re.MULTILINE), output[-3000:]
    error_lines = [line for line in output.splitlines() if re.match(r"^(\[rank \d+\] )?error: ", line)]
    ranks = {re.match(r"^(\[rank \d+\] )?", line).group(0) for line in error_lines}
    assert len(error_lines) == max(1, len(ranks)) or row.message.startswith("^FAIL"), error_lines
    if row.before_teacher:
        assert TEACHER_MARK not in output, output[-2000:]
    if "launcher" in row.id or "port" in row.id:
        assert "usage:" in output if row.status == 2 else True
    for pattern in tuple(row.absent) + ("**/.*.tmp.*",):
        assert not list(row_dir.glob(pattern)), (pattern, sorted(str(p) for p in row_dir.rglob("*")))
    if row.check is not None:
        row.check(row_dir, output)
