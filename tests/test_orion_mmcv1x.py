"""ORION trains: the plugin installed into an ORION-shaped tree on the real mmcv 1.7.2 runner.

The tree (tests/orion_standin.py) is mmcv 1.7.2's package as ORION's ``mmcv`` plus ORION-like
models, datasets, train.py and custom_train_model. The plugin goes in with the installer, and
OrionStudent trains through ORION's train.py: mmcv's IterBasedRunner, Fp16OptimizerHook, the
layer-decay optimizer constructor, the streaming sampler and the KD ``custom_hooks``.
Every ORION-side process runs in a subprocess with ``-B`` and without this project's editable
install on the import path (ORION's environment does not have it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests.mmcv1x_env import ensure_mmcv1x
from tests.orion_standin import write_orion_tree

REPO = Path(__file__).resolve().parents[1]
# Run a script as __main__ with this project's editable-install finder removed from sys.meta_path.
BOOT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
        "getattr(f, '__module__', '')]; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
TINY_BACKBONE = dict(img_size=32, patch_size=8, window_size=2, embed_dim=32, depth=2, window_block_indexes=[0],
                     flash_attn=False, with_cp=False, drop_path_rate=0.1)
TEACHER_SCRIPT = """
import sys
import torch
from mmcv.utils import import_modules_from_strings
import_modules_from_strings(['mmcv.models.backbones.eva_vit_student'])
from mmcv.models import build_model
torch.manual_seed(0)
backbone = dict(type='EVAViTStudent', num_heads=4, teacher_num_heads=4, **%r)
model = build_model(dict(type='Orion', use_grid_mask=True, img_backbone=backbone,
                         pts_bbox_head=dict(type='StreamingDetHead', in_channels=32),
                         map_head=dict(type='LaneHead', in_channels=32)))
state = {k: v for k, v in model.state_dict().items()
         if not k.endswith(('.head_index', '.channel_index'))}  # ORION's EVAViT keys
torch.save(dict(meta={}, state_dict=state), sys.argv[1])
""" % (TINY_BACKBONE,)


@pytest.fixture(scope="module")
def mmcv1x() -> Dict[str, Path]:
    try:
        mmcv_dir, deps_dir = ensure_mmcv1x()
    except RuntimeError as exc:
        pytest.skip("mmcv 1.7.2 could not be built here (needs PyPI): {}".format(exc))
    return dict(mmcv=mmcv_dir, deps=deps_dir)


def orion_env(root: Path, deps: Path) -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH="{}{}{}".format(root, os.pathsep, deps), PYTHONDONTWRITEBYTECODE="1",
                PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def run_orion(root: Path, deps: Path, script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``script`` (a path relative to the ORION root, or absolute) there, as ORION's Python would."""
    return subprocess.run([sys.executable, "-B", "-c", BOOT, script] + list(args), cwd=str(root),
                          env=orion_env(root, deps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def run_installer(root: Path, deps: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-B", str(REPO / "tools/install_into_orion.py"), str(root)] + list(args),
                          env=orion_env(root, deps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=240)


def log_lines(work_dir: Path) -> List[dict]:
    """Per-iteration training records of mmcv's TextLoggerHook (``*.log.json``)."""
    records = []
    for path in sorted(work_dir.glob("*.log.json")):
        records += [json.loads(line) for line in path.read_text().splitlines() if '"mode": "train"' in line]
    return records


@pytest.fixture(scope="module")
def orion(mmcv1x, tmp_path_factory) -> Dict[str, Path]:
    """An ORION-shaped tree with the plugin installed, a teacher checkpoint and a tiny KD config."""
    base = tmp_path_factory.mktemp("orion_mmcv1x")
    root = write_orion_tree(base / "Orion", mmcv1x["mmcv"])
    installed = run_installer(root, mmcv1x["deps"])
    assert installed.returncode == 0, installed.stderr
    teacher = base / "teacher.pth"
    script = base / "make_teacher.py"
    script.write_text(TEACHER_SCRIPT)
    made = run_orion(root, mmcv1x["deps"], str(script), str(teacher))
    assert made.returncode == 0, made.stderr
    config = base / "kd_tiny.py"
    config.write_text(textwrap.dedent("""
        _base_ = [{kd!r}]
        teacher = {teacher!r}
        kd_config = dict(teacher_backbone_path=teacher)
        model = dict(teacher_backbone_path=teacher, kd_config=dict(teacher_backbone_path=teacher),
                     img_backbone=dict(num_heads=2, teacher_num_heads=4, **{backbone!r}))
        checkpoint_config = dict(interval=2)
        """).format(kd=str(root / "adzoo/orion/configs/orion_stage3_kd_train.py"), teacher=str(teacher),
                    backbone=TINY_BACKBONE))
    return dict(root=root, deps=mmcv1x["deps"], teacher=teacher, config=config, base=base)


@pytest.fixture(scope="module")
def kd_run(orion) -> Dict[str, Path]:
    """Six KD iterations through ORION's train.py, then a run resumed from iteration 2."""
    first, resumed = orion["base"] / "wd_first", orion["base"] / "wd_resumed"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]),
                     "--work-dir", str(first))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]),
                     "--work-dir", str(resumed), "--resume-from", str(first / "iter_2.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(first=first, resumed=resumed)


# --------------------------------------------------------------------------- the overlay
def test_kd_config_without_the_plugin_stops_with_one_line_naming_the_installer(mmcv1x, tmp_path: Path) -> None:
    root = write_orion_tree(tmp_path / "Orion", mmcv1x["mmcv"])
    configs = root / "adzoo/orion/configs"
    for name in ("orion_stage3_kd_train.py", "orion_stage3_kd_infer.py"):  # a user's copy, no plugin modules
        shutil.copy(str(REPO / "adzoo/orion/configs" / name), str(configs / name))
    proc = run_orion(root, mmcv1x["deps"], "adzoo/orion/train.py", "adzoo/orion/configs/orion_stage3_kd_train.py")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("orion_stage3_kd_train.py: the ORION-KD plugin is not installed here")
    assert "python tools/install_into_orion.py PATH/TO/Orion" in proc.stderr
    probe = tmp_path / "load_infer.py"
    probe.write_text("from mmcv import Config\nConfig.fromfile('adzoo/orion/configs/orion_stage3_kd_infer.py')\n")
    proc = run_orion(root, mmcv1x["deps"], str(probe))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "install_into_orion.py" in proc.stderr


# --------------------------------------------------------------------------- ORION trains OrionStudent
def test_alpha_follows_the_iteration_and_a_resumed_run_continues_it(kd_run) -> None:
    first, resumed = log_lines(kd_run["first"]), log_lines(kd_run["resumed"])
    # ORION's stand-in epoch is 3 iterations; warmup_epochs=1 -> alpha 0.8 for iterations 1-3 (1-based log)
    assert [(r["iter"], r["alpha"]) for r in first] == [(1, 0.8), (2, 0.8), (3, 0.8), (4, 0.6), (5, 0.6), (6, 0.6)]
    # mmcv 1.x (and ORION's fork) saves iter_N.pth in after_train_iter, before the counter moves: its
    # meta says iter N-1, so a resume repeats iteration N. Alpha is a function of runner.iter only,
    # so every resumed iteration gets exactly the alpha the uninterrupted run used there.
    resumed_at = torch.load(str(kd_run["first"] / "iter_2.pth"), map_location="cpu", weights_only=True)["meta"]["iter"]
    assert [r["iter"] for r in resumed] == list(range(resumed_at + 1, 7))
    alpha_of = {r["iter"]: r["alpha"] for r in first}
    assert [r["alpha"] for r in resumed] == [alpha_of[r["iter"]] for r in resumed]
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in first[resumed_at:]])  # ORION's lr hook too
    for record in first:
        assert record["loss"] == pytest.approx(record["total_loss"], abs=1e-4)
        assert record["total_loss"] == pytest.approx((1 - record["alpha"]) * record["task_loss"]
                                                     + record["alpha"] * record["backbone_distill_loss"], abs=1e-3)


def test_the_log_shows_the_top_layers_and_the_base_lr_beside_orions_first_group(kd_run) -> None:
    """ORION's lr is the first parameter group's: the lowest layer's under layer-wise decay (0.9**3 here)."""
    records = log_lines(kd_run["first"])  # mmcv's JSON log rounds to 5 decimals
    assert records and all(r["lr_top"] == pytest.approx(0.9 * r["lr_base"], abs=1e-5) for r in records)
    assert all(r["lr"] == pytest.approx(0.9 ** 3 * r["lr_base"], abs=1e-5) and r["lr"] < r["lr_top"]
               for r in records)


def test_frozen_heads_train_in_orions_mode_on_streamed_scenes(kd_run) -> None:
    first = log_lines(kd_run["first"])
    assert all("dn_loss_cls" in r for r in first)  # denoising exists only in training mode
    assert max(r["memory_used"] for r in first) == 1.0  # consecutive frames of one scene reach the memory
    assert all("grad_norm" in r for r in first)  # ORION's (mmcv's) Fp16OptimizerHook stepped


def test_only_the_student_backbone_changes_and_the_teacher_is_never_saved(orion, kd_run) -> None:
    teacher = torch.load(str(orion["teacher"]), map_location="cpu", weights_only=True)["state_dict"]
    saved = torch.load(str(kd_run["first"] / "iter_6.pth"), map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    assert saved["meta"]["iter"] == 5 and "optimizer" in saved  # 0-based index of the last iteration
    assert not any("teacher" in key for key in state)
    frozen = [k for k in state if not k.startswith("img_backbone.")]
    assert frozen and all(torch.equal(state[k], teacher[k]) for k in frozen)
    changed = [k for k in state if k.startswith("img_backbone.") and k in teacher
               and state[k].shape == teacher[k].shape and not torch.equal(state[k], teacher[k])]
    assert "img_backbone.patch_embed.proj.weight" in changed and "img_backbone.blocks.1.mlp.w3.weight" in changed
    assert state["img_backbone.blocks.0.attn.q_proj.weight"].shape == (16, 32)  # 2 of 4 heads, head_dim 8


def test_exported_student_loads_strictly_into_the_kd_inference_config(orion, kd_run) -> None:
    exported = kd_run["first"] / "student_pruned.pth"
    assert exported.is_file() and (kd_run["first"] / "student_pruned_backbone.safetensors").is_file()
    config = kd_run["first"] / "student_pruned_infer.py"  # written by KDExportStudentHook
    assert "_base_ = [{!r}]".format(str(orion["root"] / "adzoo/orion/configs/orion_stage3_kd_infer.py")) \
        in config.read_text()
    script = orion["base"] / "infer.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        from mmcv import Config
        from mmcv.runner import load_checkpoint
        from mmcv.utils import import_modules_from_strings
        from mmcv.datasets import build_dataset
        from mmcv.models import build_model
        from mmcv.parallel import collate, scatter
        cfg = Config.fromfile(sys.argv[1])
        import_modules_from_strings(**cfg.custom_imports)
        model = build_model(cfg.model, test_cfg=cfg.get('test_cfg')).eval()
        ckpt = torch.load(sys.argv[2], map_location='cpu', weights_only=True)
        model.load_state_dict(ckpt['state_dict'], strict=True)
        load_checkpoint(model, sys.argv[2], map_location='cpu', strict=True)  # ORION's test.py loader
        data = build_dataset(cfg.data.test)
        batch = scatter(collate([data[0], data[1]], samples_per_gpu=2), [-1])[0]
        with torch.no_grad():
            out = model(batch, return_loss=False)
        print('infer ok', len(out), ckpt['meta']['pruning']['num_heads'])
        """))
    proc = run_orion(orion["root"], orion["deps"], str(script), str(config), str(exported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "infer ok 2 [2, 2]" in proc.stdout


# mmcv 1.7.2's IterBasedRunner with its Fp16OptimizerHook around a linear model whose gradients overflow
# (turn infinite) while they exceed a limit, as fp16 gradients do while the loss scale is too large.
FP16_GUARD_SCRIPT = """
import functools, json, logging, sys, tempfile
import torch
from torch import nn
import mmcv.runner.hooks.optimizer as optimizer_hooks
# The hook creates torch.cuda.amp.GradScaler, which turns itself off on a CPU (it then steps every time);
# ORION trains on GPUs, where it is on. Substitute the CPU scaler where the hook creates the CUDA one.
optimizer_hooks.GradScaler = functools.partial(torch.amp.GradScaler, 'cpu')
from mmcv.runner import IterBasedRunner
from mmcv.runner.hooks.nonfinite_guard import NonFiniteGuardHook, NonFiniteTrainingError

loss_scale, limit, max_iters = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
loss_scale = loss_scale if loss_scale == 'dynamic' else float(loss_scale)


class Overflow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float('inf') if bool(grad.abs().max() > limit) else grad


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def train_step(self, data, optimizer):
        loss = Overflow.apply((self.fc(data[0]) - 1).pow(2).mean())
        return dict(loss=loss, log_vars=dict(loss=float(loss)), num_samples=len(data[0]))


torch.manual_seed(0)
model = Toy()
start = model.fc.weight.detach().clone()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
runner = IterBasedRunner(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         work_dir=tempfile.mkdtemp(), logger=logging.getLogger('guard'), meta={},
                         max_iters=max_iters)
runner.register_optimizer_hook(dict(type='Fp16OptimizerHook', loss_scale=loss_scale,
                                    grad_clip=dict(max_norm=35, norm_type=2)))
guard = NonFiniteGuardHook(max_consecutive_skips=3)
runner.register_hook(guard, priority='ABOVE_NORMAL')  # after the optimizer hook, as ORION's custom_hooks
error = None
try:
    runner.run([loader], [('train', 1)])
except NonFiniteTrainingError as exc:
    error = str(exc)
print(json.dumps(dict(error=error, iters=runner.iter, skipped=guard.skipped_total,
                      scale=runner.meta['fp16']['loss_scaler']['scale'],
                      trained=not torch.equal(start, model.fc.weight.detach()))))
"""


@pytest.mark.parametrize("loss_scale, limit, expected", [
    ("dynamic", 1024.0, dict(error=None, iters=24, skipped=6, scale=1024.0, trained=True)),
    ("dynamic", 0.0, dict(iters=19, skipped=20, trained=False)),
    ("512.", 0.0, dict(iters=3, skipped=4, scale=512.0, trained=False))])
def test_the_guard_sees_fp16_optimizer_hook_skips_in_mmcv_1x_runner(orion, tmp_path: Path, loss_scale: str,
                                                                    limit: float, expected: Dict) -> None:
    """An enabled GradScaler: a dynamic scale's warm-up (2**16 down to 2**10) trains on; overflow at every scale
    stops once the scale is below 1 (iteration 20); a static scale stops after max_consecutive_skips=3."""
    script = tmp_path / "fp16_guard.py"
    script.write_text(FP16_GUARD_SCRIPT)
    proc = run_orion(orion["root"], orion["deps"], str(script), loss_scale, str(limit), "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: result[k] for k in expected} == expected, result
    if limit == 0.0:
        stop = 20 if loss_scale == "dynamic" else 4
        assert result["error"].startswith("non-finite training at iteration {}: loss terms finite on this rank, "
                                          "gradient norm ".format(stop)), result["error"]
        assert "optimizer.step() not reached, loss scale" in result["error"]
        assert "4 consecutive step(s) skipped" in result["error"]


def test_orions_non_strict_test_py_refuses_a_student_that_keeps_other_heads(orion, kd_run, tmp_path: Path) -> None:
    """ORION's test.py loads through mmcv's load_checkpoint(strict=False), which only prints mismatches:
    a checkpoint whose kept heads differ from the model's must still stop the load, in one line."""
    infer, exported = kd_run["first"] / "student_pruned_infer.py", kd_run["first"] / "student_pruned.pth"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/test.py", str(infer), str(exported))
    assert proc.returncode == 0 and "evaluated 6 samples" in proc.stdout, proc.stderr[-3000:]
    state = torch.load(str(exported), map_location="cpu", weights_only=True)["state_dict"]
    kept = [state["img_backbone.blocks.{}.attn.head_index".format(i)].tolist() for i in range(2)]
    other = [sorted(set(range(4)) - set(heads)) for heads in kept]
    config = tmp_path / "other_heads_infer.py"
    config.write_text("_base_ = [{!r}]\nmodel = dict(img_backbone=dict(selected_heads_per_layer={!r}))\n".format(
        str(infer), other))
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/test.py", str(config), str(exported))
    assert proc.returncode != 0 and "evaluated" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("mmcv.models.backbones.eva_layers.SelectionMismatchError: img_backbone.blocks.0.attn.head_index: "
                    "checkpoint keeps teacher heads {}, this model keeps {}; build the model with the checkpoint's "
                    "selection (its meta['img_backbone']; the exported *_infer.py config does)".format(
                        kept[0], other[0])), last


def test_a_depth_pruned_student_trains_in_orion_and_loads_only_into_its_own_blocks(orion, tmp_path: Path) -> None:
    """ORION's train.py with a student that keeps teacher block 1 of 2; the exported inference config builds it
    for ORION's test.py, and mmcv's non-strict load_checkpoint refuses a backbone that keeps other blocks."""
    work_dir = tmp_path / "wd_depth"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]), "--work-dir",
                     str(work_dir), "--cfg-options", "model.img_backbone.selected_blocks=[1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    infer, exported = work_dir / "student_pruned_infer.py", work_dir / "student_pruned.pth"
    state = torch.load(str(exported), map_location="cpu", weights_only=True)["state_dict"]
    assert state["img_backbone.kept_blocks"].tolist() == [1] and "img_backbone.blocks.1.norm1.weight" not in state
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/test.py", str(infer), str(exported))
    assert proc.returncode == 0 and "evaluated 6 samples" in proc.stdout, proc.stderr[-3000:]
    heads = state["img_backbone.blocks.0.attn.head_index"].tolist()
    config = tmp_path / "every_block_infer.py"
    config.write_text("_base_ = [{!r}]\nmodel = dict(img_backbone=dict(selected_blocks=None, "
                      "selected_heads_per_layer={!r}))\n".format(str(infer), [heads, heads]))
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/test.py", str(config), str(exported))
    assert proc.returncode != 0 and "evaluated" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmcv.models.backbones.eva_layers.SelectionMismatchError: img_backbone.kept_blocks: "
                           "checkpoint keeps teacher blocks [1], this model keeps [0, 1]; build the model with the "
                           "checkpoint's selection"), last


def test_an_epoch_computed_for_other_gpus_stops_orions_run_with_the_cfg_options_that_fix_it(orion) -> None:
    """The stand-in config computes its epoch when the file runs, as ORION's (for num_gpus x batch_size); a run
    with another batch (as with another number of GPUs) has another epoch: one line gives the options."""
    work_dir = orion["base"] / "wd_epoch"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]), "--work-dir",
                     str(work_dir), "--cfg-options", "data.samples_per_gpu=1")
    assert proc.returncode != 0 and not list(work_dir.glob("iter_*.pth"))
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmcv.runner.hooks.kd_hooks.KDRunError: KDAlphaScheduleHook: an epoch of this run is 6 "
                           "iterations (6 samples / (1 per GPU x 1 processes)) but the config counts 3 "), last
    options = last.split("start again with --cfg-options ")[1].split(" (")[0].split()
    assert options == ["num_iters_per_epoch=6", "runner.max_iters=12", "checkpoint_config.interval=6",
                       "data.shuffler_sampler.num_iters_to_seq=6", "evaluation.interval=18",
                       "custom_hooks.1.iters_per_epoch=6"]
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]), "--work-dir",
                     str(work_dir), "--cfg-options", "data.samples_per_gpu=1", *options, "runner.max_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KDAlphaScheduleHook: an epoch is 6 iterations" in proc.stdout + proc.stderr


def test_a_diverging_run_in_orions_runner_stops_with_finite_checkpoints_and_no_export(orion) -> None:
    """NonFiniteGuardHook in mmcv 1.7.2's runner (Fp16OptimizerHook, CheckpointHook): skip, then stop."""
    work_dir = orion["base"] / "wd_nan"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]), "--work-dir",
                     str(work_dir), "--cfg-options", "optimizer.lr=1e6", "custom_hooks.2.max_consecutive_skips=1")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "NonFiniteTrainingError: non-finite training at iteration" in proc.stderr, proc.stderr[-3000:]
    assert "skipped the step of iteration" in proc.stdout + proc.stderr
    saved = sorted(work_dir.glob("iter_*.pth"))
    assert saved, sorted(p.name for p in work_dir.iterdir())
    for path in saved:
        state = torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), path.name
    assert not (work_dir / "student_pruned.pth").exists()  # after_run (the export) never ran


def test_a_resume_path_that_orion_ignores_stops_the_run_in_one_line(orion, tmp_path: Path) -> None:
    work, missing = tmp_path / "wd", tmp_path / "no_such_dir/iter_4.pth"
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]),
                     "--work-dir", str(work), "--resume-from", str(missing))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ResumeCheckHook: --resume-from {} is not a file".format(missing)), proc.stderr[-2000:]
    assert "starts at iteration 0" in last and "--cfg-options allow_fresh_start=True" in last
    assert "Traceback" not in proc.stderr and not list(work.glob("iter_*.pth"))
    launcher_work = "adzoo/orion/work_dirs/kd_resume_check/"  # relative, as ORION's launcher passes it
    proc = run_orion(orion["root"], orion["deps"], "adzoo/orion/train.py", str(orion["config"]),
                     "--work-dir", launcher_work, "--resume-from", str(missing), "--cfg-options",
                     "allow_fresh_start=True", "runner.max_iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = orion["root"] / launcher_work
    log = "".join(path.read_text() for path in work.glob("*.log"))  # mmcv's runner logs into work_dir
    assert "allow_fresh_start=True: training from iteration 0" in log
    assert (work / "student_pruned.pth").is_file() and str(work / "student_pruned.pth") in log
    assert "evaluate it with: bash adzoo/orion/orion_dist_eval.sh {0}/student_pruned_infer.py " \
        "{0}/student_pruned.pth GPUS".format(work) in log
