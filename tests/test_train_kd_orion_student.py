"""OrionStudent on the miniature ORION through the standalone loop: 2-rank DDP, exact resume, load_from."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from adzoo.orion.apis.checkpoints import load_from
from adzoo.orion.apis.settings import ConfigError
from adzoo.orion.apis.kd_loop import train_kd
from mmcv import Config
from mmcv.datasets import build_dataset
from mmcv.models.builder import build_model
from mmcv.utils import set_random_seed
from tests.test_train_kd import ROOT, load, run_launcher

TINY_TEACHER_CONFIG = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
TINY_KD_CONFIG = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_kd_train.py"
PLUGIN_IMPORTS = ["mmcv.models.backbones.eva_vit_student", "mmcv.models.detectors.orion_student",
                  "mmcv.models.losses.kd_losses", "mmcv.runner.hooks.kd_hooks", "orion_kd_toy"]


def save_random_teacher(path: Path, seed: int) -> Path:
    """A TinyOrion with random weights, saved as an ORION-format teacher checkpoint."""
    torch.manual_seed(seed)
    teacher = build_model(Config.fromfile(str(TINY_TEACHER_CONFIG)).model)
    torch.save(dict(meta=dict(seed=seed), state_dict=teacher.state_dict()), str(path))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Dict[str, Path]:
    folder = tmp_path_factory.mktemp("teachers")
    return dict(first=save_random_teacher(folder / "teacher0.pth", 0),
                second=save_random_teacher(folder / "teacher1.pth", 1))


def kd_config(folder: Path, teacher: Path, max_iters: int = 4, custom_hooks: Any = ()) -> Path:
    """The shipped tiny KD config, shortened: 4 scenes of 8 frames, batch 2, ``max_iters`` iterations."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_kd_test.py"
    path.write_text("\n".join([
        "_base_ = [{!r}]".format(str(TINY_KD_CONFIG)),
        "custom_imports = dict(imports={!r}, allow_failed_imports=False)".format(PLUGIN_IMPORTS),
        "kd_config = dict(teacher_backbone_path={!r})".format(str(teacher)),
        "model = dict(teacher_backbone_path={0!r}, kd_config=dict(teacher_backbone_path={0!r}))".format(str(teacher)),
        "data = dict(samples_per_gpu=2, train=dict(num_samples=32))",
        "runner = dict(_delete_=True, type='IterBasedRunner', max_iters={})".format(max_iters),
        "checkpoint_config = dict(_delete_=True, interval=2, max_keep_ckpts=3)",
        "log_config = dict(_delete_=True, interval=1, hooks=[dict(type='TextLoggerHook')])",
        "custom_hooks = {!r}".format(list(custom_hooks)),
        "seed = 0", ""]))
    return path


def train_in_process(config: Path, work_dir: Path, seed_before_build: int, **over: Any) -> torch.nn.Module:
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    for key, value in over.items():
        cfg[key] = value
    set_random_seed(seed_before_build)
    model = build_model(cfg.model)
    train_kd(model, [build_dataset(cfg.data.train)], cfg, timestamp="t")
    return model


def test_orion_student_under_two_gloo_ranks_keeps_ranks_identical_and_trains_only_the_backbone(tmp_path, teachers):
    dumps = tmp_path / "dumps"
    config = kd_config(tmp_path, teachers["first"],
                       custom_hooks=[dict(type="OrionKDTestDumpWeightsHook", dump_dir=str(dumps)),
                                     dict(type="KDAlphaScheduleHook")])  # as the tiny KD config: epochs of the run
    res = run_launcher(config, "2", "--work-dir", "wd", cwd=tmp_path, timeout=420)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    before, after0, after1 = (load(dumps / name) for name in ("before_rank0.pth", "after_rank0.pth",
                                                              "after_rank1.pth"))
    assert after0.keys() == after1.keys() == before.keys()
    assert all(torch.equal(after0[k], after1[k]) for k in after0)  # DDP kept the ranks in step
    changed = {k for k in before if not torch.equal(before[k], after0[k])}
    assert changed and all(k.startswith("img_backbone.") for k in changed)  # only the student backbone trains
    assert {k for k in changed if k.endswith("attn.q_proj.weight")}  # attention weights of the pruned heads moved
    assert "Iter [4/4]" in res.stdout and "sampler InfiniteGroupEachSampleInBatchSampler" in res.stdout
    assert "KDAlphaScheduleHook: an epoch is 8 iterations (32 samples / (2 per GPU x 2 processes))" in res.stdout


def test_orion_student_resumed_run_equals_the_uninterrupted_one(tmp_path, teachers):
    config = kd_config(tmp_path, teachers["first"])
    model = train_in_process(config, tmp_path / "full", seed_before_build=0)
    # another RNG state before building: the checkpoint must bring back RNG, memory, optimiser and data order
    train_in_process(config, tmp_path / "resumed", seed_before_build=123,
                     resume_from=str(tmp_path / "full" / "iter_2.pth"))
    full, resumed = load(tmp_path / "full" / "iter_4.pth"), load(tmp_path / "resumed" / "iter_4.pth")
    assert set(full["state_dict"]) == set(model.state_dict()) == set(resumed["state_dict"])
    assert not any("teacher" in k for k in full["state_dict"])  # the frozen teacher stays out of checkpoints
    for key in full["state_dict"]:
        assert torch.equal(full["state_dict"][key], resumed["state_dict"][key]), key
    memory_full = full["memory"][0]["pts_bbox_head.memory"]
    memory_resumed = resumed["memory"][0]["pts_bbox_head.memory"]
    assert memory_full["tokens"] == memory_resumed["tokens"] and memory_full["memory"] is not None
    assert torch.equal(memory_full["memory"], memory_resumed["memory"])  # the heads' temporal memory continued
    assert load(tmp_path / "full" / "iter_2.pth")["memory"][0]["pts_bbox_head.memory"]["memory"] is not None


def _student(tmp_path: Path, teacher: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(Config.fromfile(str(kd_config(tmp_path, teacher))).model)


def test_load_from_a_teacher_shaped_checkpoint_slices_the_backbone_to_the_kept_heads(tmp_path, teachers):
    student = _student(tmp_path, teachers["first"])
    load_from(student, str(teachers["second"]), logging.getLogger("test"))
    other = load(teachers["second"])["state_dict"]
    mine = student.state_dict()
    backbone = student.img_backbone
    for layer, block in enumerate(backbone.blocks):
        heads = torch.tensor(block.attn.selected_heads)
        rows = (heads[:, None] * backbone.head_dim + torch.arange(backbone.head_dim)).reshape(-1)
        base = "img_backbone.blocks.{}.attn.".format(layer)
        assert len(heads) < backbone.teacher_num_heads
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_bias", "v_bias"):
            assert torch.equal(mine[base + name], other[base + name][rows]), base + name
        assert torch.equal(mine[base + "proj.weight"], other[base + "proj.weight"][:, rows])
    for key in ("img_backbone.patch_embed.proj.weight", "pts_bbox_head.cls_out.weight", "lm_head.plan_head.0.weight"):
        assert torch.equal(mine[key], other[key]), key  # everything else is copied as it is


def test_load_from_a_checkpoint_of_another_architecture_names_the_mis_shaped_keys(tmp_path, teachers):
    student = _student(tmp_path, teachers["first"])
    broken = load(teachers["second"])
    broken["state_dict"]["pts_bbox_head.cls_out.weight"] = torch.zeros(7, 96, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(broken, str(path))
    with pytest.raises(ConfigError, match=r"broken.pth does not fit the model: 1 mis-shaped keys.*cls_out.weight"):
        load_from(student, str(path), logging.getLogger("test"))


def test_a_depth_pruned_student_trains_in_the_loop_and_load_from_takes_the_kept_teacher_blocks(tmp_path, teachers):
    config = kd_config(tmp_path, teachers["first"], max_iters=2)
    with open(str(config), "a") as handle:
        handle.write("model.update(img_backbone=dict(selected_blocks=[0, 1, 3]))\n")
    model = train_in_process(config, tmp_path / "wd", seed_before_build=0)
    saved = load(tmp_path / "wd" / "iter_2.pth")["state_dict"]
    assert saved["img_backbone.kept_blocks"].tolist() == [0, 1, 3] and model.img_backbone.num_blocks == 3
    assert "img_backbone.blocks.3.norm1.weight" not in saved
    student = build_model(Config.fromfile(str(config)).model)
    load_from(student, str(teachers["second"]), logging.getLogger("test"))  # the teacher-shaped original
    other = load(teachers["second"])["state_dict"]
    mine = student.state_dict()
    assert torch.equal(mine["img_backbone.blocks.2.norm1.weight"], other["img_backbone.blocks.3.norm1.weight"])
    assert torch.equal(mine["img_backbone.blocks.2.mlp.w3.bias"], other["img_backbone.blocks.3.mlp.w3.bias"])
