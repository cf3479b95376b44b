"""Drawing one camera image of a miniature-world scene, with its ground truth.

Objects are painted far to near into an RGB canvas and an id map; an object is
ground truth when enough of it is on screen (its clipped box keeps >= 60 % of
the box and is at least 4 x 6 px) and at least half of the pixels it painted
are still visible after nearer objects were drawn (partial occlusion).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .synthetic_scene import Z_NEAR, SceneScript, Thing

LAMP_COLOURS = np.array([[1.00, 0.10, 0.05], [1.00, 0.80, 0.05], [0.10, 1.00, 0.30]], dtype=np.float32)
_UNLIT = np.array([0.3, 0.3, 0.3], np.float32)
_NO_ID = -1
VISIBLE_DEPTH = (0.2, 1.35)  # screen depths t drawn at all (t = Z_NEAR / z)
LIGHT_RISE = 1.2  # the lamp's bottom edge rises LIGHT_RISE * t * (ground rows) above the horizon
LIGHT_LANE = 1.3  # lateral position of the light pole, lane widths right of the ego lane's centre


class Canvas:
    """An RGB float image, the mask of visible lane-marking pixels, and an object-id map."""

    def __init__(self, height: int, width: int) -> None:
        self.img = np.zeros((height, width, 3), dtype=np.float32)
        self.lane = np.zeros((height, width), dtype=bool)
        self.ids = np.full((height, width), _NO_ID, dtype=np.int16)
        self.painted: Dict[int, int] = {}
        self.h, self.w = height, width

    def _paint(self, rows: slice, cols: slice, mask: Optional[np.ndarray], colour: np.ndarray, obj_id: int) -> None:
        target = np.ones((rows.stop - rows.start, cols.stop - cols.start), bool) if mask is None else mask
        self.img[rows, cols][target] = colour
        self.lane[rows, cols][target] = False
        ids = self.ids[rows, cols]
        if obj_id != _NO_ID:
            self.painted[obj_id] = self.painted.get(obj_id, 0) + int((target & (ids != obj_id)).sum())
        ids[target] = obj_id

    def rect(self, x1: float, y1: float, x2: float, y2: float, colour: np.ndarray, obj_id: int = _NO_ID) -> None:
        """Paint the pixels whose centres lie in [x1, x2) x [y1, y2)."""
        c1, c2 = max(int(round(x1)), 0), min(int(round(x2)), self.w)
        r1, r2 = max(int(round(y1)), 0), min(int(round(y2)), self.h)
        if c2 > c1 and r2 > r1:
            self._paint(slice(r1, r2), slice(c1, c2), None, colour, obj_id)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour: np.ndarray, obj_id: int = _NO_ID) -> None:
        """Paint a filled axis-aligned ellipse."""
        r1, r2 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, self.h)
        c1, c2 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, self.w)
        if r2 <= r1 or c2 <= c1:
            return
        yy, xx = np.mgrid[r1:r2, c1:c2]
        inside = ((xx + 0.5 - cx) / max(rx, 0.5)) ** 2 + ((yy + 0.5 - cy) / max(ry, 0.5)) ** 2 <= 1.0
        self._paint(slice(r1, r2), slice(c1, c2), inside, colour, obj_id)


class CameraView:
    """Road geometry of one camera: horizon, lane width and the curved road centre."""

    def __init__(self, height: int, width: int, curvature: float, ego_offset: float) -> None:
        self.h, self.w = height, width
        self.horizon = int(round(0.4 * height))
        self.lane_w = 0.42 * width
        self.curvature = curvature
        self.ego_offset = ego_offset

    def ground_row(self, t: np.ndarray) -> np.ndarray:
        return self.horizon + t * (self.h - 1 - self.horizon)

    def x_at(self, t: np.ndarray, u: float) -> np.ndarray:
        """Column of lateral position ``u`` (lane widths, road frame) at screen depth ``t``."""
        u = u - self.ego_offset
        return self.w / 2.0 + t * u * self.lane_w + self.curvature * 0.35 * self.w * (1.0 - t) ** 2


def draw_background(cv: Canvas, view: CameraView, rng: np.random.Generator, script: SceneScript, dash_phase: float,
                    mirror: bool) -> None:
    """Sky, buildings on the horizon, grass, road and lane markings (dashes fixed to the road)."""
    h, w, horizon = cv.h, cv.w, view.horizon
    sky_top, sky_bottom = np.array([0.35, 0.55, 0.90]), np.array([0.70, 0.82, 0.95])
    ramp = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    cv.img[:horizon] = (sky_top * (1 - ramp) + sky_bottom * ramp)[:, None, :]
    for x, width, height, grey in script.buildings:
        bw, bh = width * w, height * h
        bx = w - x - bw if mirror else x
        cv.rect(bx, horizon - bh, bx + bw, horizon, np.full(3, grey, np.float32))
    cv.img[horizon:] = np.array([0.25, 0.55, 0.20], np.float32) + rng.normal(0, 0.03, (h - horizon, w, 1))
    rows = np.arange(horizon + 1, h)
    t = (rows - horizon) / float(h - 1 - horizon)
    cols = np.arange(w)[None, :] + 0.5
    road = (cols >= view.x_at(t, -1.65)[:, None]) & (cols <= view.x_at(t, 1.65)[:, None])
    sub = cv.img[horizon + 1:]
    sub[road] = np.array([0.42, 0.42, 0.44], np.float32)
    half = 0.5 + 1.3 * t
    for k, line in enumerate((-1.5, -0.5, 0.5, 1.5)):
        on = np.abs(cols - view.x_at(t, line)[:, None]) <= half[:, None]
        if k in (1, 2):  # dashed inner markings, periodic in distance (1 / t is proportional to it)
            on &= (((1.0 / t) * 0.9 + dash_phase) % 1.0 < 0.6)[:, None]
        sub[on] = np.array([0.95, 0.85, 0.2] if k == 0 else [0.97, 0.97, 0.97], np.float32)
        cv.lane[horizon + 1:][on] = True


def _thing_box(view: CameraView, thing: Thing, t: float, u: float) -> Tuple[float, float, float, float]:
    xc = float(view.x_at(np.array(t), u))
    yb = float(view.ground_row(np.array(t))) + 1
    if thing.kind == 0:
        bw = 0.75 * view.lane_w * t * thing.size
        bh = bw * thing.aspect
    elif thing.kind == 1:
        bw = max(3.0, 0.16 * view.lane_w * t + 1.5)
        bh = bw * thing.size
    else:
        r = 2.0 + 5.0 * min(t, 1.0)
        return xc - r, yb - 1.3 * r, xc + r, yb
    return xc - bw / 2, yb - bh, xc + bw / 2, yb


def _paint_thing(cv: Canvas, kind: int, box: Tuple[float, float, float, float], colour: np.ndarray, obj_id: int,
                 light_state: int = -1) -> None:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if kind == 0:
        cv.rect(x1, y1 + 0.35 * bh, x2, y2 - 0.12 * bh, colour, obj_id)
        cv.rect(x1 + 0.15 * bw, y1, x2 - 0.15 * bw, y1 + 0.4 * bh, colour, obj_id)
        cv.rect(x1 + 0.22 * bw, y1 + 0.08 * bh, x2 - 0.22 * bw, y1 + 0.36 * bh, np.array([0.15, 0.2, 0.3], np.float32),
                obj_id)
        wheel = np.array([0.05, 0.05, 0.05], np.float32)
        cv.rect(x1 + 0.05 * bw, y2 - 0.2 * bh, x1 + 0.3 * bw, y2, wheel, obj_id)
        cv.rect(x2 - 0.3 * bw, y2 - 0.2 * bh, x2 - 0.05 * bw, y2, wheel, obj_id)
    elif kind == 1:
        legs = np.array([0.12, 0.12, 0.2], np.float32)
        cv.rect(x1 + 0.1 * bw, y1 + 0.7 * bh, x1 + 0.45 * bw, y2, legs, obj_id)
        cv.rect(x2 - 0.45 * bw, y1 + 0.7 * bh, x2 - 0.1 * bw, y2, legs, obj_id)
        cv.rect(x1, y1 + 0.25 * bh, x2, y1 + 0.72 * bh, colour, obj_id)
        cv.ellipse((x1 + x2) / 2, y1 + 0.13 * bh, 0.4 * bw, 0.13 * bh, np.array([0.93, 0.75, 0.6], np.float32), obj_id)
    elif kind == 2:
        cv.rect(x1, y1, x2, y2, np.array([0.12, 0.12, 0.12], np.float32), obj_id)
        for lamp in range(3):
            lit = LAMP_COLOURS[lamp] if lamp == light_state else _UNLIT
            cv.ellipse((x1 + x2) / 2, y1 + bh * (lamp * 2 + 1) / 6.0, 0.34 * bw, 0.34 * bw, lit, obj_id)
    else:
        cv.ellipse((x1 + x2) / 2, y2 - 0.55 * bh, bw / 2, 0.45 * bh, np.array([0.10, 0.38, 0.12], np.float32))


def _light_drawable(view: CameraView, distance: float) -> Optional[dict]:
    if distance <= 0:
        return None
    t = Z_NEAR / distance
    bw = 24.0 * t
    y2 = view.horizon - LIGHT_RISE * t * (view.h - 1 - view.horizon)
    xm = float(view.x_at(np.array(t), LIGHT_LANE))
    return dict(kind=2, z=distance, box=(xm - bw / 2, y2 - 2.4 * bw, xm + bw / 2, y2), u=LIGHT_LANE, t=t,
                pole=(xm, y2, float(view.ground_row(np.array(t))), max(1.0, 0.15 * bw)))


def render_camera(cv: Canvas, view: CameraView, things: List[Thing], time: float, travel: float, rear: bool,
                  light_state: int, light_distance: float) -> Tuple[List[tuple], List[dict]]:
    """Paint ``things`` (and the light) and return ``(ground truth, drawn objects)``.

    Ground truth: ``(box, label, light state)`` per visible object; drawn objects
    carry ``kind``, ``t`` (screen depth) and ``u`` (lateral position) for the plan cues, and
    ``visible_px``, the number of their pixels left in view.
    """
    drawn = []
    for thing in things:
        z = thing.distance(time, travel, rear)
        t = Z_NEAR / z if z > 0 else 0.0
        if not VISIBLE_DEPTH[0] <= t <= VISIBLE_DEPTH[1]:
            continue
        u = thing.lateral(time)
        drawn.append(dict(kind=thing.kind, z=z, t=t, u=u - view.ego_offset, box=_thing_box(view, thing, t, u),
                          colour=np.array(thing.colour, np.float32)))
    if light_state >= 0:
        light = _light_drawable(view, light_distance)
        if light is not None:
            drawn.append(light)
    for obj_id, obj in enumerate(sorted(drawn, key=lambda o: -o["z"])):
        obj["id"] = obj_id
        if obj["kind"] == 2:
            xm, top, bottom, width = obj["pole"]
            cv.rect(xm - width / 2, top, xm + width / 2, bottom + 1, np.array([0.3, 0.3, 0.3], np.float32))
        _paint_thing(cv, obj["kind"], obj["box"], obj.get("colour"), obj_id, light_state)
    visible_px = np.bincount(cv.ids[cv.ids >= 0].ravel(), minlength=len(drawn))
    truth = []
    for obj in sorted(drawn, key=lambda o: o["id"]):
        if obj["kind"] == 3:
            continue
        x1, y1, x2, y2 = obj["box"]
        clip = (max(x1, 0.0), max(y1, 0.0), min(x2, float(cv.w)), min(y2, float(cv.h)))
        cw, ch = clip[2] - clip[0], clip[3] - clip[1]
        own = cv.painted.get(obj["id"], 0)
        obj["visible_px"] = int(visible_px[obj["id"]])
        obj["visible"] = (cw >= 4 and ch >= 6 and cw * ch >= 0.6 * (x2 - x1) * (y2 - y1) and own > 0
                          and obj["visible_px"] >= 0.5 * own)
        if obj["visible"]:
            truth.append((clip, obj["kind"], light_state if obj["kind"] == 2 else -1))
    return truth, drawn


__all__ = ["Canvas", "CameraView", "draw_background", "render_camera", "LAMP_COLOURS"]
