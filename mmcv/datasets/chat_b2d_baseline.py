"""The image-blind baseline that defines "chance" in the miniature world.

``PriorBaseline`` never looks at the images: it is fitted on training targets
and then predicts the same things for every frame (boxes copied from the
training distribution, the lane cells that are lane most often, the majority
answer per question type, the most frequent traffic state, the mean ego plan). Scoring it with the same
``evaluate`` as the real models gives the chance level of every metric;
a model is only learning something when it beats these numbers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .chat_b2d_metrics import evaluate


class PriorBaseline(nn.Module):
    """Predict from training-set statistics only (same output contract as TinyOrion's test path)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.fitted = False

    def fit(self, dataset: Any, max_samples: Optional[int] = 512) -> "PriorBaseline":
        """Collect the priors from the first ``max_samples`` samples of ``dataset``."""
        n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
        if n < 1:
            raise ValueError("PriorBaseline.fit: the dataset is empty")
        num_classes = len(dataset.CLASSES)
        lane_sum: Optional[torch.Tensor] = None
        lanes: List[torch.Tensor] = []
        plans = []
        answers: Dict[str, Dict[tuple, int]] = {}
        traffic: Dict[int, int] = {}
        boxes: List[List[List[torch.Tensor]]] = []  # [cam][class] -> list of boxes
        for i in range(n):
            s = dataset[i]
            cams = len(s["gt_bboxes"])
            if not boxes:
                boxes = [[[] for _ in range(num_classes)] for _ in range(cams)]
            for cam in range(cams):
                for box, label in zip(s["gt_bboxes"][cam], s["gt_labels"][cam]):
                    boxes[cam][int(label)].append(box)
            lane = s["gt_lane_masks"] > 0.5
            lanes.append(lane)
            lane_sum = lane.float() if lane_sum is None else lane_sum + lane.float()
            plans.append(s["ego_fut_trajs"])
            if "traffic_state" in s["img_metas"]:
                state = int(s["img_metas"]["traffic_state"])
                traffic[state] = traffic.get(state, 0) + 1
            for qa_type, ids in zip(s["img_metas"]["qa_types"], s["vlm_answer_ids"]):
                key = tuple(ids.tolist())
                answers.setdefault(qa_type, {})
                answers[qa_type][key] = answers[qa_type].get(key, 0) + 1
        # Boxes: per camera and class, the mean count and a pool to copy from.
        self.box_pool = [[torch.stack(b) if b else torch.zeros(0, 4) for b in cam] for cam in boxes]
        self.box_counts = [[len(b) / n for b in cam] for cam in boxes]
        # Lanes: the frequency threshold that maximises IoU on the fitting set.
        freq = lane_sum / n
        stacked = torch.stack(lanes)
        best, best_iou = 0.5, -1.0
        for thr in torch.linspace(0.05, 0.95, 19).tolist():
            pred = (freq >= thr).expand_as(stacked)
            union = int((pred | stacked).sum())
            iou = int((pred & stacked).sum()) / union if union else 0.0
            if iou > best_iou:
                best, best_iou = thr, iou
        self.lane_mask = freq >= best
        self.plan = torch.stack(plans).mean(0)
        self.majority = {t: list(max(c.items(), key=lambda kv: kv[1])[0]) for t, c in answers.items()}
        self.traffic_state = max(traffic.items(), key=lambda kv: kv[1])[0] if traffic else None
        self.fitted = True
        return self

    def forward(self, data: Optional[dict] = None, return_loss: bool = False, **kwargs: Any) -> List[dict]:
        """Image-blind predictions for every sample of ``data`` (deterministic per sample index)."""
        if not self.fitted:
            raise RuntimeError("PriorBaseline: call fit(train_dataset) before predicting")
        if return_loss:
            raise ValueError("PriorBaseline has no training losses: call it with return_loss=False")
        data = dict(data or {}, **kwargs)
        outputs = []
        for meta in data["img_metas"]:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + int(meta.get("sample_idx", 0)))
            boxes, scores, labels = [], [], []
            for cam_pool, cam_counts in zip(self.box_pool, self.box_counts):
                cam_boxes, cam_labels = [], []
                for cls, (pool, mean) in enumerate(zip(cam_pool, cam_counts)):
                    k = int(round(mean))
                    if k and len(pool):
                        idx = torch.randint(len(pool), (k,), generator=gen)
                        cam_boxes.append(pool[idx])
                        cam_labels.append(torch.full((k,), cls, dtype=torch.long))
                b = torch.cat(cam_boxes) if cam_boxes else torch.zeros(0, 4)
                boxes.append(b)
                labels.append(torch.cat(cam_labels) if cam_labels else torch.zeros(0, dtype=torch.long))
                scores.append(torch.ones(len(b)))
            answer_ids = [list(self.majority.get(t, [])) for t in meta["qa_types"]]
            outputs.append(dict(boxes=boxes, scores=scores, labels=labels, lane_masks=self.lane_mask.clone(),
                                answer_ids=answer_ids, plan=self.plan.clone()))
            if self.traffic_state is not None:
                outputs[-1]["traffic_state"] = self.traffic_state
        return outputs


def chance_levels(train_set: Any, val_set: Any, max_train_samples: int = 512,
                  max_val_samples: Optional[int] = None) -> Dict[str, float]:
    """Metrics of the image-blind :class:`PriorBaseline` fitted on ``train_set``, scored on ``val_set``."""
    baseline = PriorBaseline().fit(train_set, max_train_samples)
    return evaluate(baseline, val_set, max_samples=max_val_samples)


__all__ = ["PriorBaseline", "chance_levels"]
