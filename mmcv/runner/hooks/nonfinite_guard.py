"""Stop a run whose loss or gradients go non-finite, without ever applying a non-finite step.

``NonFiniteGuardHook`` works like a dynamic loss scaler's skip, in ORION's runner and in the
standalone loop alike (both list it in ``custom_hooks``):

* ``before_run`` registers an optimizer step pre-hook (``Optimizer.register_step_pre_hook``,
  torch >= 2.0). Whoever steps the optimizer (ORION's ``OptimizerHook``, its fp16 hook, the
  standalone loop), the pre-hook runs between backward and the update. When the step's loss
  terms (``runner.outputs``) or the gradient norm are non-finite on any rank, it sets every
  gradient of that optimizer to None, so the optimizer leaves every parameter and its state as
  they were: the step is skipped, not applied and undone.
* ``after_train_iter`` (priority ``ABOVE_NORMAL``: after ORION's ``OptimizerHook``, which shares
  that priority but is registered first, and before the ``CheckpointHook``) counts consecutive
  skipped steps and raises :class:`NonFiniteTrainingError` after ``max_consecutive_skips`` of
  them, naming the iteration and the loss terms. It also checks that the trainable weights are
  finite after an applied step, which no skip can undo; it then stops before any checkpoint of
  them is written. The last saved checkpoint (``latest.pth``) is therefore always finite, and
  the export (``after_run``) never runs.

Every decision is all-reduced (MAX) over the ranks, so under DDP all ranks skip the same steps
and stop at the same iteration; none waits for a peer that has left.
Plugin module: Python 3.8, torch 2.0-2.4, registries from ``mmcv``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from mmcv.models.utils.checkpoint_io import non_finite_tensors
from mmcv.models.utils.unwrap import unwrap_model
from mmcv.runner.hooks import HOOKS, Hook


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because the loss, the gradients or the weights went non-finite (one line)."""


def non_finite_terms(outputs: Optional[Mapping[str, Any]]) -> List[str]:
    """Names of the step's loss terms (``loss`` and ``log_vars``) that are NaN or infinite."""
    outputs = outputs or {}
    values: Dict[str, Any] = dict(outputs.get("log_vars") or {})
    if "loss" in outputs:
        values.setdefault("loss", outputs["loss"])
    bad = []
    for name in sorted(values):
        value = values[name]
        if torch.is_tensor(value):
            finite = bool(torch.isfinite(value.detach().float()).all()) if value.is_floating_point() else True
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            finite = math.isfinite(float(value))
        else:
            continue
        if not finite:
            bad.append(name)
    return bad


def _any_rank(flags: Sequence[bool], device: torch.device) -> List[bool]:
    """Each flag OR-ed over the ranks (one all-reduce; a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    packed = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return [bool(v) for v in packed.tolist()]


@HOOKS.register_module()
class NonFiniteGuardHook(Hook):
    """Skip steps with a non-finite loss or gradient norm; stop after ``max_consecutive_skips`` in a row.

    Args:
        max_consecutive_skips: skipped steps in a row that are tolerated; the next one stops the
            run (0: the first non-finite step stops it). A finite step resets the count.
        check_weights: after each applied step, check that the trainable weights are finite.
    """

    def __init__(self, max_consecutive_skips: int = 3, check_weights: bool = True) -> None:
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 0:
            raise ValueError("NonFiniteGuardHook: max_consecutive_skips must be an integer >= 0, got {!r}".format(
                max_consecutive_skips))
        self.max_consecutive_skips = max_consecutive_skips
        self.check_weights = bool(check_weights)
        self.consecutive = 0
        self.skipped_total = 0
        self._runner: Any = None
        self._handles: List[Any] = []
        self._skipped_this_iter = False
        self._grad_norm: Optional[float] = None

    def before_run(self, runner: Any) -> None:
        self._runner = runner
        optimizers = runner.optimizer.values() if isinstance(runner.optimizer, dict) else [runner.optimizer]
        for optimizer in optimizers:
            if not callable(getattr(optimizer, "register_step_pre_hook", None)):
                raise NonFiniteTrainingError("NonFiniteGuardHook: {} has no register_step_pre_hook (torch >= 2.0 "
                                             "optimizers have it)".format(type(optimizer).__name__))
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def after_run(self, runner: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def before_train_iter(self, runner: Any) -> None:
        self._skipped_this_iter, self._grad_norm = False, None

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-hook: drop every gradient (so the step changes nothing) when the step is non-finite."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])) \
            if grads else torch.zeros((), device=device)
        self._grad_norm = float(norm)
        local_bad = not math.isfinite(self._grad_norm) or bool(non_finite_terms(getattr(self._runner, "outputs", None)))
        if _any_rank([local_bad], device)[0]:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self._skipped_this_iter = True

    def after_train_iter(self, runner: Any) -> None:
        terms = non_finite_terms(getattr(runner, "outputs", None))
        model = unwrap_model(runner.model)
        device = next(model.parameters()).device
        bad_weights: List[str] = []
        skipped = self._skipped_this_iter or bool(terms)
        if self.check_weights and not skipped:
            bad_weights = non_finite_tensors({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        skipped, weights_bad = _any_rank([skipped, bool(bad_weights)], device)
        iteration = int(runner.iter) + 1
        if weights_bad:
            raise NonFiniteTrainingError(
                "non-finite weights after the step of iteration {}: {} trainable tensor(s), e.g. {}; stopped before "
                "saving them (the last checkpoint, latest.pth, is finite); lower optimizer.lr or set "
                "optimizer_config.grad_clip".format(iteration, len(bad_weights) or "some", bad_weights[:3]))
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        what = "loss terms {}".format(terms) if terms else "loss terms finite on this rank"
        detail = "{}, gradient norm {}".format(what, "not computed (no step)" if self._grad_norm is None
                                               else "{:.4g}".format(self._grad_norm))
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteTrainingError(
                "non-finite training at iteration {}: {}; {} consecutive step(s) skipped (limit "
                "NonFiniteGuardHook.max_consecutive_skips={}); no step was applied, the last checkpoint (latest.pth) "
                "holds finite weights; lower optimizer.lr, set optimizer_config.grad_clip or check the teacher "
                "and the data".format(iteration, detail, self.consecutive, self.max_consecutive_skips))
        logger = getattr(runner, "logger", None)
        if logger is not None:
            logger.warning("NonFiniteGuardHook: skipped the step of iteration %d (%s); %d in a row, limit %d",
                           iteration, detail, self.consecutive, self.max_consecutive_skips)
        runner.log_buffer.update({"skipped_steps": float(self.skipped_total)})


__all__ = ["NonFiniteGuardHook", "NonFiniteTrainingError", "non_finite_terms"]
