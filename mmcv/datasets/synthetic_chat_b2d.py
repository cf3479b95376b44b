"""SyntheticChatB2D: a procedural, Chat-B2D-shaped driving dataset for the miniature world.

Every sample is drawn on the fly from a random stream keyed by
``(seed, split, index)``, so a sample never depends on the order of access and
the same seed always gives the same data. One sample is a small multi-camera
frame (a front and a rear camera by default) of a road seen in perspective:
lane markings (solid and dashed, bending with the road's curvature), cars,
pedestrians, a traffic light with a lit lamp, buildings and bushes as
distractors, partial occlusion, colour jitter and pixel noise. Its targets
feed every head of TinyOrion:

* ``gt_bboxes`` / ``gt_labels`` / ``gt_light_states``: 2D boxes per camera
  (x1, y1, x2, y2 in pixels), classes ``CLASSES`` and, for traffic lights,
  the lamp state (``LIGHT_STATES``; -1 for other classes);
* ``gt_lane_masks``: visible lane-marking pixels per camera, pooled to a grid
  of ``lane_mask_stride`` pixels;
* ``ego_fut_trajs``: the ego plan, ``plan_horizon`` waypoints (x forward,
  y left, metres) every ``plan_dt`` seconds: stop for a red light or a
  pedestrian in the ego lane, slow down for a yellow light or a close car
  ahead, otherwise follow the road's curvature at cruise speed;
* ``vlm_question_ids`` / ``vlm_answer_ids``: four Chat-B2D-like questions
  (cars ahead, pedestrians ahead, light state, next action) and their answers,
  tokenised by :class:`ChatTokenizer`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .builder import DATASETS
from .chat_tokenizer import ANSWER_LEN, QUESTION_LEN, ChatTokenizer

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")

QUESTION_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "count_cars": ("how many cars are in front ?", "how many cars are ahead ?"),
    "count_pedestrians": ("how many pedestrians are in front ?", "how many people are ahead ?"),
    "light_state": ("what is the traffic light state ?", "what colour is the traffic light ?"),
    "next_action": ("what should the ego car do ?", "what is the next action ?",
                    "what should the ego car do next ?"),
}
QA_TYPES: Tuple[str, ...] = tuple(QUESTION_TEMPLATES)
ACTIONS: Tuple[str, ...] = ("stop", "slow down", "go straight", "turn left", "turn right")

_CAR_COLOURS = np.array([[0.80, 0.12, 0.10], [0.15, 0.25, 0.75], [0.88, 0.88, 0.85],
                         [0.22, 0.22, 0.25], [0.90, 0.55, 0.10]], dtype=np.float32)
_SHIRT_COLOURS = np.array([[0.95, 0.85, 0.10], [0.10, 0.65, 0.25], [0.85, 0.25, 0.60],
                           [0.15, 0.70, 0.80], [0.95, 0.95, 0.95]], dtype=np.float32)
_LAMP_COLOURS = np.array([[1.00, 0.10, 0.05], [1.00, 0.80, 0.05], [0.10, 1.00, 0.30]], dtype=np.float32)


class _Canvas:
    """An RGB float image plus the mask of lane-marking pixels still visible on it."""

    def __init__(self, height: int, width: int) -> None:
        self.img = np.zeros((height, width, 3), dtype=np.float32)
        self.lane = np.zeros((height, width), dtype=bool)
        self.h, self.w = height, width

    def rect(self, x1: float, y1: float, x2: float, y2: float, colour: np.ndarray) -> None:
        """Paint the pixels whose centres lie in [x1, x2) x [y1, y2); hides lane pixels there."""
        c1, c2 = max(int(round(x1)), 0), min(int(round(x2)), self.w)
        r1, r2 = max(int(round(y1)), 0), min(int(round(y2)), self.h)
        if c2 > c1 and r2 > r1:
            self.img[r1:r2, c1:c2] = colour
            self.lane[r1:r2, c1:c2] = False

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour: np.ndarray) -> None:
        """Paint a filled axis-aligned ellipse; hides lane pixels under it."""
        r1, r2 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, self.h)
        c1, c2 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, self.w)
        if r2 <= r1 or c2 <= c1:
            return
        yy, xx = np.mgrid[r1:r2, c1:c2]
        inside = ((xx + 0.5 - cx) / max(rx, 0.5)) ** 2 + ((yy + 0.5 - cy) / max(ry, 0.5)) ** 2 <= 1.0
        self.img[r1:r2, c1:c2][inside] = colour
        self.lane[r1:r2, c1:c2][inside] = False


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@DATASETS.register_module()
class SyntheticChatB2D(Dataset):
    """Procedural multi-camera driving frames with detection, lane, QA and planning targets.

    Args:
        split: ``'train'``, ``'val'`` or ``'test'``; each split is its own random stream.
        num_samples: length of the split (default 2048 for train, 256 otherwise).
        seed: world seed; the same seed, split and index always give the same sample.
        img_size: ``(H, W)`` of every camera image.
        num_cams: 1 (front only) or 2 (front and rear).
        lane_mask_stride: pixels per lane-mask cell (must divide H and W).
        plan_horizon, plan_dt: number and spacing (s) of the ego-plan waypoints.
        cache: keep rendered samples (uint8) in memory after the first access.
        test_mode: accepted for ORION config compatibility; targets are always returned.
    """

    CLASSES: Tuple[str, ...] = ("car", "pedestrian", "traffic_light")
    LIGHT_STATES: Tuple[str, ...] = ("red", "yellow", "green")
    CAMERAS: Tuple[str, ...] = ("CAM_FRONT", "CAM_BACK")
    QA_TYPES: Tuple[str, ...] = QA_TYPES
    ACTIONS: Tuple[str, ...] = ACTIONS
    IMG_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    IMG_STD: Tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __init__(self, split: str = "train", num_samples: Optional[int] = None, seed: int = 0,
                 img_size: Sequence[int] = (80, 80), num_cams: int = 2, lane_mask_stride: int = 4,
                 plan_horizon: int = 6, plan_dt: float = 0.5, cache: bool = True,
                 test_mode: bool = False) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"SyntheticChatB2D: split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        if num_cams not in (1, 2):
            raise ValueError(f"SyntheticChatB2D: num_cams must be 1 or 2, got {num_cams}")
        h, w = (int(v) for v in img_size)
        if h < 32 or w < 32:
            raise ValueError(f"SyntheticChatB2D: img_size must be at least (32, 32), got {(h, w)}")
        if h % lane_mask_stride or w % lane_mask_stride:
            raise ValueError(f"SyntheticChatB2D: lane_mask_stride {lane_mask_stride} must divide "
                             f"img_size {(h, w)}")
        self.split = split
        self.num_samples = int(num_samples if num_samples is not None else (2048 if split == "train" else 256))
        if self.num_samples < 1:
            raise ValueError(f"SyntheticChatB2D: num_samples must be >= 1, got {self.num_samples}")
        self.seed = int(seed)
        self.img_size = (h, w)
        self.num_cams = num_cams
        self.cam_names = list(self.CAMERAS[:num_cams])
        self.lane_mask_stride = lane_mask_stride
        self.plan_horizon = int(plan_horizon)
        self.plan_dt = float(plan_dt)
        self.test_mode = test_mode
        self.tokenizer = ChatTokenizer()
        self.collate_fn = collate_chat_b2d
        self._cache: Optional[Dict[int, dict]] = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------ sample access
    def __getitem__(self, index: int) -> dict:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"SyntheticChatB2D[{self.split}]: index {index} out of range [0, {self.num_samples})")
        index = index % self.num_samples
        raw = self._cache.get(index) if self._cache is not None else None
        if raw is None:
            raw = self._generate(index)
            if self._cache is not None:
                self._cache[index] = raw
        return self._to_tensors(raw)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, _SPLIT_CODES[self.split], index]))

    def _to_tensors(self, raw: dict) -> dict:
        img = torch.from_numpy(raw["img"]).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.IMG_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.IMG_STD).view(1, 3, 1, 1)
        return dict(
            img=(img - mean) / std,
            img_metas=dict(raw["meta"]),
            gt_bboxes=[torch.from_numpy(b) for b in raw["boxes"]],
            gt_labels=[torch.from_numpy(l) for l in raw["labels"]],
            gt_light_states=[torch.from_numpy(s) for s in raw["states"]],
            gt_lane_masks=torch.from_numpy(raw["lane"]).float(),
            ego_fut_trajs=torch.from_numpy(raw["plan"]),
            vlm_question_ids=torch.from_numpy(raw["question_ids"]),
            vlm_answer_ids=torch.from_numpy(raw["answer_ids"]),
        )

    # ------------------------------------------------------------------ generation
    def _generate(self, index: int) -> dict:
        rng = self._rng(index)
        h, w = self.img_size
        curvature = float(rng.uniform(-1.0, 1.0))
        ego_offset = float(rng.uniform(-0.25, 0.25))
        has_light = rng.random() < 0.75
        light_state = int(rng.integers(0, 3)) if has_light else -1

        imgs, boxes, labels, states, lanes = [], [], [], [], []
        front_info: dict = {}
        for cam in range(self.num_cams):
            front = cam == 0
            cam_curv = curvature if front else float(rng.uniform(-0.3, 0.3))
            canvas, objs, info = self._render_camera(rng, cam_curv, ego_offset if front else -ego_offset,
                                                     light_state if front else -1)
            if front:
                front_info = info
            img = np.clip(canvas.img * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.035, canvas.img.shape), 0, 1)
            imgs.append(np.round(img * 255.0).astype(np.uint8))
            boxes.append(np.array([o[0] for o in objs], dtype=np.float32).reshape(-1, 4))
            labels.append(np.array([o[1] for o in objs], dtype=np.int64))
            states.append(np.array([o[2] for o in objs], dtype=np.int64))
            s = self.lane_mask_stride
            cells = canvas.lane.reshape(h // s, s, w // s, s).sum(axis=(1, 3))
            lanes.append(cells >= 2)

        action = self._decide_action(light_state, front_info, curvature)
        plan = self._plan(action, curvature)
        light_word = self.LIGHT_STATES[light_state] if light_state >= 0 else "none"
        answers = {
            "count_cars": _NUMBER_WORDS[front_info["num_cars"]],
            "count_pedestrians": _NUMBER_WORDS[front_info["num_peds"]],
            "light_state": light_word,
            "next_action": action,
        }
        questions = [str(rng.choice(QUESTION_TEMPLATES[t])) for t in QA_TYPES]
        tok = self.tokenizer
        meta = dict(
            sample_idx=index, split=self.split, seed=self.seed,
            scene_token=f"synthetic-{self.split}-{self.seed}-{index:06d}",
            cam_names=list(self.cam_names), img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(h, w, 3),
            img_norm_cfg=dict(mean=list(self.IMG_MEAN), std=list(self.IMG_STD), to_rgb=False),
            qa_types=list(QA_TYPES), questions=questions, answers=[answers[t] for t in QA_TYPES],
            action=action, light_state=light_word, curvature=curvature,
        )
        return dict(
            img=np.stack(imgs), boxes=boxes, labels=labels, states=states,
            lane=np.stack(lanes), plan=plan, meta=meta,
            question_ids=np.array([tok.encode_question(q, QUESTION_LEN) for q in questions], dtype=np.int64),
            answer_ids=np.array([tok.encode_answer(answers[t], ANSWER_LEN) for t in QA_TYPES], dtype=np.int64),
        )

    def _render_camera(self, rng: np.random.Generator, curv: float, ego_offset: float,
                       light_state: int) -> Tuple[_Canvas, List[tuple], dict]:
        """Draw one camera; return the canvas, its objects ``(box, label, state)`` and plan cues."""
        h, w = self.img_size
        cv = _Canvas(h, w)
        horizon = int(round(0.4 * h))
        lane_w = 0.42 * w
        cx = w / 2.0

        def x_at(t: np.ndarray, u: float) -> np.ndarray:
            return cx + t * u * lane_w + curv * 0.35 * w * (1.0 - t) ** 2

        # Sky, buildings on the horizon, grass.
        sky_top, sky_bottom = np.array([0.35, 0.55, 0.90]), np.array([0.70, 0.82, 0.95])
        ramp = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
        cv.img[:horizon] = (sky_top * (1 - ramp) + sky_bottom * ramp)[:, None, :]
        for _ in range(int(rng.integers(0, 4))):
            bw, bh = rng.uniform(0.08, 0.2) * w, rng.uniform(0.08, 0.22) * h
            bx = rng.uniform(0, w - bw)
            cv.rect(bx, horizon - bh, bx + bw, horizon, np.full(3, rng.uniform(0.45, 0.7), np.float32))
        cv.img[horizon:] = np.array([0.25, 0.55, 0.20], np.float32) + rng.normal(0, 0.03, (h - horizon, w, 1))

        # Road and lane markings (rows below the horizon).
        rows = np.arange(horizon + 1, h)
        t = (rows - horizon) / float(h - 1 - horizon)
        cols = np.arange(w)[None, :] + 0.5
        left, right = x_at(t, -1.65 - ego_offset), x_at(t, 1.65 - ego_offset)
        road = (cols >= left[:, None]) & (cols <= right[:, None])
        sub = cv.img[horizon + 1:]
        sub[road] = np.array([0.42, 0.42, 0.44], np.float32)
        half = 0.5 + 1.3 * t
        phase = rng.random()
        for k, line in enumerate((-1.5, -0.5, 0.5, 1.5)):
            xc = x_at(t, line - ego_offset)
            on = np.abs(cols - xc[:, None]) <= half[:, None]
            if k in (1, 2):  # dashed inner markings, periodic in depth
                on &= (((1.0 / t) * 0.9 + phase) % 1.0 < 0.6)[:, None]
            colour = np.array([0.95, 0.85, 0.2] if k == 0 else [0.97, 0.97, 0.97], np.float32)
            sub[on] = colour
            cv.lane[horizon + 1:][on] = True

        # Bushes on the verge (partial occluders).
        for _ in range(int(rng.integers(0, 3))):
            tb = rng.uniform(0.2, 0.9)
            side = -2.3 if rng.random() < 0.5 else 2.3
            bx = float(x_at(np.array(tb), side - ego_offset + rng.uniform(-0.3, 0.3)))
            by = horizon + tb * (h - 1 - horizon)
            r = 2.0 + 5.0 * tb
            cv.ellipse(bx, by - r * 0.6, r, r * 0.7, np.array([0.10, 0.38, 0.12], np.float32))

        # Objects: sample, keep the ones that fit, then paint far to near.
        placed: List[dict] = []

        def try_place(make) -> None:
            for _ in range(12):
                obj = make()
                x1, y1, x2, y2 = obj["box"]
                full = (x2 - x1) * (y2 - y1)
                cb = (max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h)))
                if cb[2] - cb[0] < 4 or cb[3] - cb[1] < 6:
                    continue
                if (cb[2] - cb[0]) * (cb[3] - cb[1]) < 0.6 * full:
                    continue
                ccx, ccy = (cb[0] + cb[2]) / 2, (cb[1] + cb[3]) / 2
                if any(_box_iou(cb, p["clip"]) > 0.25 or
                       abs(ccx - p["centre"][0]) + abs(ccy - p["centre"][1]) < 9 for p in placed):
                    continue
                obj["clip"], obj["centre"] = cb, (ccx, ccy)
                placed.append(obj)
                return

        def make_car() -> dict:
            lane = int(rng.integers(-1, 2))
            tc = float(rng.uniform(0.25, 0.95))
            u = lane - ego_offset + float(rng.uniform(-0.1, 0.1))
            bw = 0.75 * lane_w * tc * float(rng.uniform(0.9, 1.1))
            bh = bw * float(rng.uniform(0.55, 0.7))
            xc = float(x_at(np.array(tc), u))
            yb = horizon + tc * (h - 1 - horizon) + 1
            return dict(kind=0, t=tc, u=u, box=(xc - bw / 2, yb - bh, xc + bw / 2, yb),
                        colour=_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] + rng.normal(0, 0.04, 3))

        def make_ped() -> dict:
            tp = float(rng.uniform(0.3, 0.95))
            u = float(rng.uniform(-2.2, 2.2))
            bw = max(3.0, 0.16 * lane_w * tp + 1.5)
            bh = bw * float(rng.uniform(2.4, 2.8))
            xc = float(x_at(np.array(tp), u))
            yb = horizon + tp * (h - 1 - horizon) + 1
            return dict(kind=1, t=tp, u=u, box=(xc - bw / 2, yb - bh, xc + bw / 2, yb),
                        colour=_SHIRT_COLOURS[rng.integers(len(_SHIRT_COLOURS))] + rng.normal(0, 0.04, 3))

        def make_light() -> dict:
            bw = float(rng.integers(5, 8))
            bh = round(bw * 2.4)
            x1 = float(rng.uniform(0.2 * w, 0.8 * w - bw))
            y1 = float(rng.uniform(2, max(3.0, horizon - bh - 4)))
            return dict(kind=2, t=0.0, u=0.0, box=(x1, y1, x1 + bw, y1 + bh), colour=None)

        if light_state >= 0:
            try_place(make_light)
        for _ in range(int(rng.integers(0, 4))):
            try_place(make_car)
        for _ in range(int(rng.integers(0, 3))):
            try_place(make_ped)

        for obj in sorted(placed, key=lambda o: o["t"]):
            x1, y1, x2, y2 = obj["box"]
            bw, bh = x2 - x1, y2 - y1
            if obj["kind"] == 0:
                col = np.clip(obj["colour"], 0, 1).astype(np.float32)
                cv.rect(x1, y1 + 0.35 * bh, x2, y2 - 0.12 * bh, col)
                cv.rect(x1 + 0.15 * bw, y1, x2 - 0.15 * bw, y1 + 0.4 * bh, col)
                cv.rect(x1 + 0.22 * bw, y1 + 0.08 * bh, x2 - 0.22 * bw, y1 + 0.36 * bh,
                        np.array([0.15, 0.2, 0.3], np.float32))
                wheel = np.array([0.05, 0.05, 0.05], np.float32)
                cv.rect(x1 + 0.05 * bw, y2 - 0.2 * bh, x1 + 0.3 * bw, y2, wheel)
                cv.rect(x2 - 0.3 * bw, y2 - 0.2 * bh, x2 - 0.05 * bw, y2, wheel)
            elif obj["kind"] == 1:
                col = np.clip(obj["colour"], 0, 1).astype(np.float32)
                legs = np.array([0.12, 0.12, 0.2], np.float32)
                cv.rect(x1 + 0.1 * bw, y1 + 0.7 * bh, x1 + 0.45 * bw, y2, legs)
                cv.rect(x2 - 0.45 * bw, y1 + 0.7 * bh, x2 - 0.1 * bw, y2, legs)
                cv.rect(x1, y1 + 0.25 * bh, x2, y1 + 0.72 * bh, col)
                cv.ellipse((x1 + x2) / 2, y1 + 0.13 * bh, 0.4 * bw, 0.13 * bh,
                           np.array([0.93, 0.75, 0.6], np.float32))
            else:
                xm = (x1 + x2) / 2
                cv.rect(xm - 0.6, y2, xm + 0.6, horizon + 2, np.array([0.3, 0.3, 0.3], np.float32))
                cv.rect(x1, y1, x2, y2, np.array([0.12, 0.12, 0.12], np.float32))
                for lamp in range(3):
                    lit = lamp == light_state
                    col = _LAMP_COLOURS[lamp] if lit else np.array([0.3, 0.3, 0.3], np.float32)
                    cv.ellipse(xm, y1 + bh * (lamp * 2 + 1) / 6.0, 0.34 * bw, 0.34 * bw, col)

        objs = [(o["clip"], o["kind"], light_state if o["kind"] == 2 else -1) for o in placed]
        info = dict(
            num_cars=sum(o["kind"] == 0 for o in placed),
            num_peds=sum(o["kind"] == 1 for o in placed),
            ped_in_path=any(o["kind"] == 1 and abs(o["u"]) < 0.45 and o["t"] >= 0.5 for o in placed),
            car_ahead=any(o["kind"] == 0 and abs(o["u"]) < 0.5 and o["t"] >= 0.6 for o in placed),
        )
        return cv, objs, info

    @staticmethod
    def _decide_action(light_state: int, info: dict, curvature: float) -> str:
        if light_state == 0 or info["ped_in_path"]:
            return "stop"
        if light_state == 1 or info["car_ahead"]:
            return "slow down"
        if abs(curvature) > 0.35:
            return "turn right" if curvature > 0 else "turn left"
        return "go straight"

    def _plan(self, action: str, curvature: float) -> np.ndarray:
        """Waypoints (x forward, y left) in metres for the chosen action on a curved road."""
        k = np.arange(1, self.plan_horizon + 1, dtype=np.float64)
        if action == "stop":
            x = 2.5 * (1.0 - 0.5 ** k)
        elif action == "slow down":
            x = 3.0 * self.plan_dt * k
        else:
            x = 6.0 * self.plan_dt * k
        y = -curvature * 0.012 * x ** 2
        return np.stack([x, y], axis=1).astype(np.float32)


def collate_chat_b2d(samples: List[dict]) -> dict:
    """Batch SyntheticChatB2D samples ORION-style.

    Fixed-shape tensors are stacked (``img`` [B, N, 3, H, W], ``gt_lane_masks``
    [B, N, Hm, Wm], ``ego_fut_trajs`` [B, T, 2], ``vlm_question_ids`` [B, Q, Lq],
    ``vlm_answer_ids`` [B, Q, La]); ragged targets stay lists (``gt_bboxes``,
    ``gt_labels``, ``gt_light_states``: list over B of lists over N); ``img_metas``
    is the list of per-sample dicts.
    """
    if not samples:
        raise ValueError("collate_chat_b2d: expected at least one sample, got an empty list")
    stacked = ("img", "gt_lane_masks", "ego_fut_trajs", "vlm_question_ids", "vlm_answer_ids")
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in stacked:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"collate_chat_b2d: key {key!r} needs one shape across the batch, got {shapes}")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


__all__ = ["SyntheticChatB2D", "collate_chat_b2d", "QA_TYPES", "ACTIONS", "QUESTION_TEMPLATES"]
