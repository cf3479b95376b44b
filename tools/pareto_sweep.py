"""The speed / accuracy front of the miniature world: retention after KD against measured speedup, per family.

    python tools/pareto_sweep.py --quick                        # 2x only, 3 seeds, 128 frames: about 2 min on 2 cores
    python tools/pareto_sweep.py --jobs 2 --publish docs/pareto # the full sweep (docs/pareto/, docs/results.md)

For each target speedup (default 1.3 1.6 2 2.5 3) and family, the budget (``tools/head_pruning/budget.py``)
chooses what the student keeps from the shipped teacher's importance, scored on the first training frames
(heads and SwiGLU channels: gradient; blocks: the KD-loss increase when the block is skipped): ``heads``
(heads only), ``heads_width`` (heads + channels), ``heads_width_depth`` (heads + channels + blocks), and
``random`` (the per-block counts and removed-block count of the ``heads_width_depth`` choice, units drawn by
seed). A family that cannot reach a target is recorded with its fastest reachable speedup. Every selection's
backbone is timed against the teacher's (alternating rounds on one validation batch, every round kept) before
any training starts; then every (family, target, seed) is trained by one KD run with the settings of
``tools/kd_study.py``'s kd cells (reused: the study's teacher, data, config writer, workers) and judged on the
validation frames. At the highest target the last family is also pruned iteratively (to the square root of
the target, half the iterations of KD, pruned further to the target, the other half) and compared with the
one-shot run of the same final selection at equal iterations, paired by seed. Finished cells are skipped on a
rerun. Writes ``sweep.json``, ``pareto.png`` and ``report.md`` (``tools/pareto_report.py``) into ``--out``,
and with ``--publish DIR`` into DIR too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

from tools.pareto_select import FAMILIES, FAMILY_AXES, RANDOM_MATCHES, Choice  # noqa: E402

TARGETS = (1.3, 1.6, 2.0, 2.5, 3.0)
ITERATIVE_FAMILY = "heads_width_depth"
QUICK = dict(targets=[2.0], seeds=[0, 1, 2], frames=128, epochs=1, timing_rounds=7)
#: Stage 2 of the iterative schedule trains on another slice of the training split (its world seed), so that
#: both schedules see as many distinct training frames.
STAGE2_DATA_SEED = 1
BATCH, SCENE_LEN = 8, 8  # samples_per_gpu and scene_len of orion_tiny_train.py


@dataclass(frozen=True)
class SweepCell:
    """One KD run of the sweep; ``kd_study.write_cell_config`` reads ``name``, ``training``, ``alpha``,
    ``label_fraction`` (a kd cell of the study: the config's alpha schedule, every label)."""

    family: str
    target: float
    seed: int
    config: str  # the selection's name (its file: <out>/configs/<config>.json)
    digest: str  # of the selection: a finished cell with another one is run again
    schedule: str = "oneshot"  # or "iterative"
    intermediate: Optional[str] = None  # iterative: the selection of stage 1

    training = "kd"
    alpha = None
    label_fraction = 1.0

    @property
    def name(self) -> str:
        return f"{self.family}_t{self.target:g}_{self.schedule}_s{self.seed}"


def digest_of(config: Any) -> str:
    """A short hash of what a selection keeps (blocks, heads, channels), not of how it was chosen."""
    payload = dict(heads=config.selected_heads_per_layer, channels=getattr(config, "selected_channels_per_layer", None),
                   blocks=getattr(config, "selected_blocks", None))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- importance and selections


def score_importance(study: Any) -> Dict[str, Any]:
    """Heads and channels (gradient) and blocks (KD-loss increase) of the teacher, on the first training frames."""
    from tools.pareto_select import block_importance

    importances = dict(heads=study.importance("heads", "gradient", 0),
                       channels=study.importance("channels", "gradient", 0))
    importances["blocks"] = block_importance(study.teacher, study.importance_loader, study.cfg.model)
    folder = study.out / "importance"
    folder.mkdir(parents=True, exist_ok=True)
    for unit, importance in importances.items():
        if callable(getattr(importance, "save", None)):
            importance.save(folder / f"{unit}.json")
    return importances


def unit_costs_for(study: Any, cost: str, rounds: int) -> Any:
    """None for the analytic MAC model; ``measured``: per-unit latencies of this machine (kept in the folder)."""
    if cost == "analytic":
        return None
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent
    from mmcv.models.utils.pruning_cost import UnitCosts
    from tools.pareto_select import measured_unit_costs

    path = study.out / "unit_costs.json"
    if path.is_file() and UnitCosts.load(path).metadata.get("repeats") == rounds:
        return UnitCosts.load(path)
    base = {k: v for k, v in dict(study.cfg.model.img_backbone).items() if k != "type"}
    backbone = study.teacher.img_backbone

    def make(heads: int, hidden: int) -> Any:
        return EVAViTStudent(**dict(base, num_heads=heads, mlp_hidden=hidden)).eval()

    image = next(iter(study.loader))["img"].flatten(0, 1)
    costs = measured_unit_costs(make, image, backbone.teacher_num_heads, backbone.teacher_mlp_hidden, rounds)
    costs.save(path)
    return costs


def make_choices(targets: Sequence[float], families: Sequence[str], seeds: Sequence[int],
                 importances: Mapping[str, Any], geometry: Mapping[str, Any], unit_costs: Any = None) -> List[Choice]:
    """Every family's selection at every target (random: one per seed, with the counts of RANDOM_MATCHES)."""
    from tools.pareto_select import budget_choice, random_like

    choices: List[Choice] = []
    for target in targets:
        chosen = {f: budget_choice(f, target, importances, geometry, unit_costs) for f in FAMILY_AXES
                  if f in families or (f == RANDOM_MATCHES and "random" in families)}
        choices += [chosen[f] for f in FAMILY_AXES if f in families]
        if "random" not in families:
            continue
        matched = chosen[RANDOM_MATCHES]
        for seed in seeds:
            if matched.reachable:
                choices.append(Choice("random", target, config=random_like(matched.config, seed, target), seed=seed))
            else:
                choices.append(Choice("random", target, fastest_reachable=matched.fastest_reachable, seed=seed,
                                      note=f"the {RANDOM_MATCHES} selection it copies is out of reach"))
    for choice in choices:
        if choice.reachable:
            choice.config.metadata.update(family=choice.family, target=choice.target, name=choice.name)
    return choices


def intermediate_choice(final: Choice, importances: Mapping[str, Any], geometry: Mapping[str, Any],
                        unit_costs: Any = None) -> Choice:
    """Stage 1 of the iterative schedule: the budget's choice at sqrt(target), widened to hold the final one
    (so stage 2 only removes units, and both schedules end with the same student architecture)."""
    from tools.pareto_select import budget_choice, is_subselection, union

    target = math.sqrt(final.target)
    part = budget_choice(final.family, target, importances, geometry, unit_costs)
    if not part.reachable:
        raise ValueError(f"iterative schedule: {final.family} cannot reach {target:.3g}x ({part.note})")
    config = part.config if is_subselection(final.config, part.config) else union(part.config, final.config)
    choice = Choice(final.family, round(target, 4), config=config, predicted_speedup=part.predicted_speedup,
                    note=f"stage 1 of the iterative schedule to {final.target:g}x", details=dict(role="intermediate"))
    config.metadata.update(family=final.family, target=choice.target, name=f"{final.name}_intermediate")
    return choice


def save_choices(out: Path, choices: Sequence[Choice], analytic: Mapping[str, float]) -> List[Dict[str, Any]]:
    """Each selection's file under ``<out>/configs`` and its record for sweep.json."""
    from tools.pareto_select import describe

    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for choice in choices:
        name = choice.config.metadata["name"] if choice.reachable else choice.name
        record = dict(name=name, family=choice.family, target=choice.target, seed=choice.seed,
                      reachable=choice.reachable, predicted_speedup=choice.predicted_speedup,
                      fastest_reachable=choice.fastest_reachable, note=choice.note,
                      role=choice.details.get("role", "sweep"))
        if choice.reachable:
            choice.config.save(folder / f"{name}.json")
            record.update(config_file=f"configs/{name}.json", digest=digest_of(choice.config),
                          analytic_speedup=analytic.get(name), kept=describe(choice.config))
        records.append(record)
    return records


# --------------------------------------------------------------------------- measured speed


def student_backbone(study: Any, config: Any) -> Any:
    """The tiny KD config's student backbone keeping ``config``'s selection, filled from the teacher (eval)."""
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent

    kwargs = {k: v for k, v in dict(study.cfg.model.img_backbone).items() if k != "type"}
    kwargs.update(config.to_model_kwargs())
    if getattr(config, "selected_blocks", None) is not None:
        kwargs["selected_blocks"] = list(config.selected_blocks)
    backbone = EVAViTStudent(**kwargs)
    backbone.load_from_teacher(study.teacher.img_backbone.state_dict())
    return backbone.eval()


def measure_speed(study: Any, config: Any, image: Any, rounds: int) -> Dict[str, Any]:
    """Teacher and student backbones in alternating rounds on ``image``: every round, per-round ratios,
    the speedup of the median times, the analytic (MAC) ceiling and the conditions of the run."""
    import torch

    from tools.bench_record import environment, rounds_record
    from tools.benchmark_backbone import time_alternating

    teacher, student = study.teacher.img_backbone.eval(), student_backbone(study, config)
    with torch.no_grad():
        times = time_alternating({"teacher": lambda: teacher(image), "student": lambda: student(image)}, rounds, 2,
                                 image.device)
    median = {name: statistics.median(values) for name, values in times.items()}
    hw = tuple(image.shape[-2:])
    record = rounds_record(times, {"speedup": ("teacher", "student")})
    record.update(speedup=median["teacher"] / median["student"], median_s=median, rounds=rounds,
                  batch=int(image.shape[0]), analytic_speedup=teacher.analytic_macs(hw) / student.analytic_macs(hw),
                  digest=digest_of(config), environment=environment())
    return record


def measure_all(study: Any, configs: Mapping[str, Any], rounds: int) -> Dict[str, Dict[str, Any]]:
    """Every selection timed (before any training runs beside it); a folder keeps its timings for the same
    selection and number of rounds (``<out>/speed``)."""
    from mmcv.models.utils.checkpoint_io import atomic_write_json

    folder = study.out / "speed"
    folder.mkdir(parents=True, exist_ok=True)
    image = next(iter(study.loader))["img"].flatten(0, 1)
    speed = {}
    for name, config in configs.items():
        path = folder / f"{name}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if (cached.get("digest"), cached.get("rounds")) != (digest_of(config), rounds):
            cached = measure_speed(study, config, image, rounds)
            atomic_write_json(path, cached)
        speed[name] = cached
        print(f"  {name}: measured {cached['speedup']:.3f}x (rounds {cached['ratio_spread']['speedup']['min']:.2f}-"
              f"{cached['ratio_spread']['speedup']['max']:.2f}), analytic {cached['analytic_speedup']:.3f}x",
              flush=True)
    return speed


# --------------------------------------------------------------------------- one KD run


def _train(study: Any, cell: SweepCell, config_name: str, frames: int, stage: str,
           extra_lines: Sequence[str] = ()) -> Path:
    """One KD run of ``cell`` on selection ``config_name``; the exported student's path."""
    from tools.demo_support import train_kd
    from tools.kd_study import write_cell_config

    cell_dir = study.out / "cells" / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    pruning = study.out / "configs" / f"{config_name}.json"
    # a budgeted selection is not uniform per block: its counts, not a ratio, say what it keeps
    config = write_cell_config(cell, cell_dir, pruning, study, frames=frames, stage=stage,
                               extra_kd=dict(pruning_ratio=None, mlp_pruning_ratio=None), extra_lines=extra_lines)
    train_kd(config, cell_dir / f"{stage}train", cell.seed)
    return cell_dir / f"{stage}train" / "student_pruned.pth"


def narrowed_checkpoint(exported: Path, config_path: Path, path: Path) -> Path:
    """The exported student of stage 1 pruned further to ``config_path``'s selection (its own weights), as a
    checkpoint for stage 2's ``load_from``."""
    from mmcv.models.utils.checkpoint_io import atomic_torch_save, load_checkpoint_file
    from mmcv.models.utils.pruning_config import PruningConfig
    from tools.demo_support import load_exported_student
    from tools.pareto_select import narrow_student

    ckpt = load_checkpoint_file(exported)
    student = load_exported_student(exported)
    backbone, cfg = narrow_student(student.img_backbone, ckpt["meta"]["img_backbone"], PruningConfig.load(config_path))
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("img_backbone.")}
    state.update({f"img_backbone.{k}": v for k, v in backbone.state_dict().items()})
    atomic_torch_save(dict(meta=dict(ckpt["meta"], img_backbone=cfg), state_dict=state), path)
    return path


def run_sweep_cell(study: Any, cell: SweepCell) -> Dict[str, Any]:
    """Train (one-shot, or the two stages of the iterative schedule), evaluate, return the cell's record."""
    import torch

    from mmcv.datasets.chat_b2d_metrics import evaluate
    from mmcv.models.utils.pruning_config import PruningConfig
    from tools.demo_support import backbone_similarity, load_exported_student, retained
    from tools.pareto_select import describe

    started = time.time()
    torch.manual_seed(cell.seed)
    if cell.schedule == "oneshot":
        exported = _train(study, cell, cell.config, study.frames, "")
        stages = [dict(config=cell.config, frames=study.frames)]
    else:
        half = study.frames // 2
        first = _train(study, cell, cell.intermediate, half, "stage1_")
        load = narrowed_checkpoint(first, study.out / "configs" / f"{cell.config}.json",
                                   study.out / "cells" / cell.name / "stage1_narrowed.pth")
        exported = _train(study, cell, cell.config, half, "stage2_",
                          [f"data = dict(train=dict(seed={STAGE2_DATA_SEED}))", f"load_from = {str(load)!r}"])
        stages = [dict(config=cell.intermediate, frames=half), dict(config=cell.config, frames=half,
                                                                    train_data_seed=STAGE2_DATA_SEED)]
    student = load_exported_student(exported)
    metrics = evaluate(student, study.val_set)
    similarity = backbone_similarity(study.teacher.img_backbone, student.img_backbone, study.loader, 8)
    kept = describe(PruningConfig.load(study.out / "configs" / f"{cell.config}.json"))
    return dict(asdict(cell), name=cell.name, metrics=metrics, retained=retained(metrics, study.teacher_metrics),
                backbone_cosine=similarity["cosine"], kept=kept, stages=stages, epochs=study.epochs,
                frames=study.frames, iterations=study.epochs * study.frames // BATCH,
                backbone_params=sum(p.numel() for p in student.img_backbone.parameters()),
                seconds=round(time.time() - started, 1))


# --------------------------------------------------------------------------- the sweep


def build_cells(choices: Sequence[Choice], seeds: Sequence[int], iterative: Optional[Dict[str, Any]]
                ) -> List[SweepCell]:
    """One one-shot cell per reachable selection and seed (random: its own seed), plus the iterative cells."""
    cells = []
    for choice in choices:
        if not choice.reachable:
            continue
        name, digest = choice.config.metadata["name"], digest_of(choice.config)
        for seed in ([choice.seed] if choice.seed is not None else seeds):
            cells.append(SweepCell(choice.family, choice.target, seed, name, digest))
    if iterative:
        cells += [SweepCell(iterative["family"], iterative["target"], seed, iterative["final"], iterative["digest"],
                            "iterative", iterative["intermediate"]) for seed in seeds]
    return cells


def plan_iterative(args: argparse.Namespace, choices: Sequence[Choice], importances: Mapping[str, Any],
                   geometry: Mapping[str, Any], unit_costs: Any) -> Optional[Dict[str, Any]]:
    """The iterative schedule at the highest target, when its family reaches it (else None, said in a line)."""
    if args.no_iterative:
        return None
    top = max(args.targets)
    final = next((c for c in choices if c.family == args.iterative_family and c.target == top), None)
    if final is None or not final.reachable:
        print(f"iterative schedule skipped: {args.iterative_family} does not reach {top:g}x", flush=True)
        return None
    mid = intermediate_choice(final, importances, geometry, unit_costs)
    return dict(family=final.family, target=top, final=final.config.metadata["name"], digest=digest_of(final.config),
                intermediate=mid.config.metadata["name"], intermediate_target=mid.target, choice=mid,
                stage_frames=args.frames // 2, stage2_train_data_seed=STAGE2_DATA_SEED)


def finished(out: Path, cell: SweepCell, epochs: int, frames: int) -> Optional[Dict[str, Any]]:
    """A cell's record from an earlier run with the same selection, epochs and frames, else None."""
    path = out / "cells" / f"{cell.name}.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    same = (record.get("epochs"), record.get("frames"), record.get("digest")) == (epochs, frames, cell.digest)
    return record if same else None


def run_sweep(args: argparse.Namespace) -> Dict[str, Any]:
    """Choose, time, train every unfinished cell, then write sweep.json, pareto.png and report.md."""
    from tqdm import tqdm

    from mmcv.models.utils.checkpoint_io import atomic_write_json
    from tools.head_pruning.sites import describe_backbone
    from tools.kd_study import Study, record_command, run_cells
    from tools.pareto_report import build_payload, write_outputs

    out, started = Path(args.out), time.time()
    study = Study(out, args.epochs, args.frames, args.threads)
    importances = score_importance(study)
    geometry = describe_backbone(study.teacher.img_backbone)
    unit_costs = unit_costs_for(study, args.cost, args.timing_rounds)
    choices = make_choices(args.targets, args.families, args.seeds, importances, geometry, unit_costs)
    iterative = plan_iterative(args, choices, importances, geometry, unit_costs)
    timed = [c for c in choices if c.reachable] + ([iterative["choice"]] if iterative else [])
    print(f"timing {len(timed)} selections against the teacher ({args.timing_rounds} alternating rounds each)",
          flush=True)
    speed = measure_all(study, {c.config.metadata["name"]: c.config for c in timed}, args.timing_rounds)
    records = save_choices(out, choices + ([iterative["choice"]] if iterative else []),
                           {name: s["analytic_speedup"] for name, s in speed.items()})
    cells = build_cells(choices, args.seeds, iterative)
    earlier = {c: finished(out, c, args.epochs, args.frames) for c in cells}
    done = [r for r in earlier.values() if r]
    todo = [c for c, r in earlier.items() if r is None]
    bar = tqdm(total=len(todo), desc="pareto_sweep", unit="cell")
    for record in run_cells(study, todo, args.jobs, runner=run_sweep_cell):
        atomic_write_json(out / "cells" / f"{record['name']}.json", record)
        done.append(record)
        bar.set_postfix_str(record["name"])
        bar.update()
    bar.close()
    command = " && ".join(record_command(out, "python tools/pareto_sweep.py " + " ".join(args.argv)))
    info = dict(settings(args, study, command, speed, iterative), cells_run=len(todo),
                seconds=round(time.time() - started, 1))  # this invocation's wall time (cells run: cells_run)
    payload = build_payload(done, records, speed, study.teacher_metrics, info, _public(iterative))
    for folder in [out] + ([Path(args.publish)] if args.publish else []):
        write_outputs(payload, folder)
    return payload


def _public(iterative: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    return None if iterative is None else {k: v for k, v in iterative.items() if k != "choice"}


def settings(args: argparse.Namespace, study: Any, command: str, speed: Mapping[str, Mapping[str, Any]],
             iterative: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """How the sweep was run, for sweep.json."""
    from tools.bench_record import environment
    from tools.demo_support import IMPORTANCE_FRAMES

    return dict(command=command, targets=list(args.targets), seeds=list(args.seeds), families=list(args.families),
                epochs=args.epochs, frames=args.frames, iterations=args.epochs * args.frames // BATCH,
                threads=args.threads, jobs=args.jobs, importance_frames=IMPORTANCE_FRAMES,
                importance=dict(heads="gradient", channels="gradient", blocks="kd_loss"), cost=args.cost,
                validation_frames=len(study.val_set), teacher=os.path.relpath(study.teacher_path, ROOT),
                timing=dict(rounds=args.timing_rounds, batch=next((s["batch"] for s in speed.values()), None),
                            threads=args.threads, environment=environment()),
                iterative=_public(iterative) or {})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work_dirs/pareto_sweep", help="sweep folder (rerun: finished cells skipped)")
    parser.add_argument("--publish", help="also write sweep.json, pareto.png and report.md here (e.g. docs/pareto)")
    parser.add_argument("--quick", action="store_true",
                        help="2x only, 3 seeds, 1 epoch of 128 frames, 7 timing rounds (tests and a first look)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="target speedups (> 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (at least 3)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--epochs", type=int, default=1, help="KD epochs per run (as the study's kd cells)")
    parser.add_argument("--frames", type=int, default=512,
                        help=f"training frames per epoch (multiple of {2 * BATCH}: the iterative schedule's two "
                             f"stages train on half each)")
    parser.add_argument("--timing-rounds", type=int, default=21, help="alternating teacher/student rounds per selection")
    parser.add_argument("--cost", choices=("analytic", "measured"), default="analytic",
                        help="the budget's cost model: analytic MACs, or per-unit latency measured here first")
    parser.add_argument("--iterative-family", choices=list(FAMILY_AXES), default=ITERATIVE_FAMILY,
                        help="family pruned iteratively at the highest target")
    parser.add_argument("--no-iterative", action="store_true", help="skip the one-shot vs iterative comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=None, help="KD runs at once, each in its own process "
                                                               "(default: 2, or 1 on a 1-core machine)")
    from tools.kd_study import parse_with_quick

    args = parse_with_quick(parser, argv, QUICK)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear error per bad option (parser.error exits with status 2)."""
    if len(set(args.seeds)) < 3:
        parser.error(f"--seeds: at least 3 different seeds (paired verdicts), got {args.seeds}")
    bad = [t for t in args.targets if not t > 1.0]
    if bad:
        parser.error(f"--targets are speedups over the teacher, > 1; got {bad}")
    if "random" in args.families and RANDOM_MATCHES not in args.families:
        parser.error(f"--families: random copies the counts of {RANDOM_MATCHES}; name both")
    if args.frames < 2 * BATCH * SCENE_LEN or args.frames % (2 * BATCH):
        parser.error(f"--frames must be a multiple of {2 * BATCH} and >= {2 * BATCH * SCENE_LEN} (each of the "
                     f"iterative schedule's two stages needs one {SCENE_LEN}-frame scene per batch slot), got "
                     f"{args.frames}")
    if args.epochs < 1 or args.timing_rounds < 3 or args.threads < 1:
        parser.error(f"--epochs and --threads must be >= 1 and --timing-rounds >= 3, got {args.epochs}, "
                     f"{args.threads}, {args.timing_rounds}")
    if args.jobs is None:
        args.jobs = min(2, os.cpu_count() or 1)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    payload = run_sweep(args)
    print(payload["table"])
    for line in payload["headline"]:
        print(line["sentence"])
    print(f"\nwrote {Path(args.out) / 'sweep.json'}, pareto.png, report.md ({len(payload['cells'])} cells)"
          + (f"; published to {args.publish}" if args.publish else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
