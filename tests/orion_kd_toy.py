"""A toy KD detector and dataset for the training-loop tests (test-only registry names).

``OrionKDTestToyDetector`` follows the detector contract of .dev/INTERFACES.md:
``forward(data, return_loss=True) -> dict(loss, log_vars, num_samples)``, an
``img_backbone.blocks.N`` path (layer-wise decay), a frozen teacher left out of
``state_dict()``, frozen heads, GridMask-like and dropout randomness, and the
optional ``set_distillation_alpha`` / ``export_student`` hooks. It can also be
told to sleep per step (kill tests) or to raise on one rank (failure tests).
"""
from __future__ import annotations

import atexit
import os
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmcv.models.builder import MODELS

try:
    from mmcv.datasets.builder import DATASETS
except ImportError:  # the dataset registry has not landed: in-process tests still work
    DATASETS = None


class ToyDataContainer:
    """Duck-typed stand-in for mmcv's DataContainer (``data``, ``stack``, ``cpu_only``)."""

    def __init__(self, data: Any, stack: bool = False, cpu_only: bool = False) -> None:
        self.data = data
        self.stack = stack
        self.cpu_only = cpu_only


class ToyBlock(nn.Module):
    def __init__(self, dim: int, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class ToyBackbone(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, patch: int = 4, img: int = 16, drop: float = 0.1) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList([ToyBlock(dim, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return [self.norm(t)]


class ToyGridMask(nn.Module):
    """Zeroes random stripes in training (uses the global torch RNG, like ORION's GridMask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, x.shape[2], 1) > 0.3).to(x.dtype)
        return x * keep


class OrionKDTestToyDetector(nn.Module):
    """Student backbone (trained) + frozen teacher backbone + frozen heads."""

    def __init__(self, embed_dim: int = 16, depth: int = 3, drop: float = 0.1, sleep: float = 0.0,
                 fail_rank: Optional[int] = None, fail_iter: Optional[int] = None, dump_dir: Optional[str] = None,
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.img_backbone = ToyBackbone(embed_dim, depth, drop=drop)
        self.teacher_backbone = ToyBackbone(embed_dim, depth, drop=0.0)
        self.img_neck = None
        self.pts_bbox_head = nn.Linear(embed_dim, 4)
        self.map_head = nn.Linear(embed_dim, 2)
        self.lm_head = None
        self.grid_mask = ToyGridMask()
        self.use_grid_mask = True
        self.alpha = 0.5
        self.alpha_history: List[float] = []
        self.sleep = sleep
        self.fail_rank, self.fail_iter = fail_rank, fail_iter
        self.calls = 0
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("img_backbone."))
        if dump_dir:  # every rank writes its final student weights at exit (DDP consistency tests)
            atexit.register(self._dump_weights, dump_dir)

    def _dump_weights(self, dump_dir: str) -> None:
        os.makedirs(dump_dir, exist_ok=True)
        path = os.path.join(dump_dir, "rank{}.pth".format(os.environ.get("RANK", "0")))
        torch.save({k: v.detach().cpu() for k, v in self.img_backbone.state_dict().items()}, path)

    def train(self, mode: bool = True) -> "OrionKDTestToyDetector":
        super().train(mode)
        self.teacher_backbone.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith("teacher_backbone.")]:
            del sd[key]
        return sd

    def set_distillation_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)
        self.alpha_history.append(self.alpha)

    def export_student(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save({"state_dict": self.img_backbone.state_dict()}, tmp)
        os.replace(tmp, path)

    def forward(self, data: Dict[str, Any], return_loss: bool = True) -> Dict[str, Any]:
        self.calls += 1
        if self.fail_iter is not None and self.calls == self.fail_iter:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            if self.fail_rank is None or rank == self.fail_rank:
                raise RuntimeError("toy failure on rank {} at call {}".format(rank, self.calls))
        if self.sleep:
            time.sleep(self.sleep)
        img = data["img"]
        assert isinstance(data["img_metas"], list) and isinstance(data["img_metas"][0], dict)
        b, n = img.shape[:2]
        x = self.grid_mask(img.flatten(0, 1))
        feat = self.img_backbone(x)[0]
        with torch.no_grad():
            teacher = self.teacher_backbone(x)[0]
        pred = self.pts_bbox_head(feat.mean(1)).view(b, n, -1).mean(1)
        task_loss = F.mse_loss(pred, data["gt"])
        distill_loss = F.mse_loss(feat, teacher)
        loss = (1 - self.alpha) * task_loss + self.alpha * distill_loss
        log_vars = dict(task_loss=float(task_loss.detach()), backbone_distill_loss=float(distill_loss.detach()),
                        total_loss=float(loss.detach()))
        return dict(loss=loss, log_vars=log_vars, num_samples=b)


class OrionKDTestToyDataset(Dataset):
    """Deterministic multi-view samples: ``img`` [2, 3, 16, 16], ``gt`` [4], ``img_metas``."""

    def __init__(self, num_samples: int = 10, num_cams: int = 2) -> None:
        self.num_samples = num_samples
        self.num_cams = num_cams

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        gen = torch.Generator().manual_seed(1000 + int(idx))
        img = torch.randn(self.num_cams, 3, 16, 16, generator=gen)
        gt = img.mean(dim=(0, 2, 3))[:3].repeat(2)[:4] * 5
        return dict(img=img, gt=gt, img_metas=dict(sample_idx=int(idx)))

    @staticmethod
    def collate_fn(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return dict(img=ToyDataContainer([torch.stack([s["img"] for s in samples])], stack=True),
                    gt=torch.stack([s["gt"] for s in samples]),
                    img_metas=ToyDataContainer([[s["img_metas"] for s in samples]], cpu_only=True))


if "OrionKDTestToyDetector" not in MODELS:
    MODELS.register_module(name="OrionKDTestToyDetector", module=OrionKDTestToyDetector)
if DATASETS is not None and "OrionKDTestToyDataset" not in DATASETS:
    DATASETS.register_module(name="OrionKDTestToyDataset", module=OrionKDTestToyDataset)
