"""NonFiniteGuardHook: a non-finite step is skipped (weights and optimizer state untouched), N in a row stop the run."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional

import pytest
import torch

from mmcv.models.utils.checkpoint_io import CheckpointError, non_finite_tensors, require_finite
from mmcv.runner.hooks import HOOKS
from mmcv.runner.hooks.nonfinite_guard import NonFiniteGuardHook, NonFiniteTrainingError, non_finite_terms


class Buffer:
    def __init__(self) -> None:
        self.values: Dict[str, float] = {}

    def update(self, values: Dict[str, float], count: int = 1) -> None:
        self.values.update(values)


def make_runner() -> SimpleNamespace:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return SimpleNamespace(model=model, optimizer=optimizer, iter=0, outputs={}, log_buffer=Buffer(), logger=None)


def step(runner: SimpleNamespace, hook: NonFiniteGuardHook, scale: float) -> None:
    """One iteration as ORION's runner does it: forward, hooks' before/after, OptimizerHook's backward + step."""
    hook.before_train_iter(runner)
    loss = runner.model(torch.ones(1, 3)).sum() * scale
    runner.outputs = dict(loss=loss, log_vars=dict(loss=float(loss.detach()), task_loss=1.0), num_samples=1)
    runner.optimizer.zero_grad()
    loss.backward()
    runner.optimizer.step()
    hook.after_train_iter(runner)
    runner.iter += 1


def snapshot(runner: SimpleNamespace) -> Dict[str, Any]:
    state = {k: v.clone() for k, v in runner.model.state_dict().items()}
    for p, s in runner.optimizer.state.items():
        state.update({"{}.{}".format(id(p), k): v.clone() for k, v in s.items()})
    return state


def test_a_nan_step_changes_neither_weights_nor_optimizer_state_and_a_finite_step_resets_the_count() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook(max_consecutive_skips=2)
    hook.before_run(runner)
    step(runner, hook, 1.0)
    before = snapshot(runner)
    step(runner, hook, float("nan"))
    after = snapshot(runner)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hook.consecutive == 1 and runner.log_buffer.values["skipped_steps"] == 1.0
    step(runner, hook, 1.0)
    assert hook.consecutive == 0 and not any(torch.equal(after[k], v) for k, v in runner.model.state_dict().items())


def test_the_step_after_max_consecutive_skips_stops_naming_iteration_and_terms() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook(max_consecutive_skips=1)
    hook.before_run(runner)
    step(runner, hook, 1.0)
    step(runner, hook, float("inf"))
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite training at iteration 3: loss terms \['loss'\], "
                                                     r"gradient norm (nan|inf).*max_consecutive_skips=1"):
        step(runner, hook, float("inf"))
    assert not non_finite_tensors(runner.model.state_dict())


def test_non_finite_weights_after_an_applied_step_stop_before_a_save() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook()
    hook.before_run(runner)
    hook.before_train_iter(runner)
    runner.outputs = dict(loss=torch.tensor(1.0), log_vars=dict(loss=1.0))
    with torch.no_grad():
        runner.model.weight[0, 0] = float("inf")
    runner.optimizer.step()  # an applied step (no gradients: it changes nothing)
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite weights after the step of iteration 1: 1 .*"
                                                     r"\['weight'\]"):
        hook.after_train_iter(runner)


def scaled_step(runner: SimpleNamespace, hook: NonFiniteGuardHook, scaler: Any, overflow: bool,
                static: Optional[float] = None) -> None:
    """One iteration as ORION's Fp16OptimizerHook runs it, with an enabled CPU GradScaler; ``overflow`` makes
    every gradient infinite while the loss stays finite (what fp16 overflow does)."""
    hook.before_train_iter(runner)
    loss = runner.model(torch.ones(1, 3)).sum()
    runner.outputs = dict(loss=loss, log_vars=dict(loss=float(loss.detach())), num_samples=1)
    runner.optimizer.zero_grad()
    scaler.scale(_InfGrad.apply(loss) if overflow else loss).backward()
    scaler.unscale_(runner.optimizer)
    scaler.step(runner.optimizer)
    scaler.update(static)
    runner.meta.setdefault("fp16", {})["loss_scaler"] = scaler.state_dict()
    hook.after_train_iter(runner)
    runner.iter += 1


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def test_a_grad_scaler_skip_counts_and_a_static_scale_stops_after_the_limit() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook(max_consecutive_skips=2)
    runner.meta = {}
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    hook.before_run(runner)
    scaled_step(runner, hook, scaler, overflow=False, static=512.0)
    before = snapshot(runner)
    scaled_step(runner, hook, scaler, overflow=True, static=512.0)
    scaled_step(runner, hook, scaler, overflow=True, static=512.0)
    assert hook.consecutive == 2 and all(torch.equal(before[k], v) for k, v in snapshot(runner).items())
    with pytest.raises(NonFiniteTrainingError, match=r"^non-finite training at iteration 4: loss terms finite on this "
                                                     r"rank, gradient norm (inf|nan), optimizer.step\(\) not reached, "
                                                     r"loss scale 512; 3 consecutive step\(s\) skipped"):
        scaled_step(runner, hook, scaler, overflow=True, static=512.0)


def test_a_dynamic_scalers_search_is_not_counted_until_its_scale_falls_below_min_loss_scale() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook(max_consecutive_skips=0, min_loss_scale=4.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    runner.meta, runner.hooks = {}, [SimpleNamespace(loss_scaler=scaler)]  # where ORION's runner keeps its fp16 hook
    hook.before_run(runner)
    for _ in range(4):  # 64 -> 32 -> 16 -> 8 -> 4: the scaler's own search
        scaled_step(runner, hook, scaler, overflow=True)
    assert hook.consecutive == 0 and hook.skipped_total == 4 and runner.log_buffer.values["skipped_steps"] == 4.0
    scaled_step(runner, hook, scaler, overflow=False)  # a finite step at scale 4 trains
    with pytest.raises(NonFiniteTrainingError, match=r"iteration 6: .*loss scale 2 \(was 4\); 1 consecutive"):
        scaled_step(runner, hook, scaler, overflow=True)  # 4 -> 2 < min_loss_scale: counted


def test_an_iteration_that_never_steps_the_optimizer_is_skipped() -> None:
    runner, hook = make_runner(), NonFiniteGuardHook(max_consecutive_skips=0)
    hook.before_run(runner)
    hook.before_train_iter(runner)
    loss = runner.model(torch.ones(1, 3)).sum()
    runner.outputs = dict(loss=loss, log_vars=dict(loss=float(loss.detach())))
    loss.backward()  # gradients, but no optimizer.step()
    with pytest.raises(NonFiniteTrainingError, match=r"^no optimizer step at iteration 1: loss terms finite on this "
                                                     r"rank, gradient norm \d.*optimizer.step\(\) not reached; 1 "
                                                     r".*check that the optimizer hook steps the optimizer$"):
        hook.after_train_iter(runner)


def test_guard_is_registered_and_rejects_a_negative_limit() -> None:
    assert HOOKS.get("NonFiniteGuardHook") is NonFiniteGuardHook
    with pytest.raises(ValueError, match="max_consecutive_skips must be an integer >= 0, got -1"):
        NonFiniteGuardHook(max_consecutive_skips=-1)


def test_non_finite_terms_and_tensors_are_named() -> None:
    assert non_finite_terms(dict(loss=torch.tensor(float("nan")), log_vars=dict(a=1.0, b=float("inf")))) == \
        ["b", "loss"]
    with pytest.raises(CheckpointError, match=r"teacher x: 1 of 2 tensors hold NaN or infinite values \(e.g. \['b'\]\)"):
        require_finite(dict(a=torch.zeros(2), b=torch.full((2,), float("nan"))), "teacher x", "fix it")
