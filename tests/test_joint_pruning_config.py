"""One pruning configuration for heads and SwiGLU channels: allocation (uniform, global, cost-aware), validation,
file round trips (old head-only files included) and building the student from it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.eva_cost import analytic_backbone_macs, block_unit_macs
from mmcv.models.utils.head_importance import ChannelImportance, HeadImportance
from mmcv.models.utils.pruning_config import (PruningConfig, create_pruning_config, load_pruning_selection,
                                              validate_channel_selection)
from mmcv.models.utils.pruning_cost import UnitCosts, analytic_unit_costs
from tests.head_pruning_fixtures import SMALL, make_teacher
from tools.head_pruning.channel_importance import compute_channel_importance_magnitude
from tools.head_pruning.importance import compute_head_importance_magnitude

ORION_L_GEOMETRY = dict(img_hw=[640, 640], patch_size=16, in_chans=3, embed_dim=1024, head_dim=64, mlp_hidden=2730,
                        window_per_block=[16 if i % 3 != 2 else 0 for i in range(24)], num_heads=16, depth=24)


def orion_l_scores(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    heads = HeadImportance(torch.rand(24, 16, generator=g, dtype=torch.float64) + 0.5, "test",
                           metadata=dict(backbone=ORION_L_GEOMETRY))
    channels = ChannelImportance(torch.rand(24, 2730, generator=g, dtype=torch.float64) + 0.5, "test",
                                 metadata=dict(backbone=ORION_L_GEOMETRY))
    return heads, channels


def test_uniform_joint_keeps_each_blocks_best_channels_and_the_issues_1536():
    heads, channels = orion_l_scores()
    config = create_pruning_config(heads, 0.5, "uniform", channel_importance=channels, mlp_pruning_ratio=0.4375)
    assert config.num_heads == [8] * 24 and config.mlp_hidden == [1536] * 24 and config.teacher_mlp_hidden == 2730
    for layer in (0, 2, 23):
        best = torch.sort(channels.scores[layer], descending=True, stable=True).indices[:1536]
        assert config.selected_channels_per_layer[layer] == sorted(best.tolist())
    assert config.metadata["channels_kept_total"] == 24 * 1536
    assert config.metadata["effective_mlp_pruning_ratio"] == pytest.approx(1 - 1536 / 2730)
    kwargs = config.to_model_kwargs()
    assert kwargs["mlp_hidden"] == [1536] * 24 and len(kwargs["selected_channels_per_layer"][5]) == 1536


def test_global_channel_allocation_ignores_each_blocks_score_scale():
    heads, channels = orion_l_scores(1)
    scale = torch.tensor([50.0 if i % 3 == 2 else 0.1 for i in range(24)], dtype=torch.float64)
    loud = ChannelImportance(channels.scores * scale[:, None], "test")
    plain = create_pruning_config(heads, 0.5, "global", channel_importance=channels, mlp_pruning_ratio=0.5)
    scaled = create_pruning_config(heads, 0.5, "global", channel_importance=loud, mlp_pruning_ratio=0.5)
    assert scaled.selected_channels_per_layer == plain.selected_channels_per_layer
    assert sum(plain.mlp_hidden) == 24 * 1365 and len(set(plain.mlp_hidden)) > 1
    raw = create_pruning_config(heads, 0.5, "global", channel_importance=loud, mlp_pruning_ratio=0.5,
                                block_normalization="none")
    assert min(raw.mlp_hidden[i] for i in range(2, 24, 3)) > max(raw.mlp_hidden[i] for i in range(24) if i % 3 != 2)


def test_cost_aware_allocation_prices_a_global_blocks_head_at_what_it_costs():
    heads = HeadImportance(torch.ones(24, 16, dtype=torch.float64), "flat", metadata=dict(backbone=ORION_L_GEOMETRY))
    config = create_pruning_config(heads, 0.5, "cost")
    win_cost, _ = block_unit_macs((640, 640), 16, 1024, 64, 16)
    glb_cost, _ = block_unit_macs((640, 640), 16, 1024, 64, 0)
    assert glb_cost > win_cost  # at 640x640 a global head attends over 1600 tokens
    counts = config.num_heads
    # equal value per head: the budget goes to the cheaper window heads; global blocks keep the floor of 1
    assert all(counts[i] == 1 for i in range(2, 24, 3)) and sum(counts) > 8 * 24
    spent, budget = config.metadata["head_cost_spent"], config.metadata["head_cost_budget"]
    assert budget - win_cost < spent <= budget  # no room for one more head
    assert config.metadata["head_cost_budget"] == pytest.approx(8 * (16 * win_cost + 8 * glb_cost))
    assert config.metadata["unit_costs"]["unit"] == "MACs"
    geometry = {k: ORION_L_GEOMETRY[k] for k in ("img_hw", "patch_size", "in_chans", "embed_dim", "head_dim",
                                                 "window_per_block")}
    uniform_macs = analytic_backbone_macs(mlp_hidden=2730, heads_per_block=[8] * 24, **geometry)
    assert analytic_backbone_macs(mlp_hidden=2730, heads_per_block=counts, **geometry) <= uniform_macs


def test_cost_aware_allocation_with_measured_unit_latency(tmp_path):
    heads, channels = orion_l_scores(2)
    costs = UnitCosts(head={"window": 1.0, "global": 3.0}, channel={"window": 0.01, "global": 0.01}, unit="seconds",
                      source="measured", metadata=dict(window_per_block=ORION_L_GEOMETRY["window_per_block"]))
    costs.save(tmp_path / "latency.json")
    loaded = UnitCosts.load(tmp_path / "latency.json")
    assert loaded == costs
    bare = HeadImportance(heads.scores, "test")  # no geometry: the cost file says which blocks are global
    config = create_pruning_config(bare, 0.5, "cost", channel_importance=channels.scores, mlp_pruning_ratio=0.4375,
                                   unit_costs=loaded)
    assert config.metadata["head_cost_spent"] <= 8 * (16 * 1.0 + 8 * 3.0) + 1e-9
    mean_global = np.mean([config.num_heads[i] for i in range(2, 24, 3)])
    mean_window = np.mean([config.num_heads[i] for i in range(24) if i % 3 != 2])
    assert mean_global < mean_window  # a global head costs three window heads here
    assert sum(config.mlp_hidden) == 24 * 1536  # equal channel costs: the channel budget is the uniform count
    with pytest.raises(ValueError, match=r"not a unit costs file"):
        UnitCosts.load(tmp_path / "x.json") if (tmp_path / "x.json").write_text("{}") else None
    with pytest.raises(ValueError, match=r"must be a positive number"):
        UnitCosts(head={"window": 0.0}, channel={"window": 1.0}, unit="s")


def test_joint_configuration_round_trip_builds_the_student_that_keeps_those_channels(tmp_path):
    teacher = make_teacher()
    config = create_pruning_config(compute_head_importance_magnitude(teacher), 0.5, "global",
                                   channel_importance=compute_channel_importance_magnitude(teacher),
                                   mlp_pruning_ratio=0.5)
    config.save(tmp_path / "joint.json")
    loaded = PruningConfig.load(tmp_path / "joint.json")
    assert loaded == config and loaded.prunes_channels
    student = EVAViTStudent(**SMALL, **loaded.to_model_kwargs())
    student.load_from_teacher(teacher.state_dict())
    assert student.selected_channels == config.selected_channels_per_layer
    assert student.selected_heads == config.selected_heads_per_layer
    selection = load_pruning_selection(str(tmp_path / "joint.json"), teacher_num_heads=8, teacher_mlp_hidden=341)
    assert selection.channels == config.selected_channels_per_layer
    with pytest.raises(ValueError, match=r"made for a teacher whose MLPs have 341 hidden channels, but this teacher's "
                                         r"have 2730"):
        load_pruning_selection(str(tmp_path / "joint.json"), teacher_num_heads=8, teacher_mlp_hidden=2730)


def test_head_only_files_of_version_1_still_load_and_newer_versions_are_refused(tmp_path):
    old = dict(format="orion-kd-pruning-config", version=1, selected_heads_per_layer=[[0, 1], [2, 3]],
               num_heads=[2, 2], teacher_num_heads=4, pruning_ratio=0.5, strategy="uniform", method="magnitude",
               min_heads_per_layer=1, metadata={})
    (tmp_path / "v1.json").write_text(json.dumps(old))
    config = PruningConfig.load(tmp_path / "v1.json")
    assert not config.prunes_channels and config.selected_heads_per_layer == [[0, 1], [2, 3]]
    assert "mlp_hidden" not in config.to_model_kwargs()
    (tmp_path / "v9.json").write_text(json.dumps(dict(old, version=9)))
    with pytest.raises(ValueError, match=r"version 9; this ORION-KD reads versions 1..3"):
        PruningConfig.load(tmp_path / "v9.json")
    broken = dict(old, version=2, selected_channels_per_layer=[[0, 1], [0, 1]])
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken.json: pruning configuration: selected_channels_per_layer needs "
                                         r"teacher_mlp_hidden and mlp_pruning_ratio"):
        PruningConfig.load(tmp_path / "broken.json")


@pytest.mark.parametrize("selection, kwargs, match", [
    ([[0, 1]] * 2, {}, "expected 3 blocks"),
    ([[0, 1], [0, 341], [1, 2]], {}, r"indices in \[0, 341\)"),
    ([[0, 1], [2, 2], [1, 2]], {}, "duplicate channel indices"),
    ([[0, 1], [], [1, 2]], {}, "at least one channel"),
    ([[0, 1], [0.5, 2], [1, 2]], {}, "integers"),
    ("0,1", {}, "one list of channel indices per block"),
    ([[0, 1]] * 3, dict(mlp_hidden=3), "mlp_hidden says 3"),
    ([list(range(100))] * 3, dict(mlp_pruning_ratio=0.5), r"mlp_pruning_ratio 0.5 is the fraction of channels "
                                                          r"REMOVED: it keeps 171 of 341"),
    ([list(range(100))] * 3, dict(mlp_pruning_ratio=1.0), r"fraction of channels REMOVED in \[0, 1\)"),
])
def test_every_invalid_channel_selection_is_refused(selection, kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_channel_selection(selection, depth=3, teacher_hidden=341, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_pruning_ratio=0.5), "needs both channel_importance and mlp_pruning_ratio"),
    (dict(channel_importance=torch.rand(4, 64)), "needs both channel_importance and mlp_pruning_ratio"),
    (dict(channel_importance=torch.rand(3, 64), mlp_pruning_ratio=0.5), "channel importance has 3 blocks, head "
                                                                         "importance 4"),
    (dict(channel_importance=torch.rand(4, 64), mlp_pruning_ratio=0.999), "removes every channel"),
    (dict(channel_importance=torch.rand(4, 64), mlp_pruning_ratio=0.5, min_channels_per_layer=40),
     "fewer than min_channels_per_layer=40"),
    (dict(channel_importance=HeadImportance(torch.rand(4, 16), "m"), mlp_pruning_ratio=0.5),
     "expected channels importance"),
    (dict(strategy="cost"), "strategy 'cost' needs unit costs"),
])
def test_impossible_joint_requests_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_pruning_config(torch.rand(4, 16), 0.5, **dict(dict(strategy="uniform"), **kwargs))


def test_analytic_unit_costs_need_the_geometry():
    with pytest.raises(ValueError, match=r"missing \['img_hw'\]"):
        analytic_unit_costs(dict(ORION_L_GEOMETRY, img_hw=None))
    costs = analytic_unit_costs(ORION_L_GEOMETRY)
    heads, channels = costs.per_block(ORION_L_GEOMETRY["window_per_block"])
    assert heads[2] == block_unit_macs((640, 640), 16, 1024, 64, 0)[0] and channels[0] == 1600 * 1024 * 3


def test_channel_multiple_rounds_every_blocks_width_within_the_budget():
    heads, channels = orion_l_scores(3)
    uniform = create_pruning_config(heads, 0.5, "uniform", channel_importance=channels, mlp_pruning_ratio=0.5,
                                    channel_multiple=64)
    assert uniform.mlp_hidden == [1344] * 24  # round(2730 / 2) = 1365 -> the nearest multiple of 64
    for strategy in ("global", "cost"):
        config = create_pruning_config(heads, 0.5, strategy, channel_importance=channels, mlp_pruning_ratio=0.5,
                                       channel_multiple=64)
        assert all(width % 64 == 0 for width in config.mlp_hidden), strategy
        assert 24 * 1365 - 64 < sum(config.mlp_hidden) <= 24 * 1365, strategy
        for layer in (0, 2):  # each block keeps its best channels
            best = torch.sort(channels.scores[layer], descending=True, stable=True).indices[:config.mlp_hidden[layer]]
            assert config.selected_channels_per_layer[layer] == sorted(best.tolist())
    assert uniform.metadata["channel_multiple"] == 64
    with pytest.raises(ValueError, match=r"channel_multiple: expected an int in \[1, 2730\], got 0"):
        create_pruning_config(heads, 0.5, channel_importance=channels, mlp_pruning_ratio=0.5, channel_multiple=0)
