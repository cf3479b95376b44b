"""The KD hooks and the alpha schedule they apply, driven by a minimal runner (attributes of PLAN.md only)."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
import torch

from mmcv import Config
from mmcv.models.utils.kd_config import KDConfigError, resolve_distillation_alpha, resolve_kd_config, warmup_iterations
from mmcv.runner.hooks import HOOKS
from mmcv.runner.hooks.kd_hooks import KDAlphaScheduleHook, KDCheckHook, KDExportStudentHook, KDRunError
from tests.test_orion_student import make_student, teacher_ckpt  # noqa: F401  (a fixture)
from tools.plugin_manifest import CUSTOM_IMPORTS

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the schedule (one owner)
def test_step_schedule_is_a_function_of_the_iteration() -> None:
    step = dict(alpha_schedule="step", warmup_alpha=0.8, finetune_alpha=0.6, warmup_epochs=1)
    assert [resolve_distillation_alpha(step, i, iters_per_epoch=3) for i in range(7)] == [0.8] * 3 + [0.6] * 4
    assert [resolve_distillation_alpha({}, i, 2) for i in range(4)] == [0.8, 0.8, 0.6, 0.6]  # guide defaults
    assert [resolve_distillation_alpha(dict(warmup_iters=2), i) for i in range(4)] == [0.8, 0.8, 0.6, 0.6]
    assert resolve_distillation_alpha(dict(warmup_epochs=0), 0) == 0.6
    assert warmup_iterations(dict(warmup_epochs=2), iters_per_epoch=5) == 10
    const = dict(alpha_schedule="constant", distillation_alpha=0.7)
    assert [resolve_distillation_alpha(const, i) for i in (0, 1, 10 ** 6)] == [0.7, 0.7, 0.7]


@pytest.mark.parametrize("kd, iteration, words", [
    (dict(distillation_alpha=0.7), 0, ["distillation_alpha", "alpha_schedule='constant'", "warmup_alpha"]),
    (dict(alpha_schedule="constant"), 0, ["needs kd_config.distillation_alpha"]),
    (dict(alpha_schedule="cosine"), 0, ["alpha_schedule must be one of"]),
    (dict(warmup_alpha=1.5), 0, ["warmup_alpha", "[0, 1]"]),
    (dict(warmup_epochs=-1), 0, ["warmup_epochs"]),
    (dict(warmup_epochs=1.5), 0, ["warmup_epochs must be an integer"]),
    (dict(warmup_epochs=1, warmup_iters=10), 0, ["warmup_iters=10 and warmup_epochs=1; give one"]),
    (dict(warmup_epochs=1), 5, ["counts epochs but no iters_per_epoch", "KDAlphaScheduleHook(iters_per_epoch"]),
])
def test_alpha_config_errors_are_explained(kd: Dict[str, Any], iteration: int, words: List[str]) -> None:
    with pytest.raises(KDConfigError) as info:
        resolve_distillation_alpha(kd, iteration)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- a runner with PLAN.md's attributes
class LogBuffer:
    def __init__(self) -> None:
        self.updates: List[Dict[str, float]] = []

    def update(self, values: Dict[str, float], count: int = 1) -> None:
        self.updates.append(dict(values))


class Wrapper(torch.nn.Module):
    """Stands for (MM)DataParallel / DDP: the model is ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def make_runner(model: torch.nn.Module, work_dir: str = "", rank: int = 0, optimizer: Any = None) -> SimpleNamespace:
    raw = model.module if isinstance(model, Wrapper) else model
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=1e-3)
    return SimpleNamespace(model=model, iter=0, optimizer=optimizer, work_dir=work_dir, rank=rank, logger=None,
                           outputs={}, log_buffer=LogBuffer())


def test_hooks_are_registered_under_new_names() -> None:
    for name in ("KDAlphaScheduleHook", "KDCheckHook", "KDExportStudentHook"):
        assert HOOKS.get(name) is not None


def test_alpha_hook_sets_alpha_from_runner_iter_and_logs_it_once(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(warmup_epochs=1))
    runner = make_runner(Wrapper(student))
    hook = KDAlphaScheduleHook(iters_per_epoch=2)
    hook.before_run(runner)
    seen = []
    for it in range(5):
        runner.iter = it
        hook.before_train_iter(runner)
        seen.append(student.distillation_alpha)
        runner.outputs = dict(log_vars={}, num_samples=1)
        hook.after_train_iter(runner)
    assert seen == [0.8, 0.8, 0.6, 0.6, 0.6]
    assert [u["alpha"] for u in runner.log_buffer.updates] == seen
    runner.outputs = dict(log_vars={"alpha": 0.6}, num_samples=1)  # OrionStudent logs it itself
    hook.after_train_iter(runner)
    assert len(runner.log_buffer.updates) == 5
    runner.iter = 3  # a resumed run starts at the saved iteration and gets that iteration's alpha
    fresh = KDAlphaScheduleHook(iters_per_epoch=2)
    fresh.before_run(runner)
    fresh.before_train_iter(runner)
    assert student.distillation_alpha == seen[3]


def test_alpha_hook_fails_before_training_when_the_schedule_needs_an_epoch_size(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt)
    hook, runner = KDAlphaScheduleHook(), make_runner(student)
    hook.before_run(runner)  # no data loader yet (ORION's runner sets it just before the first iteration)
    with pytest.raises(KDConfigError, match="counts epochs but no iters_per_epoch"):
        hook.before_train_iter(runner)  # still none: stopped before the first step
    with pytest.raises(KDRunError, match="iters_per_epoch must be a positive integer"):
        KDAlphaScheduleHook(iters_per_epoch=0)
    with pytest.raises(KDRunError, match="runner.model is Linear, expected an OrionStudent"):
        KDAlphaScheduleHook(iters_per_epoch=1).before_run(make_runner(torch.nn.Linear(2, 2)))


class IterLoader:
    """mmcv's IterLoader: what ``runner.data_loader`` holds in ORION's IterBasedRunner."""

    def __init__(self, loader: Any) -> None:
        self._dataloader = loader


def epoch_runner(student: torch.nn.Module, samples: int, per_gpu: int, world_size: int, max_iters: int) -> Any:
    runner = make_runner(student)
    dataset = torch.utils.data.TensorDataset(torch.zeros(samples, 1))
    runner.data_loader = IterLoader(torch.utils.data.DataLoader(dataset, batch_size=per_gpu))
    runner.world_size, runner.max_iters = world_size, max_iters
    return runner


def test_alpha_warmup_counts_the_runs_epochs_from_the_data_loader_and_world_size(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt)  # warm-up: 1 epoch at alpha 0.8, then 0.6
    runner = epoch_runner(student, samples=40, per_gpu=4, world_size=2, max_iters=30)
    hook = KDAlphaScheduleHook()
    hook.before_run(runner)
    alphas = []
    for it in range(7):
        runner.iter = it
        hook.before_train_iter(runner)
        alphas.append(hook.alpha)
    assert hook.iters_per_epoch == 5 and alphas == [0.8] * 5 + [0.6] * 2  # 40 samples / (4 x 2 processes)
    for configured in (5, 6):  # a last partial batch may count or not: 42 samples / 8 = 5.25
        KDAlphaScheduleHook(iters_per_epoch=configured).before_run(epoch_runner(student, 42, 4, 2, 30))


def test_an_epoch_computed_for_other_gpus_stops_with_the_cfg_options(teacher_ckpt) -> None:  # noqa: F811
    """ORION's stage-3 config computes its epoch for 32 GPUs x 4 samples; on 8 GPUs an epoch is 4x longer."""
    runner = epoch_runner(make_student(teacher_ckpt), samples=234769, per_gpu=4, world_size=8, max_iters=6 * 1834)
    with pytest.raises(KDRunError) as error:
        KDAlphaScheduleHook(iters_per_epoch=234769 // (32 * 4)).before_run(runner)
    assert str(error.value) == (
        "KDAlphaScheduleHook: an epoch of this run is 7336 iterations (234769 samples / (4 per GPU x 8 processes)) "
        "but the config counts 1834 (num_iters_per_epoch, computed when the config file ran, for another number of "
        "GPUs), so the alpha warm-up, the run length and the checkpoint interval would count other epochs; start "
        "again with --cfg-options num_iters_per_epoch=7336 runner.max_iters=44016 checkpoint_config.interval=7336 "
        "data.shuffler_sampler.num_iters_to_seq=7336 evaluation.interval=51352 custom_hooks.1.iters_per_epoch=7336 "
        "(custom_hooks.1: KDAlphaScheduleHook's place in the list)")


def test_lr_log_hook_logs_the_top_layers_lr_and_the_base_lr_beside_orions_first_group() -> None:
    layers = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    scales = [0.9 ** 25, 0.9 ** 2, 0.9]  # ORION's order: the lowest layer (patch embedding) first
    optimizer = torch.optim.AdamW([dict(params=[p], lr=1e-4 * s, lr_scale=s) for p, s in zip(layers, scales)])
    runner = SimpleNamespace(optimizer=optimizer, log_buffer=LogBuffer())
    HOOKS.build(dict(type="KDLrLogHook")).after_train_iter(runner)
    values = runner.log_buffer.updates[-1]
    assert values["lr_top"] == pytest.approx(0.9e-4) and values["lr_base"] == pytest.approx(1e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.9 ** 25)  # what ORION logs as lr: 0.072x


def test_check_hook_accepts_backbone_only_kd_and_checks_modes_at_the_first_iteration(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt)
    runner = make_runner(Wrapper(student))
    hook = KDCheckHook()
    hook.before_run(runner)
    student.train()
    hook.before_train_iter(runner)
    eval_student = make_student(teacher_ckpt, kd_config=dict(frozen_parts_mode="eval")).train()
    KDCheckHook().before_train_iter(make_runner(eval_student))
    eval_student.map_head.train()  # someone switched a frozen part back on
    with pytest.raises(KDRunError, match=r"frozen parts \['map_head'\] are in training mode, but "
                                         r"kd_config.frozen_parts_mode='eval'"):
        KDCheckHook().before_train_iter(make_runner(eval_student))


def test_check_hook_removes_temp_files_of_a_killed_save_from_the_work_dir(teacher_ckpt, tmp_path) -> None:  # noqa: F811
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".student_pruned.pth.tmp.{}".format(dead.pid)
    live = tmp_path / ".latest.pth.tmp.{}".format(os.getpid())  # a writer that still runs keeps its file
    stale.write_bytes(b"\0" * 64)
    live.write_bytes(b"\0" * 64)
    KDCheckHook().before_run(make_runner(make_student(teacher_ckpt), work_dir=str(tmp_path)))
    assert not stale.exists() and live.exists()


def test_check_hook_names_what_breaks_backbone_only_kd(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt)
    leaked = next(n for n, p in student.named_parameters() if n.startswith("pts_bbox_head."))
    dict(student.named_parameters())[leaked].requires_grad = True
    with pytest.raises(KDRunError, match=r"parameter\(s\) outside img_backbone require gradients .*pts_bbox_head"):
        KDCheckHook().before_run(make_runner(student))
    clean = make_student(teacher_ckpt)
    teacher_opt = torch.optim.SGD(list(clean.img_backbone.parameters()) + list(clean.teacher_backbone.parameters()),
                                  lr=0.1)
    with pytest.raises(KDRunError, match="the optimizer holds teacher parameters"):
        KDCheckHook().before_run(make_runner(clean, optimizer=teacher_opt))
    for module in clean.teacher_backbone.modules():  # its train() refuses (frozen=True): force it
        module.training = True
    with pytest.raises(KDRunError, match="teacher backbone is in training mode"):
        KDCheckHook().before_train_iter(make_runner(clean))
    with pytest.raises(KDRunError, match="runner.model is Linear"):
        KDCheckHook().before_run(make_runner(torch.nn.Linear(2, 2)))


def test_export_hook_writes_the_student_on_rank_zero_only(teacher_ckpt, tmp_path: Path) -> None:  # noqa: F811
    student = make_student(teacher_ckpt)
    KDExportStudentHook().after_run(make_runner(Wrapper(student), str(tmp_path / "rank1"), rank=1))
    assert not (tmp_path / "rank1").exists()
    base = tmp_path / "orion_stage3_kd_infer.py"
    base.write_text("model = dict(type='TinyOrion', img_backbone=dict(type='EVAViT', pretrained='eva02.pth'))\n")
    hook = KDExportStudentHook(filename="out/student.pth", inference_config=str(base))
    hook.after_run(make_runner(Wrapper(student), str(tmp_path)))
    assert hook.written == dict(checkpoint=str(tmp_path / "out/student.pth"),
                                backbone=str(tmp_path / "out/student_backbone.safetensors"),
                                inference_config=str(tmp_path / "out/student_infer.py"))
    infer = Config.fromfile(hook.written["inference_config"])
    assert infer.model.type == "TinyOrion" and dict(infer.model.img_backbone) == student.student_backbone_cfg
    assert infer.model.img_backbone.selected_heads_per_layer == student.img_backbone.selected_heads
    KDExportStudentHook(filename="plain.pth", inference_config=str(tmp_path / "missing.py")).after_run(
        make_runner(student, str(tmp_path)))
    assert not (tmp_path / "plain_infer.py").exists() and (tmp_path / "plain.pth").is_file()
    saved = torch.load(hook.written["checkpoint"], map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]
    for bad in ("/abs/student.pth", "../student.pth", "student.safetensors"):
        with pytest.raises(KDRunError, match="relative \\*.pth path inside work_dir"):
            KDExportStudentHook(filename=bad)


# --------------------------------------------------------------------------- the configs list the hooks
FAKE_ORION_STAGE3 = """
num_iters_per_epoch = 234769 // (32 * 4)
model = dict(type='Orion', use_grid_mask=True, lm_head='./ckpts/pretrain_qformer/',
             img_backbone=dict(type='EVAViT', img_size=640, patch_size=16, window_size=16, in_chans=3,
                               embed_dim=1024, depth=24, num_heads=16, pretrained='ckpts/eva02_L.pth'),
             pts_bbox_head=dict(type='OrionHead', num_query=256), map_head=dict(type='OrionHeadM'))
data = dict(samples_per_gpu=4, workers_per_gpu=4, train=dict(type='B2DOrionDataset', seq_mode=True),
            shuffler_sampler=dict(type='InfiniteGroupEachSampleInBatchSampler', seq_split_num=10,
                                  warmup_split_num=80, num_iters_to_seq=num_iters_per_epoch))
optimizer = dict(constructor='LearningRateDecayOptimizerConstructor', type='AdamW', lr=8e-5)
optimizer_config = dict(type='Fp16OptimizerHook', loss_scale='dynamic', grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(policy='CosineAnnealing', warmup='linear', warmup_iters=500, warmup_ratio=1.0 / 3,
                 min_lr_ratio=1e-3)
runner = dict(type='IterBasedRunner', max_iters=6 * num_iters_per_epoch)
checkpoint_config = dict(interval=num_iters_per_epoch, max_keep_ckpts=3)
log_config = dict(interval=10, hooks=[dict(type='TextLoggerHook'), dict(type='TensorboardLoggerHook')])
find_unused_parameters = False
load_from = None
resume_from = None
"""


def test_stage3_kd_config_changes_only_the_model_and_extension_points(tmp_path: Path) -> None:
    src = ROOT / "adzoo/orion/configs/orion_stage3_kd_train.py"
    (tmp_path / "orion_stage3_kd_train.py").write_text(src.read_text())
    (tmp_path / "orion_stage3_train.py").write_text(FAKE_ORION_STAGE3)
    base = Config.fromfile(str(tmp_path / "orion_stage3_train.py"))
    cfg = Config.fromfile(str(tmp_path / "orion_stage3_kd_train.py"), import_custom_modules=False)
    assert "_delete_" not in cfg.pretty_text and "_orion_kd_missing_module" not in cfg
    assert tuple(cfg.custom_imports.imports) == CUSTOM_IMPORTS
    added = {"custom_imports", "custom_hooks"}  # every KD setting lives in model.kd_config, no top-level copy
    assert set(cfg) - set(base) == added
    for key in set(base) - {"model"}:  # ORION's data/sampler, optimizer, fp16 hook, lr, runner, logs
        assert cfg[key] == base[key], key
    m, b = cfg.model, base.model
    kd = m.kd_config
    assert (m.type, m.base_detector, kd.teacher_backbone_path, kd.freeze_non_backbone) == \
        ("OrionStudent", "Orion", "ckpts/Orion.pth", True)
    assert dict(m.distillation_loss) == dict(type="CombinedKDLoss")  # temperature and weights: kd_config
    assert all(m[k] == b[k] for k in b if k not in ("type", "img_backbone"))  # the rest of ORION's model
    bb = m.img_backbone
    assert "pretrained" not in bb and bb.type == "EVAViTStudent" and (bb.num_heads, bb.teacher_num_heads) == (None, 16)
    assert kd.pruning_ratio == 0.5 and kd.head_selection == "magnitude"  # 8 of 16 heads: the ratio sets the count
    assert list(bb.window_block_indexes) == [i for i in range(24) if i % 3 != 2]
    assert kd.frozen_parts_mode == "train"
    hooks = {h["type"]: h for h in cfg.custom_hooks}
    assert list(hooks) == ["KDCheckHook", "KDAlphaScheduleHook", "NonFiniteGuardHook", "KDExportStudentHook",
                           "KDLrLogHook", "ResumeCheckHook"]
    assert hooks["KDAlphaScheduleHook"]["iters_per_epoch"] == base.num_iters_per_epoch == 1834
    alphas = [resolve_distillation_alpha(kd, i, 1834) for i in (0, 1833, 1834, cfg.runner.max_iters - 1)]
    assert alphas == [0.8, 0.8, 0.6, 0.6]
    resolve_kd_config(copy.deepcopy(dict(kd)))
    HOOKS.build(dict(hooks["KDAlphaScheduleHook"]))


def test_tiny_kd_config_lists_the_same_hooks() -> None:
    cfg = Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_kd_train.py"), import_custom_modules=False)
    assert tuple(cfg.custom_imports.imports) == CUSTOM_IMPORTS
    assert [h["type"] for h in cfg.custom_hooks] == ["KDCheckHook", "KDAlphaScheduleHook", "NonFiniteGuardHook",
                                                     "KDExportStudentHook", "KDLrLogHook"]
    for hook_cfg in cfg.custom_hooks:
        hook_cfg = dict(hook_cfg)
        hook_cfg.pop("priority", None)
        HOOKS.build(hook_cfg)


# --------------------------------------------------------------------------- one place for each KD setting
def test_distillation_loss_takes_kd_config_values_and_a_disagreeing_copy_is_refused(teacher_ckpt) -> None:  # noqa: F811
    student = make_student(teacher_ckpt, kd_config=dict(distillation_temperature=2.0, feature_distill_weight=0.1))
    assert (student.distill_loss.temperature, student.distill_loss.feature_distill_weight) == (2.0, 0.1)
    only_loss = make_student(teacher_ckpt, distillation_loss=dict(type="CombinedKDLoss", temperature=4.0))
    assert only_loss.distill_loss.temperature == only_loss.kd_config["distillation_temperature"] == 4.0  # recorded
    with pytest.raises(KDConfigError, match=r"model.distillation_loss.temperature=4.0 but "
                                            r"model.kd_config.distillation_temperature=2.0: give the value once"):
        make_student(teacher_ckpt, kd_config=dict(distillation_temperature=2.0),
                     distillation_loss=dict(type="CombinedKDLoss", temperature=4.0))


def test_a_top_level_kd_config_must_agree_with_the_models() -> None:
    from mmcv.models.utils.kd_config import check_kd_config_copies
    model = dict(kd_config=dict(pruning_ratio=0.5, teacher_backbone_path="t.pth"))
    check_kd_config_copies(dict(model=model, kd_config=dict(pruning_ratio=0.5, warmup_alpha=0.8)))  # default agrees
    check_kd_config_copies(dict(model=model))
    with pytest.raises(KDConfigError, match=r"kd_config.pruning_ratio=0.3 but model.kd_config.pruning_ratio=0.5: "
                                            r"the model reads model.kd_config only"):
        check_kd_config_copies(dict(model=model, kd_config=dict(pruning_ratio=0.3)))
    with pytest.raises(KDConfigError, match=r"kd_config.teacher_backbone_path='u.pth' but "
                                            r"model.kd_config.teacher_backbone_path='t.pth'"):
        check_kd_config_copies(dict(model=model, kd_config=dict(teacher_backbone_path="u.pth")))
