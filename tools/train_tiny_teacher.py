"""Train the miniature ORION teacher (TinyOrion on SyntheticChatB2D) on CPU in about a minute or two.

    python tools/train_tiny_teacher.py [--config adzoo/orion/configs/orion_tiny_train.py]
                                       [--out ckpt/orion_tiny/orion_tiny.pth] [--seed 0]

The loop reads top to bottom: config, data, model, optimiser, then one loop
that steps, logs and finally evaluates against the image-blind chance levels
and saves an ORION-format checkpoint (``{'meta', 'state_dict'}``) atomically.
The same seed (and thread count, fixed by the config) gives the same teacher.
``ensure_tiny_teacher()`` creates the checkpoint when it is missing (the demo
calls it); ``load_tiny_teacher()`` rebuilds the model from the checkpoint alone.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mmcv import Config, DictAction  # noqa: E402
from mmcv.datasets import build_dataloader, build_dataset, chance_levels, evaluate  # noqa: E402
from mmcv.models import build_model  # noqa: E402
from mmcv.models.utils.checkpoint_io import atomic_torch_save  # noqa: E402
from mmcv.utils import set_random_seed  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_train.py"
DEFAULT_CHECKPOINT = REPO_ROOT / "ckpt" / "orion_tiny" / "orion_tiny.pth"
# Metrics where lower is better; every other reported metric is higher-is-better.
LOWER_IS_BETTER = ("plan_l2", "plan_l2_1s", "plan_l2_2s", "plan_l2_3s")
HEADLINE_METRICS = ("det_f1", "lane_iou", "qa_acc", "plan_l2")


def lr_at(it: int, base_lr: float, max_iters: int, lr_config: dict) -> float:
    """Linear warm-up (``warmup_iters``, from ``warmup_ratio``) then cosine decay to ``min_lr_ratio``."""
    warmup = int(lr_config.get("warmup_iters", 0)) if lr_config.get("warmup") else 0
    if it < warmup:
        ratio = float(lr_config.get("warmup_ratio", 0.1))
        return base_lr * (ratio + (1.0 - ratio) * it / warmup)
    min_lr = base_lr * float(lr_config.get("min_lr_ratio", 0.0))
    progress = (it - warmup) / max(max_iters - warmup, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """``torch.optim.<type>`` over the trainable parameters with the remaining keys as arguments."""
    cfg = dict(cfg)
    name = cfg.pop("type")
    if not hasattr(torch.optim, name):
        raise ValueError(f"optimizer.type: expected a torch.optim class name, got {name!r}")
    return getattr(torch.optim, name)([p for p in model.parameters() if p.requires_grad], **cfg)


def format_metrics_table(metrics: Dict[str, float], chance: Dict[str, float]) -> str:
    """Rows ``metric  chance  reached  better?`` for every metric both dicts have."""
    lines = [f"{'metric':<26}{'chance':>10}{'reached':>10}  better than chance"]
    for key in metrics:
        if key not in chance or key == "num_samples":
            continue
        better = metrics[key] < chance[key] if key in LOWER_IS_BETTER else metrics[key] > chance[key]
        lines.append(f"{key:<26}{chance[key]:>10.3f}{metrics[key]:>10.3f}  {'yes' if better else 'NO'}")
    return "\n".join(lines)


def train_tiny_teacher(config: Union[str, os.PathLike, Config] = DEFAULT_CONFIG, seed: Optional[int] = None,
                       out: Optional[Union[str, os.PathLike]] = None, max_iters: Optional[int] = None,
                       evaluate_at_end: bool = True, verbose: bool = True) -> Dict[str, Any]:
    """Train TinyOrion from ``config``; return ``{'model', 'meta', 'losses', 'path'}``.

    ``out`` None: nothing is written. ``max_iters`` overrides ``runner.max_iters``
    (short runs for tests). ``evaluate_at_end`` False skips the validation pass.
    """
    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    max_iters = int(cfg.runner["max_iters"] if max_iters is None else max_iters)
    log = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(int(cfg.get("num_threads", 2)))
    set_random_seed(seed)

    train_set = build_dataset(cfg.data["train"])
    val_set = build_dataset(cfg.data["val"])
    loader = build_dataloader(train_set, cfg.data["samples_per_gpu"], cfg.data.get("workers_per_gpu", 0),
                              shuffle=True, seed=seed, drop_last=True)
    model = build_model(cfg.model, train_cfg=cfg.model.get("train_cfg"), test_cfg=cfg.model.get("test_cfg"))
    model.train()
    optimizer = build_optimizer(model, cfg.optimizer)
    base_lr = float(cfg.optimizer["lr"])
    grad_clip = (cfg.get("optimizer_config") or {}).get("grad_clip")
    log_interval = int(cfg.log_config.get("interval", 20))

    log(f"[train_tiny_teacher] seed {seed}, {max_iters} iters, batch {cfg.data['samples_per_gpu']}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {torch.get_num_threads()} threads")
    losses, start, window, data_time = [], time.time(), time.time(), 0.0
    batches = iter(loader)
    for it in range(max_iters):
        t0 = time.time()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        data_time += time.time() - t0
        lr = lr_at(it, base_lr, max_iters, cfg.lr_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        outputs = model(batch, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        outputs["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), **grad_clip)
        optimizer.step()
        losses.append(outputs["log_vars"]["loss"])
        if (it + 1) % log_interval == 0 or it + 1 == max_iters:
            n = (it % log_interval) + 1
            per_iter = (time.time() - window) / n
            eta = datetime.timedelta(seconds=int(per_iter * (max_iters - it - 1)))
            parts = ", ".join(f"{k}: {v:.4f}" for k, v in outputs["log_vars"].items())
            log(f"Iter [{it + 1}/{max_iters}] lr: {lr:.3e}, eta: {eta}, time: {per_iter:.3f}, "
                f"data_time: {data_time / n:.3f}, {parts}")
            window, data_time = time.time(), 0.0
    train_time = time.time() - start
    log(f"[train_tiny_teacher] trained in {train_time:.1f} s")

    meta: Dict[str, Any] = dict(
        seed=seed, iter=max_iters, config=cfg.pretty_text, train_time_s=round(train_time, 2),
        torch_version=str(torch.__version__), num_threads=torch.get_num_threads(),
        time=datetime.datetime.now().isoformat(timespec="seconds"), model_type=cfg.model["type"])
    if evaluate_at_end:
        max_val = (cfg.get("evaluation") or {}).get("max_samples")
        metrics = evaluate(model, val_set, max_samples=max_val)
        chance = chance_levels(train_set, val_set, max_val_samples=max_val)
        meta.update(metrics=metrics, chance=chance)
        log("[train_tiny_teacher] validation metrics vs image-blind chance:\n" + format_metrics_table(metrics, chance))
    path = None
    if out is not None:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = atomic_torch_save(dict(meta=meta, state_dict=state_dict), out)
        log(f"[train_tiny_teacher] wrote {path}")
    return dict(model=model, meta=meta, losses=losses, path=path)


def load_tiny_teacher(path: Union[str, os.PathLike] = DEFAULT_CHECKPOINT, config: Optional[Union[str, Config]] = None,
                      map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild TinyOrion from a checkpoint (its ``meta['config']`` unless ``config`` is given), load strictly, eval."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_tiny_teacher: no checkpoint at {path}; create it with "
                                f"`python tools/train_tiny_teacher.py --out {path}`")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def ensure_tiny_teacher(path: Union[str, os.PathLike] = DEFAULT_CHECKPOINT, seed: int = 0,
                        config: Union[str, os.PathLike] = DEFAULT_CONFIG, verbose: bool = True) -> str:
    """Return ``path``, training and writing the tiny teacher first when the file is missing."""
    path = Path(path)
    if path.is_file():
        return str(path)
    if verbose:
        print(f"[train_tiny_teacher] {path} is missing: training the tiny teacher (seed {seed}, about 1-2 min)")
    result = train_tiny_teacher(config, seed=seed, out=path, verbose=verbose)
    return str(result["path"])


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the miniature ORION teacher (TinyOrion) on CPU.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="ORION-style config file")
    parser.add_argument("--out", default=None, help="checkpoint to write (default: the config's out_checkpoint)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed)")
    parser.add_argument("--max-iters", type=int, default=None, help="override runner.max_iters")
    parser.add_argument("--no-eval", action="store_true", help="skip the final validation")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, key=value")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    out = args.out or cfg.get("out_checkpoint") or str(DEFAULT_CHECKPOINT)
    train_tiny_teacher(cfg, seed=args.seed, out=out, max_iters=args.max_iters, evaluate_at_end=not args.no_eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
