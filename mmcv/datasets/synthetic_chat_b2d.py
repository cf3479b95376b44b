"""SyntheticChatB2D: a procedural, Chat-B2D-shaped driving dataset of short scenes.

Samples are the consecutive frames of scenes: sample ``i`` is frame
``i % scene_len`` of scene ``i // scene_len``, ``frame_dt`` seconds after the
previous one (ORION's key frames are 0.5 s apart). A scene is scripted once
from a random stream keyed by ``(seed, split, scene)`` and every frame is
rendered from the script (see :mod:`.synthetic_scene`): the ego drives on,
cars and pedestrians move, a traffic light comes closer and finally leaves the
top of the front view while its state still decides what the ego must do.
Pixel noise comes from a stream keyed by ``(seed, split, index)``, so a sample
never depends on the order of access. ``flag`` holds the scene of every
sample, as ORION's ``seq_mode`` datasets do, for the streaming samplers.

One sample is a small multi-camera frame (front and rear by default) of a road
seen in perspective: lane markings (solid and dashed, bending with the road's
curvature), cars, pedestrians, a traffic light with a lit lamp, buildings and
bushes, partial occlusion, colour jitter and pixel noise. Its targets feed
every head of TinyOrion:

* ``gt_bboxes`` / ``gt_labels`` / ``gt_light_states``: 2D boxes per camera
  (x1, y1, x2, y2 in pixels) of the visible objects, classes ``CLASSES`` and,
  for traffic lights, the lamp state (``LIGHT_STATES``; -1 for other classes);
* ``gt_lane_masks``: visible lane-marking pixels per camera, pooled to a grid
  of ``lane_mask_stride`` pixels;
* ``ego_fut_trajs``: the ego plan, ``plan_horizon`` waypoints (x forward,
  y left, metres) every ``plan_dt`` seconds: stop for a red light or a
  pedestrian in the ego lane, slow down for a yellow light or a close car
  ahead, otherwise follow the road's curvature at cruise speed;
* ``vlm_question_ids`` / ``vlm_answer_ids``: four Chat-B2D-like questions
  (cars ahead, pedestrians ahead, light state, next action) and their answers,
  tokenised by :class:`ChatTokenizer`. The light state is the state of the
  scene's light even when no pixel of it is in view (``img_metas['light_hidden']``);
* ``img_metas['traffic_state']``: that state as an index into ``LIGHT_STATES``
  (``len(LIGHT_STATES)``: no light), the per-frame target of the detection head's
  traffic-state output (ORION's heads also read traffic states from ``img_metas``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .builder import DATASETS
from .chat_tokenizer import ANSWER_LEN, QUESTION_LEN, ChatTokenizer
from .synthetic_render import Canvas, CameraView, draw_background, render_camera
from .synthetic_scene import Z_NEAR, SceneScript, make_scene_script

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
_SCENE_STREAM = 1 << 20  # keeps scene streams apart from the per-sample noise streams
_SCENE_SECONDS = 100.0  # timestamps of different scenes lie this far apart


def scene_flags(num_samples: int, scene_len: int, seq_split_num: Union[int, str] = 1) -> np.ndarray:
    """Group id of every sample: its scene, or ORION's ``seq_split_num`` pieces of it ('all': one per frame)."""
    if seq_split_num == "all":
        return np.arange(num_samples, dtype=np.int64)
    if isinstance(seq_split_num, bool) or not isinstance(seq_split_num, int) or seq_split_num < 1:
        raise ValueError(f"SyntheticChatB2D: seq_split_num must be a positive integer or 'all', got {seq_split_num!r}")
    scene, frame = np.divmod(np.arange(num_samples), scene_len)
    piece = int(np.ceil(scene_len / seq_split_num))
    return (scene * seq_split_num + frame // piece).astype(np.int64)


@DATASETS.register_module()
class SyntheticChatB2D(Dataset):
    """Procedural multi-camera driving scenes with detection, lane, QA and planning targets.

    Args:
        split: ``'train'``, ``'val'`` or ``'test'``; each split is its own random stream.
        num_samples: frames in the split (default 2048 for train, 256 otherwise).
        seed: world seed; the same seed, split and index always give the same sample.
        img_size: ``(H, W)`` of every camera image.
        num_cams: 1 (front only) or 2 (front and rear).
        lane_mask_stride: pixels per lane-mask cell (must divide H and W).
        plan_horizon, plan_dt: number and spacing (s) of the ego-plan waypoints.
        scene_len: frames per scene; frame_dt: seconds between consecutive frames.
        seq_mode, seq_split_num: ORION's keys. ``flag`` is the scene of each sample
            (``seq_split_num`` > 1 splits a scene into that many groups, 'all' makes
            every frame its own group); ``seq_mode=False`` is refused (no streaming).
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
                 plan_horizon: int = 6, plan_dt: float = 0.5, scene_len: int = 8, frame_dt: float = 0.5,
                 seq_mode: bool = True, seq_split_num: Union[int, str] = 1, cache: bool = True,
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
        if int(scene_len) < 1 or not float(frame_dt) > 0:
            raise ValueError(f"SyntheticChatB2D: scene_len must be >= 1 and frame_dt > 0, got {scene_len}, {frame_dt}")
        if not seq_mode:
            raise ValueError("SyntheticChatB2D: seq_mode=False is not supported: the miniature world is made of "
                             "scenes; use seq_split_num='all' for one group per frame")
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
        self.scene_len = int(scene_len)
        self.frame_dt = float(frame_dt)
        self.flag = scene_flags(self.num_samples, self.scene_len, seq_split_num)
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

    def _rng(self, key: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, _SPLIT_CODES[self.split], key]))

    def scene_script(self, scene: int) -> SceneScript:
        """The script of scene ``scene`` (the same for all of its frames)."""
        return make_scene_script(self._rng(_SCENE_STREAM + scene), (self.scene_len - 1) * self.frame_dt,
                                 _CAR_COLOURS, _SHIRT_COLOURS, self.img_size[1])

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
        scene, frame = divmod(index, self.scene_len)
        script = self.scene_script(scene)
        rng = self._rng(index)
        time = frame * self.frame_dt
        travel = script.ego_travel(time)
        h, w = self.img_size
        imgs, boxes, labels, states, lanes = [], [], [], [], []
        front_truth: List[tuple] = []
        front_drawn: List[dict] = []
        for cam in range(self.num_cams):
            front = cam == 0
            view = CameraView(h, w, script.curvature if front else script.rear_curvature,
                              script.ego_offset if front else -script.ego_offset)
            canvas = Canvas(h, w)
            dash = script.dash_phase + (-0.9 if front else 0.9) * travel / Z_NEAR
            draw_background(canvas, view, rng, script, dash, mirror=not front)
            truth, drawn = render_camera(canvas, view, script.front if front else script.rear, time, travel,
                                         rear=not front, light_state=script.light_state if front else -1,
                                         light_distance=script.light_distance(time))
            if front:
                front_truth, front_drawn = truth, drawn
            img = np.clip(canvas.img * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.035, canvas.img.shape), 0, 1)
            imgs.append(np.round(img * 255.0).astype(np.uint8))
            boxes.append(np.array([o[0] for o in truth], dtype=np.float32).reshape(-1, 4))
            labels.append(np.array([o[1] for o in truth], dtype=np.int64))
            states.append(np.array([o[2] for o in truth], dtype=np.int64))
            s = self.lane_mask_stride
            lanes.append(canvas.lane.reshape(h // s, s, w // s, s).sum(axis=(1, 3)) >= 2)

        light_in_view = any(o["kind"] == 2 and o.get("visible_px", 0) > 0 for o in front_drawn)
        cues = dict(ped_in_path=any(o["kind"] == 1 and abs(o["u"]) < 0.45 and o["t"] >= 0.5 for o in front_drawn),
                    car_ahead=any(o["kind"] == 0 and abs(o["u"]) < 0.5 and o["t"] >= 0.6 for o in front_drawn))
        action = self._decide_action(script.light_state, cues, script.curvature)
        plan = self._plan(action, script.curvature)
        light_word = self.LIGHT_STATES[script.light_state] if script.light_state >= 0 else "none"
        answers = {
            "count_cars": _NUMBER_WORDS[sum(o[1] == 0 for o in front_truth)],
            "count_pedestrians": _NUMBER_WORDS[sum(o[1] == 1 for o in front_truth)],
            "light_state": light_word,
            "next_action": action,
        }
        questions = [str(rng.choice(QUESTION_TEMPLATES[t])) for t in QA_TYPES]
        tok = self.tokenizer
        meta = dict(
            sample_idx=index, split=self.split, seed=self.seed,
            scene_token=f"synthetic-{self.split}-{self.seed}-scene{scene:05d}", frame_idx=frame,
            timestamp=scene * _SCENE_SECONDS + time,
            cam_names=list(self.cam_names), img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(h, w, 3),
            img_norm_cfg=dict(mean=list(self.IMG_MEAN), std=list(self.IMG_STD), to_rgb=False),
            qa_types=list(QA_TYPES), questions=questions, answers=[answers[t] for t in QA_TYPES],
            action=action, light_state=light_word, curvature=script.curvature,
            light_hidden=script.light_state >= 0 and not light_in_view,
            traffic_state=script.light_state if script.light_state >= 0 else len(self.LIGHT_STATES),
        )
        return dict(
            img=np.stack(imgs), boxes=boxes, labels=labels, states=states,
            lane=np.stack(lanes), plan=plan, meta=meta,
            question_ids=np.array([tok.encode_question(q, QUESTION_LEN) for q in questions], dtype=np.int64),
            answer_ids=np.array([tok.encode_answer(answers[t], ANSWER_LEN) for t in QA_TYPES], dtype=np.int64),
        )

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


__all__ = ["SyntheticChatB2D", "collate_chat_b2d", "scene_flags", "QA_TYPES", "ACTIONS", "QUESTION_TEMPLATES"]
