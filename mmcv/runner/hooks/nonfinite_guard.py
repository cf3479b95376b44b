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
  that priority but is registered first, and before the ``CheckpointHook``) decides whether the
  iteration's step was skipped. *Skipped* covers every iteration whose update never reached
  ``optimizer.step()`` or was dropped there: the pre-hook dropped it, a loss scaler
  (``Fp16OptimizerHook``'s ``GradScaler``, dynamic or with a static float scale) found inf/NaN
  gradients and never called the optimizer, or nothing stepped the optimizer at all. It counts
  consecutive skips and raises :class:`NonFiniteTrainingError` after ``max_consecutive_skips`` of
  them, naming the iteration, the loss terms, the gradient norm and the loss scale. One kind of
  skip is not counted: a dynamic scaler's overflow skip that lowered its scale to a value still
  ``>= min_loss_scale`` (its normal search for a scale, e.g. the first overflow skips from
  2**16); it is logged and joins ``skipped_steps``. A scaler that keeps overflowing goes below
  ``min_loss_scale`` within a few dozen iterations, and from then on every skip counts.
  After an applied step it checks that the trainable weights are finite, which no skip can undo;
  it then stops before any checkpoint of them is written. The last saved checkpoint
  (``latest.pth``) is therefore always finite, and the export (``after_run``) never runs.

The loss scale is read from the runner's fp16 hook (``runner.hooks``: the hook's ``loss_scaler``,
as ORION's and mmcv's ``Fp16OptimizerHook`` keep it) or from ``runner.meta['fp16']['loss_scaler']``
(where those hooks, and the standalone loop, store the scaler's state every iteration).
With gradient accumulation over k iterations, set ``max_consecutive_skips >= k - 1``.
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


def loss_scale_of(runner: Any) -> Optional[float]:
    """The current scale of the runner's enabled loss scaler, or None when it trains without one.

    First a hook's ``loss_scaler`` (``Fp16OptimizerHook`` keeps its ``GradScaler`` there), then
    ``runner.meta['fp16']['loss_scaler']['scale']`` (that hook's, or the standalone loop's, record).
    """
    for hook in getattr(runner, "hooks", None) or []:
        scaler = getattr(hook, "loss_scaler", None)
        if callable(getattr(scaler, "get_scale", None)):
            enabled = getattr(scaler, "is_enabled", None)
            return float(scaler.get_scale()) if not callable(enabled) or enabled() else None
    meta = getattr(runner, "meta", None)
    state = ((meta.get("fp16") or {}).get("loss_scaler") or {}) if isinstance(meta, Mapping) else {}
    return float(state["scale"]) if isinstance(state, Mapping) and "scale" in state else None


def _grad_norm(optimizers: Sequence[torch.optim.Optimizer]) -> Optional[float]:
    """The L2 norm of every gradient the optimizers hold (None when they hold none)."""
    grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float())
                                                       for g in grads])))


def _any_rank(flags: Sequence[bool], device: torch.device) -> List[bool]:
    """Each flag OR-ed over the ranks (one all-reduce; a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    packed = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return [bool(v) for v in packed.tolist()]


def _optimizers(runner: Any) -> List[torch.optim.Optimizer]:
    return list(runner.optimizer.values()) if isinstance(runner.optimizer, dict) else [runner.optimizer]


@HOOKS.register_module()
class NonFiniteGuardHook(Hook):
    """Skip steps with a non-finite loss or gradient norm; stop after ``max_consecutive_skips`` in a row.

    Args:
        max_consecutive_skips: skipped steps in a row that are tolerated; the next one stops the
            run (0: the first skipped step stops it). An applied step resets the count. A skipped
            step is one that never reached ``optimizer.step()`` or was dropped there (module
            docstring), except a dynamic loss scaler's overflow skip down to a scale
            ``>= min_loss_scale``.
        check_weights: after each applied step, check that the trainable weights are finite.
        min_loss_scale: below this loss scale a loss scaler's overflow skips count as skips.
    """

    def __init__(self, max_consecutive_skips: int = 3, check_weights: bool = True,
                 min_loss_scale: float = 1.0) -> None:
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 0:
            raise ValueError("NonFiniteGuardHook: max_consecutive_skips must be an integer >= 0, got {!r}".format(
                max_consecutive_skips))
        if isinstance(min_loss_scale, bool) or not isinstance(min_loss_scale, (int, float)) \
                or not 0 < min_loss_scale < math.inf:
            raise ValueError("NonFiniteGuardHook: min_loss_scale must be a positive number, got {!r}".format(
                min_loss_scale))
        self.max_consecutive_skips = max_consecutive_skips
        self.check_weights = bool(check_weights)
        self.min_loss_scale = float(min_loss_scale)
        self.consecutive = 0
        self.skipped_total = 0
        self._runner: Any = None
        self._handles: List[Any] = []
        self._stepped = False
        self._dropped = False
        self._grad_norm: Optional[float] = None
        self._scale_before: Optional[float] = None

    def before_run(self, runner: Any) -> None:
        self._runner = runner
        for optimizer in _optimizers(runner):
            if not callable(getattr(optimizer, "register_step_pre_hook", None)):
                raise NonFiniteTrainingError("NonFiniteGuardHook: {} has no register_step_pre_hook (torch >= 2.0 "
                                             "optimizers have it)".format(type(optimizer).__name__))
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def after_run(self, runner: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def before_train_iter(self, runner: Any) -> None:
        self._stepped, self._dropped, self._grad_norm = False, False, None
        self._scale_before = loss_scale_of(runner)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-hook: drop every gradient (so the step changes nothing) when the step is non-finite."""
        self._stepped = True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
        norm = _grad_norm([optimizer])
        self._grad_norm = 0.0 if norm is None else norm
        local_bad = not math.isfinite(self._grad_norm) or bool(non_finite_terms(getattr(self._runner, "outputs", None)))
        if _any_rank([local_bad], device)[0]:
            for param in params:
                param.grad = None
            self._dropped = True

    def after_train_iter(self, runner: Any) -> None:
        terms = non_finite_terms(getattr(runner, "outputs", None))
        model = unwrap_model(runner.model)
        device = next(model.parameters()).device
        skipped = self._dropped or not self._stepped or bool(terms)
        if not self._stepped:  # what the scaler saw: its unscaled gradients are still there
            self._grad_norm = _grad_norm(_optimizers(runner))
        scale = loss_scale_of(runner)
        backoff = skipped and not terms and scale is not None and self._scale_before is not None \
            and self.min_loss_scale <= scale < self._scale_before
        bad_weights: List[str] = []
        if self.check_weights and not skipped:
            bad_weights = non_finite_tensors({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        skipped, counted, weights_bad = _any_rank([skipped, skipped and not backoff, bool(bad_weights)], device)
        iteration = int(runner.iter) + 1
        if weights_bad:
            raise NonFiniteTrainingError(
                "non-finite weights after the step of iteration {}: {} trainable tensor(s), e.g. {}; stopped before "
                "saving them (the last checkpoint, latest.pth, is finite); lower optimizer.lr or set "
                "optimizer_config.grad_clip".format(iteration, len(bad_weights) or "some", bad_weights[:3]))
        self.skipped_total += int(skipped)
        if self.skipped_total:  # from the first skip on, every log line shows the total so far
            runner.log_buffer.update({"skipped_steps": float(self.skipped_total)})
        if not skipped:
            self.consecutive = 0
            return
        detail = self._detail(terms, scale)
        logger = getattr(runner, "logger", None)
        if not counted:
            if logger is not None:
                logger.info("NonFiniteGuardHook: the loss scaler skipped the step of iteration %d (%s): its "
                            "dynamic search for a scale, not counted", iteration, detail)
            return
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteTrainingError(self._stop_message(iteration, terms, detail))
        if logger is not None:
            logger.warning("NonFiniteGuardHook: skipped the step of iteration %d (%s); %d in a row, limit %d",
                           iteration, detail, self.consecutive, self.max_consecutive_skips)

    def _detail(self, terms: List[str], scale: Optional[float]) -> str:
        """What the skipped step looked like: loss terms, gradient norm, whether it stepped, the loss scale."""
        parts = ["loss terms {}".format(terms) if terms else "loss terms finite on this rank",
                 "gradient norm {}".format("none (no gradients)" if self._grad_norm is None
                                           else "{:.4g}".format(self._grad_norm))]
        if not self._stepped:
            parts.append("optimizer.step() not reached")
        if scale is not None:
            parts.append("loss scale {:g} (was {:g})".format(scale, self._scale_before)
                         if self._scale_before is not None and self._scale_before != scale
                         else "loss scale {:g}".format(scale))
        return ", ".join(parts)

    def _stop_message(self, iteration: int, terms: List[str], detail: str) -> str:
        finite = not terms and self._grad_norm is not None and math.isfinite(self._grad_norm)
        return ("{} at iteration {}: {}; {} consecutive step(s) skipped (limit NonFiniteGuardHook."
                "max_consecutive_skips={}); no step was applied, the last checkpoint (latest.pth) holds finite "
                "weights; {}".format(
                    "no optimizer step" if finite else "non-finite training", iteration, detail, self.consecutive,
                    self.max_consecutive_skips,
                    "check that the optimizer hook steps the optimizer" if finite else
                    "lower optimizer.lr, set optimizer_config.grad_clip or check the teacher and the data"))


__all__ = ["NonFiniteGuardHook", "NonFiniteTrainingError", "non_finite_terms", "loss_scale_of"]
