"""A toy KD detector, dataset and test hooks for the training-loop tests (test-only registry names).

``OrionKDTestToyDetector`` follows ORION's detector contract:
``forward(data, return_loss=True) -> dict(loss, log_vars, num_samples)``, an
``img_backbone.blocks.N`` path (layer-wise decay), a frozen teacher held outside the
module tree, frozen heads, GridMask-like and dropout randomness and
``set_distillation_alpha``. It records the alpha and the autocast dtype of every
forward, can sleep per step (kill tests), raise on one rank (failure tests), make the loss NaN
at chosen forwards and imitate fp16 gradient overflow (non-finite step tests).
``OrionKDTestToyDataset`` has scenes of two samples (``flag``) for the streaming sampler.
The ``OrionKDTest*Hook`` classes are small ``custom_hooks`` that record what the loop does.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmcv.datasets.builder import DATASETS
from mmcv.models.builder import MODELS
from mmcv.runner.hooks import HOOKS, Hook


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


class _OverflowAbove(torch.autograd.Function):
    """Identity whose backward turns the gradient infinite when it exceeds ``limit`` in magnitude:
    fp16 overflow as a loss scaler meets it (a scaled loss's gradient is the scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.limit = limit
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return (grad * float("inf") if bool(grad.abs().max() > ctx.limit) else grad), None


class OrionKDTestToyDetector(nn.Module):
    """Student backbone (trained) + frozen teacher backbone (outside the module tree) + frozen heads."""

    def __init__(self, embed_dim: int = 16, depth: int = 3, drop: float = 0.1, sleep: float = 0.0,
                 fail_rank: Optional[int] = None, fail_iter: Optional[int] = None,
                 nan_calls: Sequence[int] = (), overflow_above: Optional[float] = None,
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.img_backbone = ToyBackbone(embed_dim, depth, drop=drop)
        object.__setattr__(self, "teacher_backbone", ToyBackbone(embed_dim, depth, drop=0.0).eval())
        self.img_neck = None
        self.pts_bbox_head = nn.Linear(embed_dim, 4)
        self.map_head = nn.Linear(embed_dim, 2)
        self.grid_mask = ToyGridMask()
        self.use_grid_mask = True
        self.alpha = 0.5
        self.alpha_per_forward: List[float] = []
        self.head_output_dtypes: List[torch.dtype] = []
        self.sleep = sleep
        self.fail_rank, self.fail_iter = fail_rank, fail_iter
        self.nan_calls, self.overflow_above = set(nan_calls), overflow_above
        self.calls = 0
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("img_backbone."))
        self.teacher_backbone.requires_grad_(False)

    def set_distillation_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)

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
        self.alpha_per_forward.append(self.alpha)
        pred = self.pts_bbox_head(feat.mean(1)).view(b, n, -1).mean(1)
        self.head_output_dtypes.append(pred.dtype)  # a Linear: its dtype shows autocast
        task_loss = F.mse_loss(pred.float(), data["gt"])
        distill_loss = F.mse_loss(feat.float(), teacher.float())
        loss = (1 - self.alpha) * task_loss + self.alpha * distill_loss
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        if self.overflow_above is not None:
            loss = _OverflowAbove.apply(loss, self.overflow_above)
        log_vars = dict(task_loss=float(task_loss.detach()), backbone_distill_loss=float(distill_loss.detach()),
                        total_loss=float(loss.detach()))
        return dict(loss=loss, log_vars=log_vars, num_samples=b)


class OrionKDTestToyDataset(Dataset):
    """Deterministic multi-view samples: ``img`` [2, 3, 16, 16], ``gt`` [4], ``img_metas``; scenes of 2."""

    def __init__(self, num_samples: int = 10, num_cams: int = 2) -> None:
        self.num_samples = num_samples
        self.num_cams = num_cams
        self.flag = np.arange(num_samples, dtype=np.int64) // 2

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        gen = torch.Generator().manual_seed(1000 + int(idx))
        img = torch.randn(self.num_cams, 3, 16, 16, generator=gen)
        gt = img.mean(dim=(0, 2, 3))[:3].repeat(2)[:4] * 5
        return dict(img=img, gt=gt, img_metas=dict(sample_idx=int(idx)))

    @staticmethod
    def collate_fn(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return dict(img=torch.stack([s["img"] for s in samples]), gt=torch.stack([s["gt"] for s in samples]),
                    img_metas=[s["img_metas"] for s in samples])


def _raw(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class OrionKDTestRecordHook(Hook):
    """Records ``(stage, iter, epoch, inner_iter)`` at every stage; writes them to ``out`` (per rank) at the end."""

    instances: List["OrionKDTestRecordHook"] = []

    def __init__(self, out: Optional[str] = None) -> None:
        self.out = out
        self.calls: List[tuple] = []
        OrionKDTestRecordHook.instances.append(self)

    def _record(self, stage: str, runner: Any) -> None:
        self.calls.append((stage, runner.iter, runner.epoch, runner.inner_iter))

    def before_run(self, runner: Any) -> None:
        self._record("before_run", runner)

    def before_epoch(self, runner: Any) -> None:
        self._record("before_epoch", runner)

    def before_train_epoch(self, runner: Any) -> None:
        self._record("before_train_epoch", runner)

    def before_train_iter(self, runner: Any) -> None:
        self._record("before_train_iter", runner)

    def after_train_iter(self, runner: Any) -> None:
        self._record("after_train_iter", runner)

    def after_train_epoch(self, runner: Any) -> None:
        self._record("after_train_epoch", runner)

    def after_epoch(self, runner: Any) -> None:
        self._record("after_epoch", runner)

    def after_run(self, runner: Any) -> None:
        self._record("after_run", runner)
        if self.out:
            path = "{}.rank{}.json".format(self.out, runner.rank)
            with open(path, "w") as handle:
                json.dump(self.calls, handle)


class OrionKDTestAlphaHook(Hook):
    """Sets the distillation alpha before every iteration: ``high`` before ``switch_iter``, ``low`` after."""

    def __init__(self, switch_iter: int = 3, high: float = 0.8, low: float = 0.6) -> None:
        self.switch_iter, self.high, self.low = switch_iter, high, low

    def before_train_iter(self, runner: Any) -> None:
        _raw(runner.model).set_distillation_alpha(self.high if runner.iter < self.switch_iter else self.low)


class OrionKDTestLogHook(Hook):
    """Adds ``hook_value`` (= iter) to the log buffer and remembers the last iteration in ``meta['hook_msgs']``."""

    def after_train_iter(self, runner: Any) -> None:
        runner.log_buffer.update(dict(hook_value=float(runner.iter)), 1)
        runner.meta.setdefault("hook_msgs", {})["last_iter"] = runner.iter
        runner.meta["hook_msgs"].setdefault("iters_seen", 0)
        runner.meta["hook_msgs"]["iters_seen"] += 1


class OrionKDTestDumpWeightsHook(Hook):
    """Every rank writes its model's state dict before and after the run (DDP consistency tests)."""

    def __init__(self, dump_dir: str) -> None:
        self.dump_dir = dump_dir

    def _dump(self, runner: Any, when: str) -> None:
        os.makedirs(self.dump_dir, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in _raw(runner.model).state_dict().items()}
        torch.save(state, os.path.join(self.dump_dir, "{}_rank{}.pth".format(when, runner.rank)))

    def before_run(self, runner: Any) -> None:
        self._dump(runner, "before")

    def after_run(self, runner: Any) -> None:
        self._dump(runner, "after")


class OrionKDTestStepRecordHook(Hook):
    """After every iteration, records the trainable weights, ``runner.outputs`` and the loss scale in ``meta``."""

    instances: List["OrionKDTestStepRecordHook"] = []

    def __init__(self) -> None:
        self.weights: List[torch.Tensor] = []
        self.scales: List[Optional[float]] = []
        OrionKDTestStepRecordHook.instances.append(self)

    def after_train_iter(self, runner: Any) -> None:
        params = [p.detach().flatten() for p in _raw(runner.model).parameters() if p.requires_grad]
        self.weights.append(torch.cat(params).clone())
        scaler = (runner.meta.get("fp16") or {}).get("loss_scaler") or {}
        self.scales.append(scaler.get("scale"))


class OrionKDTestOrderHook(Hook):
    """Appends its name to ``ORDER`` at ``before_run`` (priority-order tests)."""

    ORDER: List[str] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def before_run(self, runner: Any) -> None:
        OrionKDTestOrderHook.ORDER.append(self.name)


for _registry, _cls in ((MODELS, OrionKDTestToyDetector), (DATASETS, OrionKDTestToyDataset),
                        (HOOKS, OrionKDTestRecordHook), (HOOKS, OrionKDTestAlphaHook), (HOOKS, OrionKDTestLogHook),
                        (HOOKS, OrionKDTestDumpWeightsHook), (HOOKS, OrionKDTestOrderHook),
                        (HOOKS, OrionKDTestStepRecordHook)):
    if _cls.__name__ not in _registry:
        _registry.register_module(name=_cls.__name__, module=_cls)
