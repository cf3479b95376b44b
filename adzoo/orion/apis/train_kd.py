"""The KD training loop: ORION's config keys and logs, nanoGPT's shape.

``train_kd(model, datasets, cfg)`` reads top to bottom: settings, data, model
(on device, wrapped in DDP after the model froze what it freezes), optimiser,
resume, then one loop that sets the distillation alpha, steps, logs and saves.

What it reads from the config (ORION's keys): ``data.samples_per_gpu``,
``data.workers_per_gpu``, ``optimizer`` (+ ``constructor``/``paramwise_cfg``
for layer-wise decay keyed on ``img_backbone.blocks.N.``), ``optimizer_config
.grad_clip``, ``fp16`` (dynamic or static loss scale) or ``mixed_precision=
'bf16'``, ``lr_config`` (linear warmup then cosine to ``min_lr_ratio``),
``runner`` (``IterBasedRunner``/``EpochBasedRunner``), ``checkpoint_config``,
``log_config``, ``load_from``, ``resume_from``, ``auto_resume``, ``work_dir``,
``seed``, ``find_unused_parameters`` and ``kd_config`` (alpha schedule).

Resuming is exact: the sample order depends only on (seed, epoch), batches
already done in an interrupted epoch are skipped, and the python/numpy/torch
(/cuda) RNG states of every rank are restored, so a killed-then-resumed run
ends with the same weights as an uninterrupted one (bit for bit on a CPU).

Plugin file: runs in ORION's environment too (Python 3.8, torch 2.0-2.4, no
mmengine); ORION's own modules are only imported lazily and optionally.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mmcv.models.utils.checkpoint_io import (atomic_torch_save, atomic_write_text, load_checkpoint_file,
                                            state_dict_of)
from mmcv.models.utils.kd_config import resolve_distillation_alpha, validate_kd_config
from mmcv.models.utils.batch_io import move_batch_to_device
from mmcv.utils import get_dist_info

__all__ = [
    "ConfigError",
    "train_kd",
    "resolve_distillation_alpha",
    "validate_kd_config",
    "build_kd_optimizer",
    "lr_factor_at",
    "ResumableDistributedSampler",
    "find_resume_checkpoint",
    "load_checkpoint_file",
    "format_log_line",
]

LOGGER_NAME = "orion_kd"
_CKPT_RE = re.compile(r"^(iter|epoch)_(\d+)\.pth$")


class ConfigError(ValueError):
    """A mistake in the config or the command line; the entry point reports it as one line."""


# --------------------------------------------------------------------------- small helpers
def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for dicts/ConfigDicts (``default`` when absent or when ``obj`` is None)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _to_plain(obj: Any) -> Any:
    """Recursively turn ConfigDicts/tuples/numpy scalars into plain, ``weights_only``-safe types."""
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # also str subclasses such as torch's TorchVersion
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if obj is None:
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or the model itself."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def _config_text(cfg: Any) -> str:
    """The config as Python text (``pretty_text``), falling back to its raw text or repr."""
    for attr in ("pretty_text", "text"):
        try:
            text = getattr(cfg, attr)
            if isinstance(text, str) and text:
                return text
        except Exception:  # pretty_text needs yapf and may fail on exotic values
            continue
    return repr(_to_plain(cfg))


# --------------------------------------------------------------------------- optimiser
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
    cfg = dict(_to_plain(optimizer_cfg) or {})
    opt_type = cfg.pop("type", "AdamW")
    if opt_type not in _OPTIMIZERS:
        raise ConfigError("optimizer.type must be one of {}, got {!r}".format(sorted(_OPTIMIZERS), opt_type))
    constructor = cfg.pop("constructor", None)
    paramwise = dict(cfg.pop("paramwise_cfg", None) or {})
    if "lr" not in cfg:
        raise ConfigError("optimizer.lr is required")
    base_lr = float(cfg["lr"])
    base_wd = float(cfg.get("weight_decay", 0.0))
    unknown = sorted(set(paramwise) - set(_PARAMWISE_KEYS))
    if unknown:
        raise ConfigError("optimizer.paramwise_cfg: unknown keys {} (known: {})".format(unknown, list(_PARAMWISE_KEYS)))
    layer_decay = constructor in _LAYER_DECAY_CONSTRUCTORS or (constructor is None and "decay_rate" in paramwise)
    if constructor not in (None, "DefaultOptimizerConstructor") + _LAYER_DECAY_CONSTRUCTORS:
        raise ConfigError("optimizer.constructor {!r} is not supported (use one of {})".format(
            constructor, ("DefaultOptimizerConstructor",) + _LAYER_DECAY_CONSTRUCTORS))
    if layer_decay:
        for key in ("decay_rate", "num_layers"):
            if key not in paramwise:
                raise ConfigError("optimizer.paramwise_cfg.{} is required for layer-wise decay".format(key))
        if paramwise.get("decay_type", "vit_wise") not in ("vit_wise", "layer_wise"):
            raise ConfigError("optimizer.paramwise_cfg.decay_type must be 'vit_wise' or 'layer_wise', got {!r}"
                              .format(paramwise.get("decay_type")))
    decay_rate = float(paramwise.get("decay_rate", 1.0))
    num_layers = int(paramwise.get("num_layers", 0))
    prefix = paramwise.get("backbone_prefix", "img_backbone")
    custom_keys = paramwise.get("custom_keys") or {}
    no_decay_names = tuple(paramwise.get("no_decay_names", ("pos_embed", "cls_token", "rel_pos")))

    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, param in _unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        lr_scale = 1.0
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(n in name for n in no_decay_names)
        wd = 0.0 if no_decay else base_wd
        if layer_decay:
            layer_id = vit_layer_id(name, num_layers, prefix)
            if layer_id is not None:
                lr_scale = decay_rate ** (num_layers + 1 - layer_id)
            elif "lm_head" in name:
                lr_scale = float(paramwise.get("lm_head_decay_rate", 1.0))
            else:
                lr_scale = float(paramwise.get("head_decay_rate", 1.0))
        if custom_keys:
            matches = [k for k in custom_keys if k in name]
            if matches:
                key = max(matches, key=len)
                lr_scale *= float(custom_keys[key].get("lr_mult", 1.0))
                wd *= float(custom_keys[key].get("decay_mult", 1.0))
        group = groups.setdefault((lr_scale, wd), dict(params=[], names=[], lr_scale=lr_scale, weight_decay=wd))
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError("the model has no parameter that requires gradients: nothing to train")
    param_groups = []
    summaries = []
    for (lr_scale, wd), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1])):
        lr = base_lr * lr_scale
        param_groups.append(dict(params=group["params"], lr=lr, initial_lr=lr, lr_scale=lr_scale, weight_decay=wd))
        summaries.append(dict(lr_scale=lr_scale, weight_decay=wd, num_params=len(group["names"]),
                              numel=sum(p.numel() for p in group["params"]), names=group["names"]))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    try:
        optimizer = _OPTIMIZERS[opt_type](param_groups, **kwargs)
    except TypeError as exc:
        raise ConfigError("optimizer: {} does not accept these settings {}: {}".format(opt_type, kwargs, exc))
    return optimizer, summaries


# --------------------------------------------------------------------------- learning rate
def lr_factor_at(it: int, max_iters: int, lr_config: Optional[Mapping], iters_per_epoch: int = 1,
                 by_epoch: bool = False) -> float:
    """Multiplier on each group's initial lr before step ``it`` (0-based global iteration).

    Cosine annealing from 1 to ``min_lr_ratio`` over ``max_iters`` iterations
    (or over epochs with ``by_epoch=True``, progress = completed epochs), and a
    linear warmup over the first ``warmup_iters`` iterations that scales the
    cosine value by ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``
    (so step 0 uses ``warmup_ratio``). Policies: 'CosineAnnealing', 'fixed'.
    """
    lc = dict(_to_plain(lr_config) or {})
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


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


# --------------------------------------------------------------------------- data
class ResumableDistributedSampler(Sampler):
    """Shuffled indices for one rank whose order depends only on (seed, epoch).

    The permutation is padded (cyclically) to a multiple of
    ``batch_size * num_replicas`` so every rank gets the same number of full
    batches; ``set_start_batch(k)`` skips the first ``k`` batches of the
    epoch, which is how an interrupted epoch resumes.
    """

    def __init__(self, dataset_len: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        if dataset_len <= 0:
            raise ConfigError("the training dataset is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        chunk = batch_size * num_replicas
        self.total_size = int(math.ceil(dataset_len / chunk)) * chunk
        self.num_batches = self.total_size // chunk

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, start_batch: int) -> None:
        self.start_batch = max(0, min(start_batch, self.num_batches))

    def _epoch_indices(self) -> List[int]:
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        reps = int(math.ceil(self.total_size / len(order)))
        order = (order * reps)[:self.total_size]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size


class _PerSampleSeeded(Dataset):
    """Seeds python/numpy/torch from (seed, epoch, index) before each sample in a worker.

    Data augmentation in worker processes then depends on the sample alone, not
    on which worker loads it, so skipping batches on resume changes nothing.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            s = (self.seed * 1000003 + self.epoch * 7919 + int(idx)) % (2 ** 32)
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        return self.dataset[idx]


def _resolve_collate(dataset: Any, samples_per_gpu: int) -> Optional[Callable]:
    """The dataset's ``collate_fn``; else ORION's DataContainer-aware collate; else torch's default."""
    fn = getattr(dataset, "collate_fn", None)
    if callable(fn):
        return fn
    try:  # ORION overlay: the collate that ORION's build_dataloader uses
        from functools import partial

        from mmcv.parallel import collate  # type: ignore
        return partial(collate, samples_per_gpu=samples_per_gpu)
    except ImportError:
        return None


# --------------------------------------------------------------------------- checkpoints
def _load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, exact: bool,
                        logger: logging.Logger) -> None:
    """Load weights; mis-shaped keys always fail, missing/unexpected ones fail when ``exact``."""
    own = model.state_dict()
    mis_shaped = ["{}: checkpoint {} vs model {}".format(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mis_shaped:
        raise ConfigError("checkpoint {} does not fit the model ({} mis-shaped keys, e.g. {})".format(
            path, len(mis_shaped), "; ".join(mis_shaped[:3])))
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if exact and (missing or unexpected):
        raise ConfigError("checkpoint {} does not match the model: {} missing keys {}, {} unexpected keys {}".format(
            path, len(missing), missing[:5], len(unexpected), unexpected[:5]))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if missing:
        logger.warning("load_from %s: %d model keys not in the checkpoint keep their current values (e.g. %s)",
                       path, len(missing), missing[:5])
    if unexpected:
        logger.warning("load_from %s: %d checkpoint keys ignored (e.g. %s)", path, len(unexpected), unexpected[:5])


def _rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain types (``weights_only``-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = dict(
        python_version=int(py[0]), python_state=torch.tensor(py[1], dtype=torch.int64),
        python_gauss=py[2],
        numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
        numpy_has_gauss=int(np_state[3]), numpy_cached_gaussian=float(np_state[4]),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_cached_gaussian"])))
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.clone() for s in cuda_states])


def _link_latest(src: str, latest: str) -> None:
    """Point ``latest`` at ``src`` atomically: a hard link (no extra disk), else a copy."""
    tmp = "{}.tmp.{}".format(latest, os.getpid())
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, latest)


def _prune_checkpoints(out_dir: str, kind: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ``<kind>_N.pth`` files (``keep <= 0`` keeps all)."""
    if keep is None or keep <= 0:
        return
    found = []
    for name in os.listdir(out_dir):
        m = _CKPT_RE.match(name)
        if m and m.group(1) == kind:
            found.append((int(m.group(2)), name))
    for _, name in sorted(found)[:-keep]:
        os.remove(os.path.join(out_dir, name))


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """``latest.pth`` in ``work_dir``, else its newest ``iter_N``/``epoch_N`` checkpoint, else None."""
    if not os.path.isdir(work_dir):
        return None
    latest = os.path.join(work_dir, "latest.pth")
    if os.path.isfile(latest):
        return latest
    found = []
    for name in os.listdir(work_dir):
        m = _CKPT_RE.match(name)
        if m:
            found.append((os.path.getmtime(os.path.join(work_dir, name)), int(m.group(2)), name))
    return os.path.join(work_dir, max(found)[2]) if found else None


# --------------------------------------------------------------------------- logging
def format_log_line(by_epoch: bool, epoch: int, inner_iter: int, iters_per_epoch: int, global_iter: int,
                    max_iters: int, values: Mapping[str, Any]) -> str:
    """One line in the shape of mmcv's TextLoggerHook.

    ``Iter [i/N]\\tlr: 1.000e-04, eta: 0:01:02, time: 0.123, data_time: 0.004, memory: 512, k: v, ...``
    or ``Epoch [e][i/n]\\t...`` (1-based epoch and iteration numbers).
    """
    head = "Epoch [{}][{}/{}]\t".format(epoch, inner_iter, iters_per_epoch) if by_epoch \
        else "Iter [{}/{}]\t".format(global_iter, max_iters)
    parts = []
    for key, val in values.items():
        if key == "lr":
            parts.append("lr: {:.3e}".format(val))
        elif key in ("time", "data_time"):
            parts.append("{}: {:.3f}".format(key, val))
        elif isinstance(val, float):
            parts.append("{}: {:.4f}".format(key, val))
        else:
            parts.append("{}: {}".format(key, val))
    return head + ", ".join(parts)


def _peak_memory_mb(device: torch.device) -> int:
    """Peak CUDA memory allocated (MB) on GPU; peak resident set size (MB) of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) / (1024 * 1024))
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak / (1024 * 1024)) if sys.platform == "darwin" else int(peak / 1024)
    except (ImportError, AttributeError):
        return 0


class _TrainLog:
    """Text, JSON-lines and TensorBoard output of the loop; only rank 0 writes."""

    def __init__(self, work_dir: str, timestamp: str, rank: int, tensorboard: bool) -> None:
        self.rank = rank
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: List[logging.Handler] = []
        self.json_path = os.path.join(work_dir, "{}.log.json".format(timestamp))
        self.text_path = os.path.join(work_dir, "{}.log".format(timestamp))
        self.writer = None
        fmt = logging.Formatter("%(asctime)s - {} - %(levelname)s - %(message)s".format(LOGGER_NAME))
        if rank == 0:
            for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(self.text_path, mode="a")):
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)
                self._handlers.append(handler)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(os.path.join(work_dir, "tf_logs"))
                except ImportError:
                    self.logger.warning("TensorboardLoggerHook is configured but tensorboard is not installed: "
                                        "no event files (pip install tensorboard)")
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setLevel(logging.ERROR)
            handler.setFormatter(fmt)
            self.logger.addHandler(handler)
            self._handlers.append(handler)

    def record(self, line: str, scalars: Dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        self.logger.info(line)
        with open(self.json_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(scalars) + "\n")
        if self.writer is not None:
            for key, val in scalars.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and key not in ("epoch", "iter"):
                    self.writer.add_scalar("train/{}".format(key), val, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()


def _reduce_log_values(values: Dict[str, float], memory: int, world_size: int, device: torch.device
                       ) -> Tuple[Dict[str, float], int]:
    """Average ``values`` over ranks (keys must agree) and take the max of ``memory``."""
    if world_size <= 1:
        return values, memory
    keys = sorted(values)
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, keys)
    if any(g != keys for g in gathered):
        raise RuntimeError("ranks log different keys: {}".format(gathered))
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    m = torch.tensor([memory], dtype=torch.int64, device=dev)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist())}, int(m.item())


# --------------------------------------------------------------------------- settings
def _runner_settings(cfg: Any, iters_per_epoch: int) -> Tuple[str, int, int]:
    """(runner type, max_epochs, max_iters) from ``cfg.runner`` (or ORION's ``total_epochs``)."""
    runner = _get(cfg, "runner")
    if runner is None:
        total_epochs = _get(cfg, "total_epochs")
        if total_epochs is None:
            raise ConfigError("the config needs runner=dict(type='EpochBasedRunner', max_epochs=...) "
                              "or runner=dict(type='IterBasedRunner', max_iters=...)")
        runner = dict(type="EpochBasedRunner", max_epochs=total_epochs)
    kind = _get(runner, "type", "EpochBasedRunner")
    if kind == "EpochBasedRunner":
        max_epochs = _get(runner, "max_epochs")
        if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs <= 0:
            raise ConfigError("runner.max_epochs must be a positive integer, got {!r}".format(max_epochs))
        return kind, max_epochs, max_epochs * iters_per_epoch
    if kind == "IterBasedRunner":
        max_iters = _get(runner, "max_iters")
        if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters <= 0:
            raise ConfigError("runner.max_iters must be a positive integer, got {!r}".format(max_iters))
        return kind, int(math.ceil(max_iters / iters_per_epoch)), max_iters
    raise ConfigError("runner.type must be 'EpochBasedRunner' or 'IterBasedRunner', got {!r}".format(kind))


def _precision_settings(cfg: Any, device: torch.device, logger: logging.Logger) -> Tuple[Optional[torch.dtype], Any]:
    """(autocast dtype or None, GradScaler or None) from ``fp16`` / ``mixed_precision``."""
    fp16 = _get(cfg, "fp16")
    mode = _get(cfg, "mixed_precision")
    if mode not in (None, "fp32", "no", "fp16", "bf16"):
        raise ConfigError("mixed_precision must be 'fp32', 'fp16' or 'bf16', got {!r}".format(mode))
    if fp16 is not None and mode in ("bf16", "fp32", "no"):
        raise ConfigError("the config sets both fp16={} and mixed_precision={!r}: keep one".format(fp16, mode))
    if mode == "bf16":
        return torch.bfloat16, None
    if fp16 is None and mode != "fp16":
        return None, None
    if device.type != "cuda":
        logger.warning("fp16 mixed precision needs CUDA; training in fp32 on %s "
                       "(mixed_precision='bf16' works on CPUs)", device)
        return None, None
    loss_scale = _get(fp16, "loss_scale", "dynamic")
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if isinstance(loss_scale, Mapping):
        kwargs = dict(_to_plain(loss_scale))
    elif loss_scale == "dynamic":
        kwargs = {}
    elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        kwargs = dict(init_scale=float(loss_scale), growth_factor=1.0, backoff_factor=1.0, growth_interval=2 ** 31 - 1)
    else:
        raise ConfigError("fp16.loss_scale must be 'dynamic', a positive number or a dict, got {!r}".format(loss_scale))
    try:
        scaler = scaler_cls("cuda", **kwargs) if scaler_cls is not None else torch.cuda.amp.GradScaler(**kwargs)
    except TypeError as exc:
        raise ConfigError("fp16.loss_scale: {}".format(exc))
    return torch.float16, scaler


def _logging_settings(cfg: Any, epoch_runner: bool) -> Tuple[int, bool, bool]:
    """(interval, by_epoch, tensorboard) from ``log_config``."""
    log_cfg = _get(cfg, "log_config") or {}
    interval = int(_get(log_cfg, "interval", 10))
    if interval <= 0:
        raise ConfigError("log_config.interval must be positive, got {}".format(interval))
    by_epoch, tensorboard = epoch_runner, False
    for hook in _get(log_cfg, "hooks", None) or [dict(type="TextLoggerHook")]:
        kind = _get(hook, "type")
        if kind == "TextLoggerHook":
            by_epoch = bool(_get(hook, "by_epoch", epoch_runner))
        elif kind == "TensorboardLoggerHook":
            tensorboard = True
        else:
            raise ConfigError("log_config.hooks: unsupported hook type {!r} (TextLoggerHook, TensorboardLoggerHook)"
                              .format(kind))
    return interval, by_epoch, tensorboard


def _device_for(distributed: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if distributed else torch.cuda.current_device())
    return torch.device("cpu")


def _forward(model: nn.Module, batch: Any) -> Dict[str, Any]:
    """``model(batch, return_loss=True)`` as ``dict(loss, log_vars, ...)``.

    A model that returns the raw loss dict instead is reduced with its own
    ``_parse_losses`` (ORION's convention), so the optimised total is the model's.
    """
    outputs = model(batch, return_loss=True)
    if isinstance(outputs, Mapping) and "loss" not in outputs:
        parse = getattr(_unwrap(model), "_parse_losses", None)
        if callable(parse):
            loss, log_vars = parse(outputs)
            outputs = dict(loss=loss, log_vars=log_vars)
    if not isinstance(outputs, Mapping) or not isinstance(outputs.get("loss"), torch.Tensor):
        raise TypeError("model(data, return_loss=True) must return dict(loss=<tensor>, log_vars, num_samples), "
                        "got {}".format(type(outputs).__name__ if not isinstance(outputs, Mapping)
                                        else "a dict with keys {}".format(sorted(outputs))))
    return dict(outputs)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train_kd", unit="it", dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------- the loop
def train_kd(model: nn.Module, datasets: Any, cfg: Any, distributed: bool = False, timestamp: Optional[str] = None,
             meta: Optional[Mapping] = None) -> nn.Module:
    """Train ``model`` on ``datasets[0]`` as ``cfg`` says (see the module docstring); returns the model.

    The model follows ORION's detector contract (``forward(data, return_loss=True)``
    returns ``dict(loss, log_vars, num_samples)``) and has already frozen what it
    does not train. Optional hooks: ``set_distillation_alpha(alpha)`` (called at
    every epoch start) and ``export_student(path)`` (called at the end, rank 0).
    """
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train_kd(distributed=True) needs torch.distributed to be initialised")
    rank, world_size = get_dist_info() if distributed else (0, 1)
    timestamp = timestamp or time.strftime("%Y%m%d_%H%M%S", time.localtime())
    work_dir = _get(cfg, "work_dir")
    if not work_dir:
        raise ConfigError("cfg.work_dir is not set (use --work-dir)")
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)

    # ---- settings
    data_cfg = _get(cfg, "data") or {}
    samples_per_gpu = int(_get(data_cfg, "samples_per_gpu", 1))
    workers_per_gpu = int(_get(data_cfg, "workers_per_gpu", 0))
    if samples_per_gpu <= 0 or workers_per_gpu < 0:
        raise ConfigError("data.samples_per_gpu must be > 0 and data.workers_per_gpu >= 0, got {} and {}".format(
            samples_per_gpu, workers_per_gpu))
    # One source of truth for alpha: the settings the KD model was built with (its resolved kd_config),
    # else the config's model.kd_config, else the top-level kd_config.
    kd_config = getattr(model, "kd_config", None)
    if kd_config is None:
        kd_config = _get(_get(cfg, "model"), "kd_config")
    if kd_config is None:
        kd_config = _get(cfg, "kd_config")
    kd_settings = validate_kd_config(kd_config)
    top_level = _get(cfg, "kd_config")
    if top_level is not None and validate_kd_config(top_level) != kd_settings:
        logging.getLogger(LOGGER_NAME).warning(
            "kd_config (top level) and the model's kd_config disagree on alpha; the model's wins: %s", kd_settings)
    seed = _get(cfg, "seed")
    seed = int(seed) if seed is not None else 0
    grad_clip = _get(_get(cfg, "optimizer_config"), "grad_clip")
    ckpt_cfg = _get(cfg, "checkpoint_config") or {}
    lr_config = _get(cfg, "lr_config")

    epoch_runner_type = _get(_get(cfg, "runner"), "type", "EpochBasedRunner") != "IterBasedRunner"
    interval, log_by_epoch, tensorboard = _logging_settings(cfg, epoch_runner_type)
    base_lr = float(_get(_get(cfg, "optimizer"), "lr", 0.0) or 0.0)
    log = _TrainLog(work_dir, timestamp, rank, tensorboard=tensorboard)
    logger = log.logger
    try:
        device = _device_for(distributed)
        if rank == 0:
            cfg_name = os.path.basename(_get(cfg, "filename", None) or "config.py")
            atomic_write_text(os.path.join(work_dir, cfg_name), _config_text(cfg))

        # ---- data
        dataset = datasets[0] if isinstance(datasets, (list, tuple)) else datasets
        sampler = ResumableDistributedSampler(len(dataset), samples_per_gpu, world_size, rank, seed)
        iters_per_epoch = sampler.num_batches
        runner_type, max_epochs, max_iters = _runner_settings(cfg, iters_per_epoch)
        epoch_runner = runner_type == "EpochBasedRunner"
        lr_by_epoch = bool(_get(lr_config, "by_epoch", epoch_runner))
        ckpt_interval = int(_get(ckpt_cfg, "interval", 1))
        ckpt_by_epoch = bool(_get(ckpt_cfg, "by_epoch", epoch_runner))
        max_keep = _get(ckpt_cfg, "max_keep_ckpts", -1)
        ckpt_dir = os.path.abspath(_get(ckpt_cfg, "out_dir", None) or work_dir)
        os.makedirs(ckpt_dir, exist_ok=True)
        save_last = bool(_get(ckpt_cfg, "save_last", True))

        # ---- model and optimiser (the model froze its parts in __init__; DDP comes after)
        model = model.to(device)
        autocast_dtype, scaler = _precision_settings(cfg, device, logger)
        optimizer, groups = build_kd_optimizer(model, _get(cfg, "optimizer") or {})
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        total_params = sum(p.numel() for p in model.parameters())
        logger.info("trainable parameters: %d tensors, %.2f M of %.2f M; %d optimizer groups (lr scale %s)",
                    len(trainable), sum(p.numel() for p in trainable) / 1e6, total_params / 1e6, len(groups),
                    ", ".join("{:.4g}".format(g["lr_scale"]) for g in groups))

        # ---- weights: load_from, or resume (weights + optimizer + counters + RNG)
        start_iter, start_epoch, start_inner = 0, 0, 0
        rng_to_restore = None
        resume_from = _get(cfg, "resume_from")
        if not resume_from and _get(cfg, "auto_resume", False):
            resume_from = find_resume_checkpoint(ckpt_dir)
            logger.info("auto-resume: %s", resume_from or "no checkpoint in {}, starting fresh".format(ckpt_dir))
        load_from = _get(cfg, "load_from")
        if resume_from:
            ckpt = load_checkpoint_file(resume_from)
            _load_model_weights(model, state_dict_of(ckpt, resume_from), resume_from, exact=True, logger=logger)
            if "optimizer" in ckpt:
                try:
                    optimizer.load_state_dict(ckpt["optimizer"])
                except ValueError as exc:
                    raise ConfigError("cannot resume the optimizer from {}: {}".format(resume_from, exc))
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            ck_meta = ckpt.get("meta") or {}
            start_iter = int(ck_meta.get("iter", ckpt.get("iter", 0)))
            start_epoch = int(ck_meta.get("epoch", ckpt.get("epoch", 0)))
            start_inner = int(ck_meta.get("inner_iter", 0))
            if "seed" in ck_meta and ck_meta["seed"] is not None and int(ck_meta["seed"]) != seed:
                logger.info("resume: using the checkpoint's seed %s (config says %s)", ck_meta["seed"], seed)
                seed = int(ck_meta["seed"])
                sampler.seed = seed
            if int(ck_meta.get("iters_per_epoch", iters_per_epoch)) != iters_per_epoch:
                logger.warning("resume: the checkpoint has %s iterations per epoch, now %d (different batch size, "
                               "data or world size): continuing from epoch %d, the data order is not reproduced",
                               ck_meta.get("iters_per_epoch"), iters_per_epoch, start_epoch)
                start_inner = 0
            rngs = ckpt.get("rng") or []
            if len(rngs) == world_size:
                rng_to_restore = rngs[rank]
            else:
                logger.warning("resume: RNG states of %d ranks in the checkpoint, %d ranks now: RNG not restored",
                               len(rngs), world_size)
            del ckpt
            logger.info("resumed from %s: epoch %d, iter %d", resume_from, start_epoch, start_iter)
        elif load_from:
            ckpt = load_checkpoint_file(load_from)
            _load_model_weights(model, state_dict_of(ckpt, load_from), load_from, exact=False, logger=logger)
            del ckpt
            logger.info("loaded weights from %s", load_from)

        raw_model = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=bool(_get(cfg, "find_unused_parameters", False)))

        collate_fn = _resolve_collate(dataset, samples_per_gpu)
        loader_dataset = _PerSampleSeeded(dataset, seed) if workers_per_gpu > 0 else dataset
        loader_gen = torch.Generator()

        def make_loader(epoch: int, start_batch: int) -> DataLoader:
            sampler.set_epoch(epoch)
            sampler.set_start_batch(start_batch)
            if isinstance(loader_dataset, _PerSampleSeeded):
                loader_dataset.epoch = epoch
            loader_gen.manual_seed(seed * 1000003 + epoch)
            return DataLoader(loader_dataset, batch_size=samples_per_gpu, sampler=sampler,
                              num_workers=workers_per_gpu, collate_fn=collate_fn, generator=loader_gen,
                              pin_memory=device.type == "cuda", drop_last=False)

        has_alpha = callable(getattr(raw_model, "set_distillation_alpha", None))
        logger.info("KD alpha schedule: %s", kd_settings)
        logger.info("start: %s, %d iterations per epoch, %d epochs / %d iterations, world size %d, device %s, "
                    "precision %s, work_dir %s", runner_type, iters_per_epoch, max_epochs, max_iters, world_size,
                    device, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32"), work_dir)
        if rng_to_restore is not None:
            _set_rng_state(rng_to_restore)

        # ---- the loop
        it, epoch, inner = start_iter, start_epoch, start_inner
        alpha = resolve_distillation_alpha(kd_config, epoch * iters_per_epoch, iters_per_epoch)
        model.train()
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        key_order: List[str] = []
        run_start, run_start_iter = time.time(), it
        bar = _progress(max_iters, it, rank == 0 and sys.stderr.isatty())
        amp_ctx = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def accumulate(key: str, value: float) -> None:
            if key not in sums:
                sums[key], counts[key] = 0.0, 0
                key_order.append(key)
            sums[key] += value
            counts[key] += 1

        while it < max_iters and epoch < max_epochs:
            alpha = resolve_distillation_alpha(kd_config, epoch * iters_per_epoch, iters_per_epoch)
            if has_alpha:
                raw_model.set_distillation_alpha(alpha)
            loader = make_loader(epoch, inner)
            tick = time.time()
            for batch in loader:
                data_time = time.time() - tick
                factor = lr_factor_at(it, max_iters, lr_config, iters_per_epoch, lr_by_epoch)
                _set_lr(optimizer, factor)
                batch = move_batch_to_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                with amp_ctx():
                    outputs = _forward(model, batch)
                loss = outputs["loss"]
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                grad_norm = None
                if grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, **dict(_to_plain(grad_clip))))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                it += 1
                inner += 1

                # -- bookkeeping and logs
                for key, val in (outputs.get("log_vars") or {"loss": loss}).items():
                    accumulate(key, float(val.detach().float().mean()) if isinstance(val, torch.Tensor) else float(val))
                if grad_norm is not None:
                    accumulate("grad_norm", grad_norm)
                accumulate("time", time.time() - tick)
                accumulate("data_time", data_time)
                if bar is not None:
                    bar.update(1)
                end_of_epoch = inner >= iters_per_epoch
                done = it >= max_iters
                due = (inner % interval == 0) if log_by_epoch else (it % interval == 0)
                if due or end_of_epoch or done:
                    avg = {k: sums[k] / counts[k] for k in key_order}
                    memory = _peak_memory_mb(device)
                    avg, memory = _reduce_log_values(avg, memory, world_size if distributed else 1, device)
                    elapsed = time.time() - run_start
                    eta = elapsed / max(1, it - run_start_iter) * (max_iters - it)
                    values: Dict[str, Any] = dict(lr=base_lr * factor,
                                                  eta=str(datetime.timedelta(seconds=int(eta))),
                                                  time=avg["time"], data_time=avg["data_time"], memory=memory)
                    for k in key_order:
                        if k not in ("time", "data_time"):
                            values[k] = avg[k]
                    if has_alpha and "alpha" not in values:  # OrionStudent logs it itself as 'alpha'
                        values["alpha"] = alpha
                    line = format_log_line(log_by_epoch, epoch + 1, inner, iters_per_epoch, it, max_iters, values)
                    scalars = dict(mode="train", epoch=epoch + 1, iter=it, inner_iter=inner)
                    scalars.update({k: v for k, v in values.items() if k != "eta"})
                    if bar is not None:
                        bar.clear()
                    log.record(line, scalars, it)
                    sums.clear()
                    counts.clear()
                    key_order.clear()

                # -- checkpoints
                completed_epoch = epoch + 1 if end_of_epoch else epoch
                if ckpt_by_epoch:
                    save = (end_of_epoch and completed_epoch % ckpt_interval == 0) or (save_last and done)
                    name = "epoch_{}.pth".format(completed_epoch) if end_of_epoch else "iter_{}.pth".format(it)
                else:
                    save = it % ckpt_interval == 0 or (save_last and done)
                    name = "iter_{}.pth".format(it)
                if save:
                    rngs = [_rng_state()]
                    if distributed and world_size > 1:
                        gathered: List[Any] = [None] * world_size
                        dist.all_gather_object(gathered, rngs[0])
                        rngs = gathered
                    if rank == 0:
                        ck_meta = dict(_to_plain(meta or {}))
                        ck_meta.update(epoch=completed_epoch, iter=it, inner_iter=0 if end_of_epoch else inner,
                                       iters_per_epoch=iters_per_epoch, seed=seed, world_size=world_size,
                                       config=_config_text(cfg), kd_config=_to_plain(kd_config or {}),
                                       kd_settings=kd_settings, distillation_alpha=alpha,
                                       time=time.asctime(), torch_version=str(torch.__version__))
                        checkpoint = dict(
                            meta=ck_meta, state_dict=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                            lr_scheduler=dict(policy=_to_plain(lr_config), last_iter=it, factor=factor,
                                              by_epoch=lr_by_epoch, max_iters=max_iters),
                            scaler=scaler.state_dict() if scaler is not None else None,
                            rng=rngs, epoch=completed_epoch, iter=it)
                        path = os.path.join(ckpt_dir, name)
                        atomic_torch_save(checkpoint, path)
                        _link_latest(path, os.path.join(ckpt_dir, "latest.pth"))
                        _prune_checkpoints(ckpt_dir, "epoch" if ckpt_by_epoch else "iter",
                                           int(max_keep) if max_keep is not None else -1)
                        logger.info("saved checkpoint %s", path)
                if done:
                    break
                tick = time.time()
            epoch += 1
            inner = 0
        if bar is not None:
            bar.close()

        # ---- export
        if distributed:
            dist.barrier()
        exporter = getattr(raw_model, "export_student", None)
        if rank == 0 and callable(exporter):
            export_path = os.path.join(work_dir, "student_export.pth")
            exporter(export_path)
            logger.info("exported the student to %s", export_path)
        logger.info("training finished: %d iterations", it)
        return raw_model
    finally:
        log.close()
