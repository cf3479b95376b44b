"""tools/kd_study.py: the grid, the aggregation over seeds, a resumable run through the launcher's entry point."""
from __future__ import annotations

import json

import pytest
import torch

from tools.kd_study import Cell, build_grid, parse_args, run_study
from tools.kd_study_report import (aggregate, describe_comparison, detail_findings, detail_retention, detail_table,
                                  find_group, headline_comparisons, mean_std, verdict)


def test_default_grid_covers_seeds_ratios_selections_and_trainings_once():
    cells = build_grid(parse_args([]))
    assert len({c.name for c in cells}) == len(cells)
    assert {c.seed for c in cells} == {0, 1, 2} and {c.ratio for c in cells} == {0.5, 0.75}
    assert {c.selection for c in cells} == {"magnitude", "gradient", "random"}
    nothing_trained = [c for c in cells if c.training == "none"]
    assert len(nothing_trained) == 3 * 2 * 3 and all(c.label_fraction == 1.0 for c in nothing_trained)
    assert len(cells) == 18 + 18 * 2  # kd and task_only with all labels
    with_labels = build_grid(parse_args(["--label-fractions", "1.0", "0.1"]))
    assert len(with_labels) == 18 + 18 * 2 * 2


def test_quick_grid_and_bad_values():
    args = parse_args(["--quick"])
    assert args.ratios == [0.5] and args.seeds == [0, 1, 2] and args.frames == 256
    for bad in (["--ratios", "1.0"], ["--label-fractions", "1.5"], ["--frames", "12"], ["--frames", "56"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == dict(mean=2.0, std=1.0, n=3)
    records = []
    for seed, value in ((0, 0.9), (1, 0.8)):
        cell = Cell(seed, 0.5, "magnitude", "kd")
        metrics = dict(det_f1=value, lane_iou=value, qa_acc=value, plan_l2=2.0)
        records.append(dict(cell=cell.__dict__, group=cell.group, metrics=metrics, backbone_cosine=value,
                            retained=dict(det_f1=value, lane_iou=1.0, qa_acc=1.0, plan_l2=1.0)))
    group = find_group(aggregate(records), ratio=0.5, selection="magnitude", training="kd")
    assert group["seeds"] == [0, 1]
    assert group["metrics"]["det_f1"]["mean"] == pytest.approx(0.85)
    assert group["metrics"]["det_f1"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert group["worst_retained"]["mean"] == pytest.approx(0.85)


def test_finer_task_metrics_are_kept_per_group_and_the_worst_is_named():
    teacher = dict(det_f1_car=0.8, qa_acc_next_action=0.5, qa_acc_count_cars=0.0)  # a zero teacher gives no ratio
    records = []
    for seed, (car, action) in enumerate(((0.8, 0.45), (0.72, 0.35))):
        cell = Cell(seed, 0.5, "random", "none")
        records.append(dict(cell=cell.__dict__, group=cell.group, backbone_cosine=0.9,
                            metrics=dict(det_f1=1, lane_iou=1, qa_acc=1, plan_l2=1, det_f1_car=car,
                                         qa_acc_next_action=action, qa_acc_count_cars=0.5),
                            retained=dict(det_f1=1.0, lane_iou=1.0, qa_acc=1.0, plan_l2=1.0)))
    details = detail_retention(records, teacher)
    (group,) = details.values()
    assert set(group) == {"det_f1_car", "qa_acc_next_action"}
    assert group["det_f1_car"]["mean"] == pytest.approx(0.95) and group["qa_acc_next_action"]["mean"] == pytest.approx(0.8)
    groups = aggregate(records)
    table = detail_table(groups, details, teacher).splitlines()
    assert table[2] == "| teacher (value) | 0% | - | - | - | 0.800 | 0.000 | 0.500 |"
    assert table[3] == "| heads | 50% | random | pruned, no training | all | 95.0% ± 7.1% | - | 80.0% ± 14.1% |"
    assert detail_findings(groups, details) == ["- 50% of heads removed (random), before any training: the finer "
                                                "task metric hit hardest is qa_acc_next_action, kept 80.0% ± 14.1%."]


def test_study_runs_cells_through_the_launcher_and_skips_finished_ones(tmp_path):
    grid = ["--seeds", "0", "--ratios", "0.5", "--selections", "random", "--frames", "64"]
    argv = ["--out", str(tmp_path), *grid, "--trainings", "none", "kd", "--alphas", "1.0", "--label-fractions", "0.5",
            "--jobs", "2"]
    summary = run_study(parse_args(argv))
    names = sorted(r["name"] for r in summary["cells"])
    assert names == ["heads_r0.5_random_kd_a1_l0.5_s0", "heads_r0.5_random_kd_l0.5_s0", "heads_r0.5_random_none_s0"]
    for name in ("study.json", "study.md", "retention_vs_ratio.png", "kd_vs_task_only.png"):
        assert (tmp_path / name).is_file(), name
    pure = tmp_path / "cells" / "heads_r0.5_random_kd_a1_l0.5_s0" / "train"
    rows = [json.loads(line) for line in sorted(pure.glob("*.log.json"))[-1].read_text().splitlines() if line.strip()]
    assert {row["alpha"] for row in rows if row.get("mode") == "train"} == {1.0}  # label-free distillation ran
    record = json.loads((tmp_path / "cells" / "heads_r0.5_random_none_s0.json").read_text())
    assert record["num_heads"] == [8, 8, 8, 8] and 0 < record["retained"]["det_f1"] <= 1.5
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    again = run_study(parse_args(argv))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == stamps
    assert again["groups"].keys() == summary["groups"].keys()
    # a cell trained in a worker process equals the same cell trained in this one
    alone = run_study(parse_args(["--out", str(tmp_path / "alone"), *grid, "--trainings", "kd", "--label-fractions",
                                  "0.5", "--jobs", "1"]))
    (cell,) = alone["cells"]
    (twin,) = [r for r in summary["cells"] if r["name"] == cell["name"]]
    assert cell["metrics"] == twin["metrics"] and cell["backbone_cosine"] == twin["backbone_cosine"]


def record(seed, training, kept, cosine=0.99, selection="magnitude", **cell):
    cell = Cell(seed, 0.5, selection, training, **cell)
    return dict(cell=cell.__dict__, group=cell.group, backbone_cosine=cosine,
                metrics=dict(det_f1=kept, lane_iou=kept, qa_acc=kept, plan_l2=1.0),
                retained=dict(det_f1=kept, lane_iou=1.0, qa_acc=1.0, plan_l2=1.0))


def test_verdicts_come_from_paired_differences_and_their_standard_error():
    # differences 1, 2, 3, 2, 2 pp: mean 2 pp, sample std sqrt(2/4) pp, standard error 0.316 pp -> ahead
    ahead = verdict([0.01, 0.02, 0.03, 0.02, 0.02])
    assert ahead["verdict"] == "ahead" and ahead["mean_difference"] == pytest.approx(0.02)
    assert ahead["standard_error"] == pytest.approx(0.0031623, rel=1e-4)
    assert verdict([-0.03, -0.02, -0.04, -0.03, -0.03])["verdict"] == "behind"
    # mean 0.4 pp, standard error 0.68 pp: the mean is within 2 standard errors of 0
    assert verdict([0.01, -0.01, 0.02, -0.02, 0.02])["verdict"] == "not separable"
    assert verdict([0.05])["verdict"] == "not separable"  # one pair separates nothing


def test_headline_comparisons_pair_cells_by_seed():
    records = []
    for seed, (kd, task) in enumerate(((0.99, 0.97), (0.95, 0.94), (0.97, 0.95), (0.96, 0.95), (0.98, 0.96))):
        records += [record(seed, "kd", kd), record(seed, "task_only", task)]
    records.append(record(5, "kd", 0.5))  # no task-only partner: left out of the pairs
    records += [record(seed, "none", 0.9, cosine=0.98) for seed in range(3)]
    records += [record(seed, "none", 0.9, cosine=c, selection="random") for seed, c in enumerate((0.97, 0.99, 0.95))]
    by_name = {c["name"]: c for c in headline_comparisons(records)}
    kd = by_name["50%: KD vs task loss only"]
    assert kd["seeds"] == [0, 1, 2, 3, 4]
    det = kd["by_quantity"]["det_f1"]  # differences 2, 1, 2, 1, 2 pp
    assert det["mean_difference"] == pytest.approx(0.016) and det["verdict"] == "ahead"
    assert kd["by_quantity"]["lane_iou"]["verdict"] == "not separable"  # 0 in every seed
    fidelity = by_name["50%, pruned, no training: magnitude vs random heads"]["by_quantity"]["backbone_cosine"]
    assert fidelity["mean_difference"] == pytest.approx(0.01) and fidelity["verdict"] == "not separable"
    line = describe_comparison(kd)
    assert line.startswith("- 50%: KD vs task loss only, 5 paired seeds") and "det_f1 ahead (+1.60 ± " in line
    assert set(by_name) == {"50%: KD vs task loss only", "50%, pruned, no training: magnitude vs random heads"}


def test_the_demo_quotes_the_shipped_study_as_such_and_never_as_a_target(tmp_path):
    from tools.demo_support import evaluate_targets, shipped_study_lines

    records = []
    for seed in range(5):
        records += [record(seed, "kd", 0.99 - 0.001 * seed), record(seed, "task_only", 1.0)]
    path = tmp_path / "study.json"
    path.write_text(json.dumps(dict(comparisons=headline_comparisons(records))))
    (line,) = shipped_study_lines(dict(joint=False, pruning_ratio=0.5), [path, tmp_path / "missing.json"])
    assert line.startswith("- from the shipped study, 5 seeds (") and "KD vs task loss only" in line
    assert "det_f1 behind (-1.20 ± " in line
    assert shipped_study_lines(dict(joint=False, pruning_ratio=0.75), [path]) == []  # no such cells: no claim
    assert shipped_study_lines(dict(joint=True, pruning_ratio=0.5), [path]) == []
    metrics = dict(det_f1=0.8, lane_iou=0.9, qa_acc=0.7, plan_l2=1.5)
    report = dict(retained_after_kd=dict(det_f1=0.99, lane_iou=1, qa_acc=1, plan_l2=1), seed=0, method="magnitude",
                  before_kd_backbone=dict(cosine=0.98), after_kd_backbone=dict(cosine=0.99), joint=False,
                  fidelity_before_kd=dict(by_method=dict(magnitude=0.98), random_mean=0.9), total_seconds=10.0,
                  after_kd_metrics=metrics, before_kd_metrics=metrics, pruning_ratio=0.5)
    assert not any("study" in name for name in evaluate_targets(report))


def test_importance_is_scored_on_training_frames_and_students_judged_on_validation_frames(monkeypatch):
    from mmcv import Config
    from tools import head_pruning_utils as hpu
    from tools import kd_study
    from tools.demo_support import importance_loader

    cfg = Config.fromfile(str(kd_study.TINY_KD_CONFIG))
    loader = importance_loader(cfg.data.train)
    metas = [meta for batch in loader for meta in batch["img_metas"]]
    assert len(metas) == 64 and {m["split"] for m in metas} == {"train"}
    assert sorted({m["scene_token"] for m in metas}) == [f"synthetic-train-0-scene{s:05d}" for s in range(8)]
    seen = []
    monkeypatch.setattr(hpu, "compute_head_importance_gradient",
                        lambda model, data, **kw: seen.append(data) or hpu.HeadImportance(
                            scores=torch.ones(4, 16, dtype=torch.float64), method="gradient", source="test"))
    study = object.__new__(kd_study.Study)
    study.teacher, study.loader, study.importance_loader, study._importance = None, "validation", loader, {}
    study.importance("heads", "gradient", seed=0)
    assert seen == [loader]


def test_compare_cells_reports_every_difference_and_refuses_different_cells(tmp_path):
    from tools.compare_cells import differences, main

    a = dict(name="c", metrics=dict(det_f1=0.5, plan_l2=1.5, note="x"), retained=dict(det_f1=1.0), backbone_cosine=0.9)
    b = dict(name="c", metrics=dict(det_f1=0.5, plan_l2=1.25), retained=dict(det_f1=0.75), backbone_cosine=0.9)
    result = differences(a, b)
    assert result["metrics"] == dict(det_f1=0.0, plan_l2=-0.25) and result["retained"] == dict(det_f1=-0.25)
    assert result["largest_abs_difference"] == 0.25 and not result["identical"]
    assert differences(a, a)["identical"]
    paths = []
    for name, record in (("a", a), ("b", dict(b, name="other"))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(record))
    assert main([str(p) for p in paths]) == 2


def test_compare_cells_reads_a_demo_report_as_one_record():
    from tools.compare_cells import as_record, differences

    stage = dict(det_f1=0.8, plan_l2=1.5)
    report = dict(targets={}, teacher_metrics=stage, before_kd_metrics=stage, after_kd_metrics=stage,
                  task_only_metrics=stage, retained_after_kd=dict(det_f1=1.0), after_kd_backbone=dict(cosine=0.99),
                  before_kd_backbone=dict(cosine=0.98), task_only_backbone=dict(cosine=0.96), total_seconds=1.0,
                  fidelity_before_kd=dict(by_method=dict(magnitude=0.98), random_draws=[0.9, 0.91]))
    record = as_record(report)
    assert record["metrics"]["after_kd_metrics.plan_l2"] == 1.5 and record["metrics"]["fidelity.random_1"] == 0.91
    moved = dict(report, task_only_metrics=dict(stage, plan_l2=1.25))
    result = differences(record, as_record(moved))
    assert result["largest_abs_difference"] == 0.25 and result["metrics"]["task_only_metrics.plan_l2"] == -0.25


def test_a_joint_study_plots_joint_against_heads_only_with_its_verdicts(tmp_path):
    from tools.kd_study_report import write_study_outputs

    records = []
    for seed in range(3):
        for mode, kept in (("joint", 0.99 + 0.001 * seed), ("heads_at_joint_speed", 0.95)):
            cell = Cell(seed, 0.5, "magnitude", "kd", mode=mode)
            records.append(dict(cell=cell.__dict__, group=cell.group, backbone_cosine=kept,
                                metrics=dict(det_f1=kept, lane_iou=kept, qa_acc=kept, plan_l2=1.0),
                                retained=dict(det_f1=kept, lane_iou=kept, qa_acc=kept, plan_l2=kept)))
    teacher = dict(det_f1=1.0, lane_iou=1.0, qa_acc=1.0, plan_l2=1.0)
    payload = write_study_outputs(records, teacher, tmp_path, dict(command="c", epochs=1, frames=64, threads=1,
                                                                   teacher="t"))
    assert (tmp_path / "joint_vs_heads.png").is_file() and not (tmp_path / "retention_vs_ratio.png").exists()
    (comparison,) = payload["comparisons"]
    assert comparison["by_quantity"]["det_f1"]["verdict"] == "ahead" and "joint_vs_heads.png" in \
        (tmp_path / "study.md").read_text()
