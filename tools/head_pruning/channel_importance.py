"""SwiGLU hidden-channel importance: one score per block and channel, higher = more important.

  - :func:`compute_channel_importance_magnitude`  ``||W1[c]|| * ||W2[c]|| * ||g_c W3[:, c]||`` (no data);
  - :func:`compute_channel_importance_gradient`   first-order Taylor / Michel-style ``|dL/d m_c|`` of a
    channel mask at the input of ``w3``;
  - :func:`compute_channel_importance_activation` Minitron: mean ``|y_c|`` of what ``w3`` reads.

Same hooks and data passes as the head methods (``importance.py``), the same result format
(:class:`ChannelImportance`, ``.json``/``.npz``). Entropy has no channel analogue. ``ffn_ln`` normalises
over every channel, so removing channels also changes the statistics of the kept ones: the scores rank
a channel's own contribution with the statistics frozen, and distillation recovers the rest.
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from mmcv.models.utils.eva_surgery import channel_weight_norms
from mmcv.models.utils.head_importance import ChannelImportance
from tools.head_pruning.importance import PathLike, data_pass, finish_importance, mask_gradient_scores
from tools.head_pruning.sites import channel_mask_hooks, find_backbone, find_mlp_sites, param_dtype_device, preserved_state

CHANNEL_METHODS = ("magnitude", "gradient", "activation")


def compute_channel_importance_magnitude(model: nn.Module, save_path: Optional[PathLike] = None
                                         ) -> ChannelImportance:
    """Weight-magnitude importance of every SwiGLU channel (``eva_surgery.channel_weight_norms``), no data.

    ``I[l, c] = ||W1[c]||_2 * ||W2[c]||_2 * ||g_c W3[:, c]||_2``: channel ``c``'s gate and value rows and
    its output column scaled by its ``ffn_ln`` weight ``g_c`` (biases not counted). OrionStudent's
    ``kd_config.head_selection='magnitude'`` uses the same function for a narrower MLP.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_mlp_sites(backbone)
    scores = torch.stack([channel_weight_norms(s.mlp.w1.weight, s.mlp.w2.weight, s.mlp.w3.weight, s.mlp.ffn_ln.weight)
                          for s in sites])
    return finish_importance(scores, "magnitude", 0, model, backbone, {}, save_path, time.perf_counter() - start,
                             kind=ChannelImportance)


def compute_channel_importance_gradient(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                                        normalize: bool = True, save_path: Optional[PathLike] = None,
                                        progress: bool = True) -> ChannelImportance:
    """First-order Taylor (Michel-style) importance: ``I[l, c] = mean_b |dL_b / d m[l, c]|`` at ``m = 1``.

    ``m[l, c]`` multiplies hidden channel ``c`` of block ``l`` where ``w3`` reads it (after ``ffn_ln``), so
    ``dL/dm_c = sum_t (dL/dout_t . W3[:, c]) y_{t,c}``: the first-order change of the loss when the
    channel's contribution is removed. ``normalize`` divides each block's row by its L2 norm. The
    model and loss are as for :func:`~tools.head_pruning.importance.compute_head_importance_gradient`.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_mlp_sites(backbone)
    dtype, device = param_dtype_device(backbone)
    masks = [torch.ones(s.hidden, dtype=dtype, device=device, requires_grad=True) for s in sites]
    scores, batches, samples = mask_gradient_scores(model, backbone, dataloader, num_batches, loss_fn, masks,
                                                    channel_mask_hooks(sites, masks), "SwiGLU channels", normalize,
                                                    progress)
    return finish_importance(scores, "gradient", samples, model, backbone, dict(normalize=normalize, batches=batches),
                             save_path, time.perf_counter() - start, kind=ChannelImportance)


def compute_channel_importance_activation(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                          save_path: Optional[PathLike] = None, progress: bool = True
                                          ) -> ChannelImportance:
    """Activation importance (Minitron): ``I[l, c] = mean_{images, tokens} |y_{l,t,c}|``.

    ``y`` is what ``w3`` of block ``l`` reads (the ``ffn_ln`` output); the MLP runs on the real tokens
    only (no window padding). No labels.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_mlp_sites(backbone)
    sums = torch.zeros(len(sites), sites[0].hidden, dtype=torch.float64)
    counts = torch.zeros(len(sites), dtype=torch.float64)

    def make(index: int) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            y = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[index] += y.abs().sum(dim=0).double().cpu()
            counts[index] += y.shape[0]
        return hook

    with preserved_state(model):
        images = data_pass([(site.mlp.w3, make(i)) for i, site in enumerate(sites)], dataloader, num_batches,
                           "channel activation importance", progress, backbone)
    scores = sums / counts.clamp_min(1.0)[:, None]
    return finish_importance(scores, "activation", images, model, backbone, {}, save_path, time.perf_counter() - start,
                             kind=ChannelImportance)


def compute_channel_importance(model: nn.Module, method: str = "magnitude", dataloader: Optional[Iterable] = None,
                               save_path: Optional[PathLike] = None, **kwargs: Any) -> ChannelImportance:
    """Dispatch to one of :data:`CHANNEL_METHODS`; data-driven methods need ``dataloader``."""
    if method not in CHANNEL_METHODS:
        raise ValueError(f"channel importance method: expected one of {CHANNEL_METHODS}, got {method!r} (entropy "
                         f"scores attention heads only)")
    if method == "magnitude":
        return compute_channel_importance_magnitude(model, save_path=save_path)
    if dataloader is None:
        raise ValueError(f"channel importance method {method!r} needs a dataloader")
    fn = compute_channel_importance_gradient if method == "gradient" else compute_channel_importance_activation
    return fn(model, dataloader, save_path=save_path, **kwargs)


__all__ = ["CHANNEL_METHODS", "compute_channel_importance", "compute_channel_importance_magnitude",
           "compute_channel_importance_gradient", "compute_channel_importance_activation"]
