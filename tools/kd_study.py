"""The ablation study of the miniature world: does distillation recover what pruning removes?

    python tools/kd_study.py --quick                      # 3 seeds, 50% only, 18 cells (under 5 min on 2 idle cores)
    python tools/kd_study.py                              # the default grid (README_KD.md "Miniature world results")
    python tools/kd_study.py --seeds 0 1 2 --ratios 0.5 0.75 --selections magnitude gradient random \\
        --trainings none kd task_only --label-fractions 1.0 0.1 --alphas 1.0 --modes heads joint

A cell is one (seed, pruning ratio, head selection, training, alpha, label fraction, pruning mode). Its
student is pruned from the shipped teacher (``ckpt/orion_tiny/orion_tiny_teacher.safetensors``) and, unless
``training='none'``, trained through the launcher's entry point (``adzoo/orion/train_kd.py``, the tiny KD
config with the cell's pruning configuration, written per cell), then its exported student is evaluated on
the validation scenes; data-driven importance (gradient) is scored on the first 8 training scenes, never on the
frames the students are judged on. ``kd``: the config's alpha schedule (0.8 for the first epoch, then 0.6), or a
constant alpha with ``--alphas``; ``task_only``: alpha = 0 (no distillation); ``none``: the pruned student
as is. ``--label-fractions f``: the task loss trains through a fixed fraction f of the frames
(``kd_config.label_fraction``); distillation sees them all. ``--modes joint`` also removes 43.75% of the
SwiGLU channels by the same selection (``heads_at_joint_speed``: the heads-only student with the most heads
whose measured speed reaches the joint one's, ``tools/demo_joint.py``). Finished cells are skipped on a rerun
(their JSON under ``<out>/cells``); the outputs cover every cell in ``<out>`` with the same epochs and frames, so
a study can be grown by several invocations (``commands.json`` lists them). Writes ``study.json``, ``study.md``
(mean +- std over seeds; the headline comparisons as paired per-seed differences: ahead, behind or not
separable) and plots (``tools/kd_study_report.py``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

TINY_KD_CONFIG = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_kd_train.py"
SELECTIONS = ("magnitude", "gradient", "random")
TRAININGS = ("none", "kd", "task_only")
MODES = ("heads", "joint", "heads_at_joint_speed")
JOINT_MLP_RATIO = 0.4375  # ORION-L's 2730 -> 1536 SwiGLU channels, as the demo's --joint
QUICK = dict(seeds=[0, 1, 2], ratios=[0.5], selections=["magnitude", "random"], trainings=["none", "kd", "task_only"],
             label_fractions=[1.0], alphas=[], modes=["heads"], epochs=1, frames=256)
BATCH, SCENE_LEN = 8, 8  # samples_per_gpu and scene_len of orion_tiny_train.py


@dataclass(frozen=True)
class Cell:
    """One student of the study."""

    seed: int
    ratio: float
    selection: str
    training: str
    alpha: Optional[float] = None  # None: the config's schedule (kd) / 0 (task_only)
    label_fraction: float = 1.0
    mode: str = "heads"

    @property
    def name(self) -> str:
        alpha = "" if self.alpha is None else f"_a{self.alpha:g}"
        labels = "" if self.label_fraction >= 1.0 else f"_l{self.label_fraction:g}"
        return f"{self.mode}_r{self.ratio:g}_{self.selection}_{self.training}{alpha}{labels}_s{self.seed}"

    @property
    def group(self) -> str:
        """The cell's name without the seed: the row its metrics are averaged into."""
        return self.name.rsplit("_s", 1)[0]


def build_grid(args: argparse.Namespace) -> List[Cell]:
    """Every cell of the grid; ``none`` cells ignore alpha and label fraction (nothing is trained)."""
    cells: List[Cell] = []
    for seed, ratio, selection, mode in itertools.product(args.seeds, args.ratios, args.selections, args.modes):
        for training in args.trainings:
            if training == "none":
                cells.append(Cell(seed, ratio, selection, "none", mode=mode))
                continue
            alphas = [None] + ([a for a in args.alphas] if training == "kd" else [])
            for alpha, fraction in itertools.product(alphas, args.label_fractions):
                cells.append(Cell(seed, ratio, selection, training, alpha, fraction, mode))
    return list(dict.fromkeys(cells))


class Study:
    """The shared state of one study: teacher, data, importance scores, output folder."""

    def __init__(self, out: Path, epochs: int, frames: int, threads: int) -> None:
        import torch

        from mmcv import Config
        from mmcv.datasets import build_dataset
        from mmcv.datasets.chat_b2d_metrics import evaluate
        from tools.demo_support import importance_loader, val_loader
        from tools.train_tiny_teacher import DEFAULT_CHECKPOINT, ensure_tiny_teacher, load_tiny_teacher

        torch.set_num_threads(threads)
        self.out, self.epochs, self.frames, self.threads = out, epochs, frames, threads
        (out / "cells").mkdir(parents=True, exist_ok=True)
        self.teacher_path = ensure_tiny_teacher(DEFAULT_CHECKPOINT, verbose=False)
        self.teacher = load_tiny_teacher(self.teacher_path)
        self.cfg = Config.fromfile(str(TINY_KD_CONFIG))
        self.val_set = build_dataset(self.cfg.data.val)
        self.loader = val_loader(self.val_set, batch_size=8)
        self.importance_loader = importance_loader(self.cfg.data.train)
        self._importance: Dict[Any, Any] = {}
        cached = out / "teacher_metrics.json"
        if cached.is_file():
            self.teacher_metrics = json.loads(cached.read_text())
        else:
            from mmcv.models.utils.checkpoint_io import atomic_write_json
            self.teacher_metrics = evaluate(self.teacher, self.val_set)
            atomic_write_json(cached, self.teacher_metrics)

    def importance(self, unit: str, selection: str, seed: int) -> Any:
        """Head or channel scores of the teacher: magnitude, gradient (the 8 batches of ``importance_loader``, training
        frames) or random (by seed)."""
        import torch

        from tools import head_pruning_utils as hpu

        key = (unit, selection, seed if selection == "random" else None)
        if key not in self._importance:
            if unit == "heads":
                scores = (hpu.compute_head_importance_magnitude(self.teacher) if selection != "gradient" else
                          hpu.compute_head_importance_gradient(self.teacher, self.importance_loader, num_batches=8,
                                                               progress=False))
            else:
                scores = hpu.compute_channel_importance(self.teacher, "magnitude") if selection != "gradient" else \
                    hpu.compute_channel_importance(self.teacher, "gradient", dataloader=self.importance_loader,
                                                   num_batches=8,
                                                   progress=False)
            if selection == "random":
                generator = torch.Generator().manual_seed(1000 + seed)
                random = torch.rand(scores.scores.shape, generator=generator, dtype=torch.float64)
                scores = (hpu.HeadImportance(scores=random, method="random", source="random") if unit == "heads"
                          else type(scores)(scores=random, method="random", source="random",
                                            metadata=dict(scores.metadata)))
            self._importance[key] = scores
        return self._importance[key]


def pruning_config_for(study: Study, cell: Cell, cell_dir: Path) -> Path:
    """The cell's pruning configuration file (heads; with mode 'joint' also SwiGLU channels)."""
    from tools import head_pruning_utils as hpu

    heads = study.importance("heads", cell.selection, cell.seed)
    joint: Dict[str, Any] = {}
    ratio = cell.ratio
    if cell.mode == "joint":
        joint = dict(channel_importance=study.importance("channels", cell.selection, cell.seed),
                     mlp_pruning_ratio=JOINT_MLP_RATIO)
    elif cell.mode == "heads_at_joint_speed":
        ratio = 1.0 - heads_at_joint_speed(study, cell) / heads.scores.shape[1]
    config = hpu.create_pruning_config(heads, pruning_ratio=ratio, strategy="uniform", **joint)
    path = cell_dir / "pruning_config.json"
    config.save(path)
    return path


def heads_at_joint_speed(study: Study, cell: Cell) -> int:
    """Heads per block of the heads-only student whose measured speed reaches the joint student's (cached)."""
    from mmcv import Config
    from mmcv.models.builder import build_model
    from mmcv.models.utils.checkpoint_io import atomic_write_json
    from tools.demo_joint import choose_heads, heads_only_backbones, measure_speedups

    cache = study.out / f"joint_speed_r{cell.ratio:g}.json"
    if cache.is_file():
        return int(json.loads(cache.read_text())["heads"])
    joint_cell = Cell(cell.seed, cell.ratio, "magnitude", "none", mode="joint")
    joint_dir = study.out / "speed_probe"
    joint_dir.mkdir(parents=True, exist_ok=True)
    config = write_cell_config(joint_cell, joint_dir, pruning_config_for(study, joint_cell, joint_dir), study)
    joint = build_model(Config.fromfile(str(config)).model).eval()
    image = next(iter(study.loader))["img"].flatten(0, 1)
    candidates = heads_only_backbones(joint.student_backbone_cfg, joint.img_backbone.teacher_num_heads)
    speed = measure_speedups(study.teacher.img_backbone, joint.img_backbone, candidates, image, repeats=20)
    choice = choose_heads(speed)
    atomic_write_json(cache, dict(choice, joint_speedup=speed["joint_speedup"],
                                  heads_only_speedup=speed["heads_only_speedup"]))
    return int(choice["heads"])


def write_cell_config(cell: Any, cell_dir: Path, pruning_path: Path, study: Study, frames: Optional[int] = None,
                      extra_kd: Optional[Dict[str, Any]] = None, extra_lines: Sequence[str] = (),
                      stage: str = "") -> Path:
    """The tiny KD config with the cell's pruning, alpha, label fraction, epochs and the shipped teacher.

    ``cell``: anything with ``name``, ``training``, ``alpha`` and ``label_fraction`` (a :class:`Cell`, or a
    cell of ``tools/pareto_sweep.py``); ``frames`` (default: the study's), ``extra_kd`` (more kd_config
    keys), ``extra_lines`` (more config lines) and ``stage`` (a prefix of the files and of the ``train``
    folder: one cell, several runs) for the tools that reuse this config.
    """
    from mmcv.models.utils.checkpoint_io import atomic_write_text
    from tools.demo_support import write_kd_config

    train_dir = cell_dir / f"{stage}train"
    base = write_kd_config(TINY_KD_CONFIG, cell_dir / f"{stage}base_config.py", pruning_path,
                           train_dir, frames=study.frames if frames is None else frames, epochs=study.epochs)
    kd: Dict[str, Any] = dict(teacher_backbone_path=str(Path(study.teacher_path).resolve()),
                              label_fraction=cell.label_fraction)
    if cell.training == "task_only":
        kd.update(alpha_schedule="constant", distillation_alpha=0.0)
    elif cell.alpha is not None:
        kd.update(alpha_schedule="constant", distillation_alpha=cell.alpha)
    kd.update(extra_kd or {})
    lines = [f"# Written by tools/kd_study.py for cell {cell.name}.", f"_base_ = [{str(base.resolve())!r}]",
             f"model = dict(kd_config=dict(**{kd!r}))", *extra_lines,
             f"work_dir = {str(train_dir)!r}", ""]
    return Path(atomic_write_text(cell_dir / f"{stage}config.py", "\n".join(lines)))


def run_cell(study: Study, cell: Cell) -> Dict[str, Any]:
    """Prune, train (unless 'none') through adzoo/orion/train_kd.py, evaluate; the cell's record."""
    import torch

    from mmcv import Config
    from mmcv.datasets.chat_b2d_metrics import evaluate
    from mmcv.models.builder import build_model
    from tools.demo_support import backbone_similarity, load_exported_student, retained, train_kd

    cell_dir = study.out / "cells" / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    config = write_cell_config(cell, cell_dir, pruning_config_for(study, cell, cell_dir), study)
    torch.manual_seed(cell.seed)
    if cell.training == "none":
        student = build_model(Config.fromfile(str(config)).model).eval()
        backbone = student.img_backbone
    else:
        train_kd(config, cell_dir / "train", cell.seed)
        student = load_exported_student(cell_dir / "train" / "student_pruned.pth")
        backbone = student.img_backbone
    metrics = evaluate(student, study.val_set)
    similarity = backbone_similarity(study.teacher.img_backbone, backbone, study.loader, 8)
    return dict(cell=asdict(cell), name=cell.name, group=cell.group, metrics=metrics,
                retained=retained(metrics, study.teacher_metrics), backbone_cosine=similarity["cosine"],
                num_heads=list(backbone.num_heads_per_layer) if hasattr(backbone, "num_heads_per_layer") else None,
                backbone_params=sum(p.numel() for p in backbone.parameters()), epochs=study.epochs,
                frames=study.frames, seconds=round(time.time() - started, 1))


def run_study(args: argparse.Namespace) -> Dict[str, Any]:
    """Run every unfinished cell (tqdm progress), then write study.json, study.md and the plots."""
    from tqdm import tqdm

    from mmcv.models.utils.checkpoint_io import atomic_write_json
    from tools.kd_study_report import write_study_outputs

    out = Path(args.out)
    study = Study(out, args.epochs, args.frames, args.threads)
    records: List[Dict[str, Any]] = []
    todo: List[Cell] = []
    for cell in build_grid(args):
        path = out / "cells" / f"{cell.name}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        if (record.get("epochs"), record.get("frames")) == (args.epochs, args.frames):
            records.append(record)
        else:
            todo.append(cell)
    for cell in todo:  # the speed probe times backbones: once, here, before any cell trains beside it
        if cell.mode == "heads_at_joint_speed":
            heads_at_joint_speed(study, cell)
    bar = tqdm(total=len(todo), desc="kd_study", unit="cell")
    for record in run_cells(study, todo, args.jobs):
        atomic_write_json(out / "cells" / f"{record['name']}.json", record)
        records.append(record)
        bar.set_postfix_str(record["name"])
        bar.update()
    bar.close()
    commands = record_command(out, "python tools/kd_study.py " + " ".join(args.argv))
    names = {r["name"] for r in records}
    for path in sorted((out / "cells").glob("*.json")):  # cells of earlier invocations into the same folder
        record = json.loads(path.read_text())
        if record["name"] not in names and (record.get("epochs"), record.get("frames")) == (args.epochs, args.frames):
            records.append(record)
    return write_study_outputs(records, study.teacher_metrics, out, settings=dict(
        command=" && ".join(commands), epochs=args.epochs, frames=args.frames, threads=args.threads,
        teacher=os.path.relpath(study.teacher_path, ROOT)))


def run_cells(study: Study, cells: Sequence[Any], jobs: int,
              runner: Callable[[Study, Any], Dict[str, Any]] = run_cell) -> Iterator[Dict[str, Any]]:
    """Each cell's record as it finishes: in this process, or in ``jobs`` worker processes (``--threads`` each).

    Every cell seeds its own training, so a cell's result does not depend on ``jobs`` or on the order.
    Workers are spawned (not forked from a process that has run torch) and build their own Study.
    ``runner`` (a module-level function, default :func:`run_cell`) trains and evaluates one cell.
    """
    if jobs <= 1 or len(cells) <= 1:
        for cell in cells:
            yield runner(study, cell)
        return
    import functools
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(min(jobs, len(cells)), initializer=_start_worker,
                      initargs=(str(study.out), study.epochs, study.frames, study.threads)) as pool:
        yield from pool.imap_unordered(functools.partial(_run_cell_in_worker, runner), cells)


_WORKER_STUDY: Optional[Study] = None


def _start_worker(out: str, epochs: int, frames: int, threads: int) -> None:
    global _WORKER_STUDY
    _WORKER_STUDY = Study(Path(out), epochs, frames, threads)


def _run_cell_in_worker(runner: Callable[[Study, Any], Dict[str, Any]], cell: Any) -> Dict[str, Any]:
    assert _WORKER_STUDY is not None, "kd_study worker used before _start_worker"
    return runner(_WORKER_STUDY, cell)


def record_command(out: Path, command: str) -> List[str]:
    """The commands that filled ``out`` (a study may be grown by several invocations), this one appended."""
    from mmcv.models.utils.checkpoint_io import atomic_write_json

    path = out / "commands.json"
    commands = json.loads(path.read_text()) if path.is_file() else []
    if command not in commands:
        commands.append(command)
        atomic_write_json(path, commands)
    return commands


def parse_with_quick(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                     quick: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv`` (default: the command line), keep it as ``args.argv``, and apply ``quick``'s settings
    when ``--quick`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work_dirs/kd_study", help="study folder (rerun: finished cells skipped)")
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds, 50%%, magnitude vs random, 1 epoch of 256 frames (18 cells, under 5 min on 2 "
                             "idle cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="fractions of heads REMOVED")
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS))
    parser.add_argument("--trainings", nargs="+", choices=TRAININGS, default=list(TRAININGS))
    parser.add_argument("--alphas", type=float, nargs="*", default=[],
                        help="extra kd cells with this constant alpha (1.0: pure distillation, no task loss)")
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[1.0],
                        help="fractions of frames whose labels the task loss may use (trained cells); "
                             "e.g. 1.0 0.1 adds the label-efficiency cells")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["heads"],
                        help="heads; joint (heads + 43.75%% of SwiGLU channels); heads_at_joint_speed")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per cell")
    parser.add_argument("--frames", type=int, default=512,
                        help=f"training frames per epoch (multiple of {BATCH}; 512: 64 iterations, as the demo)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: on 2 shared cores, 2 threads run several times slower)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="cells trained at once, each in its own process (default: 2, or 1 on a 1-core machine); "
                             "results do not depend on it")
    args = parse_with_quick(parser, argv, QUICK)
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            parser.error(f"--ratios are fractions of heads removed, in (0, 1); got {ratio}")
    for value in args.label_fractions + args.alphas:
        if not 0.0 <= value <= 1.0:
            parser.error(f"--label-fractions and --alphas must lie in [0, 1]; got {value}")
    if args.frames < BATCH * SCENE_LEN or args.frames % BATCH:
        parser.error(f"--frames must be a multiple of the batch size {BATCH} and >= {BATCH * SCENE_LEN} (one "
                     f"{SCENE_LEN}-frame scene per batch slot), got {args.frames}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.jobs is None:
        args.jobs = min(2, os.cpu_count() or 1)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    summary = run_study(args)
    print(summary["table"])
    print(f"\nwrote {Path(args.out) / 'study.json'}, study.md and plots ({len(summary['cells'])} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
