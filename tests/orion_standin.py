"""An ORION-shaped checkout in a temporary folder, on top of the real mmcv 1.7.2 (tests only).

Where ORION's own code runs on a CPU, tests/test_orion_tree.py runs it from an ORION tree instead; this
tree keeps what needs ORION's CUDA heads and LLM (the streaming heads, ORION's train.py end to end).

ORION keeps a fork of mmcv 1.x as its top-level ``mmcv`` package and adds ``mmcv/models``,
``mmcv/datasets`` and ``adzoo/orion``. This module writes such a tree: mmcv 1.7.2's package
copied as ``mmcv`` plus stand-ins, each at the path of the ORION file it imitates and written from
ORION's files (none of ORION's code is copied), for

* ``mmcv/models``: one registry under ORION's aliases and builders; ``Orion`` with ORION's
  calling convention (``forward(data, return_loss)``, ``_parse_losses`` summing every key with
  'loss', ``extract_feat`` under mmcv's ``auto_fp16``), a detection head with a temporal memory
  that is refreshed only for consecutive frames of one scene (< 2 s apart) and a denoising loss
  in training mode only; ORION's layer-decay optimizer constructor;
* ``mmcv/datasets``: ``build_dataset``, ``build_dataloader`` (``data.shuffler_sampler``) and a
  streaming ``InfiniteGroupEachSampleInBatchSampler`` (each batch slot walks one scene in order);
* ``adzoo/orion``: ``train.py`` (ORION's CLI), ``apis/train.py::custom_train_model`` (dataloaders,
  wrapper, optimizer, runner, fp16 / lr / checkpoint / log hooks, ``custom_hooks``, resume),
  ``orion_dist_train.sh`` (``CONFIG GPUS [args]``) and stage-3 train / inference configs.

* ``adzoo/orion/test.py``: ORION's evaluation entry (``CONFIG CHECKPOINT``): the model from the config,
  the checkpoint through mmcv's non-strict ``load_checkpoint`` (which only prints mismatches), then
  inference on ``data.test``.

Differences that the CPU forces: training runs with ``--launcher none`` in mmcv's
``MMDataParallel`` (its CPU path), whose ``train_step`` mmcv 1.7.2's runner calls where ORION's fork
calls ``model(data, return_loss=True)``; ``runner.resume`` maps to the CPU; the launcher script is there because ORION has one (the
overlay must leave it alone), not to be run on a CPU. mmcv's ``Fp16OptimizerHook`` creates
``torch.cuda.amp.GradScaler``, which turns itself off on a CPU (then every step is applied and
nothing is ever skipped); ORION trains on GPUs, where it is on, so the stand-in's
``custom_train_model`` substitutes ``torch.amp.GradScaler('cpu')`` there when no GPU is visible.
"""
from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path
from typing import Dict

STANDIN_FILES: Dict[str, str] = {}

STANDIN_FILES["mmcv/models/__init__.py"] = '''
"""ORION's model package (stand-in): one registry under ORION's aliases, and the Orion detector."""
from .builder import (BACKBONES, DETECTORS, HEADS, LOSSES, MODELS, NECKS, build_backbone,  # noqa: F401
                      build_detector, build_head, build_loss, build_model, build_neck)
from . import detectors, utils  # noqa: F401
'''

STANDIN_FILES["mmcv/models/builder.py"] = '''
"""One registry, every ORION alias is the same object; duplicate names raise (mmcv 1.x Registry)."""
from mmcv.utils import Registry

MODELS = Registry("models")
BACKBONES = NECKS = HEADS = LOSSES = DETECTORS = SEGMENTORS = MODELS


def build_backbone(cfg):
    return BACKBONES.build(cfg)


def build_neck(cfg):
    return NECKS.build(cfg)


def build_head(cfg):
    return HEADS.build(cfg)


def build_loss(cfg):
    return LOSSES.build(cfg)


def build_model(cfg, train_cfg=None, test_cfg=None):
    return DETECTORS.build(cfg, default_args=dict(train_cfg=train_cfg, test_cfg=test_cfg))


build_detector = build_model
'''

STANDIN_FILES["mmcv/models/backbones/__init__.py"] = '"""ORION keeps EVAViT here (not needed by the stand-in)."""\n'
STANDIN_FILES["mmcv/models/utils/__init__.py"] = "from . import layer_decay_optimizer_constructor  # noqa: F401\n"

STANDIN_FILES["mmcv/models/utils/layer_decay_optimizer_constructor.py"] = '''
"""ORION's layer-wise lr decay for the ViT backbone: frozen parameters are left out of the optimizer."""
from mmcv.runner import OPTIMIZER_BUILDERS, DefaultOptimizerConstructor


def _layer_id(name, num_layers):
    if name.startswith("img_backbone."):
        if ".blocks." in name:
            return int(name.split(".blocks.")[1].split(".")[0]) + 1
        return 0
    return num_layers + 1


@OPTIMIZER_BUILDERS.register_module()
class LearningRateDecayOptimizerConstructor(DefaultOptimizerConstructor):
    def add_params(self, params, module, **kwargs):
        num_layers = self.paramwise_cfg.get("num_layers") + 2
        decay_rate = self.paramwise_cfg.get("decay_rate")
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(".bias") or name.endswith("pos_embed")
            layer = _layer_id(name, num_layers - 2)
            key = "layer_{}_{}".format(layer, "no_decay" if no_decay else "decay")
            scale = decay_rate ** (num_layers - layer - 1)
            group = groups.setdefault(key, dict(params=[], lr=scale * self.base_lr, lr_scale=scale,
                                                weight_decay=0.0 if no_decay else self.base_wd))
            group["params"].append(param)
        params.extend(groups.values())
'''

STANDIN_FILES["mmcv/models/detectors/__init__.py"] = "from .orion import Orion  # noqa: F401\n"

STANDIN_FILES["mmcv/models/detectors/orion.py"] = '''
"""ORION's detector contract in miniature: temporal memory, training-only denoising, loss parsing."""
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmcv.runner import auto_fp16
from mmcv.models.builder import DETECTORS, HEADS, build_backbone, build_head


@HEADS.register_module()
class StreamingDetHead(nn.Module):
    """Keeps one memory row per batch slot; a row is used only if the slot's previous frame is the
    same scene (scene_token) less than 2 s earlier. Denoising queries act in training mode only."""

    def __init__(self, in_channels, num_classes=3, with_dn=True):
        super().__init__()
        self.fuse = nn.Linear(2 * in_channels, in_channels)
        self.cls = nn.Linear(in_channels, num_classes)
        self.dn_embed = nn.Linear(num_classes, in_channels)
        self.dropout = nn.Dropout(0.1)
        self.num_classes = num_classes
        self.with_dn = with_dn
        self.reset_memory()

    def reset_memory(self):
        self.memory, self.prev_metas = None, None

    def _kept_rows(self, img_metas, like):
        keep = torch.zeros(len(img_metas), dtype=like.dtype, device=like.device)
        if self.memory is not None and len(self.prev_metas) == len(img_metas):
            for i, (prev, cur) in enumerate(zip(self.prev_metas, img_metas)):
                dt = cur["timestamp"] - prev["timestamp"]
                keep[i] = float(cur["scene_token"] == prev["scene_token"] and 0 < dt < 2.0)
        return keep

    def forward(self, pooled, img_metas):
        keep = self._kept_rows(img_metas, pooled)
        memory = self.memory * keep[:, None] if keep.any() else torch.zeros_like(pooled)
        feat = torch.relu(self.fuse(torch.cat([pooled, memory], dim=1)))
        self.memory, self.prev_metas = feat.detach(), list(img_metas)
        return feat, keep

    def loss(self, pooled, img_metas, gt_labels):
        feat, keep = self(pooled, img_metas)
        losses = dict(loss_cls=F.cross_entropy(self.cls(self.dropout(feat)), gt_labels),
                      memory_used=keep.mean())
        if self.training and self.with_dn:
            noisy = F.one_hot(gt_labels, self.num_classes).float() + 0.1 * torch.randn(
                len(gt_labels), self.num_classes, device=feat.device)
            losses["dn_loss_cls"] = F.cross_entropy(self.cls(feat + self.dn_embed(noisy)), gt_labels)
        return losses


@HEADS.register_module()
class LaneHead(nn.Linear):
    def __init__(self, in_channels, num_points=4):
        super().__init__(in_channels, num_points)

    def loss(self, pooled, gt_labels):
        target = gt_labels.float()[:, None].expand(-1, self.out_features)
        return dict(loss_bbox_lane=F.l1_loss(self(pooled), target))


class GridMask(nn.Module):
    """Zeroes every fourth row band of the images in training."""

    def forward(self, x):
        if not self.training:
            return x
        mask = torch.ones_like(x)
        mask[..., ::4, :] = 0
        return x * mask


@DETECTORS.register_module()
class Orion(nn.Module):
    def __init__(self, img_backbone=None, pts_bbox_head=None, map_head=None, use_grid_mask=False,
                 train_cfg=None, test_cfg=None, **kwargs):
        super().__init__()
        self.img_backbone = build_backbone(img_backbone)
        self.pts_bbox_head = build_head(pts_bbox_head)
        self.map_head = build_head(map_head)
        self.grid_mask = GridMask()
        self.use_grid_mask = use_grid_mask
        self.img_neck = None
        self.train_cfg, self.test_cfg = train_cfg, test_cfg
        self.fp16_enabled = False
        self.test_flag = False

    def init_weights(self):
        pass

    def extract_img_feat(self, img):
        B, N = img.shape[:2]
        img = img.reshape(B * N, *img.shape[2:])
        if self.use_grid_mask:
            img = self.grid_mask(img)
        feat = self.img_backbone(img)[0]
        return feat.view(B, N, *feat.shape[1:])

    @auto_fp16(apply_to=("img",), out_fp32=True)
    def extract_feat(self, img):
        return self.extract_img_feat(img)

    def forward_train(self, img=None, img_metas=None, gt_labels=None, **kwargs):
        if self.test_flag:
            self.pts_bbox_head.reset_memory()
            self.test_flag = False
        pooled = self.extract_feat(img).mean(dim=(1, 3, 4))
        losses = self.pts_bbox_head.loss(pooled, img_metas, gt_labels)
        losses.update(self.map_head.loss(pooled, gt_labels))
        return losses

    def forward_test(self, img=None, img_metas=None, **kwargs):
        if not self.test_flag:
            self.pts_bbox_head.reset_memory()
            self.test_flag = True
        feat, _ = self.pts_bbox_head(self.extract_feat(img).mean(dim=(1, 3, 4)), img_metas)
        return [dict(label=int(i)) for i in self.pts_bbox_head.cls(feat).argmax(-1)]

    def forward(self, data, return_loss=True):
        if not return_loss:
            return self.forward_test(**data)
        losses = self.forward_train(**data)
        loss, log_vars = self._parse_losses(losses)
        return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img_metas"]))

    def train_step(self, data, optimizer=None):
        """mmcv 1.x's runner entry point; ORION's fork calls ``model(data, return_loss=True)`` instead."""
        return self(data, return_loss=True)

    def _parse_losses(self, losses):
        log_vars = OrderedDict((k, v.mean()) for k, v in losses.items())
        loss = sum(v for k, v in log_vars.items() if "loss" in k)
        log_vars["loss"] = loss
        for key, value in log_vars.items():
            if dist.is_available() and dist.is_initialized():
                value = value.data.clone()
                dist.all_reduce(value.div_(dist.get_world_size()))
            log_vars[key] = value.item()
        return loss, log_vars
'''

STANDIN_FILES["mmcv/datasets/__init__.py"] = '''
from .builder import DATASETS, build_dataloader, build_dataset  # noqa: F401
from . import scene_frames  # noqa: F401
'''

STANDIN_FILES["mmcv/datasets/builder.py"] = '''
"""ORION's dataset builders: with IterBasedRunner, data.shuffler_sampler becomes the batch sampler."""
from functools import partial

from torch.utils.data import DataLoader

from mmcv.parallel import collate
from mmcv.runner import get_dist_info
from mmcv.utils import Registry, build_from_cfg

from .samplers import InfiniteGroupEachSampleInBatchSampler

DATASETS = Registry("dataset")


def build_dataset(cfg, default_args=None):
    return build_from_cfg(cfg, DATASETS, default_args)


def build_dataloader(dataset, samples_per_gpu, workers_per_gpu, num_gpus=1, dist=True, shuffle=True, seed=None,
                     shuffler_sampler=None, nonshuffler_sampler=None, runner_type=dict(type="EpochBasedRunner"),
                     **kwargs):
    rank, world_size = get_dist_info()
    batch_sampler = None
    if runner_type["type"] == "IterBasedRunner" and shuffler_sampler["type"] == "InfiniteGroupEachSampleInBatchSampler":
        options = {k: v for k, v in shuffler_sampler.items() if k != "type"}
        batch_sampler = InfiniteGroupEachSampleInBatchSampler(dataset, samples_per_gpu, world_size, rank,
                                                              seed=seed or 0, **options)
    if batch_sampler is None:
        return DataLoader(dataset, batch_size=samples_per_gpu, shuffle=False, num_workers=workers_per_gpu,
                          collate_fn=partial(collate, samples_per_gpu=samples_per_gpu), **kwargs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers_per_gpu,
                      collate_fn=partial(collate, samples_per_gpu=samples_per_gpu), **kwargs)
'''

STANDIN_FILES["mmcv/datasets/samplers.py"] = '''
"""ORION's streaming batch sampler: every batch slot walks one scene (dataset.flag) in frame order.

Scenes are dealt to the global batch slots from one seeded permutation stream; a slot takes the
next sub-sequence of its scene (the scene cut at seq_split_num - 1 random points; at
warmup_split_num points during the first num_iters_to_seq iterations) and yields it frame by frame.
"""
import itertools

import numpy as np
import torch
from torch.utils.data import Sampler


class InfiniteGroupEachSampleInBatchSampler(Sampler):
    def __init__(self, dataset, samples_per_gpu=1, num_replicas=1, rank=0, seed=0, seq_split_num=1,
                 warmup_split_num=1, num_iters_to_seq=0):
        self.batch_size, self.rank, self.seed = samples_per_gpu, rank, seed
        self.seq_split_num, self.warmup_split_num, self.num_iters_to_seq = seq_split_num, warmup_split_num, num_iters_to_seq
        self.split_generator = torch.Generator().manual_seed(rank + seed)
        flag = np.asarray(dataset.flag)
        self.scenes = [np.where(flag == g)[0].tolist() for g in range(int(flag.max()) + 1)]
        self.global_batch = samples_per_gpu * num_replicas
        assert len(self.scenes) >= self.global_batch, "fewer scenes than batch slots"
        self.iters = 0
        self.sub_sequences = [self._sub_sequences(s) for s in range(len(self.scenes))]
        self.slot_scenes = [itertools.islice(self._scene_stream(), rank * samples_per_gpu + j, None, self.global_batch)
                            for j in range(samples_per_gpu)]
        self.buffers = [[] for _ in range(samples_per_gpu)]

    def _scene_stream(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(len(self.scenes), generator=g).tolist()

    def _sub_sequences(self, scene):
        frames = self.scenes[scene]
        while True:
            cuts = self.warmup_split_num if self.iters < self.num_iters_to_seq else self.seq_split_num - 1
            points = torch.randperm(len(frames), generator=self.split_generator).tolist()
            points.remove(0)
            bounds = [0] + sorted(points[:cuts]) + [len(frames)]
            parts = [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            for i in torch.randperm(len(parts), generator=self.split_generator).tolist():
                yield parts[i]

    def __iter__(self):
        while True:
            batch = []
            for slot in range(self.batch_size):
                if not self.buffers[slot]:
                    self.buffers[slot] = list(next(self.sub_sequences[next(self.slot_scenes[slot])]))
                batch.append(self.buffers[slot].pop(0))
            self.iters += 1
            yield batch

    def __len__(self):
        return len(self.scenes[0]) * len(self.scenes)
'''

STANDIN_FILES["mmcv/datasets/scene_frames.py"] = '''
"""Scenes of consecutive camera frames (0.5 s apart); ``flag`` is the scene index."""
import numpy as np
import torch
from torch.utils.data import Dataset

from mmcv.parallel import DataContainer as DC

from .builder import DATASETS


@DATASETS.register_module()
class SceneFramesDataset(Dataset):
    CLASSES = ("car", "pedestrian", "light")

    def __init__(self, num_scenes=4, frames_per_scene=6, num_cams=2, img_size=32, seed=0, seq_mode=True,
                 test_mode=False):
        self.num_scenes, self.frames, self.num_cams, self.img_size, self.seed = (
            num_scenes, frames_per_scene, num_cams, img_size, seed)
        self.flag = np.repeat(np.arange(num_scenes), frames_per_scene)

    def __len__(self):
        return self.num_scenes * self.frames

    def __getitem__(self, index):
        scene, frame = divmod(index, self.frames)
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        label = (scene + frame // 3) % len(self.CLASSES)
        img = torch.randn(self.num_cams, 3, self.img_size, self.img_size, generator=g) + label
        meta = dict(scene_token="scene_{}".format(scene), timestamp=0.5 * frame, frame_idx=frame)
        return dict(img=DC(img, stack=True), img_metas=DC(meta, cpu_only=True),
                    gt_labels=DC(torch.tensor(label), stack=True, pad_dims=None))
'''

STANDIN_FILES["adzoo/__init__.py"] = ""
STANDIN_FILES["adzoo/orion/__init__.py"] = ""
STANDIN_FILES["adzoo/orion/apis/__init__.py"] = "from .train import custom_train_model  # noqa: F401\n"

STANDIN_FILES["adzoo/orion/apis/train.py"] = '''
"""ORION's custom_train_model: its dataloaders, wrapper, optimizer, runner, hooks and custom_hooks."""
import functools

import torch

import mmcv.runner.hooks.optimizer as optimizer_hooks
from mmcv.parallel import MMDataParallel, MMDistributedDataParallel
from mmcv.runner import HOOKS, build_optimizer, build_runner
from mmcv.utils import build_from_cfg, get_logger

from mmcv.datasets import build_dataloader


def custom_train_model(model, dataset, cfg, distributed=False, validate=False, timestamp=None, meta=None):
    logger = get_logger("mmdet", log_level=cfg.log_level)
    if not torch.cuda.is_available():  # an enabled loss scaler, as on ORION's GPUs (module docstring)
        optimizer_hooks.GradScaler = functools.partial(torch.amp.GradScaler, "cpu")
    datasets = dataset if isinstance(dataset, (list, tuple)) else [dataset]
    loaders = [build_dataloader(ds, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu, len(cfg.gpu_ids),
                                dist=distributed, seed=cfg.seed, shuffler_sampler=cfg.data.shuffler_sampler,
                                nonshuffler_sampler=cfg.data.nonshuffler_sampler, runner_type=cfg.runner)
               for ds in datasets]
    if distributed:
        model = MMDistributedDataParallel(model.cuda(), broadcast_buffers=False,
                                          find_unused_parameters=cfg.get("find_unused_parameters", False))
    else:
        model = MMDataParallel(model, device_ids=list(cfg.gpu_ids))  # CPU: mmcv's scatter to device -1
    optimizer = build_optimizer(model, cfg.optimizer)
    runner = build_runner(cfg.runner, default_args=dict(model=model, optimizer=optimizer, work_dir=cfg.work_dir,
                                                        logger=logger, meta=meta))
    runner.timestamp = timestamp
    runner.register_training_hooks(cfg.lr_config, cfg.optimizer_config, cfg.checkpoint_config, cfg.log_config,
                                   cfg.get("momentum_config", None))
    for hook_cfg in cfg.get("custom_hooks", None) or []:
        hook_cfg = hook_cfg.copy()
        priority = hook_cfg.pop("priority", "NORMAL")
        runner.register_hook(build_from_cfg(hook_cfg, HOOKS), priority=priority)
    if cfg.resume_from:
        runner.resume(cfg.resume_from, map_location="cpu")  # mmcv's default maps to the current CUDA device
    elif cfg.load_from:
        runner.load_checkpoint(cfg.load_from)
    runner.run(loaders, cfg.workflow)
'''

STANDIN_FILES["adzoo/orion/train.py"] = '''
"""ORION's train.py (stand-in): CONFIG [--work-dir] [--resume-from] [--launcher] [--cfg-options] [--seed]."""
import argparse
import os.path as osp
import time

import mmcv
from mmcv import Config, DictAction
from mmcv.runner import set_random_seed
from mmcv.utils import get_logger, import_modules_from_strings

from mmcv.datasets import build_dataset
from mmcv.models import build_model
from adzoo.orion.apis.train import custom_train_model


def parse_args():
    parser = argparse.ArgumentParser(description="Train a detector")
    parser.add_argument("config")
    parser.add_argument("--work-dir")
    parser.add_argument("--resume-from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if cfg.get("custom_imports", None):
        import_modules_from_strings(**cfg["custom_imports"])
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.resume_from is not None and osp.isfile(args.resume_from):
        cfg.resume_from = args.resume_from
    cfg.gpu_ids = range(1)
    if args.launcher != "none":
        raise SystemExit("stand-in train.py: mmcv 1.7.2's distributed wrapper needs CUDA; use --launcher none")
    mmcv.mkdir_or_exist(osp.abspath(cfg.work_dir))
    cfg.dump(osp.join(cfg.work_dir, osp.basename(args.config)))
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    get_logger("mmdet", log_file=osp.join(cfg.work_dir, timestamp + ".log"), log_level=cfg.log_level)
    set_random_seed(args.seed, deterministic=args.deterministic)
    cfg.seed = args.seed
    meta = dict(seed=args.seed, exp_name=osp.basename(args.config), config=cfg.pretty_text)
    model = build_model(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    datasets = [build_dataset(cfg.data.train)]
    model.CLASSES = datasets[0].CLASSES
    custom_train_model(model, datasets, cfg, distributed=False, timestamp=timestamp, meta=meta)


if __name__ == "__main__":
    main()
'''

STANDIN_FILES["adzoo/orion/test.py"] = '''
"""ORION's test.py (stand-in): CONFIG CHECKPOINT; ORION's non-strict load_checkpoint, then inference."""
import argparse

import torch
from mmcv import Config
from mmcv.parallel import collate, scatter
from mmcv.runner import load_checkpoint  # ORION's fork exports it from mmcv.utils; same function
from mmcv.utils import import_modules_from_strings

from mmcv.datasets import build_dataset
from mmcv.models import build_model


def main():
    parser = argparse.ArgumentParser(description="Test a detector")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if cfg.get("custom_imports", None):
        import_modules_from_strings(**cfg["custom_imports"])
    cfg.model.train_cfg = None
    model = build_model(cfg.model, test_cfg=cfg.get("test_cfg"))
    load_checkpoint(model, args.checkpoint, map_location="cpu")  # strict=False: mismatches are only printed
    model.eval()
    dataset = build_dataset(cfg.data.test)
    with torch.no_grad():
        results = [model(scatter(collate([dataset[i]], samples_per_gpu=1), [-1])[0], return_loss=False)
                   for i in range(len(dataset))]
    print("evaluated {} samples".format(len(results)))


if __name__ == "__main__":
    main()
'''

STANDIN_FILES["adzoo/orion/orion_dist_train.sh"] = '''
#!/usr/bin/env bash
# ORION's launcher (stand-in): CONFIG GPUS [extra train.py args]
CFG=$1
GPUS=$2
python -m torch.distributed.run --nproc_per_node=${GPUS} --master_port=${MASTER_PORT:-29617} \\
    $(dirname "$0")/train.py $CFG --launcher pytorch ${@:3}
'''

STANDIN_FILES["adzoo/orion/configs/orion_stage3_train.py"] = '''
num_gpus = 1
batch_size = 2
num_frames = 2 * 3  # data.train: 2 scenes of 3 frames
num_iters_per_epoch = num_frames // (num_gpus * batch_size)  # as ORION's: computed once, for num_gpus
num_epochs = 2
model = dict(
    type="Orion",
    use_grid_mask=True,
    img_backbone=dict(type="EVAViT", img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024,
                      depth=24, num_heads=16, mlp_ratio=4 * 2 / 3, qkv_bias=True, drop_path_rate=0.3,
                      flash_attn=True, with_cp=True, frozen=False),
    pts_bbox_head=dict(type="StreamingDetHead", in_channels=32, num_classes=3, with_dn=True),
    map_head=dict(type="LaneHead", in_channels=32))
dataset_type = "SceneFramesDataset"
data = dict(
    samples_per_gpu=batch_size,
    workers_per_gpu=0,
    train=dict(type=dataset_type, num_scenes=2, frames_per_scene=3, seq_mode=True),
    val=dict(type=dataset_type, num_scenes=2, frames_per_scene=3, test_mode=True),
    shuffler_sampler=dict(type="InfiniteGroupEachSampleInBatchSampler", seq_split_num=1, warmup_split_num=2,
                          num_iters_to_seq=num_iters_per_epoch),
    nonshuffler_sampler=dict(type="DistributedSampler"))
optimizer = dict(constructor="LearningRateDecayOptimizerConstructor", type="AdamW", lr=1e-3, betas=(0.9, 0.999),
                 weight_decay=1e-5, paramwise_cfg=dict(decay_rate=0.9, decay_type="vit_wise", num_layers=2))
optimizer_config = dict(type="Fp16OptimizerHook", loss_scale="dynamic", grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(policy="CosineAnnealing", warmup="linear", warmup_iters=2, warmup_ratio=1.0 / 3, min_lr_ratio=1e-3)
find_unused_parameters = False
checkpoint_config = dict(interval=num_iters_per_epoch, max_keep_ckpts=3)
runner = dict(type="IterBasedRunner", max_iters=num_epochs * num_iters_per_epoch)
log_config = dict(interval=1, hooks=[dict(type="TextLoggerHook")])
dist_params = dict(backend="gloo")
log_level = "INFO"
work_dir = None
load_from = None
resume_from = None
workflow = [("train", 1)]
'''

STANDIN_FILES["adzoo/orion/configs/orion_stage3_infer.py"] = '''
model = dict(
    type="Orion",
    use_grid_mask=True,
    img_backbone=dict(type="EVAViT", img_size=640, patch_size=16, window_size=16, in_chans=3, embed_dim=1024,
                      depth=24, num_heads=16, mlp_ratio=4 * 2 / 3, qkv_bias=True, drop_path_rate=0.3,
                      flash_attn=True, with_cp=True, frozen=False),
    pts_bbox_head=dict(type="StreamingDetHead", in_channels=32, num_classes=3, with_dn=True),
    map_head=dict(type="LaneHead", in_channels=32))
data = dict(test=dict(type="SceneFramesDataset", num_scenes=2, frames_per_scene=3, test_mode=True))
'''


def write_orion_tree(root: Path, mmcv_1x_dir: Path) -> Path:
    """Write the ORION-shaped tree under ``root`` (mmcv 1.7.2 from ``mmcv_1x_dir``); returns ``root``."""
    shutil.copytree(str(Path(mmcv_1x_dir) / "mmcv"), str(root / "mmcv"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for rel, text in STANDIN_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    os.chmod(str(root / "adzoo/orion/orion_dist_train.sh"), 0o755)
    return root
