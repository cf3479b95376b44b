"""Train the miniature ORION teacher (TinyOrion on SyntheticChatB2D) on CPU; ship it; load it.

    python tools/train_tiny_teacher.py --materialize      # ckpt/orion_tiny/orion_tiny.pth from the shipped teacher
    python tools/train_tiny_teacher.py [--config adzoo/orion/configs/orion_tiny_train.py] [--seed 0]
                                       [--out work_dirs/orion_tiny/orion_tiny_retrained.pth] [--eval-interval N]
    python tools/train_tiny_teacher.py --ship             # retrain and replace the shipped teacher + its curve
    python tools/train_tiny_teacher.py --memory-benefit [--checkpoint ckpt/orion_tiny/orion_tiny.pth]

The repository ships a converged teacher (``ckpt/orion_tiny/orion_tiny_teacher.safetensors`` with its
sha256, ``tools/tiny_teacher_asset.py``; curve in ``docs/tiny_teacher_curve.png``): the default config and
seed 0 with one thread reproduce it (~20 min on 2 cores). It trains in two stages: perception (the whole
model end to end) and language (a fresh VL projector with count tokens and LM on the frozen perception;
``language_stage`` in the config). A retrain is compared with the shipped teacher at the end (identical
weights, or the largest difference and the metrics side by side).
Each stage reads top to bottom: data (batches from ``data.shuffler_sampler``, ORION's
streaming order), model, optimiser and lr schedule (the KD loop's builders), then one loop
that steps, logs (and with ``--eval-interval`` validates); the end evaluates
against the image-blind chance levels and saves an ORION-format checkpoint
(``{'meta', 'state_dict'}``) atomically. The final evaluation streams the validation scenes twice,
with the temporal memory and with the memory reset before every frame, and records both
(``--memory-benefit`` repeats that measurement for an existing checkpoint). The same seed and thread
count (fixed by the config) give the same teacher. ``ensure_tiny_teacher()`` makes a checkpoint ready
(the default path from the shipped teacher, refusing stale files); ``load_tiny_teacher()`` rebuilds the
model from it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if __name__ == "__main__":
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch  # noqa: E402

from adzoo.orion.apis.optim import build_kd_optimizer, build_lr_scheduler  # noqa: E402
from adzoo.orion.apis.step import forward_train, optimizer_step  # noqa: E402
from mmcv import Config, DictAction  # noqa: E402
from mmcv.datasets import build_dataloader, build_dataset, chance_levels, evaluate  # noqa: E402
from mmcv.models import build_model  # noqa: E402
from mmcv.models.utils.checkpoint_io import (atomic_torch_save, atomic_write_json, load_checkpoint_file,  # noqa: E402
                                            state_dict_of)
from mmcv.utils import set_random_seed  # noqa: E402
from tools.metric_direction import HEADLINE_METRICS, higher_is_better  # noqa: E402
from tools.tiny_teacher_asset import (MATERIALIZED_CHECKPOINT, TeacherAssetError, check_materialized,  # noqa: E402
                                      compare_with_shipped, materialize_teacher_checkpoint, plot_curve,
                                      write_shipped_teacher)

DEFAULT_CONFIG = REPO_ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
DEFAULT_CHECKPOINT = MATERIALIZED_CHECKPOINT
RETRAINED_CHECKPOINT = REPO_ROOT / "work_dirs" / "orion_tiny" / "orion_tiny_retrained.pth"
CURVE_JSON = REPO_ROOT / "docs" / "tiny_teacher_curve.json"
SHIP_EVAL_INTERVAL = 200
COUNTS = ("num_samples", "num_light_hidden")
# The convergence curve: the headline metrics and every question type (each must end above chance).
CURVE_METRICS = HEADLINE_METRICS + ("traffic_state_acc", "qa_acc_count_cars", "qa_acc_count_pedestrians",
                                    "qa_acc_light_state", "qa_acc_next_action")
MEMORY_METRICS = ("traffic_state_acc_hidden", "qa_acc_light_state_hidden", "plan_l2_light_hidden",
                  "traffic_state_acc", "qa_acc_light_state", "qa_acc", "plan_l2", "det_f1", "lane_iou")


def format_metrics_table(metrics: Dict[str, float], chance: Dict[str, float]) -> str:
    """Rows ``metric  chance  reached  better?`` for every metric both dicts have."""
    lines = [f"{'metric':<26}{'chance':>10}{'reached':>10}  better than chance"]
    for key in metrics:
        if key not in chance or key in COUNTS:
            continue
        better = metrics[key] > chance[key] if higher_is_better(key) else metrics[key] < chance[key]
        lines.append(f"{key:<26}{chance[key]:>10.3f}{metrics[key]:>10.3f}  {'yes' if better else 'NO'}")
    return "\n".join(lines)


def train_tiny_teacher(config: Union[str, os.PathLike, Config] = DEFAULT_CONFIG, seed: Optional[int] = None,
                       out: Optional[Union[str, os.PathLike]] = None, max_iters: Optional[int] = None,
                       evaluate_at_end: bool = True, verbose: bool = True,
                       eval_interval: Optional[int] = None, language_iters: Optional[int] = None) -> Dict[str, Any]:
    """Train TinyOrion from ``config`` in its two stages; return ``{'model', 'meta', 'losses', 'curve', 'path'}``.

    Stage 1 (perception) trains the whole model, built with ``perception_stage.model_changes``,
    for ``runner.max_iters``. Stage 2 (language, when the config has ``language_stage``) builds
    ``cfg.model``, takes every module but ``language_stage.trained_modules`` from stage 1, freezes
    them in eval mode, switches the grid mask off and trains the fresh modules for
    ``language_stage.max_iters`` with batches of ``language_stage.samples_per_gpu``: end to end, the
    tiny LM learned to count or to answer the rest, never both (README_KD.md, "Counting"). ``out`` None: nothing is written. ``max_iters`` /
    ``language_iters`` override the stage lengths (short runs for tests). ``evaluate_at_end`` False
    skips the validation passes. ``eval_interval`` N: validation every N iterations of either stage
    (``meta['curve']``, iterations counted across the stages).
    """
    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    max_iters = int(cfg.runner["max_iters"] if max_iters is None else max_iters)
    language = dict(cfg.get("language_stage") or {})
    language_iters = int(language.get("max_iters", 0) if language_iters is None else language_iters)
    log = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    set_random_seed(seed)
    train_set, val_set = build_dataset(cfg.data["train"]), build_dataset(cfg.data["val"])
    loader = _loader(train_set, cfg, seed)
    perception_cfg = Config(dict(model=cfg.model))
    perception_cfg.merge_from_dict(dict(model=dict((cfg.get("perception_stage") or {}).get("model_changes") or {})))
    model = _build(perception_cfg.model)
    log(f"[train_tiny_teacher] stage 1 (perception): the whole model, {max_iters} iters")
    stage1 = _train_stage(model, cfg, loader, val_set, seed, max_iters, eval_interval, log, first_iter=0)
    losses, curve, train_time = stage1["losses"], stage1["curve"], stage1["seconds"]
    if language:
        set_random_seed(seed)
        loader = _loader(train_set, cfg, seed, language.get("samples_per_gpu"))
        final = _build(cfg.model)
        trained = tuple(language.get("trained_modules") or ())
        copy_and_freeze(model, final, trained)
        log(f"[train_tiny_teacher] stage 2 (language): {', '.join(trained)} from scratch on the frozen rest, "
            f"no grid mask, {language_iters} iters of {language.get('samples_per_gpu') or cfg.data['samples_per_gpu']}")
        stage2 = _train_stage(final, cfg, loader, val_set, seed, language_iters, eval_interval, log,
                              first_iter=max_iters)
        model, losses, curve = final, losses + stage2["losses"], curve + stage2["curve"]
        train_time += stage2["seconds"]
    log(f"[train_tiny_teacher] trained in {train_time:.1f} s")

    meta: Dict[str, Any] = dict(
        seed=seed, iter=max_iters + (language_iters if language else 0), config=cfg.pretty_text,
        stage_iters=[max_iters] + ([language_iters] if language else []), train_time_s=round(train_time, 2),
        torch_version=str(torch.__version__), num_threads=torch.get_num_threads(),
        time=datetime.datetime.now().isoformat(timespec="seconds"), model_type=cfg.model["type"],
        **(dict(curve=curve) if curve else {}))
    if evaluate_at_end:
        meta.update(validate_with_and_without_memory(model, train_set, val_set,
                                                     (cfg.get("evaluation") or {}).get("max_samples"), log))
    path = None
    if out is not None:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = atomic_torch_save(dict(meta=meta, state_dict=state_dict), out)
        log(f"[train_tiny_teacher] wrote {path}")
    return dict(model=model, meta=meta, losses=losses, curve=curve, path=path)


def _loader(train_set: Any, cfg: Config, seed: int, batch: Optional[int] = None) -> Any:
    return build_dataloader(train_set, int(batch or cfg.data["samples_per_gpu"]), cfg.data.get("workers_per_gpu", 0),
                            seed=seed, shuffler_sampler=cfg.data.get("shuffler_sampler"), drop_last=True)


def _build(model_cfg: Any) -> torch.nn.Module:
    return build_model(model_cfg, train_cfg=model_cfg.get("train_cfg"), test_cfg=model_cfg.get("test_cfg"))


def copy_and_freeze(source: torch.nn.Module, target: torch.nn.Module, trained: Sequence[str]) -> None:
    """Stage 2's start: every top-level module of ``target`` but ``trained`` gets ``source``'s weights
    (strictly) and stops learning (no gradients, eval mode under ``train()``); the grid mask goes off."""
    names = [name for name, _ in target.named_children()]
    unknown = sorted(set(trained) - set(names))
    if unknown:
        raise ValueError(f"language_stage.trained_modules: {unknown} are not modules of {type(target).__name__} "
                         f"(expected some of {names})")
    frozen = [name for name in names if name not in trained]
    for name in frozen:
        module = getattr(target, name)
        module.load_state_dict(getattr(source, name).state_dict(), strict=True)
        module.requires_grad_(False)
    target.frozen_children = tuple(frozen)
    target.use_grid_mask = False


def _train_stage(model: torch.nn.Module, cfg: Config, loader: Any, val_set: Any, seed: int, max_iters: int,
                 eval_interval: Optional[int], log: Any, first_iter: int) -> Dict[str, Any]:
    """One stage: the optimiser and lr schedule over what requires gradients, ``loader``'s (streaming) batches,
    the loop (logging, the curve every ``eval_interval``); iterations are numbered from ``first_iter``."""
    _train_mode(model)
    optimizer, _ = build_kd_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_config, max(max_iters, 1))
    grad_clip = (cfg.get("optimizer_config") or {}).get("grad_clip")
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_interval = int(cfg.log_config.get("interval", 20))
    max_val = (cfg.get("evaluation") or {}).get("max_samples")
    log(f"[train_tiny_teacher] seed {seed}, {max_iters} iters, batch {loader.batch_sampler.batch_size}, order "
        f"{(cfg.data.get('shuffler_sampler') or {}).get('type', 'random')}, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
        f" M parameters trained, {torch.get_num_threads()} threads")
    losses, curve, start, window, data_time = [], [], time.time(), time.time(), 0.0
    batches = iter(loader)
    for it in range(max_iters):
        t0 = time.time()
        try:
            batch = next(batches)
        except StopIteration:  # a finite (random-order) loader starts a new pass
            batches = iter(loader)
            batch = next(batches)
        data_time += time.time() - t0
        lr = optimizer.param_groups[0]["lr"]
        outputs = forward_train(model, batch)
        optimizer_step(outputs["loss"], optimizer, trainable, grad_clip, None)
        scheduler.step()
        losses.append(outputs["log_vars"]["loss"])
        if (it + 1) % log_interval == 0 or it + 1 == max_iters:
            n = (it % log_interval) + 1
            per_iter = (time.time() - window) / n
            eta = datetime.timedelta(seconds=int(per_iter * (max_iters - it - 1)))
            parts = ", ".join(f"{k}: {v:.4f}" for k, v in outputs["log_vars"].items())
            log(f"Iter [{first_iter + it + 1}/{first_iter + max_iters}] lr: {lr:.3e}, eta: {eta}, "
                f"time: {per_iter:.3f}, data_time: {data_time / n:.3f}, {parts}")
            window, data_time = time.time(), 0.0
        if eval_interval and ((it + 1) % eval_interval == 0 or it + 1 == max_iters):
            metrics = evaluate(model, val_set, max_samples=max_val)
            curve.append(dict(iter=first_iter + it + 1, **{k: v for k, v in metrics.items() if k in CURVE_METRICS}))
            model.reset_memory()
            _train_mode(model)
            window = time.time()
            log(f"[train_tiny_teacher] validation at iter {first_iter + it + 1}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "iter"))
    return dict(losses=losses, curve=curve, seconds=time.time() - start)


def _train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, with the children :func:`copy_and_freeze` froze kept in eval mode."""
    model.train()
    for name in getattr(model, "frozen_children", ()):
        getattr(model, name).eval()


def validate_with_and_without_memory(model: torch.nn.Module, train_set: Any, val_set: Any,
                                     max_samples: Optional[int], log: Any) -> Dict[str, Any]:
    """The final validation for ``meta``: metrics with the temporal memory, with it reset every frame, and chance."""
    memory = measure_memory_benefit(model, val_set, max_samples)
    chance = chance_levels(train_set, val_set, max_val_samples=max_samples)
    log("[train_tiny_teacher] validation metrics (streaming, with memory) vs image-blind chance:\n"
        + format_metrics_table(memory["with_memory"], chance))
    log("[train_tiny_teacher] the temporal memory's share:\n" + format_memory_table(memory))
    return dict(metrics=memory["with_memory"], metrics_memory_reset=memory["memory_reset_each_frame"], chance=chance)


def measure_memory_benefit(model: torch.nn.Module, dataset: Any, max_samples: Optional[int] = None
                           ) -> Dict[str, Dict[str, float]]:
    """Validation metrics in streaming order with the temporal memory and with it reset before every frame."""
    return dict(with_memory=evaluate(model, dataset, max_samples=max_samples),
                memory_reset_each_frame=evaluate(model, dataset, max_samples=max_samples,
                                                 reset_memory_each_frame=True))


def format_memory_table(memory: Dict[str, Dict[str, float]]) -> str:
    """Rows ``metric  memory reset every frame  with memory`` for the metrics the memory can change."""
    with_memory, reset = memory["with_memory"], memory["memory_reset_each_frame"]
    lines = [f"{'metric':<28}{'memory reset':>14}{'with memory':>13}  "
             f"({int(with_memory.get('num_light_hidden', 0))} of {int(with_memory['num_samples'])} frames have the "
             f"light out of view)"]
    for key in MEMORY_METRICS:
        if key in with_memory and key in reset:
            arrow = "" if higher_is_better(key) else "lower is better"
            lines.append(f"{key:<28}{reset[key]:>14.3f}{with_memory[key]:>13.3f}  {arrow}")
    return "\n".join(lines)


def load_tiny_teacher(path: Union[str, os.PathLike] = DEFAULT_CHECKPOINT, config: Optional[Union[str, Config]] = None,
                      map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild TinyOrion from a checkpoint (its ``meta['config']`` unless ``config`` is given), load strictly, eval."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_tiny_teacher: no checkpoint at {path}; create it with "
                                f"`python tools/train_tiny_teacher.py --out {path}`")
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"load_tiny_teacher: {path} is not an ORION-format checkpoint: expected keys "
                         f"'meta' and 'state_dict', got {got}")
    if config is None:
        text = (ckpt.get("meta") or {}).get("config")
        if not text:
            raise ValueError(f"load_tiny_teacher: {path} has no meta['config']; pass config=...")
        cfg = Config.fromstring(text, ".py")
    else:
        cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    model = build_model(cfg.model, train_cfg=cfg.model.get("train_cfg"), test_cfg=cfg.model.get("test_cfg"))
    state = state_dict_of(ckpt, str(path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"load_tiny_teacher: {path} does not fit the TinyOrion of its config ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(reshaped)} reshaped keys, e.g. "
                         f"{(missing + unexpected + reshaped)[0]}): it was written by another version; delete it "
                         f"(the default teacher is rewritten from the shipped one) or retrain it with "
                         f"`python tools/train_tiny_teacher.py --out {path}`")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def ensure_tiny_teacher(path: Union[str, os.PathLike] = DEFAULT_CHECKPOINT, seed: int = 0,
                        config: Union[str, os.PathLike] = DEFAULT_CONFIG, verbose: bool = True) -> str:
    """Return ``path``, ready to load.

    The default teacher path (``ckpt/orion_tiny/orion_tiny.pth``) is written from the shipped, checksummed
    teacher when missing and refused with a one-line fix when it came from anything else. Any other
    path is returned when present and trained from ``config`` (``seed``) when missing.
    """
    path = Path(path)
    if path.resolve() == MATERIALIZED_CHECKPOINT.resolve():
        if path.is_file():
            check_materialized(path)
            return str(path)
        return materialize_teacher_checkpoint(path, verbose=verbose)
    if path.is_file():
        return str(path)
    if verbose:
        print(f"[train_tiny_teacher] {path} is missing: training a tiny teacher from {config} (seed {seed})")
    result = train_tiny_teacher(config, seed=seed, out=path, verbose=verbose)
    return str(result["path"])


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the miniature ORION teacher (TinyOrion) on CPU.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="ORION-style config file")
    parser.add_argument("--out", default=None, help="checkpoint to write (default: the config's out_checkpoint, "
                        "work_dirs/orion_tiny/orion_tiny_retrained.pth); compared with the shipped teacher at the end")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed)")
    parser.add_argument("--max-iters", type=int, default=None, help="override runner.max_iters (stage 1; stage 2: "
                        "--cfg-options language_stage.max_iters=N)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final validation")
    parser.add_argument("--materialize", action="store_true",
                        help="train nothing: write ckpt/orion_tiny/orion_tiny.pth (the ORION-format checkpoint the "
                             "tiny KD config reads) from the shipped, checksummed teacher")
    parser.add_argument("--ship", action="store_true",
                        help="replace the shipped teacher (ckpt/orion_tiny/orion_tiny_teacher.safetensors + .sha256) "
                             f"and its curve under docs/ (validates every {SHIP_EVAL_INTERVAL} iterations)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="validate every N iterations (the convergence curve, stored in the checkpoint's meta)")
    parser.add_argument("--memory-benefit", action="store_true",
                        help="train nothing: evaluate --checkpoint in streaming order with the temporal memory and "
                             "with it reset before every frame, print both and write --json")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="teacher for --memory-benefit")
    parser.add_argument("--json", default="work_dirs/memory_benefit.json", help="where --memory-benefit writes")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, key=value")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    """The command line; a damaged, missing or stale teacher file ends in one line with the fix (exit 2)."""
    args = parse_args(argv)
    try:
        return run(args)
    except TeacherAssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Materialise, measure the memory benefit, or train (and maybe ship) a teacher, as ``args`` asks."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.materialize:
        materialize_teacher_checkpoint(MATERIALIZED_CHECKPOINT)
        return 0
    if args.memory_benefit:
        torch.set_num_threads(int(cfg.get("num_threads", 2)))
        model = load_tiny_teacher(args.checkpoint)
        memory = measure_memory_benefit(model, build_dataset(cfg.data["val"]),
                                        (cfg.get("evaluation") or {}).get("max_samples"))
        print(f"[train_tiny_teacher] {args.checkpoint}, validation split, streaming order:")
        print(format_memory_table(memory))
        atomic_write_json(args.json, dict(checkpoint=args.checkpoint, **memory))
        print(f"[train_tiny_teacher] wrote {args.json}")
        return 0
    out = args.out or cfg.get("out_checkpoint") or str(RETRAINED_CHECKPOINT)
    if Path(out).resolve() == MATERIALIZED_CHECKPOINT.resolve():
        print(f"error: --out {out} is where the shipped teacher is written; choose another path "
              f"(default {RETRAINED_CHECKPOINT.relative_to(REPO_ROOT)}) or use --ship to replace the shipped teacher",
              file=sys.stderr)
        return 2
    result = train_tiny_teacher(cfg, seed=args.seed, out=out, max_iters=args.max_iters,
                                evaluate_at_end=not args.no_eval or args.ship,
                                eval_interval=args.eval_interval or (SHIP_EVAL_INTERVAL if args.ship else None))
    state = result["model"].state_dict()
    if args.ship:
        ship(result, cfg)
    else:
        try:
            print("[train_tiny_teacher] " + "\n".join(compare_with_shipped(state, result["meta"].get("metrics"))))
        except ValueError as err:  # no (valid) shipped teacher to compare with
            print(f"[train_tiny_teacher] not compared with the shipped teacher: {str(err).splitlines()[0]}")
    return 0


def ship(result: Dict[str, Any], cfg: Config) -> None:
    """Replace the shipped teacher: safetensors + checksum, the convergence curve (PNG + JSON), the .pth cache."""
    meta = result["meta"]
    digest = write_shipped_teacher(result["model"].state_dict(), meta)
    write_curve_record(meta, digest)
    materialize_teacher_checkpoint(MATERIALIZED_CHECKPOINT)
    print(f"[train_tiny_teacher] shipped: sha256 {digest}; curve in {CURVE_JSON.relative_to(REPO_ROOT)} and "
          f"docs/tiny_teacher_curve.png")


def write_curve_record(meta: Dict[str, Any], digest: str) -> None:
    """The shipped teacher's convergence curve as ``docs/tiny_teacher_curve.{json,png}`` (from its ``meta``)."""
    stage_iters = list(meta.get("stage_iters") or [meta["iter"]])
    stage_starts = [sum(stage_iters[:i]) for i in range(1, len(stage_iters))]
    plot_curve(meta["curve"], meta["chance"], stage_starts=stage_starts)
    atomic_write_json(CURVE_JSON, dict(seed=meta["seed"], iters=meta["iter"], stage_iters=stage_iters,
                                       curve=meta["curve"], final=meta["metrics"], chance=meta["chance"],
                                       memory_reset_each_frame=meta["metrics_memory_reset"], sha256=digest))


if __name__ == "__main__":
    sys.exit(main())
