"""Task heads of the miniature ORION: detection, lanes, and the visual-token projector.

They read the backbone's token grid (one [C, h, w] map per camera) and mirror
the roles of ORION's heads at toy scale:

* ``TinyDetHead`` (``pts_bbox_head``): a dense, one-object-per-cell detector. The
  cell holding a box centre predicts its class, the centre offset inside the
  cell, the log size, and for traffic lights the lamp state. Like ORION's
  detection head it keeps a temporal memory per batch slot (``SceneMemory``:
  the previous frame's pooled features and traffic-state probabilities, reset
  at a scene change), so it must run exactly once per frame;
  ``num_train_calls`` lets tests check that.
* ``TinyMapHead`` (``map_head``): lane-marking logits at a finer grid (pixel shuffle).
* ``TinyVLProjector``: pools the token grid and the detection head's cell
  features of every camera into local and global scene tokens, adds camera and
  position embeddings and projects into the language model's width; these are
  the visual tokens handed to the LM (``TinyOrion.vl_tokens``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcv.datasets.chat_b2d_metrics import box_iou
from mmcv.models.builder import HEADS

from .tiny_temporal_memory import SceneMemory, pooled_per_sample


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise GIoU of matching rows of [K, 4] boxes (x1, y1, x2, y2)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def nms(boxes: Tensor, scores: Tensor, iou_thr: float) -> Tensor:
    """Indices kept by greedy non-maximum suppression, by decreasing score."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep: List[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    ious = box_iou(boxes[order], boxes[order])
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= ious[i] > iou_thr
    return torch.tensor(keep, dtype=torch.long)


def _conv_block(in_channels: int, feat_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, feat_channels, 3, padding=1), nn.GroupNorm(8, feat_channels),
                         nn.GELU(), nn.Conv2d(feat_channels, feat_channels, 3, padding=1), nn.GELU())


@HEADS.register_module()
class TinyDetHead(nn.Module):
    """Dense 2D detector on a token grid of stride ``stride`` pixels.

    Outputs per cell: ``num_classes + 1`` class logits (last = background),
    4 box numbers (sigmoid centre offset x, y in the cell; log width, height in
    units of the stride) and ``num_light_states`` lamp-state logits.
    Losses: ``loss_cls`` (weighted cross-entropy), ``loss_bbox`` (L1 on the box
    numbers), ``loss_iou`` (1 - GIoU) and ``loss_traffic`` (lamp-state cross-entropy
    on traffic-light cells). With ``memory=True`` every cell is fused with the
    slot's memory of the previous frame (its pooled fused features and traffic-state
    probabilities, see :class:`SceneMemory`), when the call brings ``img_metas``
    with ``scene_token`` and ``timestamp``.

    Per sample it also predicts the traffic state that governs the ego
    (``num_light_states`` lamp states plus 'none') from the fused features of all
    its cameras, supervised by ``img_metas[i]['traffic_state']`` on every frame
    (``loss_traffic_state``), also when the light has left the view: then only the
    memory knows it.
    """

    def __init__(self, in_channels: int = 128, feat_channels: int = 96, num_classes: int = 3,
                 num_light_states: int = 3, stride: int = 8, light_class: int = 2, bg_weight: float = 0.2,
                 loss_weights: Optional[Dict[str, float]] = None, score_thr: float = 0.4, nms_iou: float = 0.5,
                 max_per_img: int = 16, memory: bool = True, memory_max_gap: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_light_states = num_light_states
        self.stride = stride
        self.light_class = light_class
        self.score_thr = score_thr
        self.nms_iou = nms_iou
        self.max_per_img = max_per_img
        weights = dict(cls=1.0, bbox=1.0, iou=1.0, traffic=0.5, traffic_state=1.0)
        weights.update(loss_weights or {})
        self.loss_weights = weights
        self.register_buffer("class_weight", torch.tensor([1.0] * num_classes + [bg_weight]), persistent=False)
        self.trunk = _conv_block(in_channels, feat_channels)
        self.cls_out = nn.Conv2d(feat_channels, num_classes + 1, 1)
        self.box_out = nn.Conv2d(feat_channels, 4, 1)
        self.light_out = nn.Conv2d(feat_channels, num_light_states, 1)
        nn.init.constant_(self.cls_out.bias[-1], math.log(100.0))  # start predicting background
        num_traffic_states = num_light_states + 1  # the lamp states and 'none'
        # Memory per slot: the pooled fused features and the traffic-state probabilities of the previous frame.
        self.memory_dim = feat_channels + num_traffic_states if memory else 0
        self.memory = SceneMemory(memory_max_gap) if memory else None
        if memory:
            self.memory_fuse = nn.Sequential(nn.Conv2d(feat_channels + self.memory_dim, feat_channels, 1), nn.GELU(),
                                             nn.Conv2d(feat_channels, feat_channels, 1))
            nn.init.zeros_(self.memory_fuse[-1].weight)  # an untrained memory changes nothing
            nn.init.zeros_(self.memory_fuse[-1].bias)
        self.traffic_state_out = nn.Linear(feat_channels + self.memory_dim, num_traffic_states)
        self.num_train_calls = 0

    def reset_memory(self) -> None:
        """Forget the previous frame of every batch slot."""
        if self.memory is not None:
            self.memory.reset()

    def _fuse_memory(self, x: Tensor, prev: Tensor) -> Tensor:
        """Add what the memory ``prev`` [B, D] says to every cell of the sample's cameras, ``x`` [B*N, C, h, w]."""
        per_map = prev.repeat_interleave(x.shape[0] // prev.shape[0], dim=0)[:, :, None, None]
        return x + self.memory_fuse(torch.cat([x, per_map.expand(-1, -1, *x.shape[2:])], dim=1))

    def forward(self, feats: Tensor, img_metas: Optional[Sequence[dict]] = None) -> Dict[str, Tensor]:
        """[BN, C, h, w] -> ``cls_logits`` [BN, K+1, h, w], ``bbox_pred`` [BN, 4, h, w], ``light_logits``,
        ``scene_feats`` and, given ``img_metas``, ``traffic_state_logits`` [B, num_light_states + 1].

        With ``img_metas`` it reads the temporal memory, then stores this frame's (once per frame, in
        training and evaluation); without them it runs memory-less and changes no memory.
        """
        if self.training:
            self.num_train_calls += 1
        x = self.trunk(feats)
        batch = len(img_metas) if img_metas is not None else x.shape[0]
        if img_metas is not None and x.shape[0] % batch:
            raise ValueError(f"TinyDetHead: {x.shape[0]} feature maps do not split into {batch} samples")
        prev = None
        if self.memory is not None:
            prev = self.memory.read(img_metas, x, self.memory_dim) if img_metas is not None else \
                x.new_zeros(batch, self.memory_dim)
            x = self._fuse_memory(x, prev)
        outs = dict(cls_logits=self.cls_out(x), bbox_pred=self.box_out(x), light_logits=self.light_out(x),
                    scene_feats=x)
        if img_metas is not None:  # one traffic state per sample, from all of its cameras and the memory
            pooled = pooled_per_sample(x, batch)
            logits = self.traffic_state_out(pooled if prev is None else torch.cat([pooled, prev], dim=1))
            outs["traffic_state_logits"] = logits
            if self.memory is not None:
                self.memory.last_read = prev.detach()
                self.memory.write(torch.cat([pooled, logits.float().softmax(-1).to(pooled.dtype)], dim=1), img_metas)
        return outs

    def soft_counts(self, cls_logits: Tensor) -> Tensor:
        """Expected number of objects per class, [BN, num_classes]: class probabilities summed over the cells
        (background left out). Differentiable, so a count read from it trains what it is read from."""
        return cls_logits.float().softmax(dim=1)[:, :self.num_classes].sum(dim=(2, 3))

    def scene_features(self, feats: Tensor) -> Tensor:
        """The per-cell features the predictions are read from, [BN, feat_channels, h, w], without state change:
        fused with the memory that the last :meth:`forward` read (zeros when it does not fit ``feats``)."""
        x = self.trunk(feats)
        if self.memory is None:
            return x
        prev = self.memory.last_read
        if prev is None or x.shape[0] % prev.shape[0]:
            prev = x.new_zeros(x.shape[0], self.memory_dim)  # no usable memory: zeros
        return self._fuse_memory(x, prev.to(x.dtype))

    def _decode(self, bbox_pred: Tensor) -> Tensor:
        """[BN, 4, h, w] raw box numbers -> [BN, h, w, 4] pixel boxes (x1, y1, x2, y2)."""
        _, _, h, w = bbox_pred.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=bbox_pred.device), torch.arange(w, device=bbox_pred.device),
                                indexing="ij")
        p = bbox_pred.permute(0, 2, 3, 1)
        cx = (xs + p[..., 0].sigmoid()) * self.stride
        cy = (ys + p[..., 1].sigmoid()) * self.stride
        bw = p[..., 2].clamp(max=6.0).exp() * self.stride
        bh = p[..., 3].clamp(max=6.0).exp() * self.stride
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)

    def get_targets(self, gt_bboxes: Sequence[Tensor], gt_labels: Sequence[Tensor], gt_light_states: Sequence[Tensor],
                    grid_hw: Tuple[int, int]) -> Dict[str, Tensor]:
        """Assign each box to the cell holding its centre (the larger box wins a shared cell)."""
        h, w = grid_hw
        n = len(gt_bboxes)
        device = self.class_weight.device
        labels = torch.full((n, h, w), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.zeros(n, h, w, 4, device=device)
        states = torch.full((n, h, w), -100, dtype=torch.long, device=device)
        for i, (bxs, lbl, st) in enumerate(zip(gt_bboxes, gt_labels, gt_light_states)):
            if len(bxs) == 0:
                continue
            bxs = bxs.to(device).float()
            area = (bxs[:, 2] - bxs[:, 0]) * (bxs[:, 3] - bxs[:, 1])
            for j in torch.argsort(area).tolist():  # larger boxes overwrite smaller ones
                x1, y1, x2, y2 = bxs[j].tolist()
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                c = min(max(int(cx // self.stride), 0), w - 1)
                r = min(max(int(cy // self.stride), 0), h - 1)
                labels[i, r, c] = int(lbl[j])
                boxes[i, r, c] = bxs[j]
                states[i, r, c] = int(st[j]) if int(lbl[j]) == self.light_class and int(st[j]) >= 0 else -100
        return dict(labels=labels, boxes=boxes, states=states)

    def loss(self, outs: Dict[str, Tensor], gt_bboxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
             gt_light_states: Sequence[Tensor], img_metas: Optional[Sequence[dict]] = None) -> Dict[str, Tensor]:
        """``loss_cls``, ``loss_bbox``, ``loss_iou``, ``loss_traffic`` for flattened (B*N) cameras, and
        ``loss_traffic_state`` per sample when ``img_metas`` carry ``traffic_state``."""
        cls_logits = outs["cls_logits"]
        if len(gt_bboxes) != cls_logits.shape[0]:
            raise ValueError(f"TinyDetHead.loss: got boxes for {len(gt_bboxes)} images, expected "
                             f"{cls_logits.shape[0]} (B*N)")
        t = self.get_targets(gt_bboxes, gt_labels, gt_light_states, tuple(cls_logits.shape[-2:]))
        loss_cls = F.cross_entropy(cls_logits.float(), t["labels"], weight=self.class_weight)
        pos = t["labels"] < self.num_classes
        bbox_pred = outs["bbox_pred"].permute(0, 2, 3, 1)
        if bool(pos.any()):
            gt = t["boxes"][pos]
            r, c = torch.nonzero(pos, as_tuple=True)[1:]
            target = torch.stack([
                ((gt[:, 0] + gt[:, 2]) / 2 / self.stride - c).clamp(0.0, 1.0),
                ((gt[:, 1] + gt[:, 3]) / 2 / self.stride - r).clamp(0.0, 1.0),
                torch.log((gt[:, 2] - gt[:, 0]).clamp(min=1.0) / self.stride),
                torch.log((gt[:, 3] - gt[:, 1]).clamp(min=1.0) / self.stride)], dim=-1)
            p = bbox_pred[pos]
            pred = torch.cat([p[:, :2].sigmoid(), p[:, 2:]], dim=-1)
            loss_bbox = F.l1_loss(pred, target)
            decoded = self._decode(outs["bbox_pred"])[pos]
            loss_iou = (1.0 - generalized_box_iou(decoded, gt)).mean()
        else:
            loss_bbox = bbox_pred.sum() * 0.0
            loss_iou = bbox_pred.sum() * 0.0
        light_logits = outs["light_logits"]
        if bool((t["states"] >= 0).any()):
            loss_traffic = F.cross_entropy(light_logits.float(), t["states"], ignore_index=-100)
        else:
            loss_traffic = light_logits.sum() * 0.0
        w = self.loss_weights
        losses = dict(loss_cls=loss_cls * w["cls"], loss_bbox=loss_bbox * w["bbox"], loss_iou=loss_iou * w["iou"],
                      loss_traffic=loss_traffic * w["traffic"])
        if img_metas is not None and "traffic_state_logits" in outs and \
                all("traffic_state" in meta for meta in img_metas):
            target = torch.tensor([int(meta["traffic_state"]) for meta in img_metas], device=cls_logits.device)
            losses["loss_traffic_state"] = F.cross_entropy(outs["traffic_state_logits"].float(), target) * \
                w["traffic_state"]
        return losses

    @torch.no_grad()
    def get_bboxes(self, outs: Dict[str, Tensor], img_hw: Tuple[int, int]) -> List[Dict[str, Tensor]]:
        """Per image: ``boxes`` [K, 4] clipped to the image, ``scores``, ``labels``, ``light_states``."""
        probs = outs["cls_logits"].float().softmax(dim=1)
        fg_scores, fg_labels = probs[:, : self.num_classes].max(dim=1)
        boxes = self._decode(outs["bbox_pred"].float())
        lights = outs["light_logits"].argmax(dim=1)
        h_img, w_img = img_hw
        results = []
        for i in range(probs.shape[0]):
            keep = fg_scores[i] > self.score_thr
            b = boxes[i][keep]
            b = torch.stack([b[:, 0].clamp(0, w_img), b[:, 1].clamp(0, h_img),
                             b[:, 2].clamp(0, w_img), b[:, 3].clamp(0, h_img)], dim=-1)
            s, lab, st = fg_scores[i][keep], fg_labels[i][keep], lights[i][keep]
            kept = []
            for cls in lab.unique().tolist():
                idx = torch.nonzero(lab == cls).flatten()
                kept.append(idx[nms(b[idx], s[idx], self.nms_iou)])
            idx = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=b.device)
            idx = idx[torch.argsort(s[idx], descending=True, stable=True)][: self.max_per_img]
            st = torch.where(lab[idx] == self.light_class, st[idx], torch.full_like(st[idx], -1))
            results.append(dict(boxes=b[idx], scores=s[idx], labels=lab[idx], light_states=st))
        return results


@HEADS.register_module()
class TinyMapHead(nn.Module):
    """Lane-marking mask logits at ``mask_stride`` pixels per cell from a token grid of ``stride``.

    Losses: ``loss_cls_lane`` (binary cross-entropy) and ``loss_dice_lane`` (soft Dice).
    """

    def __init__(self, in_channels: int = 128, feat_channels: int = 64, stride: int = 8, mask_stride: int = 4,
                 pos_weight: float = 2.0, loss_weights: Optional[Dict[str, float]] = None,
                 mask_thr: float = 0.5) -> None:
        super().__init__()
        if stride % mask_stride:
            raise ValueError(f"TinyMapHead: mask_stride {mask_stride} must divide the token stride {stride}")
        self.up = stride // mask_stride
        self.mask_thr = mask_thr
        weights = dict(cls=1.0, dice=1.0)
        weights.update(loss_weights or {})
        self.loss_weights = weights
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)), persistent=False)
        self.trunk = _conv_block(in_channels, feat_channels)
        self.out = nn.Conv2d(feat_channels, self.up * self.up, 1)

    def forward(self, feats: Tensor) -> Tensor:
        """[BN, C, h, w] -> lane logits [BN, h * up, w * up]."""
        return F.pixel_shuffle(self.out(self.trunk(feats)), self.up)[:, 0]

    def loss(self, logits: Tensor, gt_lane_masks: Tensor) -> Dict[str, Tensor]:
        """``loss_cls_lane`` and ``loss_dice_lane`` against [BN, Hm, Wm] 0/1 masks."""
        if logits.shape != gt_lane_masks.shape:
            raise ValueError(f"TinyMapHead.loss: gt_lane_masks has shape {tuple(gt_lane_masks.shape)}, expected "
                             f"{tuple(logits.shape)} (B*N, Hm, Wm); check the dataset's lane_mask_stride")
        target = gt_lane_masks.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=self.pos_weight)
        prob = logits.float().sigmoid()
        inter = (prob * target).sum(dim=(1, 2))
        dice = 1.0 - (2 * inter + 1.0) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
        return dict(loss_cls_lane=bce * self.loss_weights["cls"], loss_dice_lane=dice.mean() * self.loss_weights["dice"])

    @torch.no_grad()
    def get_masks(self, logits: Tensor) -> Tensor:
        """Boolean lane masks from logits."""
        return logits.sigmoid() > self.mask_thr


@HEADS.register_module()
class TinyVLProjector(nn.Module):
    """Scene tokens for the LM from the backbone grid and the detection head's cell features.

    Per camera: ``ceil(h / pool) * ceil(w / pool)`` local tokens (average- and
    max-pooled backbone and detection features) plus one global token (the same
    statistics over the whole grid), each with camera and position embeddings,
    projected to the LM width. With ``count_tokens`` one more token per camera
    follows them all: the detection head's soft object counts per class
    (``TinyDetHead.soft_counts``), ``LayerNorm(MLP(log1p(counts)))`` plus a camera
    embedding. Pooled features cannot say "two cars": the LayerNorm removes most
    of the magnitude an average carries. Output [B, N * (local + 1) (+ N), out_channels].
    A pure function of its inputs (no state), so it runs on student and teacher
    features alike. ORION's LLM likewise reads scene queries from its detection head.
    """

    def __init__(self, in_channels: int = 128, det_channels: int = 96, out_channels: int = 64, num_cams: int = 2,
                 grid_hw: Sequence[int] = (10, 10), pool: int = 2, count_tokens: bool = False,
                 num_classes: int = 3) -> None:
        super().__init__()
        self.pool = pool
        self.count_tokens = bool(count_tokens)
        self.num_classes = int(num_classes)
        self.num_cams = num_cams
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.det_channels = det_channels
        ph, pw = (math.ceil(s / pool) for s in self.grid_hw)
        dim = 2 * in_channels + 2 * det_channels
        self.cam_embed = nn.Parameter(torch.zeros(1, num_cams, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, ph * pw + 1, dim))  # last slot: the global token
        nn.init.trunc_normal_(self.cam_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, out_channels), nn.GELU(), nn.Linear(out_channels, out_channels))
        if self.count_tokens:
            self.count_proj = nn.Sequential(nn.Linear(self.num_classes, out_channels), nn.GELU(),
                                            nn.Linear(out_channels, out_channels), nn.LayerNorm(out_channels))
            self.count_cam_embed = nn.Parameter(torch.zeros(1, num_cams, out_channels))
            nn.init.trunc_normal_(self.count_cam_embed, std=0.02)

    def forward(self, img_feats: Tensor, det_feats: Tensor, det_counts: Optional[Tensor] = None) -> Tensor:
        """``img_feats`` [B, N, C, h, w], ``det_feats`` [B, N, Cd, h, w] (and, with ``count_tokens``,
        ``det_counts`` [B, N, num_classes]) -> tokens [B, K, out_channels]."""
        b, n, c, h, w = img_feats.shape
        if n != self.num_cams or (h, w) != self.grid_hw:
            raise ValueError(f"TinyVLProjector: expected features [B, {self.num_cams}, C, {self.grid_hw[0]}, "
                             f"{self.grid_hw[1]}], got {tuple(img_feats.shape)}")
        if det_feats.shape[:2] != (b, n) or det_feats.shape[2] != self.det_channels or det_feats.shape[3:] != (h, w):
            raise ValueError(f"TinyVLProjector: expected detection features [{b}, {n}, {self.det_channels}, {h}, {w}], "
                             f"got {tuple(det_feats.shape)}")
        img = img_feats.reshape(b * n, c, h, w)
        det = det_feats.reshape(b * n, self.det_channels, h, w)
        local = torch.cat([F.avg_pool2d(img, self.pool, ceil_mode=True), F.max_pool2d(img, self.pool, ceil_mode=True),
                           F.avg_pool2d(det, self.pool, ceil_mode=True), F.max_pool2d(det, self.pool, ceil_mode=True)],
                          dim=1).flatten(2)
        glob = torch.cat([img.mean(dim=(2, 3)), img.amax(dim=(2, 3)), det.mean(dim=(2, 3)), det.amax(dim=(2, 3))],
                         dim=1)[:, :, None]
        x = torch.cat([local, glob], dim=2).transpose(1, 2).reshape(b, n, local.shape[2] + 1, -1)
        x = (x + self.cam_embed + self.pos_embed).reshape(b, -1, x.shape[-1])
        tokens = self.proj(self.norm(x))
        if not self.count_tokens:
            return tokens
        if det_counts is None or tuple(det_counts.shape) != (b, n, self.num_classes):
            got = None if det_counts is None else tuple(det_counts.shape)
            raise ValueError(f"TinyVLProjector: count_tokens=True needs det_counts [{b}, {n}, {self.num_classes}] "
                             f"(TinyDetHead.soft_counts per camera), got {got}")
        counts = self.count_proj(torch.log1p(det_counts.to(tokens.dtype).clamp_min(0))) + self.count_cam_embed
        return torch.cat([tokens, counts], dim=1)


__all__ = ["TinyDetHead", "TinyMapHead", "TinyVLProjector", "generalized_box_iou", "nms"]
