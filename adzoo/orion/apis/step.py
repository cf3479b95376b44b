"""One optimisation step of the standalone KD loop: forward, backward, clip, step."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from mmcv.models.utils.unwrap import unwrap_model

from .settings import to_plain


def forward_train(model: nn.Module, batch: Any) -> Dict[str, Any]:
    """``model(batch, return_loss=True)`` as ``dict(loss, log_vars, num_samples)``.

    A model that returns the raw loss dict instead is reduced with its own
    ``_parse_losses`` (ORION's convention), so the optimised total is the model's.
    """
    outputs = model(batch, return_loss=True)
    if isinstance(outputs, Mapping) and "loss" not in outputs:
        parse = getattr(unwrap_model(model), "_parse_losses", None)
        if callable(parse):
            loss, log_vars = parse(outputs)
            outputs = dict(loss=loss, log_vars=log_vars)
    if not isinstance(outputs, Mapping) or not isinstance(outputs.get("loss"), torch.Tensor):
        raise TypeError("model(data, return_loss=True) must return dict(loss=<tensor>, log_vars, num_samples), "
                        "got {}".format(type(outputs).__name__ if not isinstance(outputs, Mapping)
                                        else "a dict with keys {}".format(sorted(outputs))))
    return dict(outputs)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                   grad_clip: Optional[Mapping[str, Any]], scaler: Any) -> Optional[float]:
    """Backward, optional gradient clipping (on unscaled gradients) and the step, as ORION's
    ``Fp16OptimizerHook``/``OptimizerHook`` do; returns the gradient norm before clipping, if clipped."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    grad_norm = None
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, **dict(to_plain(grad_clip))))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


__all__ = ["forward_train", "optimizer_step"]
