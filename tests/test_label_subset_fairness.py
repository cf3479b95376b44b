"""kd_config.label_fraction draws a fair share of the frames: per frame position, per scene, for several key shapes.

At the study's scale (64 scenes x 8 frames) the labelled frames are compared with what independent fair coin
flips give: exact binomial tails and the chi-square law, both computed here from their formulas.
"""
from __future__ import annotations

import math
import random

import pytest

from mmcv.models.utils.label_subset import is_labelled

SCENES, FRAMES = 64, 8
ALPHA = 1e-3  # two-sided level of every check; a fair draw fails one with probability about 1e-3


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, k + 1))


def inside_binomial(count: int, n: int, p: float, alpha: float = ALPHA) -> bool:
    """``count`` is not in either tail of Binomial(n, p) of probability alpha / 2."""
    low = binomial_cdf(count, n, p)
    high = 1.0 - binomial_cdf(count - 1, n, p) if count > 0 else 1.0
    return low > alpha / 2 and high > alpha / 2


def chi2_sf_even(x: float, dof: int) -> float:
    """P(chi-square with an even ``dof`` > x): exp(-x/2) * sum_{i < dof/2} (x/2)^i / i!."""
    half = x / 2.0
    return math.exp(-half) * sum(half ** i / math.factorial(i) for i in range(dof // 2))


def scene_names(shape: str) -> list:
    """64 scene tokens of one shape: the miniature world's own, sequential, Bench2Drive-like routes, random hex."""
    if shape == "dataset":
        return [f"synthetic-train-0-scene{s:05d}" for s in range(SCENES)]
    if shape == "sequential":
        return [f"scene-{s:04d}" for s in range(1, SCENES + 1)]
    if shape == "bench2drive":
        kinds = ["ParkingExit", "AccidentTwoWays", "DynamicObjectCrossing", "HighwayExit"]
        return [f"v1/{kinds[s % 4]}_Town{(s % 13) + 1:02d}_Route{100 + s}_Weather{s % 27}" for s in range(SCENES)]
    rng = random.Random(0)
    return ["%032x" % rng.getrandbits(128) for _ in range(SCENES)]


def labelled_grid(shape: str, fraction: float) -> list:
    """[scene][frame] booleans: which frames are labelled."""
    return [[is_labelled(dict(scene_token=scene, frame_idx=frame), fraction) for frame in range(FRAMES)]
            for scene in scene_names(shape)]


SHAPES = ("dataset", "sequential", "bench2drive", "random_hex")


@pytest.mark.parametrize("fraction", [0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_labelled_share_of_all_frames_is_a_fair_draw(shape, fraction):
    grid = labelled_grid(shape, fraction)
    count = sum(map(sum, grid))
    assert inside_binomial(count, SCENES * FRAMES, fraction), (shape, fraction, count)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_frame_position_gets_its_share(shape, fraction):
    grid = labelled_grid(shape, fraction)
    per_position = [sum(row[frame] for row in grid) for frame in range(FRAMES)]
    mean, var = SCENES * fraction, SCENES * fraction * (1 - fraction)
    chi2 = sum((c - mean) ** 2 / var for c in per_position)  # 8 independent binomials under a fair draw
    assert chi2_sf_even(chi2, FRAMES) > ALPHA, (shape, fraction, per_position)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_scenes_without_a_labelled_frame_are_as_many_as_a_fair_draw_leaves(shape, fraction):
    grid = labelled_grid(shape, fraction)
    empty = sum(not any(row) for row in grid)
    assert inside_binomial(empty, SCENES, (1 - fraction) ** FRAMES), (shape, fraction, empty)


def test_the_references_themselves():
    # Hand-checked values of the two laws the checks above use.
    assert binomial_cdf(0, 64, 0.1) == pytest.approx(0.9 ** 64)
    assert binomial_cdf(64, 64, 0.3) == pytest.approx(1.0)
    assert chi2_sf_even(0.0, 8) == 1.0
    assert chi2_sf_even(26.12, 8) == pytest.approx(0.001, rel=0.01)  # the table's 0.1% point of chi-square(8)
    assert not inside_binomial(42, 64, 0.9 ** 8) and inside_binomial(28, 64, 0.9 ** 8)
