"""Task metrics of the miniature world and ``evaluate(model, dataset)``.

Any model with the detector contract (``model(batch, return_loss=False)``
returning one prediction dict per sample) gets the same numbers, so teacher,
pruned and distilled students are compared on equal terms. A prediction dict
holds:

* ``boxes``, ``scores``, ``labels``: lists over cameras of [K, 4] (x1, y1, x2, y2
  pixels), [K] and [K] (long) tensors;
* ``lane_masks``: [N, Hm, Wm] boolean lane mask per camera;
* ``answer_ids``: one list of token ids per question (the decoded answer, without ``<eos>``);
* ``plan``: [T, 2] ego waypoints in metres.

Metrics (all floats):

* ``det_precision``, ``det_recall``, ``det_f1`` and ``det_f1_<class>``: a prediction is a
  true positive when it has the class of an unmatched ground-truth box with IoU >= 0.5
  (greedy by score, per camera); counts are summed over the split before the ratios.
* ``lane_iou``: intersection over union of the lane-mask cells, summed over the split.
* ``qa_acc`` and ``qa_acc_<type>``: exact match of the decoded answer tokens.
* ``plan_l2``: mean waypoint distance (m) over the horizon; ``plan_l2_<t>s``: the mean over
  the waypoints up to t seconds (VAD/ORION style), for t = 1, 2, 3 when the horizon reaches it.
* ``traffic_state_acc``: accuracy of a prediction's ``traffic_state`` (the state of the light
  that governs the ego, or none) against ``img_metas['traffic_state']``, when both exist.
* ``traffic_state_acc_hidden``, ``qa_acc_light_state_hidden`` and ``plan_l2_light_hidden``
  (with ``num_light_hidden``): the same on the frames whose traffic light has left the view
  (``img_metas['light_hidden']``), where its state can only come from earlier frames, i.e.
  from the model's temporal memory.

``evaluate`` feeds a dataset with scenes (a ``flag`` attribute) in streaming order: every
batch slot walks whole scenes frame by frame, as ORION's temporal heads need.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .chat_tokenizer import ChatTokenizer
from .samplers import GroupStreamBatchSampler


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of [N, 4] and [M, 4] boxes in (x1, y1, x2, y2) form -> [N, M]."""
    boxes1, boxes2 = boxes1.float().reshape(-1, 4), boxes2.float().reshape(-1, 4)
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def match_detections(pred_boxes: Tensor, pred_scores: Tensor, pred_labels: Tensor,
                     gt_boxes: Tensor, gt_labels: Tensor, iou_thr: float = 0.5,
                     num_classes: int = 3) -> Tuple[Tensor, Tensor, Tensor]:
    """Greedy one-to-one matching of one camera's predictions to its ground truth.

    Predictions are visited by decreasing score; each takes the unmatched
    ground-truth box of its own class with the highest IoU if that IoU is at
    least ``iou_thr``. Returns per-class ``(tp, fp, fn)`` counts, each [num_classes].
    """
    tp = torch.zeros(num_classes, dtype=torch.long)
    fp = torch.zeros(num_classes, dtype=torch.long)
    fn = torch.zeros(num_classes, dtype=torch.long)
    pred_labels, gt_labels = pred_labels.long().reshape(-1), gt_labels.long().reshape(-1)
    for labels, name in ((pred_labels, "predicted"), (gt_labels, "ground-truth")):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"match_detections: {name} labels must lie in [0, {num_classes}), "
                             f"got {labels.unique().tolist()}")
    ious = box_iou(pred_boxes, gt_boxes)
    taken = torch.zeros(gt_labels.numel(), dtype=torch.bool)
    for p in torch.argsort(pred_scores.reshape(-1).float(), descending=True, stable=True).tolist():
        cls = int(pred_labels[p])
        candidates = (gt_labels == cls) & ~taken
        if candidates.any():
            row = torch.where(candidates, ious[p], torch.full_like(ious[p], -1.0))
            g = int(row.argmax())
            if row[g] >= iou_thr:
                taken[g] = True
                tp[cls] += 1
                continue
        fp[cls] += 1
    for g in torch.nonzero(~taken).flatten().tolist():
        fn[int(gt_labels[g])] += 1
    return tp, fp, fn


def f1_score(tp: int, fp: int, fn: int) -> float:
    """F1 = 2TP / (2TP + FP + FN); 1.0 when there is nothing to find and nothing was predicted."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


class ChatB2DMetrics:
    """Accumulates predictions against SyntheticChatB2D batches; ``compute()`` gives the metrics."""

    def __init__(self, class_names: Sequence[str] = ("car", "pedestrian", "traffic_light"),
                 qa_types: Sequence[str] = ("count_cars", "count_pedestrians", "light_state", "next_action"),
                 iou_thr: float = 0.5, plan_dt: float = 0.5, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None) -> None:
        tok = ChatTokenizer()
        self.class_names = tuple(class_names)
        self.qa_types = tuple(qa_types)
        self.iou_thr = float(iou_thr)
        self.plan_dt = float(plan_dt)
        self.eos_id = tok.eos_id if eos_id is None else eos_id
        self.pad_id = tok.pad_id if pad_id is None else pad_id
        k = len(self.class_names)
        self.tp, self.fp, self.fn = (torch.zeros(k, dtype=torch.long) for _ in range(3))
        self.lane_inter = 0
        self.lane_union = 0
        self.qa_correct = torch.zeros(len(self.qa_types), dtype=torch.long)
        self.qa_total = torch.zeros(len(self.qa_types), dtype=torch.long)
        self.plan_err_sum: Optional[Tensor] = None
        self.num_samples = 0
        self.hidden_light_correct = 0
        self.hidden_light_plan_err = 0.0
        self.num_light_hidden = 0
        self.traffic_correct = [0, 0]  # all frames, frames with the light out of view
        self.traffic_total = [0, 0]

    def _answer_tokens(self, ids: Sequence[int]) -> List[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(i)
        return out

    def update(self, predictions: Sequence[dict], batch: dict) -> None:
        """Add one batch: ``predictions[b]`` is the prediction dict of sample ``b`` of ``batch``."""
        num = len(batch["img_metas"])
        if len(predictions) != num:
            raise ValueError(f"ChatB2DMetrics.update: expected {num} predictions (one per sample), "
                             f"got {len(predictions)}")
        for b, pred in enumerate(predictions):
            missing = [k for k in ("boxes", "scores", "labels", "lane_masks", "answer_ids", "plan") if k not in pred]
            if missing:
                raise KeyError(f"ChatB2DMetrics.update: prediction {b} lacks keys {missing}; "
                               f"got {sorted(pred)}")
            gt_boxes, gt_labels = batch["gt_bboxes"][b], batch["gt_labels"][b]
            if len(pred["boxes"]) != len(gt_boxes):
                raise ValueError(f"ChatB2DMetrics.update: prediction {b} 'boxes' covers {len(pred['boxes'])} "
                                 f"cameras, expected {len(gt_boxes)}")
            for cam in range(len(gt_boxes)):
                tp, fp, fn = match_detections(pred["boxes"][cam].detach().cpu(), pred["scores"][cam].detach().cpu(),
                                              pred["labels"][cam].detach().cpu(), gt_boxes[cam].cpu(),
                                              gt_labels[cam].cpu(), self.iou_thr, len(self.class_names))
                self.tp += tp
                self.fp += fp
                self.fn += fn
            gt_lane = batch["gt_lane_masks"][b].detach().cpu() > 0.5
            pred_lane = pred["lane_masks"].detach().cpu().bool()
            if pred_lane.shape != gt_lane.shape:
                raise ValueError(f"ChatB2DMetrics.update: prediction {b} 'lane_masks' has shape "
                                 f"{tuple(pred_lane.shape)}, expected {tuple(gt_lane.shape)}")
            self.lane_inter += int((pred_lane & gt_lane).sum())
            self.lane_union += int((pred_lane | gt_lane).sum())
            gt_answers = batch["vlm_answer_ids"][b]
            if len(pred["answer_ids"]) != len(gt_answers):
                raise ValueError(f"ChatB2DMetrics.update: prediction {b} has {len(pred['answer_ids'])} answers, "
                                 f"expected {len(gt_answers)} (one per question)")
            meta = batch["img_metas"][b]
            qa_types = meta.get("qa_types", self.qa_types)
            hidden = bool(meta.get("light_hidden", False))
            for q, (ans, ref) in enumerate(zip(pred["answer_ids"], gt_answers)):
                t = self.qa_types.index(qa_types[q])
                correct = int(self._answer_tokens(ans) == self._answer_tokens(ref.tolist()))
                self.qa_total[t] += 1
                self.qa_correct[t] += correct
                if hidden and qa_types[q] == "light_state":
                    self.hidden_light_correct += correct
            gt_plan = batch["ego_fut_trajs"][b].detach().cpu().float()
            plan = torch.as_tensor(pred["plan"]).detach().cpu().float()
            if plan.shape != gt_plan.shape:
                raise ValueError(f"ChatB2DMetrics.update: prediction {b} 'plan' has shape {tuple(plan.shape)}, "
                                 f"expected {tuple(gt_plan.shape)}")
            err = (plan - gt_plan).norm(dim=-1)
            self.plan_err_sum = err if self.plan_err_sum is None else self.plan_err_sum + err
            self.num_samples += 1
            if hidden:
                self.num_light_hidden += 1
                self.hidden_light_plan_err += float(err.mean())
            if "traffic_state" in pred and "traffic_state" in meta:
                correct = int(int(pred["traffic_state"]) == int(meta["traffic_state"]))
                for subset in ((0, 1) if hidden else (0,)):
                    self.traffic_correct[subset] += correct
                    self.traffic_total[subset] += 1

    def compute(self) -> Dict[str, float]:
        """The metric dict described in the module docstring."""
        if self.num_samples == 0:
            raise ValueError("ChatB2DMetrics.compute: no samples were added")
        tp, fp, fn = int(self.tp.sum()), int(self.fp.sum()), int(self.fn.sum())
        out: Dict[str, float] = {
            "det_precision": tp / (tp + fp) if tp + fp else 0.0,
            "det_recall": tp / (tp + fn) if tp + fn else 0.0,
            "det_f1": f1_score(tp, fp, fn),
        }
        for k, name in enumerate(self.class_names):
            out[f"det_f1_{name}"] = f1_score(int(self.tp[k]), int(self.fp[k]), int(self.fn[k]))
        out["lane_iou"] = self.lane_inter / self.lane_union if self.lane_union else 1.0
        total = int(self.qa_total.sum())
        out["qa_acc"] = int(self.qa_correct.sum()) / total if total else 0.0
        for k, name in enumerate(self.qa_types):
            if int(self.qa_total[k]):
                out[f"qa_acc_{name}"] = int(self.qa_correct[k]) / int(self.qa_total[k])
        mean_err = self.plan_err_sum / self.num_samples
        out["plan_l2"] = float(mean_err.mean())
        for seconds in (1, 2, 3):
            steps = int(round(seconds / self.plan_dt))
            if 1 <= steps <= mean_err.numel():
                out[f"plan_l2_{seconds}s"] = float(mean_err[:steps].mean())
        for subset, key in enumerate(("traffic_state_acc", "traffic_state_acc_hidden")):
            if self.traffic_total[subset]:
                out[key] = self.traffic_correct[subset] / self.traffic_total[subset]
        if self.num_light_hidden:
            out["qa_acc_light_state_hidden"] = self.hidden_light_correct / self.num_light_hidden
            out["plan_l2_light_hidden"] = self.hidden_light_plan_err / self.num_light_hidden
        out["num_light_hidden"] = float(self.num_light_hidden)
        out["num_samples"] = float(self.num_samples)
        return out


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def evaluation_batches(dataset: Any, batch_size: int, num_samples: int) -> List[List[int]]:
    """Index batches over the first ``num_samples`` samples: streaming (scenes in order per slot)
    when the dataset has a ``flag``, plain consecutive chunks otherwise."""
    if getattr(dataset, "flag", None) is not None:
        return list(GroupStreamBatchSampler(dataset, batch_size, indices=range(num_samples)))
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, batch_size: int = 16, max_samples: Optional[int] = None,
             device: Optional[torch.device] = None, iou_thr: float = 0.5,
             reset_memory_each_frame: bool = False) -> Dict[str, float]:
    """Run ``model(batch, return_loss=False)`` over ``dataset`` and return its metrics.

    Samples come in streaming order (:func:`evaluation_batches`); a model with a
    temporal memory (``reset_memory()``) starts from an empty one, and with
    ``reset_memory_each_frame`` forgets it before every batch (the no-memory
    control). The model is put in eval mode for the run and its previous mode
    restored. ``device`` defaults to the device of the model's first parameter
    (CPU when it has none).
    """
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    n = len(dataset) if max_samples is None else min(int(max_samples), len(dataset))
    if n < 1:
        raise ValueError(f"evaluate: the dataset has no samples to evaluate (len {len(dataset)}, "
                         f"max_samples {max_samples})")
    metrics = ChatB2DMetrics(class_names=getattr(dataset, "CLASSES", ("car", "pedestrian", "traffic_light")),
                             qa_types=getattr(dataset, "QA_TYPES", ChatB2DMetrics().qa_types),
                             iou_thr=iou_thr, plan_dt=getattr(dataset, "plan_dt", 0.5))
    collate = getattr(dataset, "collate_fn", None)
    if collate is None:
        raise AttributeError(f"evaluate: dataset {type(dataset).__name__} has no collate_fn attribute")
    reset = getattr(model, "reset_memory", None)
    was_training = model.training
    model.eval()
    try:
        for number, indices in enumerate(evaluation_batches(dataset, batch_size, n)):
            if callable(reset) and (number == 0 or reset_memory_each_frame):
                reset()
            batch = collate([dataset[i] for i in indices])
            preds = model(_to_device(batch, device), return_loss=False)
            metrics.update(preds, batch)
    finally:
        model.train(was_training)
    return metrics.compute()


__all__ = ["box_iou", "match_detections", "f1_score", "ChatB2DMetrics", "evaluate", "evaluation_batches"]
