"""TinyOrion: an ORION-shaped detector small enough to train on a laptop CPU in minutes.

It keeps the attributes and calling conventions of ORION's ``Orion`` detector
(ORION's ``mmcv/models/detectors/orion.py``) so that the KD code treats both alike:

* ``img_backbone`` built with ``build_backbone(dict(type='EVAViT', ...))`` (16 heads,
  window and global blocks), optional ``img_neck``, ``pts_bbox_head`` (2D
  detection + traffic-light state), ``map_head`` (lanes), ``vl_proj`` (visual
  tokens), ``lm_head`` (a tiny causal LM answering questions and planning),
  ``grid_mask`` / ``use_grid_mask``;
* ``extract_img_feat`` flattens [B, N, 3, H, W] to [B*N, ...], grid-masks in
  training, runs backbone (and neck) and returns features [B, N, C, h, w];
* ``forward(data, return_loss=True)`` = ``forward_train(**data)`` then
  ``_parse_losses`` -> ``dict(loss, log_vars, num_samples)``;
  ``forward(data, return_loss=False)`` -> one prediction dict per sample;
* ``vl_tokens(img_feats, **data)`` gives the visual tokens the LM receives and
  changes no state;
* like ORION's heads, ``pts_bbox_head`` keeps a temporal memory per batch slot
  that carries the previous frame of the slot's scene into the present and is
  reset at a scene change (``img_metas[i]['scene_token']``) or a gap of 2 s
  (``img_metas[i]['timestamp']``); it acts in training and in evaluation, so
  samples must come in streaming order (``InfiniteGroupEachSampleInBatchSampler``
  for training, ``evaluate`` streams scenes). ``reset_memory()`` forgets it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmcv.datasets.chat_tokenizer import QUESTION_LEN
from mmcv.datasets.synthetic_chat_b2d import QA_TYPES, QUESTION_TEMPLATES
from mmcv.models.builder import DETECTORS, build_backbone, build_head, build_neck

from .grid_mask import GridMask
from . import tiny_lm, tiny_orion_heads  # noqa: F401  (register TinyCausalLM and the heads)


@DETECTORS.register_module()
class TinyOrion(nn.Module):
    """Miniature ORION: EVA-02 backbone, detection/lane heads, visual tokens, tiny LLM with a plan head.

    Args:
        img_backbone: backbone config (``type='EVAViT'`` in the shipped config).
        pts_bbox_head, map_head, vl_proj, lm_head: head configs (``TinyDetHead``,
            ``TinyMapHead``, ``TinyVLProjector``, ``TinyCausalLM``).
        img_neck: optional neck config (ORION has none).
        use_grid_mask: apply ``grid_mask`` to the images in training.
        grid_mask: keyword arguments of :class:`GridMask`.
        position_level: which backbone output level to use.
        train_cfg, test_cfg: accepted as in ORION; ``test_cfg`` may set ``max_answer_len``.
    """

    def __init__(self, img_backbone: dict, pts_bbox_head: dict, map_head: dict, vl_proj: dict, lm_head: dict,
                 img_neck: Optional[dict] = None, use_grid_mask: bool = True, grid_mask: Optional[dict] = None,
                 position_level: int = 0, train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None, init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.img_backbone = build_backbone(img_backbone)
        self.img_neck = build_neck(img_neck) if img_neck is not None else None
        self.pts_bbox_head = build_head(pts_bbox_head)
        self.map_head = build_head(map_head)
        self.vl_proj = build_head(vl_proj)
        self.lm_head = build_head(lm_head)
        self.tokenizer = self.lm_head.tokenizer
        self.grid_mask = GridMask(**(grid_mask or {}))
        self.use_grid_mask = use_grid_mask
        self.position_level = position_level
        self.train_cfg = train_cfg
        self.test_cfg = dict(test_cfg or {})
        self.pretrained = pretrained
        self.init_cfg = init_cfg

    @property
    def with_img_neck(self) -> bool:
        return self.img_neck is not None

    def reset_memory(self) -> None:
        """Forget the temporal memory of every batch slot (e.g. before an evaluation)."""
        self.pts_bbox_head.reset_memory()

    # ---------------------------------------------------------------- features
    def extract_img_feat(self, img: Tensor, img_metas: Optional[Sequence[dict]] = None) -> Tensor:
        """[B, N, 3, H, W] (or [B, 3, H, W]) images -> features [B, N, C, h, w], as ORION reshapes them."""
        if img.dim() == 5:
            b, n = img.shape[:2]
            img = img.reshape(b * n, *img.shape[2:])
        elif img.dim() == 4:
            b, n = img.shape[0], 1
        else:
            raise ValueError(f"TinyOrion.extract_img_feat: expected img [B, N, 3, H, W], got {tuple(img.shape)}")
        if self.use_grid_mask and self.training:
            img = self.grid_mask(img)
        feats = self.img_backbone(img)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if self.with_img_neck:
            feats = self.img_neck(feats)
        feat = feats[self.position_level] if isinstance(feats, (list, tuple)) else feats
        bn, c, h, w = feat.shape
        return feat.view(b, bn // b, c, h, w)

    def extract_feat(self, img: Tensor, img_metas: Optional[Sequence[dict]] = None) -> Tensor:
        """ORION's entry point for image features (same as :meth:`extract_img_feat` here)."""
        return self.extract_img_feat(img, img_metas)

    def vl_tokens(self, img_feats: Union[Tensor, Sequence[Tensor]], **data: Any) -> Tensor:
        """Visual tokens handed to the language model, [B, K, D_lm]; no state changes.

        Built from the image features and the detection head's cell features (and, when the
        projector has count tokens, its soft object counts): ORION's LLM reads its detection
        queries too. The head's call counter and any other state are left untouched.
        """
        if isinstance(img_feats, (list, tuple)):
            img_feats = img_feats[self.position_level]
        det_feats = self.pts_bbox_head.scene_features(img_feats.flatten(0, 1))
        return self._project(img_feats, det_feats, lambda: self.pts_bbox_head.cls_out(det_feats))

    def _vl_tokens_from(self, img_feats: Tensor, det_out: Dict[str, Tensor]) -> Tensor:
        """:meth:`vl_tokens` reusing the detection head's outputs of this forward (saves one head pass)."""
        return self._project(img_feats, det_out["scene_feats"], lambda: det_out["cls_logits"])

    def _project(self, img_feats: Tensor, det_feats: Tensor, cls_logits: Callable[[], Tensor]) -> Tensor:
        """Run ``vl_proj`` on [B, N, ...] features; ``cls_logits()`` gives the head's class logits, called only
        when the projector reads counts."""
        b, n = img_feats.shape[:2]
        counts = None
        if getattr(self.vl_proj, "count_tokens", False):
            counts = self.pts_bbox_head.soft_counts(cls_logits()).reshape(b, n, -1)
        return self.vl_proj(img_feats, det_feats.reshape(b, n, *det_feats.shape[1:]), det_counts=counts)

    # ---------------------------------------------------------------- training
    def forward(self, data: Optional[dict] = None, return_loss: bool = True, **kwargs: Any) -> Any:
        """``return_loss=True``: ``dict(loss, log_vars, num_samples)``; otherwise a list of predictions.

        Accepts the batch as one dict (``model(batch)``) or as keywords (``model(**batch)``).
        """
        if data is None:
            data = kwargs
        elif kwargs:
            data = dict(data, **kwargs)
        if not return_loss:
            return self.forward_test(**data)
        losses = self.forward_train(**data)
        loss, log_vars = self._parse_losses(losses)
        return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img_metas"]))

    def forward_train(self, img: Tensor, img_metas: Sequence[dict], gt_bboxes: Sequence[Sequence[Tensor]],
                      gt_labels: Sequence[Sequence[Tensor]], gt_light_states: Sequence[Sequence[Tensor]],
                      gt_lane_masks: Tensor, ego_fut_trajs: Tensor, vlm_question_ids: Tensor,
                      vlm_answer_ids: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        """All task losses, ORION-style keys: detection, traffic light (per box and the ego's traffic state),
        lanes, ``vlm_loss``, plan."""
        img_feats = self.extract_feat(img, img_metas)
        b, n = img_feats.shape[:2]
        flat = img_feats.flatten(0, 1)
        flat_boxes = [cam for sample in gt_bboxes for cam in sample]
        if len(flat_boxes) != b * n:
            raise ValueError(f"TinyOrion.forward_train: gt_bboxes covers {len(flat_boxes)} camera images, "
                             f"expected B*N = {b * n}")
        losses: Dict[str, Tensor] = OrderedDict()
        det_out = self.pts_bbox_head(flat, img_metas)
        losses.update(self.pts_bbox_head.loss(det_out, flat_boxes, [c for s in gt_labels for c in s],
                                              [c for s in gt_light_states for c in s], img_metas))
        losses.update(self.map_head.loss(self.map_head(flat), gt_lane_masks.flatten(0, 1)))
        vis = self._vl_tokens_from(img_feats, det_out)
        losses.update(self.lm_head.loss(vis, vlm_question_ids, vlm_answer_ids, ego_fut_trajs))
        return losses

    @staticmethod
    def _parse_losses(losses: Dict[str, Any]) -> Tuple[Tensor, Dict[str, float]]:
        """ORION's semantics: the total is the sum of EVERY key containing 'loss'; log values are
        averaged over ranks when torch.distributed is initialised (all ranks must log the same keys)."""
        log_vars: Dict[str, Tensor] = OrderedDict()
        for name, value in losses.items():
            if isinstance(value, Tensor):
                log_vars[name] = value.mean()
            elif isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) for v in value):
                log_vars[name] = sum(v.mean() for v in value)
            else:
                raise TypeError(f"_parse_losses: {name!r} must be a tensor or a list of tensors, "
                                f"got {type(value).__name__}")
        loss = sum(v for k, v in log_vars.items() if "loss" in k)
        if not isinstance(loss, Tensor):
            raise ValueError(f"_parse_losses: no key contains 'loss' in {list(log_vars)}")
        log_vars["loss"] = loss
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            count = torch.tensor(len(log_vars), device=loss.device)
            dist.all_reduce(count)
            expected = len(log_vars) * dist.get_world_size()
            if int(count) != expected:
                raise AssertionError(f"_parse_losses: rank {dist.get_rank()} logs {len(log_vars)} keys "
                                     f"({list(log_vars)}) but the ranks together log {int(count)}, expected "
                                     f"{expected}: every rank must produce the same loss keys")
        out: Dict[str, float] = OrderedDict()
        for name, value in log_vars.items():
            value = value.detach().clone()
            if distributed:
                dist.all_reduce(value.div_(dist.get_world_size()))
            out[name] = value.item()
        return loss, out

    def train_step(self, data: dict, optimizer: Any = None) -> dict:
        """mmcv-1.x runner hook: one training forward (the runner does backward and step)."""
        return self.forward(data, return_loss=True)

    def val_step(self, data: dict, optimizer: Any = None) -> List[dict]:
        """mmcv-1.x runner hook: predictions for a batch."""
        return self.forward(data, return_loss=False)

    # ---------------------------------------------------------------- inference
    def default_questions(self, batch: int, device: torch.device) -> Tensor:
        """The first template of every question type, [B, Q, Lq] (used when a batch brings none)."""
        ids = [self.tokenizer.encode_question(QUESTION_TEMPLATES[t][0], QUESTION_LEN) for t in QA_TYPES]
        return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(batch, -1, -1)

    @torch.no_grad()
    def forward_test(self, img: Tensor, img_metas: Optional[Sequence[dict]] = None,
                     vlm_question_ids: Optional[Tensor] = None, **kwargs: Any) -> List[dict]:
        """Predictions per sample: ``boxes``/``scores``/``labels``/``light_states`` (lists over
        cameras), ``lane_masks`` [N, Hm, Wm] bool, ``answer_ids`` and ``answers`` (one per
        question), ``plan`` [T, 2] and, given ``img_metas``, ``traffic_state`` (the state of the
        light that governs the ego; index into the lamp states, the last one meaning none)."""
        img_feats = self.extract_feat(img, img_metas)
        b, n = img_feats.shape[:2]
        flat = img_feats.flatten(0, 1)
        det_out = self.pts_bbox_head(flat, img_metas)
        dets = self.pts_bbox_head.get_bboxes(det_out, tuple(img.shape[-2:]))
        lane_logits = self.map_head(flat)
        lanes = self.map_head.get_masks(lane_logits).reshape(b, n, *lane_logits.shape[-2:])
        if vlm_question_ids is None:
            vlm_question_ids = self.default_questions(b, img.device)
        generated, plan = self.lm_head.generate(self._vl_tokens_from(img_feats, det_out), vlm_question_ids,
                                                int(self.test_cfg.get("max_answer_len", 3)))
        answer_ids = self.lm_head.answers_to_lists(generated)
        results = []
        for i in range(b):
            cams = dets[i * n:(i + 1) * n]
            results.append(dict(
                boxes=[d["boxes"] for d in cams], scores=[d["scores"] for d in cams],
                labels=[d["labels"] for d in cams], light_states=[d["light_states"] for d in cams],
                lane_masks=lanes[i], answer_ids=answer_ids[i],
                answers=[self.tokenizer.decode(a) for a in answer_ids[i]], plan=plan[i]))
            if "traffic_state_logits" in det_out:
                results[-1]["traffic_state"] = int(det_out["traffic_state_logits"][i].argmax())
        return results


__all__ = ["TinyOrion"]
