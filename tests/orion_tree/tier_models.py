"""A small base detector and dataset, registered in ORION's own registries (tier subprocesses only).

``OrionTierDetector`` imitates the calling convention of ORION's ``Orion``
(``mmcv/models/detectors/orion.py``): ``forward(data, return_loss=True)`` runs ``forward_train(**data)`` and
``_parse_losses`` and returns ``dict(loss, log_vars, num_samples=len(img_metas))``; ``return_loss=False``
runs ``forward_test``; the backbone is built by ORION's ``build_backbone`` as ``img_backbone``. The real
``Orion`` needs the LLM and CUDA heads, so a frozen linear head stands in for them. ``OrionTierDataset``
imitates ORION's ``B2DOrionDataset`` (``mmcv/datasets/b2d_orion_dataset.py``) where the tier needs it:
scenes in ``flag`` for ORION's streaming sampler and ``evaluate(results)`` for ORION's evaluation hook.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmcv.datasets.builder import DATASETS
from mmcv.parallel import DataContainer
from mmcv.models.backbones.base_module import BaseModule
from mmcv.models.builder import DETECTORS, build_backbone

#: A tiny EVA-02 geometry: 4 heads of 8 channels, 2 blocks (one windowed), 32x32 images.
TINY_BACKBONE = dict(img_size=32, patch_size=8, window_size=2, embed_dim=32, depth=2, window_block_indexes=[0],
                     mlp_ratio=4 * 2 / 3, flash_attn=False, with_cp=False, drop_path_rate=0.1)


def _unwrap(metas: Any) -> List[Dict[str, Any]]:
    return metas.data[0] if hasattr(metas, "data") else metas


class _InfGradient(torch.autograd.Function):
    """Identity forward; backward hands the backbone inf gradients (what an fp16 overflow looks like)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


@DETECTORS.register_module()
class OrionTierDetector(BaseModule):
    """ORION's detector contract in miniature: an ``img_backbone`` and a (frozen by KD) linear head."""

    def __init__(self, img_backbone: Dict[str, Any], embed_dim: int = 32, use_grid_mask: bool = False,
                 train_cfg: Any = None, test_cfg: Any = None, pretrained: Any = None,
                 inf_gradients: bool = False) -> None:
        super().__init__()
        self.inf_gradients = inf_gradients  # a diverged run: finite loss, inf gradients into the backbone
        self.img_backbone = build_backbone(img_backbone)
        self.pts_bbox_head = nn.Linear(embed_dim, 2)
        self.use_grid_mask = use_grid_mask

    def extract_img_feat(self, img: torch.Tensor) -> torch.Tensor:
        feats = self.img_backbone(img.flatten(0, 1) if img.dim() == 5 else img)
        return feats[0].mean(dim=(2, 3))

    def forward(self, data: Dict[str, Any], return_loss: bool = True) -> Any:
        data = dict(data, img_metas=_unwrap(data["img_metas"]))  # ORION's collate wraps them (DataContainer)
        if return_loss:
            losses = self.forward_train(**data)
            loss, log_vars = self._parse_losses(losses)
            return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img_metas"]))
        return self.forward_test(**data)

    def forward_train(self, img: torch.Tensor, img_metas: List[Dict[str, Any]], target: torch.Tensor,
                      **kwargs: Any) -> Dict[str, torch.Tensor]:
        feat = self.extract_img_feat(img)
        if self.inf_gradients:
            feat = _InfGradient.apply(feat)
        pred = self.pts_bbox_head(feat)
        return OrderedDict(loss_bbox=F.mse_loss(pred, target))

    def forward_test(self, img: torch.Tensor, img_metas: List[Dict[str, Any]], **kwargs: Any) -> List[Dict]:
        pred = self.pts_bbox_head(self.extract_img_feat(img))
        return [dict(pred=p.tolist(), sample_idx=m["sample_idx"]) for p, m in zip(pred, img_metas)]

    def _parse_losses(self, losses: Dict[str, torch.Tensor]):
        log_vars = OrderedDict((k, v.mean()) for k, v in losses.items())
        loss = sum(v for k, v in log_vars.items() if "loss" in k)
        log_vars["loss"] = loss
        return loss, OrderedDict((k, v.item()) for k, v in log_vars.items())


@DATASETS.register_module()
class OrionTierDataset(Dataset):
    """``scenes`` scenes of ``frames`` consecutive frames; ``evaluate`` records what ORION's test gave it."""

    def __init__(self, scenes: int = 4, frames: int = 3, size: int = 32, test_mode: bool = False,
                 **kwargs: Any) -> None:
        gen = torch.Generator().manual_seed(7)
        self.img = torch.randn(scenes * frames, 3, size, size, generator=gen)
        self.target = torch.randn(scenes * frames, 2, generator=gen)
        self.flag = np.repeat(np.arange(scenes), frames).astype(np.int64)
        self.evaluated: List[int] = []

    def __len__(self) -> int:
        return len(self.flag)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        meta = dict(sample_idx=int(idx), scene_token=int(self.flag[idx]))
        return dict(img=self.img[idx], target=self.target[idx], img_metas=DataContainer(meta, cpu_only=True))

    def evaluate(self, results: Dict[str, Any], logger: Any = None, **kwargs: Any) -> Dict[str, float]:
        preds = results["bbox_results"]
        self.evaluated.append(len(preds))
        return dict(tier_eval_samples=float(len(preds)))
