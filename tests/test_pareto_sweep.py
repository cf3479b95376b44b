"""The Pareto sweep's pure parts: random selections with the chosen counts, pruning a pruned student further
(exact against the student rebuilt from its own weights), union / sub-selection, aggregation and paired
verdicts against hand-computed values, the headline sentences, unreachable targets, sweep.json's schema,
the command line's checks."""
from __future__ import annotations

import inspect
import json
import math
import random

import pytest
import torch

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.eva_surgery import pruning_slice_plan
from mmcv.models.utils.pruning_config import PruningConfig
from tools import pareto_report as report
from tools import pareto_select as select
from tools import pareto_sweep as sweep

SMALL = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, window_size=2, window_block_indexes=(0, 2),
             mlp_ratio=4 * 2 / 3, qkv_bias=True, pretrain_img_size=64)
HEADS, HIDDEN = 8, 170  # int(64 * 8 / 3)
DEPTH_PRUNING = "selected_blocks" in inspect.signature(EVAViTStudent.__init__).parameters
needs_depth = pytest.mark.skipif(not DEPTH_PRUNING, reason="EVAViTStudent without selected_blocks (depth pruning)")


def config(heads, channels=None, blocks=None, name="c") -> PruningConfig:
    """A selection in teacher indices (``[]`` for a removed block)."""
    kwargs = dict(selected_heads_per_layer=heads, teacher_num_heads=HEADS, pruning_ratio=0.5,
                  metadata=dict(name=name))
    if channels is not None:
        kwargs.update(selected_channels_per_layer=channels, teacher_mlp_hidden=HIDDEN, mlp_pruning_ratio=0.5)
    if blocks is not None:
        kwargs["selected_blocks"] = blocks
    return PruningConfig(**kwargs)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved away from its init (a trained student: no two units alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def build(cfg: PruningConfig) -> EVAViTStudent:
    kwargs = dict(SMALL, **cfg.to_model_kwargs())
    if getattr(cfg, "selected_blocks", None) is not None:
        kwargs["selected_blocks"] = list(cfg.selected_blocks)
    return EVAViTStudent(**kwargs).eval()


def scatter_into_teacher(student: EVAViTStudent, teacher_state: dict) -> dict:
    """A teacher-shaped state dict holding ``student``'s weights at its units' teacher positions."""
    state = {k: v.clone() for k, v in teacher_state.items()}
    own = student.state_dict()
    blocks = list(getattr(student, "kept_blocks", range(len(student.blocks))))
    plans = pruning_slice_plan(student.selected_heads, student.head_dim, HEADS, student.selected_channels, HIDDEN)
    for key, value in own.items():
        if key.startswith("blocks."):
            j, suffix = int(key.split(".")[1]), key.split(".", 2)[2]
            target = f"blocks.{blocks[j]}.{suffix}"
            if target not in state:
                continue  # a selection record
            rule = plans[j].get(suffix)
            if rule is None:
                state[target] = value.clone()
            else:
                state[target].index_copy_(rule.axis, rule.index, value)
        elif key in state:
            state[key] = value.clone()
    return state


def random_selection(seed: int, counts, full):
    rng = random.Random(seed)
    return [sorted(rng.sample(range(full), n)) if n else [] for n in counts]


# --------------------------------------------------------------------------- random selections


def test_random_keeps_the_chosen_counts_with_other_units_drawn_by_seed():
    chosen = config(random_selection(1, [6, 5, 7, 4], HEADS), random_selection(2, [100, 90, 80, 120], HIDDEN))
    drawn = [select.random_like(chosen, seed, 2.0) for seed in (0, 1, 2)]
    for other in drawn:
        assert select.kept_counts(other) == select.kept_counts(chosen) == [(6, 100), (5, 90), (7, 80), (4, 120)]
        assert select.kept_blocks(other) == [0, 1, 2, 3]
    assert len({str(d.selected_heads_per_layer) for d in drawn}) == 3  # each seed its own draw
    again = select.random_like(chosen, 1, 2.0)
    assert again.selected_heads_per_layer == drawn[1].selected_heads_per_layer
    assert again.selected_channels_per_layer == drawn[1].selected_channels_per_layer
    heads_only = select.random_like(config(random_selection(3, [2, 3, 4, 5], HEADS)), 0, 1.3)
    assert heads_only.selected_channels_per_layer is None and select.kept_counts(heads_only)[1] == (3, None)


@needs_depth
def test_random_removes_as_many_blocks_and_copies_the_kept_blocks_counts_in_order():
    chosen = config([[0, 1, 2], [], [3, 4], []], [list(range(50)), [], list(range(60)), []], blocks=[0, 2])
    for seed in range(6):
        other = select.random_like(chosen, seed, 3.0)
        kept = select.kept_blocks(other)
        assert len(kept) == 2 and select.kept_counts(other) == [(3, 50), (2, 60)]
        assert all(other.selected_heads_per_layer[t] == [] for t in range(4) if t not in kept)


# --------------------------------------------------------------------------- union and sub-selections


def test_union_holds_both_selections_and_sub_selection_is_checked_per_unit():
    a = config([[0, 1], [2], [3], [4]], [[0, 1], [2], [3], [4]])
    b = config([[1, 5], [2], [3, 6], [7]])  # keeps every channel
    both = select.union(a, b)
    assert both.selected_heads_per_layer == [[0, 1, 5], [2], [3, 6], [4, 7]]
    assert both.selected_channels_per_layer == [list(range(HIDDEN))] * 4
    assert select.is_subselection(a, both) and select.is_subselection(b, both)
    assert not select.is_subselection(both, a)
    assert select.is_subselection(a, a)
    assert not select.is_subselection(b, a)  # b keeps every channel, a does not


# --------------------------------------------------------------------------- pruning a pruned student further


def _narrow_and_rebuild(first: PruningConfig, second: PruningConfig, seed: int):
    teacher = perturbed(EVAViTStudent(**SMALL, num_heads=HEADS, teacher_num_heads=HEADS), seed)
    student = build(first)
    student.load_from_teacher(teacher.state_dict())
    perturbed(student, seed + 1)  # trained: its own weights, no longer the teacher's
    narrowed, cfg = select.narrow_student(student, dict(SMALL, type="EVAViTStudent",
                                                        **first.to_model_kwargs()), second)
    reference = build(second)
    reference.load_from_teacher(scatter_into_teacher(student, {k: v for k, v in teacher.state_dict().items()
                                                               if not k.endswith("_index")}))
    return student, narrowed, reference, cfg


def test_a_further_pruned_student_equals_the_student_with_those_units_removed():
    first = config(random_selection(4, [6, 5, 7, 6], HEADS), random_selection(5, [120, 100, 150, 90], HIDDEN))
    rng = random.Random(6)
    second = config([sorted(rng.sample(h, max(1, len(h) - 2))) for h in first.selected_heads_per_layer],
                    [sorted(rng.sample(c, len(c) // 2)) for c in first.selected_channels_per_layer])
    student, narrowed, reference, cfg = _narrow_and_rebuild(first, second, seed=7)
    assert narrowed.selected_heads == second.selected_heads_per_layer
    assert narrowed.selected_channels == second.selected_channels_per_layer
    assert cfg["mlp_hidden"] == second.mlp_hidden
    got, want = narrowed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(narrowed(image)[0], reference(image)[0])


def test_removing_heads_equals_masking_them_in_the_student():
    first = config(random_selection(9, [6, 6, 6, 6], HEADS))
    second = config([h[1:-1] for h in first.selected_heads_per_layer])
    student, narrowed, _, _ = _narrow_and_rebuild(first, second, seed=10)
    mask = [torch.tensor([0.0] + [1.0] * 4 + [0.0]) for _ in range(4)]
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.allclose(narrowed(image)[0], student(image, head_mask=mask)[0], atol=1e-5)


@needs_depth
def test_removing_blocks_from_a_pruned_student_equals_rebuilding_it_from_its_own_weights():
    first = config(random_selection(12, [5, 6, 4, 7], HEADS), random_selection(13, [90, 100, 110, 120], HIDDEN),
                   blocks=[0, 1, 2, 3])
    second = config([first.selected_heads_per_layer[0][:3], [], first.selected_heads_per_layer[2][:2], []],
                    [first.selected_channels_per_layer[0][:40], [], first.selected_channels_per_layer[2][:30], []],
                    blocks=[0, 2])
    _, narrowed, reference, _ = _narrow_and_rebuild(first, second, seed=14)
    assert list(narrowed.kept_blocks) == [0, 2]
    got, want = narrowed.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_further_pruning_that_adds_units_back_is_refused_naming_them():
    first = config([[0, 1], [2, 3], [4, 5], [6, 7]])
    second = config([[0, 2], [2], [4], [6]])
    student = build(first)
    with pytest.raises(ValueError, match=r"block 0 heads: \[2\] were already removed"):
        select.narrow_student(student, dict(SMALL, **first.to_model_kwargs()), second)


# --------------------------------------------------------------------------- choices and unreachable targets


def _fake_budget(reach):
    """A budget that reaches ``reach[family]`` at most (tests only): uniform heads by target."""
    def choose(family, target, importances, geometry, unit_costs=None):
        if target > reach[family]:
            return select.Choice(family, target, fastest_reachable=reach[family], note="out of reach")
        keep = max(1, int(HEADS / target))
        return select.Choice(family, target, config=config([list(range(keep))] * 4,
                                                           [list(range(HIDDEN // 2))] * 4), predicted_speedup=target)
    return choose


def test_unreachable_targets_are_records_with_the_fastest_value_and_random_follows_its_family(monkeypatch):
    monkeypatch.setattr(select, "budget_choice", _fake_budget(dict(heads=1.6, heads_width=9, heads_width_depth=2.5)))
    choices = sweep.make_choices([1.3, 2.0, 3.0], list(select.FAMILIES), [0, 1, 2], {}, {})
    by = {(c.family, c.target, c.seed): c for c in choices}
    assert not by["heads", 2.0, None].reachable and by["heads", 2.0, None].fastest_reachable == 1.6
    assert by["heads", 1.3, None].reachable and by["heads_width", 3.0, None].reachable
    assert not by["random", 3.0, 2].reachable and by["random", 3.0, 2].fastest_reachable == 2.5
    assert select.kept_counts(by["random", 2.0, 1].config) == select.kept_counts(by["heads_width_depth", 2.0, None].config)
    records = [dict(name=c.name, family=c.family, target=c.target, seed=c.seed, reachable=c.reachable,
                    fastest_reachable=c.fastest_reachable, predicted_speedup=c.predicted_speedup) for c in choices]
    payload = report.build_payload([], records, {}, {}, {}, None)
    assert [(u["family"], u["target"]) for u in payload["unreachable"]] == [
        ("heads", 2.0), ("heads", 3.0), ("heads_width_depth", 3.0), ("random", 3.0)]
    assert "out of reach (fastest reachable 1.60x)" in payload["table"]


def test_the_intermediate_selection_holds_the_final_one(monkeypatch):
    def choose(family, target, importances, geometry, unit_costs=None):
        heads = [[0, 1, 2, 3, 4, 5]] * 4 if target < 2 else [[0, 1, 6], [2, 3], [4], [5, 7]]
        return select.Choice(family, target, config=config(heads), predicted_speedup=target)
    monkeypatch.setattr(select, "budget_choice", choose)
    final = choose("heads", 3.0, {}, {})
    final.config.metadata["name"] = "heads_t3"
    mid = sweep.intermediate_choice(final, {}, {})
    assert mid.target == pytest.approx(math.sqrt(3.0), abs=1e-4) and mid.details["role"] == "intermediate"
    assert select.is_subselection(final.config, mid.config)
    assert mid.config.selected_heads_per_layer[0] == [0, 1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- aggregation and verdicts


def record(family, target, seed, kept, schedule="oneshot", cosine=0.99):
    """A cell record whose four retentions are ``kept`` (det_f1, lane_iou, qa_acc, plan_l2)."""
    return dict(family=family, target=target, seed=seed, schedule=schedule, config=f"{family}_t{target:g}",
                retained=dict(zip(report.METRICS, kept)), backbone_cosine=cosine)


RECORDS = [record("heads_width", 2.0, 0, [0.99, 0.98, 0.97, 0.96]),
           record("heads_width", 2.0, 1, [0.99, 0.99, 0.98, 0.97]),
           record("heads_width", 2.0, 2, [0.99, 0.98, 0.98, 0.95]),
           record("random", 2.0, 0, [0.95, 0.96, 0.93, 0.94]),
           record("random", 2.0, 1, [0.95, 0.96, 0.95, 0.94]),
           record("random", 2.0, 2, [0.95, 0.96, 0.93, 0.925])]


def test_aggregation_gives_mean_min_max_and_standard_error_of_the_worst_metric():
    speed = {"heads_width_t2": dict(speedup=1.9, ratio_per_round=dict(speedup=[1.8, 1.9, 2.1]))}
    choices = [dict(name="heads_width_t2", predicted_speedup=2.01)]
    rows = report.aggregate(RECORDS, speed, choices)
    row = report.find(rows, "heads_width", 2.0)
    worst = row["worst"]  # 0.96, 0.97, 0.95
    assert worst["mean"] == pytest.approx(0.96) and (worst["min"], worst["max"]) == (0.95, 0.97)
    assert worst["se"] == pytest.approx(0.01 / math.sqrt(3)) and worst["n"] == 3
    assert row["worst_metric"] == "plan_l2" and row["predicted_speedup"] == 2.01
    assert row["measured_speedup"] == dict(median=1.9, min=1.8, max=2.1, per_config={"heads_width_t2": 1.9})
    assert report.find(rows, "random", 2.0)["measured_speedup"] is None


def test_paired_verdicts_against_random_by_hand():
    found = report.comparisons(RECORDS)["vs_random"][0]
    worst = found["by_quantity"]["worst"]  # differences 0.96-0.93, 0.97-0.94, 0.95-0.925
    assert worst["mean_difference"] == pytest.approx((0.03 + 0.03 + 0.025) / 3)
    assert worst["standard_error"] == pytest.approx(0.0016667, rel=1e-3)  # sample std 0.0028868 / sqrt(3)
    assert worst["verdict"] == "ahead"
    assert found["by_quantity"]["det_f1"]["verdict"] == "ahead"  # +0.04 in every seed
    assert found["by_quantity"]["backbone_cosine"]["verdict"] == "not separable"  # the same cosine everywhere
    line = report.describe_verdicts(found)
    assert line.startswith("- 2x: heads + width vs random") and "worst ahead (+2.83 ±" in line


def test_headline_says_whether_the_best_selection_keeps_the_target_and_by_how_much_it_misses():
    rows = report.aggregate(RECORDS + [record("heads_width", 3.0, s, [0.97, 0.97, 0.97, 0.965]) for s in range(3)],
                            {}, [])
    lines = report.headline(rows, [dict(family="heads", target=2.0, fastest_reachable=1.63)])
    two, three = lines
    assert (two["best_family"], two["met"]) == ("heads_width", False) and two["miss_pp"] == pytest.approx(2.0)
    assert "misses the 98% target by 2.0 points" in two["sentence"]
    assert two["side_by_side"] == ("Worst headline metric at the 2x budget, measured speedup: heads + width 96.0% "
                                   "(95.0%-97.0%) (plan_l2); random (counts of heads + width + depth) 93.2% "
                                   "(92.5%-94.0%) (plan_l2); heads only out of reach (fastest reachable 1.63x).")
    assert three["met"] and three["sentence"].endswith("the 96% target is met.")


def test_iterative_against_one_shot_is_paired_by_seed():
    records = [record("heads_width_depth", 3.0, s, [0.97] * 4) for s in range(3)] + \
              [record("heads_width_depth", 3.0, s, [0.97 + 0.01 * s] * 4, schedule="iterative") for s in range(3)]
    found = report.iterative_comparison(records, "heads_width_depth", 3.0)
    assert found["seeds"] == [0, 1, 2] and found["a"]["schedule"] == "iterative"
    assert found["by_quantity"]["worst"]["mean_difference"] == pytest.approx(0.01)
    assert found["by_quantity"]["worst"]["verdict"] == "not separable"  # 0, 0.01, 0.02: SE 0.0058


# --------------------------------------------------------------------------- sweep.json


def _payload(records=RECORDS):
    choices = [dict(name="heads_width_t2", family="heads_width", target=2.0, reachable=True, predicted_speedup=2.0),
               dict(name="heads_t2", family="heads", target=2.0, reachable=False, fastest_reachable=1.63)]
    speed = {"heads_width_t2": dict(speedup=1.9, ratio_per_round=dict(speedup=[1.8, 1.9, 2.1]))}
    settings = dict(command="python tools/pareto_sweep.py", seeds=[0, 1, 2], epochs=1, frames=512, iterations=64,
                    threads=1, jobs=2, importance_frames=64, importance=dict(heads="gradient", blocks="kd_loss"),
                    validation_frames=256, seconds=600.0, cells_run=6,
                    timing=dict(rounds=21, batch=16, threads=1, environment=dict(cpu_model="cpu")))
    return report.build_payload(records, choices, speed, dict(det_f1=0.8), settings, None)


def test_sweep_json_schema_round_trips_and_names_what_is_wrong(tmp_path):
    payload = _payload()
    assert report.check_sweep(payload, "sweep.json")["format"] == report.SWEEP_FORMAT
    for key in ("groups", "comparisons", "headline", "unreachable", "table"):
        broken = dict(payload, **{key: None})
        with pytest.raises(ValueError, match=f"sweep.json: key '{key}'"):
            report.check_sweep(broken, "sweep.json")
    with pytest.raises(ValueError, match=r"settings without \['seconds'\]"):
        report.check_sweep(dict(payload, settings={k: v for k, v in payload["settings"].items() if k != "seconds"}),
                           "sweep.json")
    with pytest.raises(ValueError, match="not a Pareto sweep"):
        report.check_sweep({"format": "other"}, "x.json")
    two_seeds = _payload([r for r in RECORDS if r["seed"] < 2])
    with pytest.raises(ValueError, match="has 2 seed"):
        report.check_sweep(two_seeds, "sweep.json")
    path = report.plot_front(payload["groups"], payload["unreachable"], tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 10000 and path.endswith("front.png")
    from tools import render_results
    (tmp_path / "sweep.json").write_text(json.dumps(payload))
    block = render_results.pareto_block(tmp_path / "sweep.json")
    assert "took 10.0 min for 6 KD runs, 2 at a time" in block and payload["table"] in block
    assert "- At the 2x budget the best selection, heads + width (measured 1.90x), keeps 96.0%" in block
    assert render_results.pareto_block(tmp_path / "absent.json") == render_results.NO_PARETO
    both = _payload(RECORDS + [record("heads_width", 3.0, s, [0.97, 0.97, 0.97, 0.965]) for s in range(3)])
    (tmp_path / "sweep.json").write_text(json.dumps(both))
    summary = render_results.pareto_summary(tmp_path / "sweep.json").splitlines()
    assert summary[0].endswith("(docs/pareto/pareto.png) Worst headline metric kept by the best selection, mean of "
                               "the seeds:") and max(len(line) for line in summary) <= 200
    assert summary[1] == ("at the 2x budget (measured 1.90x) 96.0% (target 98%: missed by 2.0 points); at the 3x "
                          "budget (not timed) 96.5% (target 96%: met); [details](docs/results.md#the-pareto-front).")


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "1"], "at least 3 different seeds"),
    (["--targets", "1.0", "2"], "> 1"),
    (["--families", "heads", "random"], "random copies the counts of heads_width_depth"),
    (["--frames", "120"], "multiple of 16"),
])
def test_bad_options_are_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(argv)
    assert message in capsys.readouterr().err


def test_quick_mode_and_cell_names():
    args = sweep.parse_args(["--quick"])
    assert (args.targets, args.seeds, args.frames) == ([2.0], [0, 1, 2], 128)
    cell = sweep.SweepCell("heads_width", 2.5, 1, "heads_width_t2.5", "d")
    assert cell.name == "heads_width_t2.5_oneshot_s1" and (cell.training, cell.alpha, cell.label_fraction) == \
        ("kd", None, 1.0)


def test_stage_two_starts_from_the_stage_one_student_pruned_further(tmp_path):
    """The iterative schedule's hand-over: the narrowed checkpoint loads (``load_from``) into the KD model of the
    final selection, whose backbone then holds the stage-1 student's own weights, not the teacher's."""
    import logging
    from types import SimpleNamespace

    from adzoo.orion.apis.checkpoints import load_from
    from mmcv import Config
    from mmcv.models.builder import build_model
    from tools.kd_study import write_cell_config
    from tools.train_tiny_teacher import DEFAULT_CHECKPOINT, ensure_tiny_teacher

    study = SimpleNamespace(teacher_path=ensure_tiny_teacher(DEFAULT_CHECKPOINT, verbose=False), frames=64, epochs=1)
    tiny_heads, tiny_hidden = 16, 341
    first = PruningConfig(selected_heads_per_layer=random_selection(20, [9, 10, 11, 12], tiny_heads),
                          teacher_num_heads=tiny_heads, pruning_ratio=0.5, teacher_mlp_hidden=tiny_hidden,
                          selected_channels_per_layer=random_selection(21, [200, 210, 220, 230], tiny_hidden),
                          mlp_pruning_ratio=0.5)
    second = PruningConfig(selected_heads_per_layer=[h[:5] for h in first.selected_heads_per_layer],
                           teacher_num_heads=tiny_heads, pruning_ratio=0.5, teacher_mlp_hidden=tiny_hidden,
                           selected_channels_per_layer=[c[::2] for c in first.selected_channels_per_layer],
                           mlp_pruning_ratio=0.5)
    models = {}
    for name, cfg in (("first", first), ("second", second)):
        cfg.save(tmp_path / f"{name}.json")
        path = write_cell_config(sweep.SweepCell("heads_width", 2.0, 0, name, "d"), tmp_path, tmp_path / f"{name}.json",
                                 study, stage=f"{name}_", extra_kd=dict(pruning_ratio=None, mlp_pruning_ratio=None))
        models[name] = build_model(Config.fromfile(str(path)).model)
    perturbed(models["first"].img_backbone, 22)  # stage 1 trained it
    models["first"].export_student(tmp_path / "stage1.pth", backbone_safetensors=False)
    narrowed = sweep.narrowed_checkpoint(tmp_path / "stage1.pth", tmp_path / "second.json", tmp_path / "narrowed.pth")
    before = {k: v.clone() for k, v in models["second"].img_backbone.state_dict().items()}  # the teacher's, sliced
    load_from(models["second"], str(narrowed), logging.getLogger("test"))
    expected, _ = select.narrow_student(models["first"].img_backbone, models["first"].student_backbone_cfg, second)
    got = models["second"].img_backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert not torch.equal(got["blocks.0.attn.q_proj.weight"], before["blocks.0.attn.q_proj.weight"])


def test_every_importance_is_scored_on_the_training_frames(monkeypatch, tmp_path):
    """Heads, channels and blocks all read the study's importance loader (training frames), never the validation
    loader the students are judged on."""
    from types import SimpleNamespace

    seen = []
    study = SimpleNamespace(importance_loader="training frames", loader="validation frames", teacher="teacher",
                            out=tmp_path, cfg=SimpleNamespace(model=dict(kd_config={})),
                            importance=lambda unit, method, seed: seen.append((unit, method)) or unit)
    monkeypatch.setattr(select, "block_importance", lambda model, loader, cfg: seen.append(("blocks", loader)))
    sweep.score_importance(study)
    assert seen == [("heads", "gradient"), ("channels", "gradient"), ("blocks", "training frames")]
