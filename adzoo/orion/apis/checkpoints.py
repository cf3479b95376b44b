"""Checkpoints of the standalone KD loop: ORION's layout, exact resume, weights-only loading.

A checkpoint is ``{'meta', 'state_dict', 'optimizer', 'lr_scheduler', 'scaler', 'rng',
'memory', 'epoch', 'iter'}`` written atomically (``checkpoint_io.atomic_torch_save``) as
``iter_N.pth`` / ``epoch_N.pth`` plus ``latest.pth``, keeping the newest
``max_keep_ckpts``. ``rng`` holds the python/numpy/torch(/cuda) RNG states of every
rank, so a resumed run draws the same random numbers (GridMask, dropout) as an
uninterrupted one; ``memory`` holds every rank's temporal memory of the heads (the
modules with ``memory_state()``/``load_memory_state()``), which a streaming run carries
from one iteration into the next. Every file is read through ``checkpoint_io.load_checkpoint_file``
(``weights_only=True``).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from mmcv.models.utils.checkpoint_io import atomic_torch_save, load_checkpoint_file, state_dict_of, temp_path_for

from .settings import ConfigError

_CKPT_RE = re.compile(r"^(iter|epoch)_(\d+)\.pth$")


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain types (``weights_only``-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = dict(
        python_version=int(py[0]), python_state=torch.tensor(py[1], dtype=torch.int64), python_gauss=py[2],
        numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
        numpy_has_gauss=int(np_state[3]), numpy_cached_gaussian=float(np_state[4]),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_cached_gaussian"])))
    torch.set_rng_state(state["torch"].clone())
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.clone() for s in cuda_states])


def memory_states(model: nn.Module) -> Dict[str, Any]:
    """``{module name: module.memory_state()}`` of every module that keeps a temporal memory."""
    return {name: module.memory_state() for name, module in model.named_modules()
            if callable(getattr(module, "memory_state", None)) and callable(getattr(module, "load_memory_state", None))}


def load_memory_states(model: nn.Module, states: Mapping[str, Any]) -> None:
    """Give every module named in ``states`` its memory back (see :func:`memory_states`)."""
    modules = dict(model.named_modules())
    for name, state in states.items():
        if name not in modules:
            raise ConfigError("resume: the checkpoint holds the temporal memory of {!r}, which the model lacks"
                              .format(name))
        modules[name].load_memory_state(state)


def _link_latest(src: str, latest: str) -> None:
    """Point ``latest`` at ``src`` atomically: a hard link (no extra disk), else a copy."""
    tmp = temp_path_for(latest)
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, latest)


def _prune_checkpoints(out_dir: str, kind: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ``<kind>_N.pth`` files (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    found = sorted((int(m.group(2)), name) for name in os.listdir(out_dir)
                   for m in [_CKPT_RE.match(name)] if m and m.group(1) == kind)
    for _, name in found[:-keep]:
        os.remove(os.path.join(out_dir, name))


def save_checkpoint(out_dir: str, name: str, checkpoint: Dict[str, Any], max_keep_ckpts: int) -> str:
    """Write ``out_dir/name`` atomically, point ``latest.pth`` at it and drop old ones; returns the path."""
    path = os.path.join(out_dir, name)
    atomic_torch_save(checkpoint, path)
    _link_latest(path, os.path.join(out_dir, "latest.pth"))
    _prune_checkpoints(out_dir, name.split("_")[0], max_keep_ckpts)
    return path


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """``latest.pth`` in ``work_dir``, else its newest ``iter_N``/``epoch_N`` checkpoint, else None."""
    if not os.path.isdir(work_dir):
        return None
    latest = os.path.join(work_dir, "latest.pth")
    if os.path.isfile(latest):
        return latest
    found = [(os.path.getmtime(os.path.join(work_dir, name)), int(m.group(2)), name)
             for name in os.listdir(work_dir) for m in [_CKPT_RE.match(name)] if m]
    return os.path.join(work_dir, max(found)[2]) if found else None


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, exact: bool,
                       logger: logging.Logger) -> None:
    """Load weights through the model's own ``load_state_dict`` (its load hooks run first).

    ``exact`` (resume): every key must match. Otherwise (``load_from``) missing and
    unexpected keys are reported and skipped. A tensor whose shape still does not fit
    after the model's hooks (e.g. OrionStudent slicing a teacher-shaped backbone to its
    kept heads) is always an error: nothing is left half-loaded or random without a word.
    """
    try:
        result = model.load_state_dict(dict(state_dict), strict=exact)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        mismatched = [ln for ln in lines if ln.startswith("size mismatch")]
        detail = "{} mis-shaped keys, e.g. {}".format(len(mismatched), "; ".join(mismatched[:2])) if mismatched \
            else " ".join(lines[:3])
        raise ConfigError("checkpoint {} does not fit the model: {}".format(path, detail)) from None
    if result.missing_keys:
        logger.warning("load_from %s: %d model keys not in the checkpoint keep their current values (e.g. %s)",
                       path, len(result.missing_keys), result.missing_keys[:5])
    if result.unexpected_keys:
        logger.warning("load_from %s: %d checkpoint keys ignored (e.g. %s)", path, len(result.unexpected_keys),
                       result.unexpected_keys[:5])


def load_from(model: nn.Module, path: str, logger: logging.Logger) -> None:
    """ORION's ``load_from``: the weights of ``path``, nothing else (see :func:`load_model_weights`)."""
    ckpt = load_checkpoint_file(path)
    load_model_weights(model, state_dict_of(ckpt, path), path, exact=False, logger=logger)
    logger.info("loaded weights from %s", path)


def resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
           rank: int, world_size: int, logger: logging.Logger) -> Dict[str, Any]:
    """Restore weights, optimizer, lr schedule, loss scaler and this rank's temporal memory from ``path``.

    Returns ``{'iter', 'meta', 'rng'}``: the iterations already done, the checkpoint's
    meta and this rank's RNG state (None when the world size changed).
    """
    ckpt = load_checkpoint_file(path)
    load_model_weights(model, state_dict_of(ckpt, path), path, exact=True, logger=logger)
    try:
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("lr_scheduler"):
            scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (ValueError, KeyError) as exc:
        raise ConfigError("cannot resume the optimizer or lr schedule from {}: {}".format(path, exc))
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    meta = dict(ckpt.get("meta") or {})
    iteration = int(meta.get("iter", ckpt.get("iter", 0)))
    rngs: List[Any] = list(ckpt.get("rng") or [])
    memories: List[Any] = list(ckpt.get("memory") or [])
    if len(rngs) != world_size:
        logger.warning("resume: RNG states of %d ranks in the checkpoint, %d ranks now: RNG not restored",
                       len(rngs), world_size)
    if len(memories) == world_size:
        load_memory_states(model, memories[rank])
    elif memory_states(model):
        logger.warning("resume: temporal memories of %d ranks in the checkpoint, %d ranks now: the heads start "
                       "from an empty memory", len(memories), world_size)
    logger.info("resumed from %s: iter %d", path, iteration)
    return dict(iter=iteration, meta=meta, rng=rngs[rank] if len(rngs) == world_size else None)


__all__ = ["rng_state", "set_rng_state", "memory_states", "load_memory_states", "save_checkpoint", "find_resume_checkpoint", "load_model_weights",
           "load_from", "resume"]
