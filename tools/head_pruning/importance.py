"""Attention-head importance: one score per block and head, higher = more important.

  - :func:`compute_head_importance_magnitude`  weight norms (``eva_surgery.head_weight_norms``), no data;
  - :func:`compute_head_importance_gradient`   Michel et al. (2019), |dL/d mask_h|;
  - :func:`compute_head_importance_entropy`    max entropy minus mean attention entropy;
  - :func:`compute_head_importance_activation` Minitron's mean norm of each head's output.

Scores of different methods live on different scales and differ between window and global blocks;
the pruning policy normalises each block before a global ranking (``pruning_config.py``).
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from mmcv.models.utils.batch_io import move_batch_to_device
from mmcv.models.utils.eva_surgery import head_weight_norms
from mmcv.models.utils.head_importance import HeadImportance
from mmcv.models.utils.unwrap import unwrap_model
from tools.head_pruning.batches import batch_size_of, images_of, loss_of, take_batches
from tools.head_pruning.sites import (AttentionSite, GeometryRecorder, describe_backbone, find_attention_sites,
                                      find_backbone, forward_pre_hooks, head_mask_hooks, param_dtype_device,
                                      preserved_state, source_label)

METHODS = ("magnitude", "gradient", "entropy", "activation")
PathLike = Union[str, "os.PathLike[str]"]


def finish_importance(scores: torch.Tensor, method: str, num_samples: int, model: nn.Module, backbone: nn.Module,
                      settings: Dict[str, Any], save_path: Optional[PathLike], seconds: float,
                      kind: Type[Any] = HeadImportance) -> Any:
    """The result object (``kind``: HeadImportance, ChannelImportance or BlockImportance) with settings and
    geometry; saved if asked."""
    metadata = dict(settings, seconds=round(seconds, 3))
    with contextlib.suppress(Exception):
        metadata["backbone"] = describe_backbone(backbone)
    result = kind(scores=scores, method=method, num_samples=num_samples, source=source_label(model, backbone),
                  metadata=metadata)
    if save_path is not None:
        result.save(save_path)
    return result


def compute_head_importance_magnitude(model: nn.Module, save_path: Optional[PathLike] = None,
                                      include_proj: bool = False) -> HeadImportance:
    """Weight-magnitude importance (no data), the formula of ``eva_surgery.head_weight_norms``.

    ``I[l, h] = sqrt(||Wq[h]||_F^2 + ||Wk[h]||_F^2 + ||Wv[h]||_F^2 (+ ||Wproj[:, h]||_F^2 with include_proj))``
    where ``W*[h]`` are the ``head_dim`` output rows of head ``h`` in block ``l``'s q/k/v projection and
    ``Wproj[:, h]`` the matching input columns of ``proj``; biases are not counted. OrionStudent's
    ``kd_config.head_selection='magnitude'`` uses the same function.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    scores = torch.stack([
        head_weight_norms(s.attn.q_proj.weight, s.attn.k_proj.weight, s.attn.v_proj.weight, s.num_heads,
                          proj_weight=s.attn.proj.weight if include_proj else None) for s in sites])
    return finish_importance(scores, "magnitude", 0, model, backbone, dict(include_proj=include_proj),
                             save_path, time.perf_counter() - start)


@contextlib.contextmanager
def _teacher_in_place(model: nn.Module) -> Iterator[None]:
    """For an OrionStudent-like detector: the teacher stands in as ``img_backbone`` and the distillation
    weight ``distillation_alpha`` is 0 (the loss is the task loss), both restored afterwards."""
    teacher = getattr(model, "teacher_backbone", None)
    student = getattr(model, "img_backbone", None)
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module) or teacher is student:
        yield
        return
    alpha = getattr(model, "distillation_alpha", None)
    setattr(model, "img_backbone", teacher)
    if isinstance(alpha, float):
        model.distillation_alpha = 0.0
    try:
        yield
    finally:
        setattr(model, "img_backbone", student)
        if isinstance(alpha, float):
            model.distillation_alpha = alpha


def mask_gradient_scores(model: nn.Module, backbone: nn.Module, dataloader: Iterable, num_batches: Optional[int],
                         loss_fn: Optional[Callable[[Any, Any], torch.Tensor]], masks: Sequence[torch.Tensor],
                         mask_hooks: Any, what: str, normalize: bool, progress: bool) -> Tuple[torch.Tensor, int, int]:
    """Mean over batches of ``|dL_b / d mask|`` at ``mask = 1``, with ``mask_hooks`` applying the masks.

    ``model``: a detector whose ``forward(batch, return_loss=True)`` returns a loss (an OrionStudent-like
    model runs with its teacher standing in for the student, alpha 0), or the backbone with
    ``loss_fn(outputs, batch)``. Eval mode without activation checkpointing; parameters get no
    gradients; modes and flags are restored. ``normalize`` divides each block's row by its L2 norm;
    ``what`` names the units in messages. Returns (scores ``[blocks, units]`` float64, batches, samples).
    """
    loss_fn = loss_fn or getattr(unwrap_model(model), "loss_fn", None)
    is_backbone = unwrap_model(model) is backbone
    if is_backbone and loss_fn is None:
        raise ValueError("gradient importance of a bare backbone needs loss_fn(outputs, batch) "
                         "(argument or model.loss_fn); or pass a detector that returns a loss")
    dtype, device = param_dtype_device(backbone)
    total = torch.zeros(len(masks), masks[0].numel(), dtype=torch.float64)
    samples = batches = 0
    with preserved_state(model, requires_grad=False, disable_checkpointing=True), \
            _teacher_in_place(unwrap_model(model)), mask_hooks, torch.enable_grad():
        for batch in take_batches(dataloader, num_batches, f"gradient importance of {what}", progress):
            if is_backbone:
                img = images_of(batch, dtype, device)
                loss = loss_fn(model(img), batch)
                samples += img.shape[0]
            else:
                data = move_batch_to_device(batch, device)
                loss = loss_of(model(data, return_loss=True) if loss_fn is None else loss_fn(model, data))
                samples += batch_size_of(data)
            grads = torch.autograd.grad(loss.sum() if loss.ndim else loss, list(masks), allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:
                    total[i] += grad.detach().abs().double().cpu()
            batches += 1
    scores = total / batches
    if not bool(scores.abs().sum() > 0):
        raise ValueError(f"gradient importance: the loss does not depend on any of the {what} (all gradients are "
                         f"zero); check that the loss uses the backbone's output")
    if normalize:
        scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return scores, batches, samples


def compute_head_importance_gradient(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                     loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                                     normalize: bool = True, save_path: Optional[PathLike] = None,
                                     progress: bool = True) -> HeadImportance:
    """Gradient (Michel et al., 2019) importance: ``I[l, h] = mean_b |dL_b / d m[l, h]|`` at ``m = 1``.

    ``m[l, h]`` multiplies head ``h``'s output in block ``l`` (before inner LN / ``proj``), ``L_b`` is the
    loss of batch ``b`` (use batches of one sample for a per-sample mean). With ``normalize`` each block's
    row is divided by its L2 norm, ``I[l] / ||I[l]||_2`` (Michel et al.'s per-layer normalisation).

    ``model``: a detector whose ``forward(batch, return_loss=True)`` returns a dict with ``loss`` (for an
    OrionStudent-like model the teacher backbone stands in for the student during the pass), or a
    backbone with ``loss_fn(outputs, batch)`` (argument or attribute). Runs in eval mode without
    activation checkpointing; parameters get no gradients; modes and flags are restored.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    dtype, device = param_dtype_device(backbone)
    masks = [torch.ones(s.num_heads, dtype=dtype, device=device, requires_grad=True) for s in sites]
    scores, batches, samples = mask_gradient_scores(model, backbone, dataloader, num_batches, loss_fn, masks,
                                                    head_mask_hooks(sites, masks), "attention heads", normalize,
                                                    progress)
    return finish_importance(scores, "gradient", samples, model, backbone, dict(normalize=normalize, batches=batches),
                             save_path, time.perf_counter() - start)


def data_pass(hooks: Sequence[Tuple[nn.Module, Callable]], dataloader: Iterable, num_batches: Optional[int],
               desc: str, progress: bool, backbone: nn.Module) -> int:
    """Run the backbone over the images of ``num_batches`` batches, no autograd, ``hooks`` attached; image count."""
    dtype, device = param_dtype_device(backbone)
    images = 0
    with torch.no_grad(), forward_pre_hooks(hooks):
        for batch in take_batches(dataloader, num_batches, desc, progress):
            img = images_of(batch, dtype, device)
            backbone(img)
            images += img.shape[0]
    return images


def _qk_rows(site: AttentionSite, x: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q of the sampled query rows and k of all keys, [S, heads, Q|N, head_dim], with biases and rope, q scaled."""
    attn = site.attn
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    s, n, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)
    q_bias = attn.q_proj.bias if q_bias is None else q_bias
    k_bias = getattr(attn, "k_bias", None)
    k_bias = attn.k_proj.bias if k_bias is None else k_bias
    q = torch.nn.functional.linear(x, attn.q_proj.weight, q_bias).view(s, n, site.num_heads, site.head_dim)
    k = torch.nn.functional.linear(x, attn.k_proj.weight, k_bias).view(s, n, site.num_heads, site.head_dim)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rope = getattr(attn, "rope", None)
    if rope is not None:
        q, k = rope(q), rope(k)
    scale = getattr(attn, "scale", None) or site.head_dim ** -0.5
    return q[:, :, rows] * scale, k


def compute_head_importance_entropy(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                    num_query_samples: Optional[int] = 64, seed: int = 0, chunk_size: int = 64,
                                    save_path: Optional[PathLike] = None, progress: bool = True) -> HeadImportance:
    """Entropy importance: ``I[l, h] = log(K_l) - mean_{images, sequences, queries} H(p_q)``.

    ``p_q = softmax(q_q k^T * scale)`` is head ``h``'s attention distribution of query row ``q`` over the
    ``K_l`` keys of its sequence (window padding included as keys, as in the forward pass), and
    ``H(p) = -sum_j p_j log p_j`` in nats; ``log(K_l)`` is the largest possible entropy, so focused heads
    score high. Per block and batch ``num_query_samples`` real (non-padding) query rows are drawn from a
    generator seeded with ``seed`` (all rows when None or larger); q/k are recomputed from the attention
    input inside a hook, one block and ``chunk_size`` sequences at a time.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    generator = torch.Generator().manual_seed(int(seed))
    sums = torch.zeros(len(sites), sites[0].num_heads, dtype=torch.float64)
    counts = torch.zeros(len(sites), dtype=torch.float64)
    max_entropy = torch.zeros(len(sites), dtype=torch.float64)

    def make(site: AttentionSite, recorder: GeometryRecorder) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            seq = args[0].reshape(args[0].shape[0], -1, args[0].shape[-1])
            s, n = seq.shape[0], seq.shape[1]
            if num_query_samples is None or num_query_samples >= n:
                rows = torch.arange(n)
            else:
                rows = torch.randperm(n, generator=generator)[:num_query_samples].sort().values
            rows = rows.to(seq.device)
            valid = recorder.valid(site, s, n, seq.device)[:, rows]
            for lo in range(0, s, chunk_size):
                q, k = _qk_rows(site, seq[lo:lo + chunk_size], rows)
                logp = torch.log_softmax((q @ k.transpose(-2, -1)).float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)  # [S, heads, Q]
                weight = valid[lo:lo + chunk_size]
                sums[site.index] += (entropy * weight[:, None, :]).sum(dim=(0, 2)).double().cpu()
                counts[site.index] += float(weight.sum())
            max_entropy[site.index] = math.log(n)
        return hook

    with preserved_state(model), GeometryRecorder(sites) as recorder:
        images = data_pass([(site.attn, make(site, recorder)) for site in sites], dataloader, num_batches,
                            "entropy importance", progress, backbone)
    scores = max_entropy[:, None] - sums / counts.clamp_min(1.0)[:, None]
    return finish_importance(scores, "entropy", images, model, backbone,
                             dict(num_query_samples=num_query_samples, seed=seed, max_entropy=max_entropy.tolist()),
                             save_path, time.perf_counter() - start)


def compute_head_importance_activation(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                       save_path: Optional[PathLike] = None, progress: bool = True) -> HeadImportance:
    """Activation importance (Minitron): ``I[l, h] = mean_{images, tokens} ||o_{l,h,t}||_2``.

    ``o_{l,h,t}`` is head ``h``'s attention output (``softmax(q k^T) v``, ``head_dim`` channels) at token
    ``t`` of block ``l``, read before inner LN / ``proj``; window padding tokens are excluded. No labels.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    sums = torch.zeros(len(sites), sites[0].num_heads, dtype=torch.float64)
    counts = torch.zeros(len(sites), dtype=torch.float64)

    def make(site: AttentionSite, recorder: GeometryRecorder) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            out = args[0].reshape(args[0].shape[0], -1, site.num_heads, site.head_dim)
            norms = out.float().norm(dim=-1)  # [S, N, heads]
            valid = recorder.valid(site, out.shape[0], out.shape[1], out.device)
            sums[site.index] += (norms * valid[..., None]).sum(dim=(0, 1)).double().cpu()
            counts[site.index] += float(valid.sum())
        return hook

    with preserved_state(model), GeometryRecorder(sites) as recorder:
        images = data_pass([(site.head_input, make(site, recorder)) for site in sites], dataloader, num_batches,
                            "activation importance", progress, backbone)
    scores = sums / counts.clamp_min(1.0)[:, None]
    return finish_importance(scores, "activation", images, model, backbone, {}, save_path, time.perf_counter() - start)


def compute_head_importance(model: nn.Module, method: str = "magnitude", dataloader: Optional[Iterable] = None,
                            save_path: Optional[PathLike] = None, **kwargs: Any) -> HeadImportance:
    """Dispatch to one of :data:`METHODS`; data-driven methods need ``dataloader``."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "magnitude":
        return compute_head_importance_magnitude(model, save_path=save_path, **kwargs)
    if dataloader is None:
        raise ValueError(f"method {method!r} needs a dataloader")
    fn = {"gradient": compute_head_importance_gradient, "entropy": compute_head_importance_entropy,
          "activation": compute_head_importance_activation}[method]
    return fn(model, dataloader, save_path=save_path, **kwargs)


__all__ = [
    "METHODS", "PathLike", "finish_importance", "mask_gradient_scores", "data_pass", "compute_head_importance",
    "compute_head_importance_magnitude", "compute_head_importance_gradient",
    "compute_head_importance_entropy", "compute_head_importance_activation",
]
