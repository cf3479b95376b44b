"""The outputs of ``tools/pareto_sweep.py``: aggregation over seeds, paired verdicts, sweep.json, the plot, report.md.

Retention is the KD student's metric as a fraction of the teacher's (teacher / student for plan L2);
"worst" is the lowest of the four headline retentions of one student. A group is one family at one target
(and schedule: ``oneshot`` or ``iterative``); its seeds give mean, min, max and the standard error of the
mean. Comparisons are paired by seed with ``kd_study_report.verdict`` (ahead / behind / not separable).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from tools.kd_study_report import VERDICT_SE, verdict
from tools.metric_direction import HEADLINE_METRICS as METRICS

SWEEP_FORMAT = "orion-kd-pareto-sweep"
SWEEP_VERSION = 1
#: Quantities compared per seed (higher is better for all): the four retentions, the worst, the backbone cosine.
COMPARED = METRICS + ("worst", "backbone_cosine")
#: The budgets the docs judge, with the retention (worst metric) the best selection should keep there.
HEADLINE_TARGETS: Dict[float, float] = {2.0: 0.98, 3.0: 0.96}
#: What sweep.json's settings must say (the docs quote them).
SETTINGS = ("command", "seeds", "epochs", "frames", "iterations", "threads", "jobs", "importance_frames", "importance",
            "validation_frames", "timing", "seconds", "cells_run")
FAMILY_LABELS = {"heads": "heads only", "heads_width": "heads + width", "heads_width_depth": "heads + width + depth",
                 "random": "random (counts of heads + width + depth)"}


def stats(values: Sequence[float]) -> Dict[str, float]:
    """Mean, min, max, sample std and standard error of the mean (0 for one value) of ``values``."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(mean=statistics.mean(values), min=min(values), max=max(values), std=std,
                se=std / math.sqrt(len(values)), n=len(values))


def quantities(record: Mapping[str, Any]) -> Dict[str, float]:
    """The compared quantities of one cell record."""
    values = {k: float(record["retained"][k]) for k in METRICS}
    values.update(worst=min(values[k] for k in METRICS), backbone_cosine=float(record["backbone_cosine"]))
    return values


def group_key(record: Mapping[str, Any]) -> Tuple[str, float, str]:
    return record["family"], float(record["target"]), record.get("schedule", "oneshot")


def aggregate(records: Sequence[Mapping[str, Any]], speed: Mapping[str, Mapping[str, Any]],
              choices: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (family, target, schedule): retention stats over seeds, the worst metric, speedups."""
    groups: Dict[Tuple[str, float, str], List[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[group_key(record)].append(record)
    rows = []
    order = list(FAMILY_LABELS)
    for (family, target, schedule), members in sorted(groups.items(), key=lambda item: (
            order.index(item[0][0]), item[0][1], item[0][2] != "oneshot")):
        per_seed = [quantities(r) for r in members]
        retained = {k: stats([q[k] for q in per_seed]) for k in METRICS}
        configs = sorted({r["config"] for r in members})
        predicted = [c["predicted_speedup"] for c in choices if c["name"] in configs and c.get("predicted_speedup")]
        rows.append(dict(family=family, target=target, schedule=schedule, seeds=sorted(r["seed"] for r in members),
                         configs=configs, retained=retained, worst=stats([q["worst"] for q in per_seed]),
                         worst_metric=min(METRICS, key=lambda k: retained[k]["mean"]),
                         backbone_cosine=stats([q["backbone_cosine"] for q in per_seed]),
                         predicted_speedup=statistics.mean(predicted) if predicted else None,
                         measured_speedup=measured(configs, speed)))
    return rows


def measured(configs: Sequence[str], speed: Mapping[str, Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The measured speedup of a group: median over its configurations' medians, min / max of every round."""
    found = [speed[c] for c in configs if c in speed]
    if not found:
        return None
    rounds = [r for s in found for r in s["ratio_per_round"]["speedup"]]
    return dict(median=statistics.median(s["speedup"] for s in found), min=min(rounds), max=max(rounds),
                per_config={c: speed[c]["speedup"] for c in configs if c in speed})


def find(rows: Sequence[Mapping[str, Any]], family: str, target: float, schedule: str = "oneshot") -> Any:
    for row in rows:
        if (row["family"], row["target"], row["schedule"]) == (family, target, schedule):
            return row
    return None


def paired(records: Sequence[Mapping[str, Any]], a: Tuple[str, float, str], b: Tuple[str, float, str]) -> Any:
    """A minus B per seed for every compared quantity, with the verdict; None without a common seed."""
    first = {r["seed"]: quantities(r) for r in records if group_key(r) == a}
    second = {r["seed"]: quantities(r) for r in records if group_key(r) == b}
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    return dict(a=dict(zip(("family", "target", "schedule"), a)), b=dict(zip(("family", "target", "schedule"), b)),
                seeds=seeds, by_quantity={k: verdict([first[s][k] - second[s][k] for s in seeds]) for k in COMPARED})


def comparisons(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Every family against random at each target; at the headline budgets, every pair of families."""
    targets = sorted({float(r["target"]) for r in records})
    families = [f for f in FAMILY_LABELS if any(r["family"] == f for r in records)]
    vs_random, pairs = [], []
    for target in targets:
        for family in families:
            if family != "random":
                found = paired(records, (family, target, "oneshot"), ("random", target, "oneshot"))
                vs_random += [found] if found else []
        if target in HEADLINE_TARGETS:  # each family against the ones with fewer axes (random: above)
            chosen = [f for f in families if f != "random"]
            for i, a in enumerate(chosen):
                for b in chosen[i + 1:]:
                    found = paired(records, (b, target, "oneshot"), (a, target, "oneshot"))
                    pairs += [found] if found else []
    return dict(vs_random=vs_random, families=pairs)


def headline(rows: Sequence[Mapping[str, Any]], unreachable: Sequence[Mapping[str, Any]] = ()
             ) -> List[Dict[str, Any]]:
    """At 2x and 3x: every family's worst retention and measured speed; whether the best keeps the target."""
    out = []
    for target, threshold in HEADLINE_TARGETS.items():
        present = [r for r in rows if r["target"] == target and r["schedule"] == "oneshot"]
        chosen = [r for r in present if r["family"] != "random"]
        if not chosen:
            continue
        best = max(chosen, key=lambda r: r["worst"]["mean"])
        mean = best["worst"]["mean"]
        met = mean >= threshold
        out.append(dict(target=target, threshold=threshold, best_family=best["family"], best_worst=best["worst"],
                        best_worst_metric=best["worst_metric"], met=met,
                        miss_pp=0.0 if met else (threshold - mean) * 100.0, sentence=headline_sentence(
                            target, threshold, best, met),
                        side_by_side=side_by_side(target, present, [u for u in unreachable if u["target"] == target]),
                        rows=[dict(family=r["family"], worst=r["worst"], worst_metric=r["worst_metric"],
                                   measured_speedup=r["measured_speedup"]) for r in present]))
    return out


def headline_sentence(target: float, threshold: float, best: Mapping[str, Any], met: bool) -> str:
    """One plain sentence: does the best selection keep the target at this budget, and by how much not."""
    worst, speed = best["worst"], best["measured_speedup"]
    at = f" (measured {speed['median']:.2f}x)" if speed else ""
    text = (f"At the {target:g}x budget the best selection, {FAMILY_LABELS[best['family']]}{at}, keeps "
            f"{worst['mean']:.1%} of the teacher on its worst headline metric ({best['worst_metric']}; mean of "
            f"{worst['n']} seeds, {worst['min']:.1%}-{worst['max']:.1%})")
    if met:
        return text + f": the {threshold:.0%} target is met."
    return text + f": it misses the {threshold:.0%} target by {(threshold - worst['mean']) * 100:.1f} points."


def side_by_side(target: float, present: Sequence[Mapping[str, Any]], unreachable: Sequence[Mapping[str, Any]]
                 ) -> str:
    """Every family's worst headline retention (mean, seed range, which metric) and measured speed at a budget."""
    parts = []
    for row in present:
        speed = row["measured_speedup"]
        parts.append(f"{FAMILY_LABELS[row['family']]} {_pct(row['worst'])} ({row['worst_metric']})"
                     + (f" at {speed['median']:.2f}x" if speed else ""))
    for u in unreachable:
        fastest = f"{u['fastest_reachable']:.2f}x" if u.get("fastest_reachable") else "unknown"
        parts.append(f"{FAMILY_LABELS[u['family']]} out of reach (fastest reachable {fastest})")
    return f"Worst headline metric at the {target:g}x budget, measured speedup: " + "; ".join(parts) + "."


def iterative_comparison(records: Sequence[Mapping[str, Any]], family: str, target: float) -> Any:
    """Iterative against one-shot pruning of ``family`` at ``target`` (equal iterations), paired by seed."""
    return paired(records, (family, target, "iterative"), (family, target, "oneshot"))


def describe_verdicts(comparison: Mapping[str, Any]) -> str:
    """One line: A vs B at a target, per quantity the verdict with the mean paired difference +- 2 SE."""
    a, b = comparison["a"], comparison["b"]
    parts = []
    for key, stat in comparison["by_quantity"].items():
        scale, digits, unit = (1.0, 4, "") if key == "backbone_cosine" else (100.0, 2, " pp")
        spread = f" ± {VERDICT_SE * stat['standard_error'] * scale:.{digits}f}" if stat["n"] > 1 else ""
        parts.append(f"{key} {stat['verdict']} ({stat['mean_difference'] * scale:+.{digits}f}{spread}{unit})")
    name_a = FAMILY_LABELS[a["family"]] + ("" if a["schedule"] == "oneshot" else f", {a['schedule']}")
    name_b = FAMILY_LABELS[b["family"]] + ("" if b["schedule"] == "oneshot" else f", {b['schedule']}")
    return (f"- {a['target']:g}x: {name_a} vs {name_b}, {len(comparison['seeds'])} paired seeds: "
            + "; ".join(parts) + ".")


def _pct(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:.1%} ({stat['min']:.1%}-{stat['max']:.1%})"


def markdown_table(rows: Sequence[Mapping[str, Any]], unreachable: Sequence[Mapping[str, Any]]) -> str:
    """One row per group: speedups, retention per metric (mean, min-max over seeds), worst with its SE."""
    header = ("| family | target | schedule | predicted | measured (rounds min-max) | " + " | ".join(METRICS)
              + " | worst (SE) | backbone cos | seeds |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        speed = r["measured_speedup"]
        measured_text = f"{speed['median']:.2f}x ({speed['min']:.2f}-{speed['max']:.2f})" if speed else "-"
        predicted = f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] else "-"
        lines.append(f"| {FAMILY_LABELS[r['family']]} | {r['target']:g}x | {r['schedule']} | {predicted} | "
                     f"{measured_text} | " + " | ".join(_pct(r["retained"][k]) for k in METRICS)
                     + f" | {_pct(r['worst'])} ± {r['worst']['se']:.1%} | {r['backbone_cosine']['mean']:.4f} | "
                     f"{len(r['seeds'])} |")
    for u in unreachable:
        fastest = f"{u['fastest_reachable']:.2f}x" if u.get("fastest_reachable") else "unknown"
        lines.append(f"| {FAMILY_LABELS[u['family']]} | {u['target']:g}x | - | out of reach (fastest reachable "
                     f"{fastest}) | - | " + " | ".join("-" for _ in METRICS) + " | - | - | 0 |")
    return "\n".join(lines)


def plot_front(rows: Sequence[Mapping[str, Any]], unreachable: Sequence[Mapping[str, Any]], path: Path) -> str:
    """Worst-metric retention (mean, min-max bars over seeds) against measured speedup, one line per family;
    a family that cannot reach the higher targets ends with a cross and its fastest reachable speedup."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.head_pruning.plots import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for family, label in FAMILY_LABELS.items():
        points = sorted((r for r in rows if r["family"] == family and r["schedule"] == "oneshot"
                         and r["measured_speedup"]), key=lambda r: r["target"])
        if not points:
            continue
        x = [p["measured_speedup"]["median"] for p in points]
        y = [p["worst"]["mean"] for p in points]
        err = [[p["worst"]["mean"] - p["worst"]["min"] for p in points],
               [p["worst"]["max"] - p["worst"]["mean"] for p in points]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, linestyle="--" if family == "random"
                           else "-")
        ends = [u for u in unreachable if u["family"] == family]
        if ends:
            fastest = ends[0].get("fastest_reachable")
            ax.plot([x[-1]], [y[-1]], marker="x", markersize=12, color=line[0].get_color())
            ax.annotate(f"{family}: ends here" + (f" (fastest reachable {fastest:.2f}x predicted)" if fastest else ""),
                        (x[-1], y[-1]), textcoords="offset points", xytext=(6, -12), fontsize=7)
    never = [u for u in unreachable if not any(r["family"] == u["family"] for r in rows)]
    for i, family in enumerate(dict.fromkeys(u["family"] for u in never)):
        fastest = next(u.get("fastest_reachable") for u in never if u["family"] == family)
        ax.text(0.01, 0.02 + 0.05 * i, f"{FAMILY_LABELS[family]}: no target reached" + (
            f" (fastest reachable {fastest:.2f}x predicted)" if fastest else ""), transform=ax.transAxes, fontsize=7)
    for r in rows:
        if r["schedule"] == "iterative" and r["measured_speedup"]:
            ax.errorbar([r["measured_speedup"]["median"] * 1.01], [r["worst"]["mean"]],
                        yerr=[[r["worst"]["mean"] - r["worst"]["min"]], [r["worst"]["max"] - r["worst"]["mean"]]],
                        marker="s", markerfacecolor="none", capsize=3, color="black", linestyle="none",
                        label=f"{FAMILY_LABELS[r['family']]}, iterative (same student; drawn 1% right)")
    for target, threshold in HEADLINE_TARGETS.items():
        ax.plot([target], [threshold], marker="*", markersize=11, color="grey", linestyle="none")
        ax.annotate(f"target {threshold:.0%} at {target:g}x", (target, threshold), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="grey")
    ax.set_xlabel("measured backbone speedup (median of alternating rounds)")
    ax.set_ylabel("worst headline retention after KD")
    ax.set_title("Speed / accuracy front (miniature world; bars: min-max over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def check_sweep(payload: Any, label: str) -> Dict[str, Any]:
    """The payload of a sweep.json, checked for what the docs render; a wrong file is one error naming it."""
    if not isinstance(payload, Mapping) or payload.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{label}: not a Pareto sweep (expected format {SWEEP_FORMAT!r}, written by "
                         f"tools/pareto_sweep.py)")
    if payload.get("version") != SWEEP_VERSION:
        raise ValueError(f"{label}: sweep version {payload.get('version')!r}, expected {SWEEP_VERSION}")
    required = dict(settings=Mapping, teacher_metrics=Mapping, choices=list, speed=Mapping, cells=list, groups=list,
                    unreachable=list, comparisons=Mapping, headline=list, table=str)
    for key, kind in required.items():
        if not isinstance(payload.get(key), kind):
            raise ValueError(f"{label}: key {key!r}: expected {kind.__name__}, got "
                             f"{type(payload.get(key)).__name__}")
    missing = [k for k in SETTINGS if k not in payload["settings"]]
    if missing:
        raise ValueError(f"{label}: settings without {missing}")
    for row in payload["groups"]:
        missing = [k for k in ("family", "target", "schedule", "seeds", "retained", "worst", "measured_speedup")
                   if k not in row]
        if missing:
            raise ValueError(f"{label}: a group row without {missing}")
        if len(row["seeds"]) < 3:
            raise ValueError(f"{label}: {row['family']} at {row['target']:g}x has {len(row['seeds'])} seed(s); "
                             f"the sweep needs >= 3")
    return dict(payload)


def build_payload(records: Sequence[Mapping[str, Any]], choices: Sequence[Mapping[str, Any]],
                  speed: Mapping[str, Mapping[str, Any]], teacher: Mapping[str, float],
                  settings: Mapping[str, Any], iterative: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Everything sweep.json holds (see :func:`check_sweep`)."""
    rows = aggregate(records, speed, choices)
    unreachable = list({(c["family"], c["target"]): dict(
        family=c["family"], target=c["target"], fastest_reachable=c.get("fastest_reachable"), note=c.get("note", ""))
        for c in choices if not c["reachable"]}.values())  # random: one row per target, not per seed
    compared = comparisons(records)
    if iterative:
        found = iterative_comparison(records, iterative["family"], iterative["target"])
        compared["iterative"] = [found] if found else []
    lines = [describe_verdicts(c) for part in compared.values() for c in part]
    return dict(format=SWEEP_FORMAT, version=SWEEP_VERSION, settings=dict(settings), teacher_metrics=dict(teacher),
                choices=list(choices), speed=dict(speed), cells=list(records), groups=rows, unreachable=unreachable,
                comparisons=compared, verdicts=lines, headline=headline(rows, unreachable),
                iterative=dict(iterative or {}),
                table=markdown_table(rows, unreachable))


def report_markdown(payload: Mapping[str, Any]) -> str:
    """report.md: the command, the table, the headline sentences, the verdicts."""
    s = payload["settings"]
    parts = ["# Pareto sweep (miniature world)", "", f"Command: `{s['command']}`", "",
             f"{s['epochs']} epoch(s) of {s['frames']} frames per KD run ({s['iterations']} iterations), "
             f"{s['threads']} thread(s); importance scored on the first {s['importance_frames']} training frames, "
             f"students judged on the {s['validation_frames']} validation frames; speedups measured with "
             f"{s['timing']['rounds']} alternating rounds on a batch of {s['timing']['batch']} images. Retention: "
             "mean (min-max) over seeds.", "", payload["table"], ""]
    parts += [line for h in payload["headline"] for line in (f"- {h['sentence']}", f"  {h['side_by_side']}")] + [""]
    parts += ["## Paired comparisons", "", "A minus B per seed; 'ahead' / 'behind' when the mean lies more than "
              "2 standard errors from 0, else 'not separable'. Retentions in percentage points (pp).", ""]
    parts += list(payload["verdicts"]) + ["", "Plot: pareto.png", ""]
    return "\n".join(parts)


def write_outputs(payload: Mapping[str, Any], out: Path) -> List[str]:
    """sweep.json, pareto.png and report.md into ``out``; returns the paths."""
    from mmcv.models.utils.checkpoint_io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_json(out / "sweep.json", dict(payload))]
    written.append(plot_front(payload["groups"], payload["unreachable"], out / "pareto.png"))
    written.append(atomic_write_text(out / "report.md", report_markdown(payload)))
    return [str(p) for p in written]


__all__ = ["SWEEP_FORMAT", "SWEEP_VERSION", "COMPARED", "HEADLINE_TARGETS", "FAMILY_LABELS", "stats", "quantities",
           "aggregate", "measured", "find", "paired", "comparisons", "headline", "headline_sentence",
           "iterative_comparison", "describe_verdicts", "markdown_table", "plot_front", "check_sweep",
           "build_payload", "report_markdown", "write_outputs"]
