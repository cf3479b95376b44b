"""Pruning to a budget: the predicted cost meets the target, floors and axes hold, units are ranked by importance per
cost, calibration picks the candidate, an unreachable target is one line, and the command line end to end."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mmcv.models.utils.head_importance import BlockImportance, ChannelImportance, HeadImportance
from mmcv.models.utils.pruning_config import PruningConfig
from mmcv.models.utils.pruning_cost import UnitCosts, analytic_unit_costs
from tests.eva_reference import reference_macs
from tools.head_pruning import timing
from tools.head_pruning.budget import UnreachableTargetError, format_candidates, prune_to_budget, removal_order
from tools.head_pruning.budget import block_costs
from tools.head_pruning_utils import main

# The miniature ORION's backbone (adzoo/orion/configs/orion_tiny_train.py): 4 blocks, window blocks 0 and 2.
TINY = dict(img_hw=[80, 80], patch_size=8, in_chans=3, embed_dim=128, head_dim=8, num_heads=16, mlp_hidden=341,
            window_per_block=[4, 0, 4, 0], depth=4)
TINY_CFG = "adzoo/orion/configs/orion_tiny_kd_train.py"


def importances(seed: int = 0, depth: int = 4, heads: int = 16, channels: int = 341, geometry=TINY):
    g = torch.Generator().manual_seed(seed)
    head = HeadImportance(torch.rand(depth, heads, generator=g) + 0.05, "magnitude", metadata=dict(backbone=geometry))
    channel = ChannelImportance(torch.rand(depth, channels, generator=g) + 0.05, "magnitude")
    return head, channel, torch.rand(depth, generator=g) + 0.05


def reference_speedup(config: PruningConfig, geometry=TINY) -> float:
    """Teacher MACs over the configuration's MACs, by the independent reference count (removed blocks: 0)."""
    kept = set(config.kept_blocks)
    heads = [len(h) if b in kept else 0 for b, h in enumerate(config.selected_heads_per_layer)]
    hidden = [(config.mlp_hidden[b] if config.prunes_channels else geometry["mlp_hidden"]) if b in kept else 0
              for b in range(config.depth)]
    common = dict(img_hw=geometry["img_hw"], patch_size=geometry["patch_size"], in_chans=3,
                  embed_dim=geometry["embed_dim"], head_dim=geometry["head_dim"],
                  window_per_block=geometry["window_per_block"])
    teacher = reference_macs(mlp_hidden=geometry["mlp_hidden"], heads_per_block=[16] * config.depth, **common)
    return teacher / reference_macs(mlp_hidden=hidden, heads_per_block=heads, **common)


@pytest.mark.parametrize("axes, target", [(("heads",), 1.2), (("heads",), 1.6), (("heads", "channels"), 1.6),
                                          (("heads", "channels"), 2.5), (("heads", "channels", "blocks"), 1.2),
                                          (("heads", "channels", "blocks"), 2.5)])
def test_the_predicted_cost_meets_the_target_and_is_the_reference_count(target, axes):
    head, channel, blocks = importances()
    result = prune_to_budget(target, head, channel, blocks, axes=axes, min_blocks=2)
    assert result.predicted_speedup >= target
    assert result.predicted_speedup == pytest.approx(reference_speedup(result.config), rel=1e-12)
    chosen = result.chosen
    assert chosen["feasible"] and chosen["predicted_speedup"] == result.predicted_speedup
    assert chosen["score"] == min(r["score"] for r in result.candidates if r["feasible"])
    if axes == ("heads",):  # the heads alone spend what is left: within one head of the target
        assert result.predicted_speedup < target * 1.1


def test_floors_hold_per_block_and_for_the_blocks():
    head, channel, blocks = importances(1)
    result = prune_to_budget(2.6, head, channel, blocks, min_heads_per_layer=3, min_channels_per_layer=40,
                             channel_multiple=32, min_blocks=3)
    config = result.config
    kept = config.kept_blocks
    assert len(kept) >= 3
    for b in kept:
        assert len(config.selected_heads_per_layer[b]) >= 3
        assert config.mlp_hidden[b] >= 64 and config.mlp_hidden[b] % 32 == 0  # 40 rounded up to a multiple of 32
    assert result.config.metadata["budget"]["floors"] == dict(heads=3, channels=64, blocks=3, channel_multiple=32,
                                                             global_blocks=1)  # 1 of TINY's 2 global blocks


GLOBALS_LEAST = torch.tensor([0.9, 0.1, 0.8, 0.2])  # TINY's global blocks 1 and 3 are the least important


@pytest.mark.parametrize("floor, removable", [(None, 1), (2, 0), (1, 1), (0, 2)])
def test_the_global_block_floor_holds_and_zero_allows_removing_every_global_block(floor, removable):
    head, channel, _ = importances(6)
    result = prune_to_budget(3.0, head, channel, GLOBALS_LEAST, axes=("heads", "channels", "blocks"), min_blocks=2,
                             min_global_blocks=floor)
    budget = result.config.metadata["budget"]
    assert budget["floors"]["global_blocks"] == (1 if floor is None else floor)  # default: half of 2, rounded up
    assert budget["teacher_global_blocks"] == [1, 3]
    assert budget["removal_order"] == [1, 3, 2, 0][:removable] + [2, 0]  # past the floor, global blocks are skipped
    for row in result.candidates:  # no candidate of the search removes more global blocks than the floor allows
        assert len({1, 3} & set(row["removed_blocks"])) <= removable
    assert len({1, 3} & set(result.config.kept_blocks)) >= 2 - removable
    if floor == 0:  # nothing protects them: at 3x the least important blocks, both global ones, go
        assert result.chosen["removed_blocks"] == [1, 3]
    assert result.predicted_speedup >= 3.0


@pytest.mark.parametrize("depth, expected", [(24, 4), (12, 2), (4, 1), (3, 1), (2, 0)])
def test_the_default_global_block_floor_is_half_the_teachers_rounded_up(depth, expected):
    # ORION's pattern (projects/configs/ in ORION's tree): every third block, from block 2, is global
    geometry = dict(img_hw=[640, 640], patch_size=16, in_chans=3, embed_dim=1024, head_dim=64, num_heads=16,
                    mlp_hidden=2730, window_per_block=[16 if b % 3 != 2 else 0 for b in range(depth)], depth=depth)
    result = prune_to_budget(1.5, torch.rand(depth, 16) + 0.1, block_importance=torch.ones(depth),
                             axes=("heads", "blocks"), geometry=geometry, min_blocks=1)
    budget = result.config.metadata["budget"]
    assert budget["floors"]["global_blocks"] == expected and len(budget["teacher_global_blocks"]) == depth // 3
    assert all(len(set(budget["teacher_global_blocks"]) - set(r["removed_blocks"])) >= expected
               for r in result.candidates)
    with pytest.raises(ValueError, match=rf"min_global_blocks: expected an int in \[0, {depth // 3}\], got -1"):
        prune_to_budget(1.5, torch.rand(depth, 16), geometry=geometry, min_global_blocks=-1)


def test_a_cheap_important_head_is_kept_over_an_expensive_unimportant_one():
    # block 0 (window): heads cost 1; block 1 (global): heads cost 4; channels almost free and not pruned
    costs = UnitCosts(head={"window": 1.0, "global": 4.0}, channel={"window": 1e-9, "global": 1e-9}, unit="seconds")
    geometry = dict(window_per_block=[4, 0], mlp_hidden=8)
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.9, 0.2, 0.1]])
    result = prune_to_budget(2.0, scores, unit_costs=costs, geometry=geometry)
    # per block L2 norm: block 1's head 1 scores 0.66 > 0.5, but 0.66 / 4 < 0.5 / 1
    assert result.config.selected_heads_per_layer == [[0, 1, 2, 3], [0]]
    assert result.predicted_speedup == pytest.approx(20 / 8, rel=1e-6)


def test_blocks_go_by_score_per_cost():
    costs, _ = block_costs(dict(window_per_block=[4, 0, 4]), UnitCosts(
        head={"window": 1.0, "global": 3.0}, channel={"window": 1.0, "global": 1.0}, unit="seconds",
        block={"window": 2.0}), 3, 2, 4)
    # 2 heads, 4 channels; full block costs: window 2 + 2 + 4 = 8, global 0 + 6 + 4 = 10
    assert [costs.block_cost(b, 2, 4) for b in range(3)] == [8.0, 10.0, 8.0]
    assert removal_order(torch.tensor([0.3, 0.5, 0.45]), costs) == [0, 1, 2]
    assert removal_order(torch.tensor([0.5, 0.5, 0.5]), costs) == [1, 0, 2]  # equal scores: the dearer block first


@pytest.mark.parametrize("axes", [("heads",), ("channels",), ("blocks",), ("channels", "blocks")])
def test_only_the_allowed_axes_are_pruned(axes):
    head, channel, blocks = importances(2)
    config = prune_to_budget(1.5, head, channel, blocks, axes=axes, min_blocks=2).config
    removed = config.metadata["budget"]["chosen"]["removed_blocks"]
    kept = [b for b in range(4) if b not in removed]
    assert config.kept_blocks == kept and (config.selected_blocks is None) == (not removed)
    assert bool(removed) == ("blocks" in axes)
    assert all(len(config.selected_heads_per_layer[b]) == 16 for b in kept) == ("heads" not in axes)
    if "channels" in axes:
        assert config.prunes_channels and any(config.mlp_hidden[b] < 341 for b in kept)
    else:
        assert not config.prunes_channels
    assert config.metadata["budget"]["axes"] == list(axes)


def test_an_axis_without_its_importance_and_bad_arguments_are_refused():
    head, channel, _ = importances()
    with pytest.raises(ValueError, match="axis 'blocks' needs block_importance"):
        prune_to_budget(2.0, head, channel, axes=("heads", "blocks"))
    with pytest.raises(ValueError, match=r"target_speedup: expected a number >= 1"):
        prune_to_budget(0.5, head)
    with pytest.raises(ValueError, match=r"axes: expected distinct names"):
        prune_to_budget(2.0, head, axes=("heads", "depth"))
    with pytest.raises(ValueError, match=r"min_heads_per_layer: expected an int in \[1, 16\], got 0"):
        prune_to_budget(2.0, head, min_heads_per_layer=0)
    with pytest.raises(ValueError, match=r"block_importance: expected 4 finite scores"):
        prune_to_budget(2.0, head, channel, torch.ones(3))
    with pytest.raises(ValueError, match="a budget needs a cost model"):
        prune_to_budget(2.0, torch.rand(4, 16), geometry=None)


def test_an_unreachable_target_names_the_fastest_reachable_speedup():
    head, channel, blocks = importances(3)
    with pytest.raises(UnreachableTargetError) as info:
        prune_to_budget(50.0, head, channel, blocks, min_heads_per_layer=2, min_channels_per_layer=64, min_blocks=3)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    fastest = info.value.fastest_reachable
    assert f"is {fastest:.3f}x predicted" in message and "2 head(s), 64 channels, 3 of 4 blocks kept" in message
    # the cheapest configuration the floors allow, by the reference count: the first block in removal order gone
    geometry = dict(TINY)
    common = {k: geometry[k] for k in ("img_hw", "patch_size", "in_chans", "embed_dim", "head_dim", "window_per_block")}
    costs, _ = block_costs(TINY, None, 4, 16, 341)
    gone = removal_order(blocks, costs)[0]
    floor = reference_macs(mlp_hidden=[0 if b == gone else 64 for b in range(4)],
                           heads_per_block=[0 if b == gone else 2 for b in range(4)], **common)
    assert fastest == pytest.approx(reference_macs(mlp_hidden=341, heads_per_block=[16] * 4, **common) / floor)
    assert prune_to_budget(fastest * 0.999, head, channel, blocks, min_heads_per_layer=2, min_channels_per_layer=64,
                           min_blocks=3).predicted_speedup >= fastest * 0.999


def test_the_fastest_reachable_speedup_keeps_the_global_block_floor():
    head, channel, _ = importances(7)
    with pytest.raises(UnreachableTargetError) as info:
        prune_to_budget(50.0, head, channel, GLOBALS_LEAST, min_channels_per_layer=64, min_blocks=2)
    assert "1 head(s), 64 channels, 2 of 4 blocks kept, 1 of 2 global blocks kept" in str(info.value)
    common = {k: TINY[k] for k in ("img_hw", "patch_size", "in_chans", "embed_dim", "head_dim", "window_per_block")}
    teacher = reference_macs(mlp_hidden=341, heads_per_block=[16] * 4, **common)
    # the two least important blocks are global, but one must stay: global block 1 and window block 2 go
    floor = reference_macs(mlp_hidden=[64, 0, 0, 64], heads_per_block=[1, 0, 0, 1], **common)
    assert info.value.fastest_reachable == pytest.approx(teacher / floor, rel=1e-12)
    with pytest.raises(UnreachableTargetError) as info:  # without the floor both global blocks may go
        prune_to_budget(50.0, head, channel, GLOBALS_LEAST, min_channels_per_layer=64, min_blocks=2,
                        min_global_blocks=0)
    floor = reference_macs(mlp_hidden=[64, 0, 64, 0], heads_per_block=[1, 0, 1, 0], **common)
    assert info.value.fastest_reachable == pytest.approx(teacher / floor, rel=1e-12)


def test_calibrate_chooses_the_lowest_scoring_candidate_once_per_selection():
    head, channel, blocks = importances(4)
    seen = []

    def calibrate(config: PruningConfig) -> float:
        seen.append(config)
        return abs(sum(config.num_heads) - 40) + 0.001 * len(config.kept_blocks)

    result = prune_to_budget(1.8, head, channel, blocks, calibrate=calibrate, min_blocks=3)
    feasible = [r for r in result.candidates if r["feasible"]]
    signatures = [(json.dumps(c.selected_heads_per_layer), json.dumps(c.selected_channels_per_layer),
                   json.dumps(c.selected_blocks)) for c in seen]
    assert len(seen) <= len(feasible) and len(set(signatures)) == len(signatures)  # each selection scored once
    assert result.chosen["calibration"] == min(r["calibration"] for r in feasible)
    assert result.chosen["calibration"] == calibrate(result.config)
    assert "calibrate(config)" in result.config.metadata["budget"]["policy"]
    with pytest.raises(ValueError, match="calibrate: expected a finite number"):
        prune_to_budget(1.8, head, channel, calibrate=lambda config: float("nan"))


def test_the_budgeted_configuration_round_trips_with_its_record(tmp_path):
    head, channel, blocks = importances(5)
    result = prune_to_budget(2.2, head, channel, blocks, channel_multiple=8, min_blocks=3)
    result.config.save(tmp_path / "p.json")
    loaded = PruningConfig.load(tmp_path / "p.json")
    assert loaded.to_dict() == json.loads(json.dumps(result.config.to_dict()))
    budget = loaded.metadata["budget"]
    assert budget["target_speedup"] == 2.2 and budget["predicted_speedup"] == result.predicted_speedup
    assert budget["cost_model"] == result.cost_model and "analytic MACs at 80x80" in result.cost_model
    assert budget["chosen"]["chosen"] and budget["policy"].startswith("budget:")
    assert budget["fastest_reachable"] == result.fastest_reachable
    table = format_candidates(result)
    assert "(chosen)" in table and f"{result.predicted_speedup:.3f}x" in table


def test_old_unit_cost_files_load_and_block_overheads_round_trip(tmp_path):
    old = dict(format="orion-kd-unit-costs", version=1, unit="seconds", head={"window": 1.0}, channel={"window": 2.0})
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = UnitCosts.load(tmp_path / "old.json")
    assert loaded.block == {} and loaded.fixed == 0.0 and loaded.block_overheads([4, 4]) == [0.0, 0.0]
    new = UnitCosts(head={"window": 1.0, "global": 2.0}, channel={"window": 0.1, "global": 0.1}, unit="seconds",
                    block={"window": 0.5, "global": 0.25}, fixed=3.0)
    new.save(tmp_path / "new.json")
    again = UnitCosts.load(tmp_path / "new.json")
    assert again.block == new.block and again.fixed == 3.0 and again.block_overheads([4, 0]) == [0.5, 0.25]
    with pytest.raises(ValueError, match="the overhead of a global block must be a number >= 0"):
        UnitCosts(head={"global": 1.0}, channel={"global": 1.0}, unit="s", block={"global": -1.0})
    assert analytic_unit_costs(TINY).fixed == 10 * 10 * 128 * 3 * 8 * 8


def test_measured_block_costs_recover_slopes_overhead_and_stem(monkeypatch):
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent
    truth = dict(window=(3.0, 0.01, 0.7), global_=(5.0, 0.02, 0.2))  # per head, per channel, overhead

    def fake_times(runners, repeats, warmup, device):
        if "once" in runners:  # how long one call takes: one call per round
            return {"once": [1.0] * repeats}
        counts = dict(full=(16, 341), half_heads=(8, 341), half_mlp=(16, 170), minimal=(1, 32))
        out = {"stem": [0.4] * repeats}
        for name in runners:
            if name != "stem":
                kind, variant = name.split("/")
                head, channel, overhead = truth["window" if kind == "window" else "global_"]
                heads, hidden = counts[variant]
                out[name] = [overhead + heads * head + hidden * channel] * repeats
        return out

    monkeypatch.setattr(timing, "time_alternating", fake_times)
    small = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, window_size=2, window_block_indexes=[0])
    costs = timing.measure_block_costs(lambda h, c: EVAViTStudent(**small, num_heads=h, mlp_hidden=c),
                                       torch.randn(1, 3, 32, 32), 16, 341, 3, 0, torch.device("cpu"), min_channels=32)
    for kind, key in (("window", "window"), ("global", "global_")):
        head, channel, overhead = truth[key]
        assert costs.head[kind] == pytest.approx(head) and costs.channel[kind] == pytest.approx(channel)
        assert costs.block[kind] == pytest.approx(overhead)
    assert costs.fixed == 0.4 and costs.unit == "seconds"


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from tools.tiny_teacher_asset import materialize_teacher_checkpoint
    root = tmp_path_factory.mktemp("budget")
    ckpt = materialize_teacher_checkpoint(root / "teacher.pth", verbose=False)
    common = ["--config", TINY_CFG, "--checkpoint", str(ckpt), "--device", "cpu"]
    assert main(["importance", *common, "--out", str(root / "imp.json")]) == 0
    assert main(["importance", *common, "--unit", "channels", "--out", str(root / "ch.json")]) == 0
    BlockImportance(torch.tensor([0.9, 0.2, 0.5, 0.1]), "kd_loss").save(root / "blocks.json")
    return root, common


def test_prune_config_to_a_budget_prints_predicted_and_measured(tiny_files, capsys):
    root, common = tiny_files
    out = root / "budget.json"
    assert main(["prune-config", *common, "--importance", str(root / "imp.json"), "--channel-importance",
                 str(root / "ch.json"), "--block-importance", str(root / "blocks.json"), "--target-speedup", "1.5",
                 "--calibrate-batches", "1", "--repeats", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    predicted = float(re.search(r"predicted speedup ([\d.]+)x", printed).group(1))
    measured = float(re.search(r"measured speedup ([\d.]+)x \(median of 3 alternating rounds of (\d+) forward", printed).group(1))
    config = PruningConfig.load(out)
    budget = config.metadata["budget"]
    assert predicted >= 1.5 and predicted == round(budget["predicted_speedup"], 3)
    assert measured == round(budget["measured"]["speedup"], 3) and len(budget["measured"]["per_round"]) == 3
    assert budget["chosen"]["calibration"] >= 0 and "calibrate(config)" in budget["policy"]
    assert budget["axes"] == ["heads", "channels", "blocks"]


def test_prune_config_to_a_budget_without_config_says_why_nothing_was_measured(tiny_files, capsys):
    root, _ = tiny_files
    out = root / "heads_only.json"
    assert main(["prune-config", "--importance", str(root / "imp.json"), "--target-speedup", "1.3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted speedup 1.3" in printed and "not measured (no --config" in printed
    assert not PruningConfig.load(out).prunes_channels


def test_an_unreachable_budget_exits_2_with_one_line_and_writes_nothing(tiny_files, capsys):
    root, _ = tiny_files
    out = root / "never.json"
    args = ["prune-config", "--importance", str(root / "imp.json"), "--out", str(out)]
    assert main([*args, "--target-speedup", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target speedup 40x is out of reach") and err.count("\n") == 1
    assert re.search(r"is \d+\.\d{3}x predicted", err) and not out.exists()
    for extra, message in ((["--target-speedup", "2", "--mlp-hidden", "128"], "chooses the SwiGLU width itself"),
                           (["--target-speedup", "2", "--measure"], "--measure times --config's backbone"),
                           (["--target-speedup", "2", "--axes", "heads,depth"], "--axes: expected names")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--target-speedup", "2", "--pruning-ratio", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err and not out.exists()


def test_prune_config_measure_prices_units_and_blocks_with_this_machines_times(tiny_files, monkeypatch, capsys):
    root, common = tiny_files

    def fake_times(runners, repeats, warmup, device):  # block time = 1 + 0.5 per head + 0.01 per channel; stem 2
        if "once" in runners:
            return {"once": [1.0] * repeats}
        counts = dict(full=(16, 341), half_heads=(8, 341), half_mlp=(16, 170), minimal=(1, 8))
        return {name: [2.0 if name == "stem" else 1.0 + 0.5 * counts[name.split("/")[1]][0]
                       + 0.01 * counts[name.split("/")[1]][1]] * repeats for name in runners}

    monkeypatch.setattr(timing, "time_alternating", fake_times)
    out = root / "measured.json"
    assert main(["prune-config", *common, "--importance", str(root / "imp.json"), "--channel-importance",
                 str(root / "ch.json"), "--target-speedup", "1.5", "--measure", "--channel-multiple", "8",
                 "--calibrate-batches", "0", "--repeats", "3", "--out", str(out)]) == 0
    budget = PruningConfig.load(out).metadata["budget"]
    costs = budget["unit_costs"]
    assert costs["unit"] == "seconds" and costs["fixed"] == 2.0
    assert costs["head"] == pytest.approx({"window": 0.5, "global": 0.5})
    assert costs["block"] == pytest.approx({"window": 1.0, "global": 1.0})
    teacher = 2.0 + 4 * (1.0 + 0.5 * 16 + 0.01 * 341)
    assert budget["teacher_cost"] == pytest.approx(teacher) and "1 - kept importance mass" in budget["policy"]
    assert "seconds of heads + channels + block overhead + stem" in capsys.readouterr().out


def test_prune_config_min_global_blocks_reaches_the_budget(tiny_files, capsys):
    root, _ = tiny_files  # blocks.json: the global blocks 1 and 3 are the least important
    args = ["prune-config", "--importance", str(root / "imp.json"), "--block-importance", str(root / "blocks.json"),
            "--min-blocks", "2", "--target-speedup", "2.5"]
    for extra, floor in (([], 1), (["--min-global-blocks", "0"], 0)):
        out = root / f"global_floor_{floor}.json"
        assert main([*args, *extra, "--out", str(out)]) == 0
        config = PruningConfig.load(out)
        assert config.metadata["budget"]["floors"]["global_blocks"] == floor
        assert len({1, 3} & set(config.kept_blocks)) >= floor
    assert main([*args, "--min-global-blocks", "3", "--out", str(root / "never.json")]) == 2
    assert "min_global_blocks: expected an int in [0, 2], got 3" in capsys.readouterr().err
