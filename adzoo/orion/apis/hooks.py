"""``cfg.custom_hooks`` for the standalone loop: built from ``mmcv.runner.hooks.HOOKS``, called like mmcv 1.x.

Priorities follow mmcv 1.x: a name ('HIGHEST' 0, 'VERY_HIGH' 10, 'HIGH' 30,
'ABOVE_NORMAL' 40, 'NORMAL' 50 (default), 'BELOW_NORMAL' 60, 'LOW' 70,
'VERY_LOW' 90, 'LOWEST' 100) or an int in [0, 100]; a hook runs after every hook
of lower or equal priority that was registered before it (stable order).

Hooks see a :class:`LoopRunner`, which offers exactly the runner attributes of the
shared contract: ``iter`` (0-based index of the current iteration = iterations
finished before it; it grows after ``after_train_iter``), ``max_iters``, ``epoch``
(``iter // iters_per_epoch``), ``inner_iter`` (``iter % iters_per_epoch``), ``model``
(DDP-wrapped in distributed runs), ``optimizer``, ``work_dir``, ``logger``, ``rank``,
``world_size``, ``meta`` (saved in every checkpoint; its ``hook_msgs`` come back on
resume; ``fp16.loss_scaler``: the loss scaler's state, as ORION's ``Fp16OptimizerHook`` keeps it),
``outputs`` (this iteration's ``dict(loss, log_vars, num_samples)``, set before the optimiser
steps), ``data_loader`` (the training ``DataLoader``, as mmcv's runners name it) and
``log_buffer`` (``update(dict, count)``: values join the next log line).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from mmcv.runner.hooks import HOOKS, Hook

from .settings import ConfigError, to_plain
from .train_log import LogBuffer

PRIORITIES: Dict[str, int] = {"HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50,
                              "BELOW_NORMAL": 60, "LOW": 70, "VERY_LOW": 90, "LOWEST": 100}
#: The stages the loop calls, in mmcv 1.x's names.
STAGES = ("before_run", "before_epoch", "before_train_epoch", "before_train_iter", "after_train_iter",
          "after_train_epoch", "after_epoch", "after_run")


def get_priority(priority: Any) -> int:
    """mmcv 1.x's priority: an int in [0, 100], a level name, or an enum member with such a value."""
    value = getattr(priority, "value", priority)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 100:
            raise ConfigError("custom_hooks: priority must be in [0, 100], got {}".format(value))
        return value
    if isinstance(value, str) and value.upper() in PRIORITIES:
        return PRIORITIES[value.upper()]
    raise ConfigError("custom_hooks: priority must be an int in [0, 100] or one of {}, got {!r}".format(
        list(PRIORITIES), priority))


def build_custom_hooks(configs: Optional[Sequence[Mapping[str, Any]]]) -> List[Hook]:
    """Build ``cfg.custom_hooks`` (dicts with ``type`` and optional ``priority``) in calling order."""
    hooks: List[Hook] = []
    for cfg in configs or []:
        cfg = dict(to_plain(cfg))
        priority = get_priority(cfg.pop("priority", "NORMAL"))
        if cfg.get("type") not in HOOKS:
            raise ConfigError("custom_hooks: hook type {!r} is not registered in mmcv.runner.hooks.HOOKS (known: {}); "
                              "import its module through custom_imports".format(cfg.get("type"),
                                                                                 sorted(HOOKS.module_dict)))
        hook = HOOKS.build(cfg)
        hook.priority = priority
        position = len(hooks)
        while position > 0 and hooks[position - 1].priority > priority:
            position -= 1
        hooks.insert(position, hook)
    return hooks


class LoopRunner:
    """What a hook may read from the loop (see the module docstring); nothing else."""

    __slots__ = ("iter", "max_iters", "epoch", "inner_iter", "model", "optimizer", "work_dir", "logger", "rank",
                 "world_size", "meta", "outputs", "data_loader", "log_buffer")

    def __init__(self, model: nn.Module, optimizer: Any, work_dir: str, logger: logging.Logger, rank: int,
                 world_size: int, max_iters: int, meta: Dict[str, Any]) -> None:
        self.model = model
        self.optimizer = optimizer
        self.work_dir = work_dir
        self.logger = logger
        self.rank = rank
        self.world_size = world_size
        self.max_iters = max_iters
        self.meta = meta
        self.iter = 0
        self.epoch = 0
        self.inner_iter = 0
        self.outputs: Dict[str, Any] = {}
        self.data_loader: Any = None
        self.log_buffer = LogBuffer()


def call_hooks(hooks: Sequence[Hook], stage: str, runner: LoopRunner) -> None:
    """Call ``stage`` on every hook, in priority order."""
    if stage not in STAGES:
        raise ValueError("call_hooks: unknown stage {!r} (known: {})".format(stage, STAGES))
    for hook in hooks:
        getattr(hook, stage)(runner)


__all__ = ["PRIORITIES", "STAGES", "get_priority", "build_custom_hooks", "LoopRunner", "call_hooks"]
