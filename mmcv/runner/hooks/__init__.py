"""The hook registry and base class with mmcv 1.x's names (light core, standalone only).

A hook is called by a runner at fixed points of training. The standalone loop offers the
runner attributes that the plugin's hooks read, with mmcv 1.x's meaning: ``iter`` (0-based
index of the current iteration = iterations completed before it; it grows after
``after_train_iter``), ``max_iters``, ``epoch``, ``inner_iter``, ``model`` (possibly DDP-wrapped), ``optimizer``,
``work_dir``, ``logger``, ``rank``, ``world_size``, ``meta`` (dict saved in checkpoints),
``outputs`` (the model's ``dict(loss, log_vars, num_samples)`` of the last step) and
``log_buffer`` (``update(dict, count)``). Hooks must use no other runner attribute.
"""
from __future__ import annotations

from typing import Any

from mmengine.registry import Registry

HOOKS = Registry("hook")


class Hook:
    """Base class: every stage is a no-op; ``*_train_iter``/``*_train_epoch`` fall back to the generic stage."""

    def before_run(self, runner: Any) -> None:
        pass

    def after_run(self, runner: Any) -> None:
        pass

    def before_epoch(self, runner: Any) -> None:
        pass

    def after_epoch(self, runner: Any) -> None:
        pass

    def before_iter(self, runner: Any) -> None:
        pass

    def after_iter(self, runner: Any) -> None:
        pass

    def before_train_epoch(self, runner: Any) -> None:
        self.before_epoch(runner)

    def after_train_epoch(self, runner: Any) -> None:
        self.after_epoch(runner)

    def before_train_iter(self, runner: Any) -> None:
        self.before_iter(runner)

    def after_train_iter(self, runner: Any) -> None:
        self.after_iter(runner)

    def every_n_iters(self, runner: Any, n: int) -> bool:
        """True when the current iteration is the n-th, 2n-th, ... (1-based), as in mmcv 1.x."""
        return n > 0 and (runner.iter + 1) % n == 0

    def is_last_iter(self, runner: Any) -> bool:
        return runner.iter + 1 == runner.max_iters


__all__ = ["HOOKS", "Hook"]
