"""A fake ORION checkout for the installer tests: its own mmcv-1.x-like package and ``Orion`` detector.

The fake ``mmcv`` has a registry that refuses duplicate names, ``build_model`` and
``mmcv.utils``; the ``Orion`` detector honours ORION's contract in miniature
(mmcv/models/detectors/orion.py). Written from ORION's files, none of ORION's code copied; the
installer on ORION's real tree is tested in tests/test_orion_tree.py.
"""
from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path
from typing import Dict, Optional

from tools import plugin_manifest as manifest

FAKE_ORION: Dict[str, str] = {
    "mmcv/__init__.py": '"""Fake ORION mmcv package (tests only)."""\n__version__ = "1.x-fake"\n',
    "mmcv/utils/__init__.py": '''
        """A few of ORION's mmcv.utils helpers."""
        import functools
        import importlib
        import random


        def get_dist_info():
            return 0, 1


        def set_random_seed(seed, deterministic=False):
            import torch
            random.seed(seed)
            torch.manual_seed(seed)


        def import_modules_from_strings(imports, allow_failed_imports=False):
            single = isinstance(imports, str)
            mods = [importlib.import_module(name) for name in ([imports] if single else imports)]
            return mods[0] if single else mods


        class Config(dict):
            """mmcv 1.x's Config, reduced to what the plugin reads: a dict of a .py file's names."""

            @classmethod
            def fromfile(cls, path):
                import runpy
                return cls({k: v for k, v in runpy.run_path(path).items() if not k.startswith('__')})

            def __getattr__(self, name):
                return self[name]


        def auto_fp16(apply_to=None, out_fp32=False):
            def wrap(fn):
                @functools.wraps(fn)
                def inner(*args, **kwargs):
                    return fn(*args, **kwargs)
                return inner
            return wrap
        ''',
    "mmcv/models/__init__.py": '''
        from .builder import *  # noqa
        from . import backbones, detectors  # noqa
        ''',
    "mmcv/models/builder.py": '''
        """mmcv-1.x-like registry: one object under every alias; duplicates raise KeyError."""


        class Registry(object):
            def __init__(self, name):
                self._name = name
                self._module_dict = {}

            def get(self, key):
                return self._module_dict.get(key)

            def register_module(self, name=None, module=None):
                def _register(cls):
                    key = name or cls.__name__
                    if key in self._module_dict:
                        raise KeyError("{} is already registered in {}".format(key, self._name))
                    self._module_dict[key] = cls
                    return cls
                return _register(module) if module is not None else _register

            def build(self, cfg, default_args=None):
                args = dict(cfg)
                obj_type = args.pop("type")
                cls = self.get(obj_type) if isinstance(obj_type, str) else obj_type
                if cls is None:
                    raise KeyError("{} is not in the {} registry".format(obj_type, self._name))
                for key, value in (default_args or {}).items():
                    args.setdefault(key, value)
                return cls(**args)


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
        ''',
    "mmcv/models/utils/__init__.py": '"""ORION keeps shared model helpers here."""\n',
    "mmcv/models/backbones/__init__.py": "from .vit import FakeViT  # noqa\n",
    "mmcv/models/backbones/vit.py": '''
        """ORION's own backbone, in miniature: one patch embedding."""
        from torch import nn

        from ..builder import BACKBONES


        @BACKBONES.register_module()
        class FakeViT(nn.Module):
            def __init__(self, embed_dim=16, patch_size=8, in_chans=3):
                super().__init__()
                self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

            def forward(self, x):
                return [self.patch_embed(x)]
        ''',
    "mmcv/models/detectors/__init__.py": "from .orion import Orion  # noqa\n",
    "mmcv/models/detectors/orion.py": '''
        """ORION's detector contract in miniature (img_backbone, heads, grid mask, loss parsing)."""
        from collections import OrderedDict

        import torch
        import torch.nn.functional as F
        from torch import nn

        from mmcv.models.builder import DETECTORS, HEADS, build_backbone, build_head, build_neck
        from mmcv.utils import auto_fp16


        @HEADS.register_module()
        class FakeHead(nn.Linear):
            def __init__(self, in_channels=16, out_channels=3):
                super().__init__(in_channels, out_channels)


        class GridMask(nn.Module):
            """Zeroes every fourth row band of the image in training."""

            def forward(self, x):
                if not self.training:
                    return x
                mask = torch.ones_like(x)
                mask[..., ::4, :] = 0
                return x * mask


        @DETECTORS.register_module()
        class Orion(nn.Module):
            def __init__(self, img_backbone=None, img_neck=None, pts_bbox_head=None, map_head=None,
                         lm_head=None, use_grid_mask=False, train_cfg=None, test_cfg=None, **kwargs):
                super().__init__()
                self.img_backbone = build_backbone(img_backbone) if img_backbone else None
                self.img_neck = build_neck(img_neck) if img_neck else None
                self.pts_bbox_head = build_head(pts_bbox_head)
                self.map_head = build_head(map_head)
                self.lm_head = build_head(lm_head)
                self.tokenizer = None
                self.grid_mask = GridMask()
                self.use_grid_mask = use_grid_mask
                self.train_cfg, self.test_cfg = train_cfg, test_cfg

            def extract_img_feat(self, img, img_metas=None):
                B, N = img.shape[:2]
                img = img.squeeze(0) if B == 1 else img.reshape(B * N, *img.shape[2:])
                if self.use_grid_mask:
                    img = self.grid_mask(img)
                feats = self.img_backbone(img)
                if self.img_neck is not None:
                    feats = self.img_neck(feats)
                return [f.reshape(B, N, *f.shape[1:]) for f in feats]

            @auto_fp16(apply_to=("img",), out_fp32=True)
            def extract_feat(self, img, img_metas=None):
                return self.extract_img_feat(img, img_metas)

            def _pool(self, img, img_metas):
                return self.extract_feat(img, img_metas)[0].mean(dim=(1, 3, 4))

            def forward_train(self, img=None, img_metas=None, gt_labels=None, map_targets=None, **kwargs):
                pooled = self._pool(img, img_metas)
                return dict(
                    loss_cls=F.cross_entropy(self.pts_bbox_head(pooled), gt_labels),
                    loss_bbox_lane=F.mse_loss(self.map_head(pooled), map_targets),
                    vlm_loss=F.cross_entropy(self.lm_head(pooled), gt_labels),
                )

            def forward_test(self, img=None, img_metas=None, **kwargs):
                pooled = self._pool(img, img_metas)
                return [dict(labels=int(i)) for i in self.pts_bbox_head(pooled).argmax(-1)]

            def forward(self, data, return_loss=True):
                if not return_loss:
                    return self.forward_test(**data)
                losses = self.forward_train(**data)
                loss, log_vars = self._parse_losses(losses)
                return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img_metas"]))

            def _parse_losses(self, losses):
                log_vars = OrderedDict((k, v.mean()) for k, v in losses.items())
                loss = sum(v for k, v in log_vars.items() if "loss" in k)
                log_vars["loss"] = loss
                return loss, OrderedDict((k, float(v)) for k, v in log_vars.items())
        ''',
    "mmcv/runner/__init__.py": "from .hooks import HOOKS, Hook  # noqa\n",
    "mmcv/runner/hooks/__init__.py": '''
        """ORION's hook registry and base class, in miniature."""
        from mmcv.models.builder import Registry

        HOOKS = Registry("hook")


        class Hook(object):
            def before_run(self, runner):
                pass

            def after_run(self, runner):
                pass
        ''',
    "adzoo/__init__.py": "",
    "adzoo/orion/__init__.py": "",
}
# ORION's own files next to the plugin's paths (names as in the public ORION tree): the overlay
# must add beside them and change none of them.
for _rel in ("adzoo/orion/train.py", "adzoo/orion/test.py", "adzoo/orion/apis/__init__.py",
             "adzoo/orion/apis/train.py", "adzoo/orion/apis/mmdet_train.py", "adzoo/orion/apis/test.py",
             "adzoo/orion/configs/orion_stage3_train.py", "adzoo/orion/configs/orion_stage3_infer.py",
             "adzoo/orion/configs/orion_stage3.py", "mmcv/models/backbones/eva_vit.py",
             "mmcv/models/utils/grid_mask.py", "mmcv/models/utils/layer_decay_optimizer_constructor.py",
             "mmcv/runner/hooks/hook.py", "mmcv/runner/hooks/optimizer.py"):
    FAKE_ORION.setdefault(_rel, "# ORION's {} (fake tree)\n".format(_rel))
FAKE_ORION["adzoo/orion/orion_dist_train.sh"] = "#!/usr/bin/env bash\n# ORION's launcher: CONFIG GPUS [args]\n"

# A miniature plugin source tree: the manifest's paths, registering the manifest's types.
FAKE_PLUGIN_SOURCES: Dict[str, str] = {
    "mmcv/models/backbones/eva_vit_student.py": '''
        from mmcv.models.builder import BACKBONES
        from mmcv.models.backbones.vit import FakeViT


        @BACKBONES.register_module()
        class EVAViTStudent(FakeViT):
            pass
        ''',
    "mmcv/models/detectors/orion_student.py": '''
        from mmcv.models.builder import DETECTORS
        from mmcv.models.detectors.orion import Orion


        @DETECTORS.register_module()
        class OrionStudent(Orion):
            pass
        ''',
    "mmcv/models/losses/kd_losses.py": '''
        from mmcv.models.builder import LOSSES


        @LOSSES.register_module()
        class CombinedKDLoss(object):
            pass
        ''',
    "mmcv/runner/hooks/kd_hooks.py": '''
        from mmcv.runner.hooks import HOOKS, Hook


        @HOOKS.register_module()
        class KDAlphaScheduleHook(Hook):
            pass


        @HOOKS.register_module()
        class KDCheckHook(Hook):
            pass


        @HOOKS.register_module()
        class KDExportStudentHook(Hook):
            pass


        @HOOKS.register_module()
        class KDLrLogHook(Hook):
            pass
        ''',
    "mmcv/runner/hooks/resume_check.py": '''
        from mmcv.runner.hooks import HOOKS, Hook


        @HOOKS.register_module()
        class ResumeCheckHook(Hook):
            pass
        ''',
}


def write_tree(root: Path, files: Dict[str, str]) -> None:
    """Write ``files`` (relative path -> dedented text) under ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def make_fake_orion(tmp_path: Path) -> Path:
    """A fake ORION checkout with its own mmcv, registry and Orion detector."""
    root = tmp_path / "Orion"
    write_tree(root, FAKE_ORION)
    os.chmod(str(root / "adzoo/orion/orion_dist_train.sh"), 0o755)
    return root


def make_fake_source(tmp_path: Path) -> Path:
    """A fake ORION-KD checkout holding every manifest file (tiny registering modules)."""
    src = tmp_path / "orion_kd_src"
    files = {rel: FAKE_PLUGIN_SOURCES.get(rel, "# {} (fake plugin source)\n".format(rel))
             for rel in manifest.PLUGIN_FILES}
    write_tree(src, files)
    return src


def tree_snapshot(root: Path) -> Dict[str, Optional[str]]:
    """Every file (-> sha256 and mode) and folder (-> None) under ``root``."""
    snap = {}  # type: Dict[str, Optional[str]]
    for dirpath, dirnames, filenames in os.walk(str(root)):
        rel_dir = os.path.relpath(dirpath, str(root))
        snap[rel_dir + "/"] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            snap[os.path.join(rel_dir, name)] = "{} {:o}".format(digest, os.stat(path).st_mode & 0o777)
    return snap


__all__ = ["FAKE_ORION", "FAKE_PLUGIN_SOURCES", "write_tree", "make_fake_orion", "make_fake_source", "tree_snapshot"]
