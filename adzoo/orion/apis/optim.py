"""Optimiser and learning-rate schedule of the KD loop, with ORION's config keys.

``build_kd_optimizer`` is ORION's ``LearningRateDecayOptimizerConstructor`` (vit_wise
layer-wise decay keyed on ``img_backbone.blocks.N.``) over the parameters that
require gradients; ``build_lr_scheduler`` is mmcv's ``CosineAnnealing`` policy with
linear warm-up as a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per iteration.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mmcv.models.utils.unwrap import unwrap_model

from .settings import ConfigError, to_plain


_LAYER_DECAY_CONSTRUCTORS = ("LearningRateDecayOptimizerConstructor", "LayerDecayOptimizerConstructor")
_PARAMWISE_KEYS = ("decay_rate", "num_layers", "decay_type", "head_decay_rate", "lm_head_decay_rate",
                   "backbone_prefix", "custom_keys", "no_decay_names")
_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def vit_layer_id(name: str, num_layers: int, prefix: str = "img_backbone") -> Optional[int]:
    """Layer id of parameter ``name`` for ViT layer-wise decay; None outside the backbone.

    ``pos_embed``/``cls_token``/``patch_embed`` -> 0, ``blocks.N`` -> N + 1, any other
    backbone parameter -> ``num_layers + 1`` (the top, not decayed).
    """
    if not name.startswith(prefix + "."):
        return None
    rest = name[len(prefix) + 1:]
    if rest in ("pos_embed", "cls_token", "mask_token") or rest.startswith("patch_embed."):
        return 0
    if rest.startswith("blocks.") or rest.startswith("layers."):
        block = int(rest.split(".")[1])
        if block + 1 > num_layers:
            raise ConfigError("optimizer.paramwise_cfg.num_layers={} but the model has parameter {} (block {}): "
                              "set num_layers to the backbone depth".format(num_layers, name, block))
        return block + 1
    return num_layers + 1


def _layer_decay_enabled(constructor: Any, paramwise: Mapping[str, Any]) -> bool:
    """Validate ``constructor``/``paramwise_cfg``; True when ORION's layer-wise decay applies."""
    unknown = sorted(set(paramwise) - set(_PARAMWISE_KEYS))
    if unknown:
        raise ConfigError("optimizer.paramwise_cfg: unknown keys {} (known: {})".format(unknown, list(_PARAMWISE_KEYS)))
    if constructor not in (None, "DefaultOptimizerConstructor") + _LAYER_DECAY_CONSTRUCTORS:
        raise ConfigError("optimizer.constructor {!r} is not supported (use one of {})".format(
            constructor, ("DefaultOptimizerConstructor",) + _LAYER_DECAY_CONSTRUCTORS))
    layer_decay = constructor in _LAYER_DECAY_CONSTRUCTORS or (constructor is None and "decay_rate" in paramwise)
    if layer_decay:
        for key in ("decay_rate", "num_layers"):
            if key not in paramwise:
                raise ConfigError("optimizer.paramwise_cfg.{} is required for layer-wise decay".format(key))
        if paramwise.get("decay_type", "vit_wise") not in ("vit_wise", "layer_wise"):
            raise ConfigError("optimizer.paramwise_cfg.decay_type must be 'vit_wise' or 'layer_wise', got {!r}"
                              .format(paramwise.get("decay_type")))
    return layer_decay


def _lr_scale_and_decay(name: str, param: torch.Tensor, base_wd: float, layer_decay: bool,
                        paramwise: Mapping[str, Any]) -> Tuple[float, float]:
    """(lr multiplier, weight decay) of one parameter under ``paramwise_cfg``."""
    no_decay_names = tuple(paramwise.get("no_decay_names", ("pos_embed", "cls_token", "rel_pos")))
    no_decay = param.ndim <= 1 or name.endswith(".bias") or any(n in name for n in no_decay_names)
    lr_scale, wd = 1.0, (0.0 if no_decay else base_wd)
    if layer_decay:
        num_layers = int(paramwise["num_layers"])
        layer_id = vit_layer_id(name, num_layers, paramwise.get("backbone_prefix", "img_backbone"))
        if layer_id is not None:
            lr_scale = float(paramwise["decay_rate"]) ** (num_layers + 1 - layer_id)
        elif "lm_head" in name:
            lr_scale = float(paramwise.get("lm_head_decay_rate", 1.0))
        else:
            lr_scale = float(paramwise.get("head_decay_rate", 1.0))
    custom_keys = paramwise.get("custom_keys") or {}
    matches = [k for k in custom_keys if k in name]
    if matches:
        key = max(matches, key=len)
        lr_scale *= float(custom_keys[key].get("lr_mult", 1.0))
        wd *= float(custom_keys[key].get("decay_mult", 1.0))
    return lr_scale, wd


def build_kd_optimizer(model: nn.Module, optimizer_cfg: Mapping) -> Tuple[torch.optim.Optimizer, List[Dict]]:
    """Build the optimiser over the parameters that require gradients, with ORION's layer-wise decay.

    ``optimizer_cfg``: ``type`` (AdamW/Adam/SGD), ``lr``, ``weight_decay`` and the
    optimiser's own keywords; optional ``constructor`` and ``paramwise_cfg``
    (``decay_rate``, ``num_layers``, ``decay_type``, ``head_decay_rate``,
    ``lm_head_decay_rate``, ``custom_keys`` with ``lr_mult``/``decay_mult``).
    Layer decay scales block N's lr by ``decay_rate ** (num_layers + 1 - (N + 1))``;
    1-D parameters, biases and position embeddings get no weight decay.
    Returns the optimiser and one summary dict per parameter group.
    """
    cfg = dict(to_plain(optimizer_cfg) or {})
    opt_type = cfg.pop("type", "AdamW")
    if opt_type not in _OPTIMIZERS:
        raise ConfigError("optimizer.type must be one of {}, got {!r}".format(sorted(_OPTIMIZERS), opt_type))
    if "lr" not in cfg:
        raise ConfigError("optimizer.lr is required")
    paramwise = dict(cfg.pop("paramwise_cfg", None) or {})
    layer_decay = _layer_decay_enabled(cfg.pop("constructor", None), paramwise)
    base_lr, base_wd = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0))
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, param in unwrap_model(model).named_parameters():
        if param.requires_grad:
            key = _lr_scale_and_decay(name, param, base_wd, layer_decay, paramwise)
            group = groups.setdefault(key, dict(params=[], names=[]))
            group["params"].append(param)
            group["names"].append(name)
    if not groups:
        raise ConfigError("the model has no parameter that requires gradients: nothing to train")
    param_groups, summaries = [], []
    for (lr_scale, wd), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        param_groups.append(dict(params=group["params"], lr=base_lr * lr_scale, lr_scale=lr_scale, weight_decay=wd))
        summaries.append(dict(lr_scale=lr_scale, weight_decay=wd, num_params=len(group["names"]),
                              numel=sum(p.numel() for p in group["params"]), names=group["names"]))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    try:
        optimizer = _OPTIMIZERS[opt_type](param_groups, **kwargs)
    except TypeError as exc:
        raise ConfigError("optimizer: {} does not accept these settings {}: {}".format(opt_type, kwargs, exc))
    return optimizer, summaries


def lr_factor_at(it: int, max_iters: int, lr_config: Optional[Mapping], iters_per_epoch: int = 1,
                 by_epoch: bool = False) -> float:
    """Multiplier on each group's initial lr before step ``it`` (0-based global iteration).

    Cosine annealing from 1 to ``min_lr_ratio`` over ``max_iters`` iterations
    (or over epochs with ``by_epoch=True``, progress = completed epochs), and a
    linear warmup over the first ``warmup_iters`` iterations that scales the
    cosine value by ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``
    (so step 0 uses ``warmup_ratio``). Policies: 'CosineAnnealing', 'fixed'.
    """
    lc = dict(to_plain(lr_config) or {})
    policy = lc.get("policy", "CosineAnnealing")
    if policy not in ("CosineAnnealing", "fixed", "Fixed"):
        raise ConfigError("lr_config.policy must be 'CosineAnnealing' or 'fixed', got {!r}".format(policy))
    factor = 1.0
    if policy == "CosineAnnealing":
        if "min_lr" in lc:
            raise ConfigError("lr_config.min_lr (absolute) is not supported: use min_lr_ratio")
        min_ratio = float(lc.get("min_lr_ratio", 0.0))
        if by_epoch:
            total = max(1, int(math.ceil(max_iters / max(1, iters_per_epoch))))
            progress = it // max(1, iters_per_epoch)
        else:
            total, progress = max(1, max_iters), it
        factor = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, total) / total))
    warmup = lc.get("warmup")
    if warmup is not None:
        if warmup != "linear":
            raise ConfigError("lr_config.warmup must be 'linear' or None, got {!r}".format(warmup))
        warmup_iters = int(lc.get("warmup_iters", 0))
        ratio = float(lc.get("warmup_ratio", 0.1))
        if warmup_iters > 0 and it < warmup_iters:
            factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - ratio)
    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_config: Optional[Mapping], max_iters: int,
                       iters_per_epoch: int = 1, by_epoch: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor at iteration ``it`` is :func:`lr_factor_at`; call ``step()`` after each iteration."""
    lr_factor_at(0, max_iters, lr_config, iters_per_epoch, by_epoch)  # validate the config before training
    factor = partial(lr_factor_at, max_iters=max_iters, lr_config=to_plain(lr_config), iters_per_epoch=iters_per_epoch,
                     by_epoch=by_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["vit_layer_id", "build_kd_optimizer", "lr_factor_at", "build_lr_scheduler"]
