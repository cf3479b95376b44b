"""The KD training loop, its entry point and launcher, on a toy detector (tests/orion_kd_toy.py)."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

import orion_kd_toy  # noqa: E402,F401  (registers the toy types)
from adzoo.orion.apis import train_kd as loop  # noqa: E402
from mmcv.utils import Config  # noqa: E402

ENTRY = ROOT / "adzoo" / "orion" / "train_kd.py"
LAUNCHER = ROOT / "adzoo" / "orion" / "orion_dist_train.sh"

# ORION's TextLoggerHook line (mmcv): "Iter [i/N]\tlr: ..., eta: h:mm:ss, time: ..., data_time: ..., memory: ..., k: v"
ITER_LINE = re.compile(
    r"Iter \[(\d+)/(\d+)\]\s+lr: \d\.\d{3}e[-+]\d{2}, eta: \d+:\d{2}:\d{2}, time: \d+\.\d{3}, "
    r"data_time: \d+\.\d{3}, memory: \d+(, [A-Za-z_][\w.]*: -?\d+\.\d{4})+$")
EPOCH_LINE = re.compile(r"Epoch \[(\d+)\]\[(\d+)/(\d+)\]\s+lr: \d\.\d{3}e[-+]\d{2}, eta: \d+:\d{2}:\d{2}, "
                        r"time: \d+\.\d{3}, data_time: \d+\.\d{3}, memory: \d+(, [A-Za-z_][\w.]*: -?\d+\.\d{4})+$")

BASE_CFG: Dict[str, Any] = dict(
    custom_imports=dict(imports=["orion_kd_toy"], allow_failed_imports=False),
    model=dict(type="OrionKDTestToyDetector", embed_dim=16, depth=3, drop=0.1, sleep=0.0, dump_dir=None,
               fail_rank=None, fail_iter=None),
    data=dict(samples_per_gpu=2, workers_per_gpu=0, train=dict(type="OrionKDTestToyDataset", num_samples=10)),
    optimizer=dict(constructor="LearningRateDecayOptimizerConstructor", type="AdamW", lr=1e-2, weight_decay=1e-4,
                   paramwise_cfg=dict(decay_rate=0.9, num_layers=3)),
    optimizer_config=dict(grad_clip=dict(max_norm=35, norm_type=2)),
    lr_config=dict(policy="CosineAnnealing", warmup="linear", warmup_iters=3, warmup_ratio=1.0 / 3,
                   min_lr_ratio=1e-3),
    runner=dict(type="IterBasedRunner", max_iters=12),
    checkpoint_config=dict(interval=2, max_keep_ckpts=3),
    log_config=dict(interval=2, hooks=[dict(type="TextLoggerHook"), dict(type="TensorboardLoggerHook")]),
    kd_config=dict(alpha_schedule="step", warmup_alpha=0.8, finetune_alpha=0.6, warmup_epochs=1),
    seed=0,
)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(directory: Path, name: str = "toy_kd.py", **over: Any) -> Path:
    """Write the toy config (with overrides merged into it) as a Python config file."""
    cfg = _merge(BASE_CFG, over)
    path = directory / name
    path.write_text("".join("{} = {!r}\n".format(k, v) for k, v in cfg.items()))
    return path


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), e.get("PYTHONPATH", "")])
    e["PYTHON"] = sys.executable
    e.setdefault("OMP_NUM_THREADS", "1")
    e.pop("ORION_KD_DEBUG", None)
    return e


def run_entry(*args: str, cwd: Optional[Path] = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY)] + [str(a) for a in args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(*args: str, cwd: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    e = env()
    e["MASTER_PORT"] = str(free_port())
    e["ORION_KD_DIST_TIMEOUT"] = "60"
    return subprocess.run(["bash", str(LAUNCHER)] + [str(a) for a in args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def load(path: Path) -> Dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def cfg_obj(tmp_path: Path, **over: Any) -> Config:
    cfg = Config.fromfile(str(write_config(tmp_path, **over)))
    cfg.work_dir = str(tmp_path / "wd")
    return cfg


def build_toy(cfg: Config) -> torch.nn.Module:
    from mmcv.models.builder import build_model
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model)


# --------------------------------------------------------------------------- pure pieces
def test_lr_is_linear_warmup_times_cosine_to_min_ratio() -> None:
    lc = dict(policy="CosineAnnealing", warmup="linear", warmup_iters=4, warmup_ratio=1.0 / 3, min_lr_ratio=1e-3)
    n = 20

    def cos(i: int) -> float:
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * i / n))

    for i in range(n + 1):
        warm = 1 - (1 - i / 4) * (1 - 1.0 / 3) if i < 4 else 1.0
        assert loop.lr_factor_at(i, n, lc) == pytest.approx(cos(i) * warm, rel=0, abs=1e-15)
    assert loop.lr_factor_at(0, n, lc) == pytest.approx(1.0 / 3)
    assert loop.lr_factor_at(n, n, lc) == pytest.approx(1e-3)
    # by epoch: constant inside an epoch, cosine over epochs (no warmup here)
    lc_epoch = dict(policy="CosineAnnealing", min_lr_ratio=0.0)
    assert [loop.lr_factor_at(i, 12, lc_epoch, iters_per_epoch=4, by_epoch=True) for i in (0, 3, 4, 8)] == \
        pytest.approx([1.0, 1.0, 0.75, 0.25])
    with pytest.raises(loop.ConfigError, match="warmup must be 'linear'"):
        loop.lr_factor_at(0, 10, dict(warmup="exp"))


def test_layer_decay_groups_cover_only_trainable_params(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path)
    model = build_toy(cfg)
    opt, groups = loop.build_kd_optimizer(model, cfg.optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad == name.startswith("img_backbone."), name
    by_name = {n: g for g in groups for n in g["names"]}
    lr = cfg.optimizer.lr
    # num_layers=3 -> ids: patch_embed/pos_embed 0, blocks.N N+1, other backbone params 4 (= num_layers+1)
    expect = {"img_backbone.patch_embed.proj.weight": 0.9 ** 4, "img_backbone.pos_embed": 0.9 ** 4,
              "img_backbone.blocks.0.fc1.weight": 0.9 ** 3, "img_backbone.blocks.2.fc2.bias": 0.9 ** 1,
              "img_backbone.norm.weight": 1.0}
    for name, scale in expect.items():
        assert by_name[name]["lr_scale"] == pytest.approx(scale), name
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert group_of[id(params["img_backbone.blocks.0.fc1.weight"])]["lr"] == pytest.approx(lr * 0.9 ** 3)
    assert group_of[id(params["img_backbone.blocks.0.fc1.weight"])]["weight_decay"] == pytest.approx(1e-4)
    for no_decay in ("img_backbone.blocks.0.fc1.bias", "img_backbone.pos_embed", "img_backbone.norm.weight"):
        assert group_of[id(params[no_decay])]["weight_decay"] == 0.0
    with pytest.raises(loop.ConfigError, match="num_layers=2"):
        loop.build_kd_optimizer(model, dict(cfg.optimizer, paramwise_cfg=dict(decay_rate=0.9, num_layers=2)))
    with pytest.raises(loop.ConfigError, match="unknown keys"):
        loop.build_kd_optimizer(model, dict(cfg.optimizer, paramwise_cfg=dict(decay_rat=0.9, num_layers=3)))


def test_batches_unwrap_datacontainers() -> None:
    batch = orion_kd_toy.OrionKDTestToyDataset.collate_fn([orion_kd_toy.OrionKDTestToyDataset(4)[i] for i in range(2)])
    moved = loop.move_batch_to_device(batch, torch.device("cpu"))
    assert moved["img"].shape == (2, 2, 3, 16, 16)
    assert moved["img_metas"] == [dict(sample_idx=0), dict(sample_idx=1)]


def test_sampler_order_depends_on_seed_and_epoch_and_skips_batches() -> None:
    s = loop.ResumableDistributedSampler(10, batch_size=2, num_replicas=2, rank=1, seed=3)
    assert s.num_batches == 3 and len(s) == 6
    s.set_epoch(1)
    full = list(s)
    s.set_start_batch(2)
    assert list(s) == full[4:]
    s2 = loop.ResumableDistributedSampler(10, batch_size=2, num_replicas=2, rank=1, seed=3)
    s2.set_epoch(1)
    assert list(s2) == full
    s2.set_epoch(2)
    assert list(s2) != full


# --------------------------------------------------------------------------- in-process loop
def test_epoch_runner_logs_epoch_lines_saves_epochs_and_sets_alpha(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path, runner=dict(type="EpochBasedRunner", max_epochs=2),
                  checkpoint_config=dict(interval=1, max_keep_ckpts=1), log_config=dict(interval=2),
                  mixed_precision="bf16")
    model = build_toy(cfg)
    loop.train_kd(model, [orion_kd_toy.OrionKDTestToyDataset(10)], cfg, timestamp="t0")
    wd = Path(cfg.work_dir)
    lines = [ln for ln in (wd / "t0.log").read_text().splitlines() if "Epoch [" in ln]
    assert lines and all(EPOCH_LINE.search(ln) for ln in lines), lines
    assert [EPOCH_LINE.search(ln).group(1, 2) for ln in lines] == [("1", "2"), ("1", "4"), ("1", "5"),
                                                                    ("2", "2"), ("2", "4"), ("2", "5")]
    assert model.alpha_history == [0.8, 0.6]
    assert sorted(p.name for p in wd.glob("*.pth")) == ["epoch_2.pth", "latest.pth", "student_export.pth"]
    ck = load(wd / "latest.pth")
    assert ck["meta"]["epoch"] == 2 and ck["meta"]["iter"] == 10 and ck["meta"]["distillation_alpha"] == 0.6
    assert "precision bf16" in (wd / "t0.log").read_text()


# --------------------------------------------------------------------------- command line
def test_cli_logs_checkpoints_json_tensorboard_and_export(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    wd = tmp_path / "wd"
    t0 = time.time()
    res = run_entry(cfg_path, "--work-dir", wd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - t0 < 60
    logs = list(wd.glob("*.log"))
    assert len(logs) == 1
    lines = [ln for ln in logs[0].read_text().splitlines() if "Iter [" in ln]
    assert all(ITER_LINE.search(ln) for ln in lines), lines
    assert [int(ITER_LINE.search(ln).group(1)) for ln in lines] == [2, 4, 5, 6, 8, 10, 12]
    for key in ("task_loss", "backbone_distill_loss", "total_loss", "grad_norm", "alpha"):
        assert key + ": " in lines[0]
    assert lines[0] in res.stdout  # also on the console
    records = [json.loads(x) for x in next(wd.glob("*.log.json")).read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 5, 6, 8, 10, 12]
    assert {"lr", "time", "data_time", "memory", "task_loss", "total_loss", "alpha"} <= set(records[0])
    assert [r["alpha"] for r in records] == [0.8, 0.8, 0.8, 0.6, 0.6, 0.6, 0.6]
    # checkpoints: max_keep_ckpts=3, latest.pth is the newest, weights_only loadable, ORION's layout
    assert sorted(p.name for p in wd.glob("iter_*.pth")) == ["iter_10.pth", "iter_12.pth", "iter_8.pth"]
    ck = load(wd / "latest.pth")
    assert {"meta", "state_dict", "optimizer", "lr_scheduler", "scaler", "rng", "epoch", "iter"} <= set(ck)
    assert ck["iter"] == 12 and ck["meta"]["seed"] == 0 and "OrionKDTestToyDetector" in ck["meta"]["config"]
    assert not any(k.startswith("teacher_backbone.") for k in ck["state_dict"])
    assert torch.equal(ck["state_dict"]["img_backbone.pos_embed"], load(wd / "iter_12.pth")["state_dict"]
                       ["img_backbone.pos_embed"])
    assert (wd / "student_export.pth").is_file()
    assert (wd / "toy_kd.py").is_file()  # config dump
    assert not list(wd.glob("*.tmp*"))
    try:
        import tensorboard  # noqa: F401
        assert list((wd / "tf_logs").glob("events.out.tfevents.*"))
    except ImportError:
        pass
    # loss falls
    assert records[-1]["total_loss"] < records[0]["total_loss"]


def test_kill9_then_auto_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    ref = run_entry(cfg_path, "--work-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    wd = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ENTRY), str(cfg_path), "--work-dir", str(wd),
                             "--cfg-options", "model.sleep=0.25"], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not (wd / "iter_4.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before the checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # mid-epoch, between checkpoints
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before = load(wd / "latest.pth")["iter"]
    assert done_before < 12

    res = run_entry(cfg_path, "--work-dir", wd, "--auto-resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a = load(tmp_path / "ref" / "latest.pth")["state_dict"]
    b = load(wd / "latest.pth")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ea = torch.load(str(tmp_path / "ref" / "student_export.pth"), weights_only=True)["state_dict"]
    eb = torch.load(str(wd / "student_export.pth"), weights_only=True)["state_dict"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_two_gloo_processes_keep_identical_weights_and_loss_falls(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    cfg_path = write_config(tmp_path, model=dict(dump_dir=str(dumps)))
    res = run_launcher(cfg_path, "2", "--work-dir", "wd", cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r0, r1 = load(dumps / "rank0.pth"), load(dumps / "rank1.pth")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    records = [json.loads(x) for x in next((tmp_path / "wd").glob("*.log.json")).read_text().splitlines()]
    assert records[-1]["total_loss"] < records[0]["total_loss"]
    assert list((tmp_path / "wd").glob("dist_train_*.log"))  # console teed
    assert "Iter [12/12]" in res.stdout


def test_exception_in_one_rank_ends_the_job_nonzero_within_60s(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, model=dict(fail_rank=1, fail_iter=3))
    t0 = time.time()
    res = run_launcher(cfg_path, "2", "--work-dir", "wd", cwd=tmp_path, timeout=90)
    elapsed = time.time() - t0
    assert res.returncode != 0
    assert elapsed < 60, elapsed
    assert "toy failure on rank 1" in res.stdout + res.stderr


# --------------------------------------------------------------------------- bad input
def test_missing_config_is_one_clear_error(tmp_path: Path) -> None:
    res = run_entry(tmp_path / "nope.py")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: config file not found: {}".format(tmp_path / "nope.py")


@pytest.mark.parametrize("args, message", [
    ([], "expected CONFIG and GPUS"),
    (["CFG", "abc"], "GPUS must be a positive integer, got 'abc'"),
    (["CFG", "0"], "GPUS must be a positive integer, got '0'"),
    (["missing.py", "2"], "config file not found: missing.py"),
])
def test_launcher_rejects_bad_arguments_with_usage(tmp_path: Path, args: Any, message: str) -> None:
    cfg_path = write_config(tmp_path)
    args = [str(cfg_path) if a == "CFG" else a for a in args]
    res = run_launcher(*args, cwd=tmp_path, timeout=30)
    assert res.returncode == 2
    assert message in res.stderr and "usage:" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("option, message", [
    ("runner.max_iter=3", "unknown key 'max_iter' under 'runner'"),
    ("runner.max_iters=abc", "runner.max_iters: the config holds int 12, got str 'abc'"),
])
def test_bad_cfg_options_are_one_clear_error(tmp_path: Path, option: str, message: str) -> None:
    res = run_entry(write_config(tmp_path), "--work-dir", tmp_path / "wd", "--cfg-options", option)
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path: Path) -> None:
    other = write_config(tmp_path, name="other.py", model=dict(embed_dim=8), runner=dict(max_iters=2))
    res = run_entry(other, "--work-dir", tmp_path / "other")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_entry(write_config(tmp_path), "--work-dir", tmp_path / "wd", "--resume-from",
                    tmp_path / "other" / "latest.pth")
    assert res.returncode == 2
    assert "does not fit the model" in res.stderr and "mis-shaped" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    res = run_entry(write_config(tmp_path), "--work-dir", tmp_path / "wd", "--load-from", tmp_path / "missing.pth")
    assert res.returncode == 2 and "checkpoint not found" in res.stderr


# --------------------------------------------------------------------------- OrionStudent errors reach the user
def _tiny_student_config(tmp_path: Path, teacher: Path) -> Path:
    base = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
    if not base.is_file():
        pytest.skip("the miniature world (orion_tiny_train.py) is not in this checkout")
    path = tmp_path / "tiny_student.py"
    path.write_text(
        "_base_ = [{!r}]\n".format(str(base))
        + "model = dict(type='OrionStudent', base_detector='TinyOrion', teacher_backbone_path={!r},\n".format(
            str(teacher))
        + "             freeze_non_backbone=True, img_backbone=dict(type='EVAViTStudent', num_heads=8,"
          " teacher_num_heads=16))\n")
    return path


@pytest.mark.parametrize("case", ["missing", "other_architecture"])
def test_teacher_checkpoint_errors_are_one_line(tmp_path: Path, case: str) -> None:
    teacher = tmp_path / "teacher.pth"
    if case == "other_architecture":
        torch.manual_seed(0)
        torch.save({"state_dict": orion_kd_toy.OrionKDTestToyDetector().state_dict()}, str(teacher))
    res = run_entry(_tiny_student_config(tmp_path, teacher), "--work-dir", tmp_path / "wd")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    if case == "missing":
        assert str(teacher) in res.stderr
    else:
        assert "img_backbone" in res.stderr or "shape" in res.stderr or "key" in res.stderr
