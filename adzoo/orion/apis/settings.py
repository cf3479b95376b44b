"""What the standalone KD loop reads from an ORION-style config, checked in one place.

Keys (ORION's): ``data.samples_per_gpu``, ``data.workers_per_gpu``,
``data.shuffler_sampler``, ``optimizer``, ``optimizer_config.grad_clip``, ``fp16``
or ``mixed_precision``, ``lr_config``, ``runner`` (``IterBasedRunner`` with
``max_iters``, or ``EpochBasedRunner`` with ``max_epochs``, mapped to iterations
per epoch), ``checkpoint_config``, ``log_config``, ``custom_hooks``, ``load_from``,
``resume_from``, ``auto_resume``, ``work_dir``, ``seed``, ``find_unused_parameters``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch


class ConfigError(ValueError):
    """A mistake in the config or the command line; the entry point reports it as one line."""


def cfg_get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for dicts/ConfigDicts (``default`` when absent or when ``obj`` is None)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def to_plain(obj: Any) -> Any:
    """Recursively turn ConfigDicts/tuples/numpy scalars into plain, ``weights_only``-safe types."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # also str subclasses such as torch's TorchVersion
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)


def config_text(cfg: Any) -> str:
    """The config as Python text (``pretty_text``), falling back to its raw text or repr."""
    for attr in ("pretty_text", "text"):
        try:
            text = getattr(cfg, attr)
            if isinstance(text, str) and text:
                return text
        except Exception:  # pretty_text needs yapf and may fail on exotic values
            continue
    return repr(to_plain(cfg))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError("{} must be a positive integer, got {!r}".format(name, value))
    return value


@dataclass
class Schedule:
    """How long the run is, in iterations; epochs are ``iters_per_epoch`` iterations (mmcv's runners)."""

    runner_type: str
    max_iters: int
    iters_per_epoch: int

    @property
    def by_epoch(self) -> bool:
        return self.runner_type == "EpochBasedRunner"

    @property
    def max_epochs(self) -> int:
        return int(math.ceil(self.max_iters / self.iters_per_epoch))


def read_schedule(cfg: Any, iters_per_epoch: int) -> Schedule:
    """The run length from ``cfg.runner`` (or ORION's ``total_epochs``)."""
    runner = cfg_get(cfg, "runner")
    if runner is None:
        total_epochs = cfg_get(cfg, "total_epochs")
        if total_epochs is None:
            raise ConfigError("the config needs runner=dict(type='EpochBasedRunner', max_epochs=...) "
                              "or runner=dict(type='IterBasedRunner', max_iters=...)")
        runner = dict(type="EpochBasedRunner", max_epochs=total_epochs)
    kind = cfg_get(runner, "type", "EpochBasedRunner")
    if kind == "EpochBasedRunner":
        epochs = _positive_int(cfg_get(runner, "max_epochs"), "runner.max_epochs")
        return Schedule(kind, epochs * iters_per_epoch, iters_per_epoch)
    if kind == "IterBasedRunner":
        return Schedule(kind, _positive_int(cfg_get(runner, "max_iters"), "runner.max_iters"), iters_per_epoch)
    raise ConfigError("runner.type must be 'EpochBasedRunner' or 'IterBasedRunner', got {!r}".format(kind))


@dataclass
class LogSettings:
    interval: int
    by_epoch: bool
    tensorboard: bool


def read_log_settings(cfg: Any, epoch_runner: bool) -> LogSettings:
    """Interval, line style and TensorBoard from ``log_config`` (TextLoggerHook, TensorboardLoggerHook)."""
    log_cfg = cfg_get(cfg, "log_config") or {}
    interval = int(cfg_get(log_cfg, "interval", 10))
    if interval <= 0:
        raise ConfigError("log_config.interval must be positive, got {}".format(interval))
    by_epoch, tensorboard = epoch_runner, False
    for hook in cfg_get(log_cfg, "hooks", None) or [dict(type="TextLoggerHook")]:
        kind = cfg_get(hook, "type")
        if kind == "TextLoggerHook":
            by_epoch = bool(cfg_get(hook, "by_epoch", epoch_runner))
        elif kind == "TensorboardLoggerHook":
            tensorboard = True
        else:
            raise ConfigError("log_config.hooks: unsupported hook type {!r} (TextLoggerHook, TensorboardLoggerHook)"
                              .format(kind))
    return LogSettings(interval, by_epoch, tensorboard)


@dataclass
class CheckpointSettings:
    interval: int
    by_epoch: bool
    max_keep_ckpts: int
    out_dir: Optional[str]
    save_last: bool

    def due(self, iteration: int, schedule: Schedule) -> bool:
        """Is a checkpoint due after ``iteration`` (1-based count of finished iterations)?"""
        last = self.save_last and iteration == schedule.max_iters
        if self.by_epoch:
            return last or (iteration % schedule.iters_per_epoch == 0
                            and (iteration // schedule.iters_per_epoch) % self.interval == 0)
        return last or iteration % self.interval == 0


def read_checkpoint_settings(cfg: Any, epoch_runner: bool) -> CheckpointSettings:
    ckpt = cfg_get(cfg, "checkpoint_config") or {}
    keep = cfg_get(ckpt, "max_keep_ckpts", -1)
    return CheckpointSettings(interval=_positive_int(int(cfg_get(ckpt, "interval", 1)), "checkpoint_config.interval"),
                              by_epoch=bool(cfg_get(ckpt, "by_epoch", epoch_runner)),
                              max_keep_ckpts=-1 if keep is None else int(keep), out_dir=cfg_get(ckpt, "out_dir"),
                              save_last=bool(cfg_get(ckpt, "save_last", True)))


def _grad_scaler(device: torch.device, loss_scale: Any) -> Any:
    """``torch.amp.GradScaler`` for ORION's ``fp16.loss_scale``: 'dynamic', a dict of its arguments, or a
    number: a static scale (as mmcv's static mode: an overflowing step is skipped, the scale never changes)."""
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        raise ConfigError("fp16 needs torch.amp.GradScaler (torch >= 2.3), found torch {}; use "
                          "mixed_precision='bf16'".format(torch.__version__))
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        static = float(loss_scale)

        class StaticGradScaler(scaler_cls):  # type: ignore[misc, valid-type]
            def update(self, new_scale: Any = None) -> None:
                super().update(static)

        return StaticGradScaler(device.type, init_scale=static)
    if isinstance(loss_scale, Mapping):
        kwargs = dict(to_plain(loss_scale))
    elif loss_scale == "dynamic":
        kwargs = {}
    else:
        raise ConfigError("fp16.loss_scale must be 'dynamic', a positive number or a dict, got {!r}".format(loss_scale))
    try:
        return scaler_cls(device.type, **kwargs)
    except (TypeError, AssertionError) as exc:
        raise ConfigError("fp16.loss_scale: {}".format(exc))


def read_precision(cfg: Any, device: torch.device, logger: logging.Logger) -> Tuple[Optional[torch.dtype], Any]:
    """(autocast dtype or None, GradScaler or None) from ``fp16`` / ``mixed_precision``.

    ``fp16=dict(loss_scale=...)`` (ORION's key) or ``mixed_precision='fp16'``: float16 autocast
    with a gradient scaler (dynamic by default); ``mixed_precision='bf16'``: bfloat16 autocast,
    no scaler. Both run on CUDA and, where torch supports autocast there, on the CPU.
    """
    fp16 = cfg_get(cfg, "fp16")
    mode = cfg_get(cfg, "mixed_precision")
    if mode not in (None, "fp32", "no", "fp16", "bf16"):
        raise ConfigError("mixed_precision must be 'fp32', 'fp16' or 'bf16', got {!r}".format(mode))
    if fp16 is not None and mode in ("bf16", "fp32", "no"):
        raise ConfigError("the config sets both fp16={} and mixed_precision={!r}: keep one".format(fp16, mode))
    if fp16 is None and mode not in ("fp16", "bf16"):
        return None, None
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if device.type != "cuda" and callable(is_available) and not is_available(device.type):
        logger.warning("autocast is not available on %s with torch %s: training in fp32", device, torch.__version__)
        return None, None
    if mode == "bf16":
        return torch.bfloat16, None
    return torch.float16, _grad_scaler(device, cfg_get(fp16, "loss_scale", "dynamic"))


__all__ = ["ConfigError", "cfg_get", "to_plain", "config_text", "Schedule", "read_schedule", "LogSettings",
           "read_log_settings", "CheckpointSettings", "read_checkpoint_settings", "read_precision"]
