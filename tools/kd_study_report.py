"""The outputs of ``tools/kd_study.py``: per-group mean +- std over seeds, study.json, study.md and plots.

A group is a cell without its seed. Retention is the student's metric as a fraction of the teacher's
(teacher / student for plan L2, lower is better), so 1.0 means "as good as the teacher" on every row.
"""
from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from tools.metric_direction import HEADLINE_METRICS as METRICS

# The finer task metrics behind the headline ones: per detection class, per question type, the traffic state.
DETAIL_METRICS = ("det_f1_car", "det_f1_pedestrian", "det_f1_traffic_light", "qa_acc_count_cars",
                  "qa_acc_count_pedestrians", "qa_acc_light_state", "qa_acc_next_action", "traffic_state_acc")
TRAINING_LABELS = {"none": "pruned, no training", "kd": "KD", "task_only": "task loss only"}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    values = [float(v) for v in values]
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def aggregate(records: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per group: the cell settings (without seed), seeds, and mean/std of metrics, retention and cosine."""
    groups: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["group"]].append(record)
    out: Dict[str, Dict[str, Any]] = {}
    for name, members in groups.items():
        settings = {k: v for k, v in members[0]["cell"].items() if k != "seed"}
        out[name] = dict(settings=settings, seeds=sorted(r["cell"]["seed"] for r in members),
                         metrics={k: mean_std([r["metrics"][k] for r in members]) for k in METRICS},
                         retained={k: mean_std([r["retained"][k] for r in members]) for k in METRICS},
                         worst_retained=mean_std([min(r["retained"][k] for k in METRICS) for r in members]),
                         backbone_cosine=mean_std([r["backbone_cosine"] for r in members]))
    return out


def _pm(stat: Mapping[str, float], percent: bool = False) -> str:
    if percent:
        return f"{stat['mean']:.1%} ± {stat['std']:.1%}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _describe(settings: Mapping[str, Any]) -> str:
    training = TRAINING_LABELS[settings["training"]]
    if settings.get("alpha") is not None:
        training += f" (alpha {settings['alpha']:g})"
    labels = "" if settings["label_fraction"] >= 1.0 else f"{settings['label_fraction']:.0%}"
    return (f"| {settings['mode']} | {settings['ratio']:.0%} | {settings['selection']} | {training} | "
            f"{labels or 'all'} |")


def markdown_table(groups: Mapping[str, Mapping[str, Any]], teacher: Mapping[str, float]) -> str:
    """One row per group: metric mean ± std, worst retention, backbone cosine."""
    header = ("| mode | heads removed | selection | training | labels | " + " | ".join(METRICS)
              + " | worst kept | backbone cos | seeds |")
    rows = [header, "|" + "---|" * (header.count("|") - 1),
            "| teacher | 0% | - | - | - | " + " | ".join(f"{teacher[k]:.4f}" for k in METRICS) + " | 100% | 1 | - |"]
    for group in sorted(groups.values(), key=_order):
        rows.append(_describe(group["settings"]) + " " + " | ".join(_pm(group["metrics"][k]) for k in METRICS)
                    + f" | {_pm(group['worst_retained'], True)} | {_pm(group['backbone_cosine'])} | "
                    f"{len(group['seeds'])} |")
    return "\n".join(rows)


def detail_retention(records: Sequence[Mapping[str, Any]], teacher: Mapping[str, float]
                     ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per group, mean/std over seeds of student / teacher for each of :data:`DETAIL_METRICS` the cells have
    (a teacher value of 0 gives no ratio)."""
    ratios: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for key in DETAIL_METRICS:
            if key in record["metrics"] and teacher.get(key):
                ratios[record["group"]][key].append(record["metrics"][key] / teacher[key])
    return {group: {k: mean_std(v) for k, v in per_key.items()} for group, per_key in ratios.items()}


def detail_table(groups: Mapping[str, Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]],
                 teacher: Mapping[str, float]) -> str:
    """One row per group: the retention of every finer task metric (mean ± std over seeds)."""
    keys = [k for k in DETAIL_METRICS if k in teacher]
    header = "| mode | heads removed | selection | training | labels | " + " | ".join(keys) + " |"
    rows = [header, "|" + "---|" * (header.count("|") - 1),
            "| teacher (value) | 0% | - | - | - | " + " | ".join(f"{teacher[k]:.3f}" for k in keys) + " |"]
    for name, group in sorted(groups.items(), key=lambda item: _order(item[1])):
        cells = [_pm(details[name][k], True) if k in details.get(name, {}) else "-" for k in keys]
        rows.append(_describe(group["settings"]) + " " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _order(group: Mapping[str, Any]) -> tuple:
    s = group["settings"]
    return s["mode"], s["ratio"], s["selection"], -s["label_fraction"], s["training"], s.get("alpha") or -1


def find_group(groups: Mapping[str, Mapping[str, Any]], **settings: Any) -> Any:
    """The group whose settings include ``settings`` (alpha None and label fraction 1 unless given)."""
    wanted = dict(dict(alpha=None, label_fraction=1.0, mode="heads"), **settings)
    for group in groups.values():
        if all(group["settings"].get(k) == v for k, v in wanted.items()):
            return group
    return None


#: Compared quantities: the four retentions, the worst of them, the backbone cosine (higher is better for all).
COMPARED = METRICS + ("worst_kept", "backbone_cosine")
VERDICT_SE = 2.0  # a mean paired difference within this many standard errors of 0 is "not separable"


def _per_seed(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> Dict[int, Dict[str, float]]:
    """Seed -> the compared quantities of the cell with ``settings`` (alpha None, all labels, heads unless given)."""
    wanted = dict(dict(alpha=None, label_fraction=1.0, mode="heads"), **settings)
    out: Dict[int, Dict[str, float]] = {}
    for record in records:
        if all(record["cell"].get(k) == v for k, v in wanted.items()):
            values = {k: float(record["retained"][k]) for k in METRICS}
            values.update(worst_kept=min(values.values()), backbone_cosine=float(record["backbone_cosine"]))
            out[int(record["cell"]["seed"])] = values
    return out


def verdict(differences: Sequence[float]) -> Dict[str, Any]:
    """Mean paired difference, its standard error and the word: 'ahead' / 'behind' when the mean lies more than
    :data:`VERDICT_SE` standard errors from 0, else 'not separable' (also with fewer than 2 pairs)."""
    n = len(differences)
    mean = statistics.mean(differences) if n else float("nan")
    se = statistics.stdev(differences) / n ** 0.5 if n > 1 else float("nan")
    word = "not separable"
    if n > 1 and abs(mean) > VERDICT_SE * se:
        word = "ahead" if mean > 0 else "behind"
    # Both students the same in every seed (no training, deterministic selection): one measurement, repeated.
    same = n > 1 and max(differences) == min(differences)
    return dict(mean_difference=mean, standard_error=se, n=n, verdict=word, same_in_every_seed=same)


def paired_comparison(records: Sequence[Mapping[str, Any]], name: str, a: Mapping[str, Any],
                      b: Mapping[str, Any]) -> Any:
    """A against B over the seeds both have: per compared quantity, the verdict of A - B (None without pairs)."""
    first, second = _per_seed(records, a), _per_seed(records, b)
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    return dict(name=name, a=dict(a), b=dict(b), seeds=seeds,
                by_quantity={k: verdict([first[s][k] - second[s][k] for s in seeds]) for k in COMPARED})


def headline_comparisons(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The study's headline comparisons that the cells support, each as paired per-seed differences."""
    specs = []
    for ratio in sorted({r["cell"]["ratio"] for r in records}):
        mag = dict(ratio=ratio, selection="magnitude")
        kd, task, tenth = dict(mag, training="kd"), dict(mag, training="task_only"), dict(label_fraction=0.1)
        specs += [(f"{ratio:.0%}: KD vs task loss only", kd, task),
                  (f"{ratio:.0%}, 10% of the labels: KD vs task loss only", dict(kd, **tenth), dict(task, **tenth)),
                  (f"{ratio:.0%}: KD with 10% of the labels vs KD with all", dict(kd, **tenth), kd),
                  (f"{ratio:.0%}: pure distillation (alpha 1) vs KD with the schedule", dict(kd, alpha=1.0), kd),
                  (f"{ratio:.0%}: pure distillation (alpha 1) vs task loss only", dict(mag, training="kd", alpha=1.0),
                   dict(mag, training="task_only")),
                  (f"{ratio:.0%}, KD: joint vs heads only at the joint student's speed",
                   dict(mag, training="kd", mode="joint"), dict(mag, training="kd", mode="heads_at_joint_speed")),
                  (f"{ratio:.0%}, no training: joint vs heads only at the joint student's speed",
                   dict(mag, training="none", mode="joint"), dict(mag, training="none", mode="heads_at_joint_speed"))]
        for training in ("none", "kd"):
            for chosen in ("magnitude", "gradient"):
                specs.append((f"{ratio:.0%}, {TRAINING_LABELS[training]}: {chosen} vs random heads",
                              dict(ratio=ratio, selection=chosen, training=training),
                              dict(ratio=ratio, selection="random", training=training)))
    found = (paired_comparison(records, *spec) for spec in specs)
    return [c for c in found if c is not None]


def describe_comparison(comparison: Mapping[str, Any]) -> str:
    """One line: per quantity, the verdict with the mean paired difference ± 2 standard errors."""
    parts = []
    for key, stat in comparison["by_quantity"].items():
        scale, digits, unit = (1.0, 4, "") if key == "backbone_cosine" else (100.0, 2, " pp")
        value = f"{stat['mean_difference'] * scale:+.{digits}f}"
        if stat.get("same_in_every_seed"):
            value += f"{unit}, the same in every seed"
        elif stat["n"] > 1:
            value += f" ± {VERDICT_SE * stat['standard_error'] * scale:.{digits}f}{unit}"
        else:
            value += unit
        parts.append(f"{key} {stat['verdict']} ({value})")
    return (f"- {comparison['name']}, {len(comparison['seeds'])} paired seeds (mean difference ± 2 standard "
            f"errors): " + "; ".join(parts) + ".")


def findings(groups: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """What pruning alone costs, per ratio (magnitude heads); the comparisons are :func:`headline_comparisons`."""
    lines: List[str] = []
    ratios = sorted({g["settings"]["ratio"] for g in groups.values()})
    for ratio in ratios:
        none = find_group(groups, ratio=ratio, selection="magnitude", training="none")
        if none:
            changes = ", ".join(f"{k} {none['retained'][k]['mean'] - 1:+.1%}" for k in METRICS)
            lines.append(f"- {ratio:.0%} of heads removed (magnitude), before any training: change against the "
                         f"teacher (negative = worse) {changes} (worst kept {_pm(none['worst_retained'], True)}).")
    return lines


def detail_findings(groups: Mapping[str, Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Per ratio and selection, before training: the finer task metric that pruning costs most."""
    lines = []
    for name, group in sorted(groups.items(), key=lambda item: _order(item[1])):
        s = group["settings"]
        if s["training"] != "none" or s["mode"] != "heads" or not details.get(name):
            continue
        key, stat = min(details[name].items(), key=lambda item: item[1]["mean"])
        lines.append(f"- {s['ratio']:.0%} of heads removed ({s['selection']}), before any training: the finer "
                     f"task metric hit hardest is {key}, kept {_pm(stat, True)}.")
    return lines


def plot_retention_vs_ratio(groups: Mapping[str, Mapping[str, Any]], path: Path,
                            comparisons: Sequence[Mapping[str, Any]] = ()) -> str:
    """Per metric: retention (mean ± std over seeds) against the pruning ratio, one line per training; the title
    gives the paired verdict of KD against task loss only at each ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.0), squeeze=False)
    for ax, key in zip(axes[0], METRICS):
        for training in TRAINING_LABELS:
            points = sorted((g["settings"]["ratio"], g["retained"][key]) for g in groups.values()
                            if g["settings"]["training"] == training and g["settings"]["selection"] == "magnitude"
                            and g["settings"]["label_fraction"] >= 1.0 and g["settings"].get("alpha") is None
                            and g["settings"]["mode"] == "heads")
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                            yerr=[p[1]["std"] for p in points], marker="o", capsize=3, label=TRAINING_LABELS[training])
        ax.axhline(0.98, color="grey", linestyle=":", linewidth=1)
        ratios = sorted({g["settings"]["ratio"] for g in groups.values()})
        verdicts = ", ".join(f"{r:.0%} {_kd_verdict(comparisons, r, 1.0, key)}" for r in ratios)
        ax.set_title(f"{key} kept\nKD vs task-only: {verdicts}", fontsize=7)
        ax.set_xlabel("fraction of heads removed", fontsize=8)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_kd_vs_task(groups: Mapping[str, Mapping[str, Any]], path: Path,
                    comparisons: Sequence[Mapping[str, Any]] = ()) -> str:
    """Bars: retention after KD and after task loss only (mean ± std), per ratio and label fraction; under each
    pair, the paired verdict of KD against task loss only (from ``comparisons``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(g["settings"]["ratio"], g["settings"]["label_fraction"]) for g in groups.values()
                   if g["settings"]["training"] != "none"}, key=lambda k: (k[0], -k[1]))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.6), squeeze=False)
    width = 0.38
    for ax, metric in zip(axes[0], METRICS):
        lows, highs = [], []
        for offset, training in ((-width / 2, "kd"), (width / 2, "task_only")):
            stats = [find_group(groups, ratio=r, selection="magnitude", training=training, label_fraction=f)
                     for r, f in keys]
            means = [s["retained"][metric]["mean"] for s in stats if s]
            stds = [s["retained"][metric]["std"] for s in stats if s]
            ax.bar([i + offset for i, s in enumerate(stats) if s], means, width, yerr=stds, capsize=3,
                   label=TRAINING_LABELS[training])
            lows += [m - e for m, e in zip(means, stds)]
            highs += [m + e for m, e in zip(means, stds)]
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{r:.0%}, {f:.0%} lab.\nKD " + _kd_verdict(comparisons, r, f, metric).replace(" (", "\n(")
                            for r, f in keys], fontsize=7)
        if lows:  # zoom on the bars' range: the differences are a few percent
            ax.set_ylim(min(lows) - 0.01, max(highs) + 0.01)
        ax.set_title(f"{metric} kept (magnitude heads)", fontsize=9)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_joint_vs_heads(groups: Mapping[str, Mapping[str, Any]], path: Path,
                        comparisons: Sequence[Mapping[str, Any]] = ()) -> str:
    """Bars: retention of the joint student and of the heads-only student at its speed (mean ± std), per training;
    under each pair, the paired verdict of joint against heads only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(g["settings"]["ratio"], g["settings"]["training"]) for g in groups.values()
                   if g["settings"]["mode"] == "joint"})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.6), squeeze=False)
    width = 0.38
    for ax, metric in zip(axes[0], METRICS):
        for offset, mode in ((-width / 2, "joint"), (width / 2, "heads_at_joint_speed")):
            stats = [find_group(groups, ratio=r, selection="magnitude", training=t, mode=mode) for r, t in keys]
            found = [(i, st["retained"][metric]) for i, st in enumerate(stats) if st]
            ax.bar([i + offset for i, _ in found], [r["mean"] for _, r in found], width,
                   yerr=[r["std"] for _, r in found], capsize=3,
                   label="joint" if mode == "joint" else "heads only, same speed")
        labels = []
        for ratio, training in keys:
            word = "no verdict"
            for c in comparisons:
                if (c["a"].get("mode"), c["b"].get("mode"), c["a"]["ratio"], c["a"]["training"]) == \
                        ("joint", "heads_at_joint_speed", ratio, training):
                    word = f"{c['by_quantity'][metric]['verdict']}\n({len(c['seeds'])} seeds)"
            labels.append(f"{ratio:.0%}, {TRAINING_LABELS[training]}\njoint {word}")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{metric} kept (magnitude)", fontsize=9)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _kd_verdict(comparisons: Sequence[Mapping[str, Any]], ratio: float, fraction: float, metric: str) -> str:
    """The verdict of KD against task loss only at ``ratio`` and ``fraction`` on ``metric`` ('?' without one)."""
    for comparison in comparisons:
        a, b = comparison["a"], comparison["b"]
        if (a.get("training"), b.get("training"), a.get("mode", "heads"), a.get("alpha")) == \
                ("kd", "task_only", "heads", None) and a["ratio"] == ratio and \
                a.get("label_fraction", 1.0) == fraction == b.get("label_fraction", 1.0):
            return f"{comparison['by_quantity'][metric]['verdict']} ({len(comparison['seeds'])} seeds)"
    return "no verdict"


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    from tools.head_pruning.plots import save_figure

    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def write_study_outputs(records: Sequence[Mapping[str, Any]], teacher: Mapping[str, float], out: Path,
                        settings: Mapping[str, Any]) -> Dict[str, Any]:
    """study.json (cells, groups, findings), study.md and the two plots; returns the study.json payload."""
    from mmcv.models.utils.checkpoint_io import atomic_write_json, atomic_write_text

    groups = aggregate(records)
    table = markdown_table(groups, teacher)
    details = detail_retention(records, teacher)
    fine_table = detail_table(groups, details, teacher)
    notes = findings(groups) + detail_findings(groups, details)
    comparisons = headline_comparisons(records)
    verdicts = [describe_comparison(c) for c in comparisons]
    payload = dict(settings=dict(settings), teacher_metrics=dict(teacher), groups=groups, findings=notes,
                   comparisons=comparisons, verdicts=verdicts, cells=list(records), table=table,
                   detail_retention=details, detail_table=fine_table)
    atomic_write_json(out / "study.json", payload)
    modes = {g["settings"]["mode"] for g in groups.values()}
    plots = []
    if "heads" in modes:
        plots += [plot_retention_vs_ratio(groups, out / "retention_vs_ratio.png", comparisons),
                  plot_kd_vs_task(groups, out / "kd_vs_task_only.png", comparisons)]
    if {"joint", "heads_at_joint_speed"} <= modes:
        plots.append(plot_joint_vs_heads(groups, out / "joint_vs_heads.png", comparisons))
    atomic_write_text(out / "study.md", "\n".join([
        "# KD study (miniature world)", "", f"Command: `{settings['command']}`; {settings['epochs']} epoch(s) of "
        f"{settings['frames']} frames per trained cell, {settings['threads']} thread(s), teacher {settings['teacher']}. Mean ± std over seeds; "
        "'worst kept' is the lowest of the four retentions (student / teacher; teacher / student for plan L2).", "",
        table, "", "## Comparisons, paired over seeds", "", "A minus B, per seed, then the mean and its standard error "
        "over the seeds both have; 'ahead' or 'behind' when the mean lies more than 2 standard errors from 0, "
        "else 'not separable'. Retentions in percentage points (pp).", "", *verdicts, "", "## Finer task metrics", "",
        "Retention (student / teacher) per detection class, per question "
        "type and of the traffic state, mean ± std over seeds:", "", fine_table, "", "## Findings", "", *notes, "",
        "Plots: " + ", ".join(os.path.basename(p) for p in plots), ""]))
    return payload


__all__ = ["METRICS", "DETAIL_METRICS", "COMPARED", "mean_std", "aggregate", "markdown_table", "detail_retention",
           "detail_table", "find_group", "verdict", "paired_comparison", "headline_comparisons", "describe_comparison",
           "findings", "detail_findings", "plot_retention_vs_ratio", "plot_kd_vs_task", "plot_joint_vs_heads",
           "write_study_outputs"]
