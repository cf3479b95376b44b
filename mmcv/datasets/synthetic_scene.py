"""Scene dynamics of the miniature world: what is where, frame by frame.

A scene is a few seconds of driving sampled every ``frame_dt`` seconds. Its
script is drawn once from the scene's random stream; frame ``k`` is then a pure
function of the script and ``k`` (no state), so any frame can be rendered in
any order and consecutive frames agree with each other:

* the ego drives along a road of constant curvature with initial speed ``v0``;
  a red or yellow traffic light ahead makes it brake uniformly to a stop a few
  metres before the light, a green one lets it cruise (slow enough not to pass
  the light within the scene);
* cars keep a lane: in the ego lane they hold a slowly changing gap, in the
  neighbouring lanes they drive at their lane's constant speed; pedestrians
  stand at a fixed spot along the road and walk across it; bushes are static;
* the traffic light stands at a fixed spot ahead; its lamp state is constant
  in the scene. Approaching it, the lamp rises in the image and leaves the top
  of the front view, so in the late frames of a scene its state can only be
  known from earlier frames. That is what the model's temporal memory is for.

Distances ``z`` are metres ahead of (front camera) or behind (rear camera) the
ego; lateral positions ``u`` are in lane widths from the ego lane's centre.
The renderer maps a distance to a screen depth ``t = Z_NEAR / z`` (1 at the
bottom row, 0 at the horizon).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

Z_NEAR = 5.0  # metres at which a point on the road lies on the bottom image row
LIGHT_STOP_GAP = (3.5, 6.0)  # the ego stops this far before a red or yellow light
LIGHT_START = (13.0, 18.0)  # distance of the light at the first frame (in view there)
RED, YELLOW, GREEN = 0, 1, 2


@dataclass
class Thing:
    """One object of a scene: ``kind`` 0 car, 1 pedestrian, 3 bush; motion per ``mode``."""

    kind: int
    lane: float  # u at t=0 (lane widths)
    z0: float  # distance at t=0 (m)
    speed: float = 0.0  # mode 'gap': gap change (m/s); 'world': world speed (m/s); 'static': 0
    lateral_speed: float = 0.0  # lane widths per second (pedestrians)
    mode: str = "static"
    size: float = 1.0
    aspect: float = 0.6
    colour: Tuple[float, float, float] = (0.5, 0.5, 0.5)

    def distance(self, time: float, ego_travel: float, rear: bool) -> float:
        """Distance from the ego at ``time`` given how far the ego has driven."""
        if self.mode == "gap":
            return self.z0 + self.speed * time
        moved = self.speed * time if self.mode == "world" else 0.0
        return self.z0 + (ego_travel - moved if rear else moved - ego_travel)

    def lateral(self, time: float) -> float:
        return self.lane + self.lateral_speed * time


@dataclass
class SceneScript:
    """Everything that stays fixed in one scene; :meth:`ego_travel` and :class:`Thing` give the motion."""

    curvature: float
    ego_offset: float
    rear_curvature: float
    v0: float
    decel: float
    light_state: int  # -1: no light
    light_z0: float
    dash_phase: float
    front: List[Thing] = field(default_factory=list)
    rear: List[Thing] = field(default_factory=list)
    buildings: List[Tuple[float, float, float, float]] = field(default_factory=list)  # x, width, height, grey

    def ego_travel(self, time: float) -> float:
        """Metres driven after ``time`` seconds (uniform braking to a stop when ``decel`` > 0)."""
        if self.decel <= 0.0:
            return self.v0 * time
        stop = self.v0 / self.decel
        time = min(time, stop)
        return self.v0 * time - 0.5 * self.decel * time * time

    def light_distance(self, time: float) -> float:
        return self.light_z0 - self.ego_travel(time)


def _speeds_by_lane(rng: np.random.Generator, duration: float) -> dict:
    return {-1: float(rng.uniform(1.0, 6.0)), 1: float(rng.uniform(1.0, 6.0)),
            0: float(rng.uniform(-1.0, 1.0))}


def _cars(rng: np.random.Generator, count: int, duration: float, palette: np.ndarray) -> List[Thing]:
    """Cars in lanes -1, 0, 1 at least 5 m apart within a lane; the ego lane keeps a gap >= 6.5 m."""
    speeds = _speeds_by_lane(rng, duration)
    cars: List[Thing] = []
    for _ in range(count):
        for _attempt in range(12):
            lane = int(rng.integers(-1, 2))
            z0 = float(rng.uniform(6.5, 21.0))
            if all(c.lane != lane or abs(c.z0 - z0) >= 5.0 for c in cars):
                break
        else:
            continue
        speed = speeds[lane]
        if lane == 0:
            speed = max(speed, (6.5 - z0) / duration)
        colour = np.clip(palette[rng.integers(len(palette))] + rng.normal(0, 0.04, 3), 0, 1)
        cars.append(Thing(kind=0, lane=float(lane), z0=z0, speed=speed, mode="gap" if lane == 0 else "world",
                          size=float(rng.uniform(0.9, 1.1)), aspect=float(rng.uniform(0.55, 0.7)),
                          colour=tuple(float(c) for c in colour)))
    for car in cars:  # keep the lane index as the slot, jitter the position inside the lane
        car.lane += float(rng.uniform(-0.1, 0.1))
    return cars


def _pedestrians(rng: np.random.Generator, count: int, palette: np.ndarray) -> List[Thing]:
    peds = []
    for _ in range(count):
        colour = np.clip(palette[rng.integers(len(palette))] + rng.normal(0, 0.04, 3), 0, 1)
        peds.append(Thing(kind=1, lane=float(rng.uniform(-2.2, 2.2)), z0=float(rng.uniform(6.0, 18.0)),
                          lateral_speed=float(rng.uniform(-0.5, 0.5)), size=float(rng.uniform(2.4, 2.8)),
                          colour=tuple(float(c) for c in colour)))
    return peds


def _bushes(rng: np.random.Generator) -> List[Thing]:
    return [Thing(kind=3, lane=(-2.3 if rng.random() < 0.5 else 2.3) + float(rng.uniform(-0.3, 0.3)),
                  z0=float(rng.uniform(5.5, 25.0))) for _ in range(int(rng.integers(0, 3)))]


def make_scene_script(rng: np.random.Generator, duration: float, car_colours: np.ndarray,
                      shirt_colours: np.ndarray, img_width: int) -> SceneScript:
    """Draw one scene lasting ``duration`` seconds from ``rng``."""
    curvature = float(rng.uniform(-1.0, 1.0))
    ego_offset = float(rng.uniform(-0.25, 0.25))
    v0 = float(rng.uniform(2.5, 4.5))
    light_state = int(rng.integers(0, 3)) if rng.random() < 0.75 else -1
    light_z0 = float(rng.uniform(*LIGHT_START))
    decel = 0.0
    if light_state in (RED, YELLOW):
        gap = float(rng.uniform(*LIGHT_STOP_GAP))
        decel = v0 * v0 / (2.0 * (light_z0 - gap))
    elif light_state == GREEN:
        v0 = min(v0, (light_z0 - 3.0) / max(duration, 1e-6))
    buildings = []
    for _ in range(int(rng.integers(0, 4))):
        width, height = float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.08, 0.22))
        buildings.append((float(rng.uniform(0, 1.0 - width)) * img_width, width, height, float(rng.uniform(0.45, 0.7))))
    front = _cars(rng, int(rng.integers(0, 4)), duration, car_colours) + \
        _pedestrians(rng, int(rng.integers(0, 3)), shirt_colours) + _bushes(rng)
    rear = _cars(rng, int(rng.integers(0, 4)), duration, car_colours) + \
        _pedestrians(rng, int(rng.integers(0, 2)), shirt_colours)
    return SceneScript(curvature=curvature, ego_offset=ego_offset, rear_curvature=float(rng.uniform(-0.3, 0.3)),
                       v0=v0, decel=decel, light_state=light_state, light_z0=light_z0,
                       dash_phase=float(rng.random()), front=front, rear=rear, buildings=buildings)


__all__ = ["Thing", "SceneScript", "make_scene_script", "Z_NEAR", "RED", "YELLOW", "GREEN"]
