"""Render the generated blocks of docs/results.md and README.md from the JSON files under docs/.

Every number in those blocks comes from a committed JSON file that a documented command writes
(the demo's report.json, the studies' study.json, the teacher's curve, the benchmarks' --out), so
the markdown can be regenerated and checked instead of edited by hand. A block sits between

    <!-- BEGIN generated: NAME -->
    <!-- END generated: NAME -->

and only its inside is rewritten. ``--check`` writes nothing and exits 1 when a file differs.

    python tools/render_results.py           # rewrite the blocks
    python tools/render_results.py --check   # exit 1 when a committed file is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEMO_REPORT = DOCS / "demo" / "report.json"
BLOCK = re.compile(r"(<!-- BEGIN generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=name) -->)",
                   re.S)
HEADLINE = ("det_f1", "lane_iou", "qa_acc", "plan_l2")


class RenderError(ValueError):
    """A generated block that cannot be rendered (missing block, missing or malformed JSON)."""


def _rel(path: Path) -> str:
    """The path as the docs name it: ``docs/...`` for a source under DOCS, else relative to the checkout."""
    if path.is_relative_to(DOCS):
        return "docs/" + path.relative_to(DOCS).as_posix()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def load_json(path: Path) -> Any:
    """Read one JSON source; a missing or broken file is one clear error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RenderError(f"{_rel(path)}: missing; it is written by the command named in docs/results.md")
    except json.JSONDecodeError as err:
        raise RenderError(f"{_rel(path)}: not valid JSON ({err})")


def replace_blocks(text: str, blocks: Mapping[str, str], where: str) -> str:
    """Put each rendered block between its markers; every marker pair must have a renderer and vice versa."""
    found = {m.group("name") for m in BLOCK.finditer(text)}
    missing = sorted(set(blocks) - found)
    unknown = sorted(found - set(blocks))
    if missing or unknown:
        raise RenderError(f"{where}: generated blocks missing {missing}, without a renderer {unknown}")
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")].rstrip("\n") + "\n" + m.group(4), text)


def demo_table(report: Mapping[str, Any]) -> str:
    """The demo's closing table, from its report.json (the same rows the demo prints)."""
    from tools.demo_support import HIGHER_IS_BETTER

    control = report.get("task_only_metrics")
    rows = ["| metric | chance | teacher | pruned, before KD | task loss only (3 ep.) | student after KD (3 ep.) "
            "| kept by KD |", "|---|---|---|---|---|---|---|"]
    for key, higher in HIGHER_IS_BETTER.items():
        ctl = f"{control[key]:.4f}" if control else "skipped"
        rows.append(f"| {key} ({'higher' if higher else 'lower'} is better) | {report['chance_metrics'][key]:.4f} | "
                    f"{report['teacher_metrics'][key]:.4f} | {report['before_kd_metrics'][key]:.4f} | {ctl} | "
                    f"{report['after_kd_metrics'][key]:.4f} | {report['retained_after_kd'][key]:.1%} |")
    ctl_cos = f"{report['task_only_backbone']['cosine']:.4f}" if control else "skipped"
    rows.append(f"| backbone cosine to teacher | - | 1.0000 | {report['before_kd_backbone']['cosine']:.4f} | "
                f"{ctl_cos} | {report['after_kd_backbone']['cosine']:.4f} | - |")
    params = report["backbone_params"]
    student = f"{params['student'] / 1e6:.3f} M"
    rows.append(f"| backbone parameters | - | {params['teacher'] / 1e6:.3f} M | {student} | {student} | {student} | "
                f"{params['student'] / params['teacher']:.1%} |")
    speed = report.get("backbone_speed")
    if speed:
        s = f"{speed['speedup']:.3f}x"
        rows.append(f"| backbone speedup (median, CPU) | - | 1.000x | {s} | {s} | {s} | ceiling {speed['ceiling']:.3f}x |")
    return "\n".join(rows)


def demo_block(report: Mapping[str, Any]) -> str:
    """The demo table with the run's settings and targets, for docs/results.md and README.md."""
    targets = "\n".join(f"- {'met' if t['met'] else 'missed'}: {name}" for name, t in report["targets"].items())
    return (f"Seed {report['seed']}, {report['pruning_ratio']:.0%} of the heads removed ({report['method']} "
            f"importance, {report['strategy']} allocation), torch {report['torch']}, {report['threads']} threads, "
            f"pipeline {report['total_seconds']:.0f} s (`docs/demo/report.json`):\n\n```\n{demo_table(report)}\n```\n\n"
            f"Targets as the demo reports them (what its own run measured):\n\n{targets}\n" + _shipped(report))


def _shipped(report: Mapping[str, Any]) -> str:
    """The shipped studies' comparisons the demo's report quotes (not measured by the demo), if any."""
    lines = report.get("shipped_study") or []
    if not lines:
        return ""
    return "\nFrom the shipped studies, quoted by the demo's report (not measured by its run):\n\n" + \
        "\n".join(lines) + "\n"


def teacher_block(curve: Mapping[str, Any], every: int = 400) -> str:
    """The shipped tiny teacher's validation curve (every ``every`` iterations) and the image-blind chance row."""
    keys = ["det_f1", "lane_iou", "qa_acc", "qa_acc_light_state", "qa_acc_next_action", "qa_acc_count_cars",
            "qa_acc_count_pedestrians", "plan_l2", "traffic_state_acc"]
    stage_end = curve["stage_iters"][0]
    rows = ["| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for point in curve["curve"]:
        if point["iter"] % every == 0:
            label = str(point["iter"]) + (" (end of stage 1)" if point["iter"] == stage_end else "") + \
                (" (shipped)" if point["iter"] == curve["iters"] else "")
            rows.append(f"| {label} | " + " | ".join(f"{point[k]:.3f}" for k in keys) + " |")
    rows.append("| image-blind chance | " + " | ".join(f"{curve['chance'][k]:.3f}" for k in keys) + " |")
    reset, final = curve["memory_reset_each_frame"], curve["final"]
    hidden = int(final["num_light_hidden"])
    text = "\n".join(rows) + "\n\n"
    text += (f"Temporal memory on the {hidden} validation frames whose light has left the view (memory reset at every "
             f"frame -> streaming): traffic state {reset['traffic_state_acc_hidden']:.3f} -> "
             f"{final['traffic_state_acc_hidden']:.3f}, light-state answer {reset['qa_acc_light_state_hidden']:.3f} -> "
             f"{final['qa_acc_light_state_hidden']:.3f}.\n")
    return text


def study_block(folder: Path) -> str:
    """A study's tables and findings as ``tools/kd_study.py`` wrote them into study.json, and its commands."""
    study = load_json(folder / "study.json")
    commands = load_json(folder / "commands.json")
    rel = _rel(folder)
    cmd = "\n".join(commands)
    findings = "\n".join(line if line.startswith("- ") else f"- {line}" for line in study["findings"])
    verdicts = "\n".join(study.get("verdicts", [])) or "- none: the study has no paired cells"
    return (f"Commands (`{rel}/commands.json`; they grow one study folder, whose study.json, study.md, plots and "
            f"commands.json are then copied into `{rel}/`):\n\n"
            f"```bash\n{cmd}\n```\n\n{study['table']}\n\nComparisons, paired over seeds (A minus B per seed; "
            f"'ahead' or 'behind' when the mean difference lies more than 2 standard errors from 0, else 'not "
            f"separable'; retentions in percentage points):\n\n{verdicts}\n\n"
            f"Finer task metrics (retention, student / teacher):\n\n"
            f"{study['detail_table']}\n\nFindings (generated by the study):\n\n{findings}\n")


def joint_speed_block(path: Path) -> str:
    """The speed probe of the joint study: heads-only students' measured speedups against the joint one."""
    probe = load_json(path)
    rows = ["| student | measured backbone speedup |", "|---|---|", f"| joint (heads + MLP width) | "
            f"{probe['joint_speedup']:.3f}x |"]
    for heads, speed in sorted(probe["heads_only_speedup"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {heads} head(s) per block | {speed:.3f}x |")
    return "\n".join(rows) + f"\n\nMatched heads-only student: {probe['heads']} head(s) per block (matched: " \
        f"{str(probe['matched']).lower()}).\n"


def bench_block(folder: Path) -> str:
    """Every benchmark result under docs/bench/ (``--out`` of the benchmark scripts), one table per file."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return ("No benchmark result is committed yet. Run a benchmark with `--out docs/bench/NAME.json` "
                "(commands above), then `python tools/render_results.py`.\n")
    return "\n".join(_bench_table(path, load_json(path)) for path in files)


def _bench_table(path: Path, result: Mapping[str, Any]) -> str:
    rel = _rel(path)
    if "speedup" in result and "median_s" in result:
        median = result["median_s"]
        rows = [f"`{rel}`: depth {result['depth']}, {result['image_size']}x{result['image_size']}, "
                f"{result['dtype']} on {result['device_name'] or result['device']}, {result['threads']} threads, "
                f"torch {result['torch']}, {result['repeats']} alternating rounds{_load(result)}, teacher vs "
                f"{result['student']}:", "", "| quantity | value |", "|---|---|"]
        spread = result.get("time_spread_s", {})
        rows += [f"| median {name} | {value * 1e3:.1f} ms{_range_ms(spread.get(name))} |"
                 for name, value in median.items()]
        rounds = result.get("ratio_spread", {}).get("speedup")
        rows += [f"| speedup (median times) | {result['speedup']:.3f}x"
                 + (f"; per round {rounds['min']:.3f}-{rounds['max']:.3f}x |" if rounds else " |"),
                 f"| analytic ceiling | {result['ceiling']:.3f}x |"]
        if result["speedup"] <= result["ceiling"]:
            rows.append(f"| efficiency | {result['efficiency']:.1%} of the ceiling |")
        else:
            rows.append("| above the ceiling | see the note below the table |")
        rows += _budget_rows(result)
        if "sdpa_vs_math_speedup" in result:
            rows.append(f"| teacher sdpa vs math | {result['sdpa_vs_math_speedup']:.3f}x |")
        if "peak_memory_ratio" in result:
            rows.append(f"| peak memory, student / teacher | {result['peak_memory_ratio']:.3f} |")
        note = f"\nNote: {result['beyond_ceiling']}.\n" if result.get("beyond_ceiling") else ""
        return "\n".join(rows) + "\n" + note
    if "settings" in result and isinstance(result["settings"], Mapping):
        rows = [f"`{rel}`: KD step vs student-only step, {result['precision']} on {result['device_name']}, "
                f"{result['threads']} threads, torch {result['torch']}{_load(result.get('environment', {}))}:", "",
                "| setting | KD step (median) | student-only | time ratio (per round) | peak memory ratio |",
                "|---|---|---|---|---|"]
        for entry in result["settings"].values():
            m = entry["median_s"]
            rounds = entry.get("ratio_spread", {}).get("time_ratio")
            per_round = f" ({rounds['min']:.3f}-{rounds['max']:.3f})" if rounds else ""
            rows.append(f"| {entry['label']} | {m['kd'] * 1e3:.1f} ms | {m['student_only'] * 1e3:.1f} ms | "
                        f"{entry['time_ratio']:.3f}x{per_round} | {entry['memory_ratio']:.3f} |")
        return "\n".join(rows) + "\n"
    if "students" in result and isinstance(result["students"], Mapping):
        rows = [f"`{rel}`: {result['what']}; depth {result['depth']}, {result['image_size']}x{result['image_size']}, "
                f"{result['dtype']}, opset {result['opset']}, {result['repeats']} rounds:", "",
                "| student | analytic ceiling | ONNX Runtime speedup, median of rounds (min-max) | PyTorch speedup |",
                "|---|---|---|---|"]
        for student in result["students"].values():
            ort, pt = student["onnxruntime"]["ratio"], student["pytorch"]["ratio"]
            rows.append(f"| {student['heads']} heads, MLP {student['mlp_hidden']} | {student['ceiling']:.3f}x | "
                        f"{ort['median']:.3f}x ({ort['min']:.2f}-{ort['max']:.2f}) | "
                        f"{pt['median']:.3f}x ({pt['min']:.2f}-{pt['max']:.2f}) |")
        return "\n".join(rows) + "\n"
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    return f"`{rel}`:\n\n| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in scalars.items()) + "\n"


def _budget_rows(result: Mapping[str, Any]) -> List[str]:
    """A ``--target-speedup`` run: the target, what the budget predicted, what was measured, the student's blocks."""
    budget = result.get("budget")
    if not budget:
        return []
    blocks = result.get("student_blocks")
    kept = f"{len(blocks)} of {result['depth']} (removed {budget['chosen']['removed_blocks']})" if blocks else "all"
    heads = _range([h for h in result["student_heads"] if h])
    hidden = _range([c for c in result["student_mlp_hidden"] if c])
    return [f"| budget target | {budget['target_speedup']:g}x ({budget['cost_model'].split(';')[0]}) |",
            f"| predicted / measured | {budget['predicted_speedup']:.3f}x / {budget['measured_speedup']:.3f}x "
            f"(measured / analytic {budget['measured_over_analytic']:.1%}) |",
            f"| student blocks kept | {kept} |",
            f"| student per kept block | {heads} heads, {hidden} SwiGLU channels |"]


def _range(values: Sequence[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


BUDGET_BENCH = "docs/bench/budget_orion_l_depth12_3x.json"
UNIT_LATENCY = "docs/bench/unit_latency_orion_l_cpu.json"


def budget_block(path: Path) -> str:
    """The ORION-L budget run (``benchmark_backbone.py --target-speedup``): target, predicted, measured, student."""
    if not path.exists():
        return (f"No run is committed yet: `python tools/benchmark_backbone.py --depth 12 --unit-latency "
                f"{UNIT_LATENCY}`, then `python tools/benchmark_backbone.py --depth 12 --target-speedup 3 --unit-costs "
                f"{UNIT_LATENCY} --skip-math --out {BUDGET_BENCH}`, then `python tools/render_results.py`.\n")
    result = load_json(path)
    budget, rounds = result["budget"], result["ratio_spread"]["speedup"]
    load = result.get("load_average") or [float("nan")]
    after = result.get("load_average_after") or [float("nan")]
    rows = [f"`{_rel(path)}`: depth {result['depth']} ({result['image_size']}x{result['image_size']}, "
            f"{result['dtype']} on {result['device_name']}, {result['threads']} threads, torch {result['torch']}, "
            f"{result['repeats']} alternating rounds, load average {load[0]:.2f} before and {after[0]:.2f} after):", "",
            "| quantity | value |", "|---|---|"] + _budget_rows(result)[1:]
    rows += [f"| target | {budget['target_speedup']:g}x |",
             f"| measured per round | {rounds['min']:.3f}-{rounds['max']:.3f}x (median {rounds['median']:.3f}x) |",
             f"| medians | teacher {result['median_s']['teacher_sdpa']:.2f} s, student "
             f"{result['median_s']['student_sdpa']:.2f} s |"]
    analytic = path.with_name(path.stem + "_analytic.json")
    if analytic.exists():  # the same target priced by the MAC model instead of measured unit costs
        other = load_json(analytic)
        spread = other["ratio_spread"]["speedup"]
        rows += ["", f"The same target priced by analytic MACs instead of measured unit costs (`{_rel(analytic)}`, "
                     f"load average {other['load_average'][0]:.2f}) chose blocks removed "
                     f"{other['budget']['chosen']['removed_blocks']}, predicted "
                     f"{other['budget']['predicted_speedup']:.3f}x and measured {other['speedup']:.3f}x (per round "
                     f"{spread['min']:.3f}-{spread['max']:.3f}x, {other['budget']['measured_over_analytic']:.1%} of its "
                     f"ceiling): the MAC model counts matmuls only, and each kept block's norms, rope and softmax "
                     f"(its overhead) make the student slower than predicted. Measured unit costs price that overhead."]
    return "\n".join(rows) + "\n"


def _load(result: Mapping[str, Any]) -> str:
    """', load average L' (1 minute, when the run was taken), or nothing for results that lack it."""
    load = result.get("load_average")
    return f", load average {load[0]:.2f}" if load else ""


def _range_ms(spread: Optional[Mapping[str, float]]) -> str:
    return f" ({spread['min'] * 1e3:.1f}-{spread['max'] * 1e3:.1f})" if spread else ""


def fidelity_block(path: Path) -> str:
    """Head-importance fidelity per method and allocation (``tools/fidelity_table.py``)."""
    result = load_json(path)
    s = result["settings"]
    return (f"{s['pruning_ratio']:.0%} of the heads removed; importance scored on the first {s['importance_frames']} "
            f"training frames; cosine of the masked backbone's\nfeatures to the full backbone's on "
            f"{s['validation_samples']} validation frames (`{_rel(path)}`, written by `{s['command']}`):\n\n"
            f"{result['table']}\n")


def reproducibility_block(folder: Path) -> str:
    """How far the same study cell moved between two runs, per comparison under ``folder`` (tools/compare_cells.py)."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise RenderError(f"{_rel(folder)}: no comparison; write one with tools/compare_cells.py")
    rows = ["| runs compared | largest difference of any metric, retention or cosine |", "|---|---|"]
    for path in files:
        result = load_json(path)
        value = "0 (identical)" if result["identical"] else f"{result['largest_abs_difference']:.1e}"
        rows.append(f"| {result['what']} (`{_rel(path)}`) | {value} |")
    return "\n".join(rows) + "\n"


def analytic_block() -> str:
    """Analytic speedup ceilings of ORION-L (24 blocks, 640x640) for head and MLP-width choices, from the code."""
    from tools.benchmark_backbone import TEACHER_HIDDEN, orion_l_ceiling

    rows = ["| kept per block | backbone MACs ceiling |", "|---|---|"]
    for heads, hidden in ((12, TEACHER_HIDDEN), (8, TEACHER_HIDDEN), (4, TEACHER_HIDDEN), (8, 2048), (8, 1536),
                          (8, 1365)):
        rows.append(f"| {heads} of 16 heads, MLP {hidden} of {TEACHER_HIDDEN} | "
                    f"{orion_l_ceiling([heads] * 24, [hidden] * 24, 640):.3f}x |")
    windows = [i for i in range(24) if i % 3 != 2]
    for heads, hidden, removed in ((8, 1365, 8), (8, 1024, 6)):  # the first window blocks removed
        kept = [i not in windows[:removed] for i in range(24)]
        ceiling = orion_l_ceiling([heads * k for k in kept], [hidden * k for k in kept], 640)
        rows.append(f"| {heads} of 16 heads, MLP {hidden}, {removed} of 24 blocks removed (window blocks) | "
                    f"{ceiling:.3f}x |")
    return "\n".join(rows) + "\n"


PARETO = DOCS / "pareto" / "sweep.json"
NO_PARETO = ("No Pareto sweep is committed yet: run `python tools/pareto_sweep.py --jobs 2 --publish docs/pareto`, "
             "then `python tools/render_results.py`.\n")


def _sweep(path: Path) -> Mapping[str, Any]:
    """docs/pareto/sweep.json, checked (``tools/pareto_report.check_sweep``); a wrong file is one RenderError."""
    from tools.pareto_report import check_sweep

    try:
        return check_sweep(load_json(path), _rel(path))
    except ValueError as err:
        raise RenderError(str(err)) from None


def pareto_block(path: Path) -> str:
    """The Pareto sweep for docs/results.md: command, plot, table, the targets in plain words, paired verdicts."""
    if not path.exists():
        return NO_PARETO
    sweep = _sweep(path)
    s = sweep["settings"]
    it = sweep.get("iterative") or {}
    iterative = [line for line in sweep["verdicts"] if ", iterative vs " in line]
    others = [line for line in sweep["verdicts"] if line not in iterative]
    text = (f"Command (`{_rel(path)}`, with `pareto.png` and `report.md` beside it):\n\n```bash\n{s['command']}\n"
            f"```\n\n{s['epochs']} epoch(s) of {s['frames']} frames per KD run ({s['iterations']} iterations), seeds "
            f"{', '.join(str(x) for x in s['seeds'])}; importance on the first {s['importance_frames']} training "
            f"frames (heads and channels: {s['importance']['heads']}, blocks: {s['importance']['blocks']}); speedups "
            f"measured on this machine's CPU ({s['timing']['environment']['cpu_model']}, {s['timing']['threads']} "
            f"thread(s), {s['timing']['rounds']} alternating rounds on {s['timing']['batch']} images); the command "
            f"took {s['seconds'] / 60:.1f} min for {s['cells_run']} KD runs, {s['jobs']} at a time.\n\n"
            f"![speed / accuracy front](pareto/pareto.png)\n\n{sweep['table']}\n\nAgainst the targets:\n\n"
            + "\n".join(f"- {h['sentence']} {h['side_by_side']}" for h in sweep["headline"])
            + "\n\nPaired comparisons (A minus B per "
            "seed; 'ahead' or 'behind' when the mean difference lies more than 2 standard errors from 0, else 'not "
            "separable'; retentions in percentage points):\n\n" + "\n".join(others) + "\n")
    if it:
        text += (f"\nOne-shot against iterative pruning at {it['target']:g}x ({it['family']}): stage 1 keeps the "
                 f"selection for {it['intermediate_target']:.2f}x widened to hold the final one, {it['stage_frames']} "
                 f"frames of KD; stage 2 prunes that student to the final selection and trains {it['stage_frames']} "
                 f"more frames; one-shot trains the final selection for all {s['frames']}.\n\n"
                 + ("\n".join(iterative) or "- no paired seeds") + "\n")
    return text


def pareto_summary(path: Path) -> str:
    """The Pareto sweep for README_KD.md: the plot and, per headline budget, the best selection against its target."""
    if not path.exists():
        return NO_PARETO
    sweep = _sweep(path)
    measured = {(g["family"], g["target"]): (g.get("measured_speedup") or {}).get("median") for g in sweep["groups"]
                if g["schedule"] == "oneshot"}

    def speed(h: Mapping[str, Any]) -> str:
        value = measured.get((h["best_family"], h["target"]))
        return "not timed" if value is None else f"measured {value:.2f}x"

    parts = [f"at the {h['target']:g}x budget ({speed(h)}) "
             f"{h['best_worst']['mean']:.1%} (target {h['threshold']:.0%}: "
             + ("met)" if h["met"] else f"missed by {h['miss_pp']:.1f} points)") for h in sweep["headline"]]
    text = ("Worst headline metric kept by the best selection, mean of the seeds:\n" + "; ".join(parts)) if parts \
        else "No 2x or 3x budget in the sweep"
    return ("![speed against accuracy: worst retention after KD against measured speedup, per family]"
            f"(docs/pareto/pareto.png) {text}; [details](docs/results.md#the-pareto-front).\n")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


NO_DEMO = ("No demo report is committed yet: run `python demo_kd_50_pruning.py`, copy "
           "`work_dirs/demo_kd_50_pruning/report.json` to `docs/demo/report.json`, then `python tools/render_results.py`.\n")


def _demo(render: Callable[[Mapping[str, Any]], str]) -> Callable[[], str]:
    """A demo block: the table from docs/demo/report.json, or where to get it when no report is committed."""
    return lambda: render(load_json(DEMO_REPORT)) if DEMO_REPORT.exists() else NO_DEMO


def renderers() -> Dict[str, Dict[str, Callable[[], str]]]:
    """Which blocks each generated file holds, and how each is rendered."""
    return {
        "docs/results.md": {
            "demo": _demo(demo_block),
            "teacher": lambda: teacher_block(load_json(DOCS / "tiny_teacher_curve.json")),
            "analytic": analytic_block,
            "bench": lambda: bench_block(DOCS / "bench"),
            "study": lambda: study_block(DOCS / "kd_study"),
            "study-joint": lambda: study_block(DOCS / "kd_study_joint"),
            "joint-speed": lambda: joint_speed_block(DOCS / "kd_study_joint" / "joint_speed_r0.5.json"),
            "pareto": lambda: pareto_block(PARETO),
        },
        "README.md": {"demo": _demo(lambda report: "```\n" + demo_table(report) + "\n```\n"),
                      "reproducibility": lambda: reproducibility_block(DOCS / "reproducibility")},
        "README_KD.md": {"fidelity": lambda: fidelity_block(DOCS / "head_importance" / "fidelity.json"),
                         "pareto": lambda: pareto_summary(PARETO)},
        "docs/prune_to_budget.md": {"orion-l": lambda: budget_block(DOCS / "bench" / Path(BUDGET_BENCH).name)},
    }


def render_file(path: Path, blocks: Mapping[str, Callable[[], str]]) -> str:
    """The file's text with every generated block rendered anew."""
    return replace_blocks(path.read_text(), {name: make() for name, make in blocks.items()}, _rel(path))


def run(check: bool, targets: Optional[Mapping[str, Mapping[str, Callable[[], str]]]] = None) -> List[str]:
    """Render (or, with ``check``, compare) every target; return the files that changed or would change."""
    from mmcv.models.utils.checkpoint_io import atomic_write_text

    changed = []
    for rel, blocks in (targets or renderers()).items():
        path = ROOT / rel
        new = render_file(path, blocks)
        if new != path.read_text():
            changed.append(rel)
            if not check:
                atomic_write_text(path, new)
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    try:
        changed = run(args.check)
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check and changed:
        print(f"out of date: {', '.join(changed)}; run: python tools/render_results.py", file=sys.stderr)
        return 1
    print(("up to date: " if args.check or not changed else "rewrote: ") + ", ".join(changed or list(renderers())))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
