"""The standalone KD loop, its hooks, entry point and launcher, on a toy detector (tests/orion_kd_toy.py)."""
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
from typing import Any, Dict, List, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

import orion_kd_toy  # noqa: E402  (registers the toy types and test hooks)
from adzoo.orion.apis import kd_loop as loop  # noqa: E402
from adzoo.orion.apis.hooks import LoopRunner, build_custom_hooks, get_priority  # noqa: E402
from adzoo.orion.apis.optim import build_kd_optimizer, build_lr_scheduler, lr_factor_at  # noqa: E402
from adzoo.orion.apis.settings import ConfigError, read_log_settings, read_schedule  # noqa: E402
from mmcv.models.utils.batch_io import move_batch_to_device  # noqa: E402
from mmcv.runner.hooks.nonfinite_guard import NonFiniteTrainingError  # noqa: E402
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
    model=dict(type="OrionKDTestToyDetector", embed_dim=16, depth=3, drop=0.1, sleep=0.0, fail_rank=None,
               fail_iter=None),
    data=dict(samples_per_gpu=2, workers_per_gpu=0, train=dict(type="OrionKDTestToyDataset", num_samples=10),
              shuffler_sampler=dict(type="InfiniteGroupEachSampleInBatchSampler", seq_split_num=1)),
    optimizer=dict(constructor="LearningRateDecayOptimizerConstructor", type="AdamW", lr=1e-2, weight_decay=1e-4,
                   paramwise_cfg=dict(decay_rate=0.9, num_layers=3)),
    optimizer_config=dict(grad_clip=dict(max_norm=35, norm_type=2)),
    lr_config=dict(policy="CosineAnnealing", warmup="linear", warmup_iters=3, warmup_ratio=1.0 / 3,
                   min_lr_ratio=1e-3),
    runner=dict(type="IterBasedRunner", max_iters=12),
    checkpoint_config=dict(interval=2, max_keep_ckpts=3),
    log_config=dict(interval=2, hooks=[dict(type="TextLoggerHook"), dict(type="TensorboardLoggerHook")]),
    custom_hooks=[],
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
    directory.mkdir(parents=True, exist_ok=True)
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


def run_entry(*args: Any, cwd: Optional[Path] = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY)] + [str(a) for a in args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(*args: Any, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
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


def train_toy(cfg: Config, timestamp: str = "t0") -> torch.nn.Module:
    model = build_toy(cfg)
    loop.train_kd(model, [orion_kd_toy.OrionKDTestToyDataset(cfg.data.train.num_samples)], cfg, timestamp=timestamp)
    return model


def json_records(work_dir: Path) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in next(work_dir.glob("*.log.json")).read_text().splitlines()]


# --------------------------------------------------------------------------- pure pieces
def test_lr_is_linear_warmup_times_cosine_to_min_ratio() -> None:
    lc = dict(policy="CosineAnnealing", warmup="linear", warmup_iters=4, warmup_ratio=1.0 / 3, min_lr_ratio=1e-3)
    n = 20

    def expected(i: int) -> float:
        cos = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * i / n))
        return cos * (1 - (1 - i / 4) * (1 - 1.0 / 3) if i < 4 else 1.0)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([dict(params=[param], lr=0.5)], lr=0.5)
    scheduler = build_lr_scheduler(optimizer, lc, n)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    seen = []
    for _ in range(n + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * expected(i) for i in range(n + 1)], rel=1e-12)
    assert seen[0] == pytest.approx(0.5 / 3) and seen[n] == pytest.approx(0.5e-3)
    # by epoch: constant inside an epoch, cosine over epochs (no warmup here)
    lc_epoch = dict(policy="CosineAnnealing", min_lr_ratio=0.0)
    assert [lr_factor_at(i, 12, lc_epoch, iters_per_epoch=4, by_epoch=True) for i in (0, 3, 4, 8)] == \
        pytest.approx([1.0, 1.0, 0.75, 0.25])
    with pytest.raises(ConfigError, match="warmup must be 'linear'"):
        build_lr_scheduler(optimizer, dict(warmup="exp"), 10)


def test_layer_decay_groups_cover_only_trainable_params(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path)
    model = build_toy(cfg)
    opt, groups = build_kd_optimizer(model, cfg.optimizer)
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
    with pytest.raises(ConfigError, match="num_layers=2"):
        build_kd_optimizer(model, dict(cfg.optimizer, paramwise_cfg=dict(decay_rate=0.9, num_layers=2)))
    with pytest.raises(ConfigError, match="unknown keys"):
        build_kd_optimizer(model, dict(cfg.optimizer, paramwise_cfg=dict(decay_rat=0.9, num_layers=3)))


def test_batches_move_to_the_device_recursively() -> None:
    ds = orion_kd_toy.OrionKDTestToyDataset(4)
    moved = move_batch_to_device(ds.collate_fn([ds[0], ds[1]]), torch.device("cpu"))
    assert moved["img"].shape == (2, 2, 3, 16, 16)
    assert moved["img_metas"] == [dict(sample_idx=0), dict(sample_idx=1)]


def test_hook_priorities_follow_mmcv_and_keep_registration_order_within_a_level() -> None:
    names = [("normal_a", "NORMAL"), ("high", "HIGH"), ("normal_b", 50), ("lowest", "LOWEST"),
             ("very_high", "very_high"), ("int_20", 20), ("normal_c", None)]
    configs = [dict(type="OrionKDTestOrderHook", name=n, **({} if p is None else dict(priority=p))) for n, p in names]
    hooks = build_custom_hooks(configs)
    assert [h.name for h in hooks] == ["very_high", "int_20", "high", "normal_a", "normal_b", "normal_c", "lowest"]
    assert [h.priority for h in hooks] == [10, 20, 30, 50, 50, 50, 100]
    assert get_priority("ABOVE_NORMAL") == 40 and get_priority(0) == 0
    for bad in (101, "URGENT", 2.5):
        with pytest.raises(ConfigError, match="priority"):
            get_priority(bad)
    with pytest.raises(ConfigError, match="not registered in mmcv.runner.hooks.HOOKS.*custom_imports"):
        build_custom_hooks([dict(type="NoSuchHook")])


def test_the_runner_hooks_see_offers_exactly_the_contract_attributes() -> None:
    contract = {"iter", "max_iters", "epoch", "inner_iter", "model", "optimizer", "work_dir", "logger", "rank",
                "world_size", "meta", "outputs", "data_loader", "log_buffer"}
    runner = LoopRunner(torch.nn.Linear(1, 1), None, "/tmp", None, 0, 1, 10, meta={})
    public = {name for name in dir(runner) if not name.startswith("_")}
    assert public == contract
    with pytest.raises(AttributeError):
        runner.hooks = []  # nothing outside the contract can be attached
    runner.log_buffer.update(dict(a=1.0), 3)
    runner.log_buffer.update(dict(a=3.0), 1)
    assert runner.log_buffer.average() == dict(a=1.5)  # weighted by count, as mmcv's LogBuffer


# --------------------------------------------------------------------------- hooks in the loop
def _calls(hook: Any, stage: str) -> List[tuple]:
    return [c[1:] for c in hook.calls if c[0] == stage]


def test_iter_runner_calls_hooks_where_mmcv_iter_based_runner_does(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path, runner=dict(max_iters=7), custom_hooks=[dict(type="OrionKDTestRecordHook")])
    orion_kd_toy.OrionKDTestRecordHook.instances.clear()
    train_toy(cfg)
    hook = orion_kd_toy.OrionKDTestRecordHook.instances[-1]
    stages = [c[0] for c in hook.calls]
    assert stages[:3] == ["before_run", "before_epoch", "before_train_iter"]
    assert stages[-2:] == ["after_epoch", "after_run"] and "before_train_epoch" not in stages
    # (iter, epoch, inner_iter): iter is the index of the running iteration; 5 iterations per epoch
    assert _calls(hook, "before_train_iter") == [(i, i // 5, i % 5) for i in range(7)]
    assert _calls(hook, "after_train_iter") == _calls(hook, "before_train_iter")
    assert _calls(hook, "after_run") == [(7, 1, 2)]


def test_epoch_runner_calls_train_epoch_hooks_at_every_epoch_boundary(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path, runner=dict(type="EpochBasedRunner", max_epochs=2),
                  custom_hooks=[dict(type="OrionKDTestRecordHook")])
    orion_kd_toy.OrionKDTestRecordHook.instances.clear()
    train_toy(cfg)
    hook = orion_kd_toy.OrionKDTestRecordHook.instances[-1]
    assert _calls(hook, "before_train_epoch") == [(0, 0, 0), (5, 1, 0)]
    assert _calls(hook, "after_train_epoch") == [(4, 0, 4), (9, 1, 4)]
    assert not _calls(hook, "before_epoch") and len(_calls(hook, "after_train_iter")) == 10


def test_the_loop_sets_no_alpha_and_a_hook_sets_it_before_each_forward(tmp_path: Path) -> None:
    plain = train_toy(cfg_obj(tmp_path / "plain", runner=dict(max_iters=5)))
    assert plain.alpha_per_forward == [0.5] * 5  # the model's own alpha: the loop does not schedule it
    cfg = cfg_obj(tmp_path / "hooked", runner=dict(max_iters=5),
                  custom_hooks=[dict(type="OrionKDTestAlphaHook", switch_iter=3, high=0.8, low=0.6)])
    hooked = train_toy(cfg)
    assert hooked.alpha_per_forward == [0.8, 0.8, 0.8, 0.6, 0.6]
    assert not (Path(cfg.work_dir) / "student_export.pth").exists()  # exporting is a hook's job too


def test_hook_values_reach_the_log_and_hook_msgs_survive_a_resume(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path, runner=dict(max_iters=6), custom_hooks=[dict(type="OrionKDTestLogHook")])
    train_toy(cfg)
    records = json_records(Path(cfg.work_dir))
    assert [r["hook_value"] for r in records] == [0.5, 2.5, 4.0, 5.0]  # means over each logged window
    assert load(Path(cfg.work_dir) / "iter_4.pth")["meta"]["hook_msgs"] == dict(last_iter=3, iters_seen=4)
    resumed = cfg_obj(tmp_path / "resumed", runner=dict(max_iters=6), custom_hooks=[dict(type="OrionKDTestLogHook")],
                      resume_from=str(Path(cfg.work_dir) / "iter_4.pth"))
    train_toy(resumed, timestamp="t1")
    assert load(Path(resumed.work_dir) / "latest.pth")["meta"]["hook_msgs"] == dict(last_iter=5, iters_seen=6)


@pytest.mark.parametrize("precision, dtype", [(dict(mixed_precision="bf16"), torch.bfloat16),
                                              (dict(fp16=dict(loss_scale="dynamic")), torch.float16),
                                              (dict(fp16=dict(loss_scale=128.0)), torch.float16)])
def test_mixed_precision_runs_under_cpu_autocast_with_the_loss_scaler_saved(tmp_path: Path, precision: Dict[str, Any],
                                                                            dtype: torch.dtype) -> None:
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch build has no CPU autocast")
    cfg = cfg_obj(tmp_path, runner=dict(max_iters=6), **precision)
    model = train_toy(cfg)
    assert set(model.head_output_dtypes) == {dtype}  # every forward ran under autocast
    log = next(Path(cfg.work_dir).glob("*.log")).read_text()
    assert "precision {}".format("bf16" if dtype == torch.bfloat16 else "fp16") in log
    ckpt = load(Path(cfg.work_dir) / "latest.pth")
    if dtype == torch.float16:
        assert ckpt["scaler"]["scale"] > 0
        if precision["fp16"]["loss_scale"] == 128.0:  # a static scale never changes
            assert ckpt["scaler"]["scale"] == 128.0
    else:
        assert ckpt["scaler"] is None
    assert all(math.isfinite(r["total_loss"]) for r in json_records(Path(cfg.work_dir)))
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())


GUARD = dict(type="NonFiniteGuardHook", priority="ABOVE_NORMAL", max_consecutive_skips=3)


def _guarded_run(tmp_path: Path, max_iters: int, **over: Any) -> Any:
    """Train the toy with NonFiniteGuardHook; returns (step record hook, error or None)."""
    model_over = {k: over.pop(k) for k in ("nan_calls", "overflow_above") if k in over}
    cfg = cfg_obj(tmp_path, runner=dict(max_iters=max_iters), model=model_over, checkpoint_config=dict(interval=100),
                  custom_hooks=[GUARD, dict(type="OrionKDTestStepRecordHook", priority="LOWEST")], **over)
    orion_kd_toy.OrionKDTestStepRecordHook.instances.clear()
    try:
        train_toy(cfg)
        error = None
    except NonFiniteTrainingError as exc:
        error = exc
    return orion_kd_toy.OrionKDTestStepRecordHook.instances[-1], error


def test_the_guard_judges_each_step_by_its_own_loss_in_the_loop(tmp_path: Path) -> None:
    record, error = _guarded_run(tmp_path, 5, nan_calls=[3])
    w = record.weights
    assert error is None and len(w) == 5
    assert torch.equal(w[1], w[2])  # iteration 3 (NaN loss) skipped
    assert not torch.equal(w[2], w[3]) and not torch.equal(w[3], w[4])  # the finite steps after it applied


@pytest.mark.parametrize("loss_scale, overflow_above, stop", [("dynamic", 1024.0, None), ("dynamic", 0.0, 20),
                                                              (512.0, 0.0, 4)])
def test_the_guard_counts_steps_the_loss_scaler_skipped_in_the_loop(tmp_path: Path, loss_scale: Any,
                                                                    overflow_above: float, stop: Optional[int]) -> None:
    """A really enabled CPU GradScaler: a dynamic scaler's warm-up overflows (2**16 down to 2**10) train on,
    overflows at every scale stop once the scale is below 1, a static scale stops after the limit."""
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch build has no CPU autocast")
    record, error = _guarded_run(tmp_path, 24, overflow_above=overflow_above, fp16=dict(loss_scale=loss_scale))
    if stop is None:
        assert error is None and len(record.weights) == 24
        assert record.scales[:7] == [2.0 ** k for k in range(15, 9, -1)] + [1024.0]
        assert all(torch.equal(record.weights[0], w) for w in record.weights[:6])  # six overflow skips
        assert not torch.equal(record.weights[5], record.weights[6])  # then it trains
        assert json_records(Path(tmp_path / "wd"))[-1]["skipped_steps"] == 6.0
        return
    scale = 2.0 ** (16 - stop) if loss_scale == "dynamic" else loss_scale
    detail = "loss scale {:g} \\(was {:g}\\)".format(scale, 2 * scale) if loss_scale == "dynamic" \
        else "loss scale 512;"
    assert error is not None and re.match(
        r"non-finite training at iteration {}: loss terms finite on this rank, gradient norm (nan|inf), "
        r"optimizer.step\(\) not reached, {}.* 4 consecutive step\(s\) skipped".format(stop, detail), str(error)), error
    assert len(record.weights) == stop - 1 and all(torch.equal(record.weights[0], w) for w in record.weights)


def test_epoch_runner_logs_epoch_lines_and_saves_epoch_checkpoints(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path, runner=dict(type="EpochBasedRunner", max_epochs=2),
                  checkpoint_config=dict(interval=1, max_keep_ckpts=1), log_config=dict(interval=2))
    train_toy(cfg)
    wd = Path(cfg.work_dir)
    lines = [ln for ln in (wd / "t0.log").read_text().splitlines() if "Epoch [" in ln]
    assert lines and all(EPOCH_LINE.search(ln) for ln in lines), lines
    assert [EPOCH_LINE.search(ln).group(1, 2) for ln in lines] == [("1", "2"), ("1", "4"), ("1", "5"),
                                                                    ("2", "2"), ("2", "4"), ("2", "5")]
    assert sorted(p.name for p in wd.glob("*.pth")) == ["epoch_2.pth", "latest.pth"]
    ck = load(wd / "latest.pth")
    assert ck["meta"]["epoch"] == 2 and ck["meta"]["iter"] == 10


def test_a_missing_shuffler_sampler_is_a_config_error(tmp_path: Path) -> None:
    cfg = cfg_obj(tmp_path)
    del cfg.data["shuffler_sampler"]
    with pytest.raises(ConfigError, match="data.shuffler_sampler is not set"):
        train_toy(cfg)


# --------------------------------------------------------------------------- command line
def test_cli_logs_checkpoints_json_and_tensorboard(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    wd = tmp_path / "wd"
    res = run_entry(cfg_path, "--work-dir", wd)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = list(wd.glob("*.log"))
    assert len(logs) == 1
    lines = [ln for ln in logs[0].read_text().splitlines() if "Iter [" in ln]
    assert all(ITER_LINE.search(ln) for ln in lines), lines
    assert [int(ITER_LINE.search(ln).group(1)) for ln in lines] == [2, 4, 5, 6, 8, 10, 12]
    for key in ("task_loss", "backbone_distill_loss", "total_loss", "grad_norm"):
        assert key + ": " in lines[0]
    assert lines[0] in res.stdout  # also on the console
    assert "sampler InfiniteGroupEachSampleInBatchSampler" in res.stdout
    records = json_records(wd)
    assert [r["iter"] for r in records] == [2, 4, 5, 6, 8, 10, 12]
    assert {"lr", "time", "data_time", "memory", "task_loss", "total_loss"} <= set(records[0])
    lr = [r["lr"] for r in records]
    assert lr[0] == pytest.approx(1e-2 * lr_factor_at(1, 12, BASE_CFG["lr_config"]))  # the last step of the window
    # checkpoints: max_keep_ckpts=3, latest.pth is the newest, weights_only loadable, ORION's layout
    assert sorted(p.name for p in wd.glob("iter_*.pth")) == ["iter_10.pth", "iter_12.pth", "iter_8.pth"]
    ck = load(wd / "latest.pth")
    assert {"meta", "state_dict", "optimizer", "lr_scheduler", "scaler", "rng", "memory", "epoch", "iter"} <= set(ck)
    assert ck["iter"] == 12 and ck["meta"]["seed"] == 0 and "OrionKDTestToyDetector" in ck["meta"]["config"]
    assert ck["lr_scheduler"]["last_epoch"] == 12
    assert torch.equal(ck["state_dict"]["img_backbone.pos_embed"],
                       load(wd / "iter_12.pth")["state_dict"]["img_backbone.pos_embed"])
    assert (wd / "toy_kd.py").is_file()  # config dump
    assert not [p for p in wd.iterdir() if ".tmp." in p.name]
    try:
        import tensorboard  # noqa: F401
        assert list((wd / "tf_logs").glob("events.out.tfevents.*"))
    except ImportError:
        pass
    assert records[-1]["total_loss"] < records[0]["total_loss"]


def test_kill9_then_auto_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, custom_hooks=[dict(type="OrionKDTestRecordHook", out=str(tmp_path / "calls"))])
    ref = run_entry(cfg_path, "--work-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    wd = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ENTRY), str(cfg_path), "--work-dir", str(wd),
                             "--cfg-options", "model.sleep=0.25"], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (wd / "iter_4.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before the checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # between checkpoints
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
    calls = json.loads(Path(str(tmp_path / "calls") + ".rank0.json").read_text())
    assert [c[1] for c in calls if c[0] == "before_train_iter"] == list(range(done_before, 12))
    a = load(tmp_path / "ref" / "latest.pth")["state_dict"]
    b = load(wd / "latest.pth")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_gloo_processes_keep_identical_weights_and_loss_falls(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    cfg_path = write_config(tmp_path, custom_hooks=[dict(type="OrionKDTestDumpWeightsHook", dump_dir=str(dumps))])
    res = run_launcher(cfg_path, "2", "--work-dir", "wd", cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r0, r1 = load(dumps / "after_rank0.pth"), load(dumps / "after_rank1.pth")
    before = load(dumps / "before_rank0.pth")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert not torch.equal(r0["img_backbone.pos_embed"], before["img_backbone.pos_embed"])
    records = json_records(tmp_path / "wd")
    assert records[-1]["total_loss"] < records[0]["total_loss"]
    assert list((tmp_path / "wd").glob("dist_train_*.log"))  # console teed
    assert "Iter [12/12]" in res.stdout


def test_exception_in_one_rank_ends_the_job_nonzero(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, model=dict(fail_rank=1, fail_iter=3))
    res = run_launcher(cfg_path, "2", "--work-dir", "wd", cwd=tmp_path, timeout=150)  # a hang raises TimeoutExpired
    assert res.returncode != 0
    assert "toy failure on rank 1" in res.stdout + res.stderr


# --------------------------------------------------------------------------- bad input
def test_a_hook_type_nobody_registered_is_one_clear_error(tmp_path: Path) -> None:
    res = run_entry(write_config(tmp_path, custom_hooks=[dict(type="KDAlphaSchedulHook")]), "--work-dir",
                    tmp_path / "wd")
    assert res.returncode == 2
    assert "'KDAlphaSchedulHook' is not registered in mmcv.runner.hooks.HOOKS" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


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
