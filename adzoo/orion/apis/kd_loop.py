"""The standalone KD training loop: ORION's config keys, runner semantics and logs; nanoGPT's shape.

In an ORION checkout ORION's own runner trains and the plugin's KD hooks come in through
``custom_hooks``. This loop plays that runner for the standalone repository (the miniature
world), with ORION's semantics where they matter: it counts iterations like mmcv's
``IterBasedRunner`` (an ``EpochBasedRunner`` config becomes ``max_epochs`` x iterations per
epoch), takes its batches from ``data.shuffler_sampler`` (ORION's streaming
``InfiniteGroupEachSampleInBatchSampler``: each batch slot walks one scene in order, which
the heads' temporal memory needs) and calls ``cfg.custom_hooks`` at mmcv 1.x's points.
The loop neither schedules the distillation alpha nor exports the student: hooks do.

``train_kd(model, datasets, cfg)`` reads top to bottom: settings, data, model, optimiser and
schedule, weights (resume or ``load_from``), DDP (after the model froze what it does not
train), hooks; then :func:`run_iterations`, one loop that steps, calls the hooks, saves and logs.

Resuming is exact: the batch order depends only on (seed, rank, iteration), the optimiser,
lr schedule, loss scaler and every rank's RNG states are restored, so a killed-then-resumed
run ends with the same weights as an uninterrupted one (bit for bit on a CPU).
"""
from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mmcv.datasets import build_dataloader
from mmcv.models.utils.batch_io import move_batch_to_device
from mmcv.models.utils.checkpoint_io import atomic_write_text, non_finite_tensors, remove_stale_temp_files
from mmcv.runner.hooks.nonfinite_guard import NonFiniteTrainingError
from mmcv.utils import get_dist_info

from .checkpoints import (find_resume_checkpoint, load_from, memory_states, resume, rng_state, save_checkpoint,
                          set_rng_state)
from .hooks import LoopRunner, build_custom_hooks, call_hooks
from .optim import build_kd_optimizer, build_lr_scheduler, lr_factor_at
from .settings import (CheckpointSettings, ConfigError, LogSettings, Schedule, cfg_get, config_text, read_checkpoint_settings,
                       read_log_settings, read_precision, read_schedule, to_plain)
from .step import forward_train, optimizer_step
from .train_log import TrainLog, format_log_line, peak_memory_mb, reduce_over_ranks

__all__ = ["ConfigError", "check_settings", "train_kd", "run_iterations"]


def _device_for(distributed: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if distributed else torch.cuda.current_device())
    return torch.device("cpu")


def _data_settings(cfg: Any) -> Tuple[int, int, Mapping]:
    """(samples_per_gpu, workers_per_gpu, shuffler_sampler) from ``cfg.data``."""
    data_cfg = cfg_get(cfg, "data") or {}
    samples_per_gpu, workers = int(cfg_get(data_cfg, "samples_per_gpu", 1)), int(cfg_get(data_cfg, "workers_per_gpu", 0))
    if samples_per_gpu <= 0 or workers < 0:
        raise ConfigError("data.samples_per_gpu must be > 0 and data.workers_per_gpu >= 0, got {} and {}".format(
            samples_per_gpu, workers))
    sampler_cfg = cfg_get(data_cfg, "shuffler_sampler")
    if sampler_cfg is None:
        raise ConfigError("data.shuffler_sampler is not set: the loop takes its training order from it, e.g. "
                          "dict(type='InfiniteGroupEachSampleInBatchSampler', seq_split_num=1)")
    return samples_per_gpu, workers, sampler_cfg


def check_settings(cfg: Any) -> None:
    """Check every setting that needs neither the model nor the data, before anything is built or started:
    data loader and sampler, run length, log and checkpoint intervals, lr schedule and ``custom_hooks``."""
    _data_settings(cfg)
    schedule = read_schedule(cfg, iters_per_epoch=1)
    read_log_settings(cfg, schedule.by_epoch)
    read_checkpoint_settings(cfg, schedule.by_epoch)
    lr_config = cfg_get(cfg, "lr_config")
    lr_factor_at(0, schedule.max_iters, lr_config, 1, bool(cfg_get(lr_config, "by_epoch", schedule.by_epoch)))
    build_custom_hooks(cfg_get(cfg, "custom_hooks"))


def _prepare_work_dir(cfg: Any, work_dir: str, ckpt_dir: str, logger: Any) -> None:
    """Remove temporary files a killed run left behind and write the config next to the logs (rank 0)."""
    for folder in sorted({work_dir, ckpt_dir}):
        for path in remove_stale_temp_files(folder):
            logger.info("removed %s, left by an interrupted run", path)
    atomic_write_text(os.path.join(work_dir, os.path.basename(cfg_get(cfg, "filename") or "config.py")),
                      config_text(cfg))


def train_kd(model: nn.Module, datasets: Any, cfg: Any, distributed: bool = False, timestamp: Optional[str] = None,
             meta: Optional[Mapping] = None) -> nn.Module:
    """Train ``model`` on ``datasets[0]`` as ``cfg`` says (see the module docstring); returns the model.

    The model follows ORION's detector contract (``forward(data, return_loss=True)`` returns
    ``dict(loss, log_vars, num_samples)``) and has already frozen what it does not train.
    """
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train_kd(distributed=True) needs torch.distributed to be initialised")
    rank, world_size = get_dist_info() if distributed else (0, 1)
    if not cfg_get(cfg, "work_dir"):
        raise ConfigError("cfg.work_dir is not set (use --work-dir)")
    work_dir = os.path.abspath(cfg_get(cfg, "work_dir"))
    os.makedirs(work_dir, exist_ok=True)

    # ---- settings
    samples_per_gpu, workers, sampler_cfg = _data_settings(cfg)
    dataset = datasets[0] if isinstance(datasets, (list, tuple)) else datasets
    seed = int(cfg_get(cfg, "seed") or 0)
    schedule = read_schedule(cfg, iters_per_epoch=int(math.ceil(len(dataset) / (samples_per_gpu * world_size))))
    logs = read_log_settings(cfg, schedule.by_epoch)
    ckpts = read_checkpoint_settings(cfg, schedule.by_epoch)
    lr_config = cfg_get(cfg, "lr_config")
    log = TrainLog(work_dir, timestamp or time.strftime("%Y%m%d_%H%M%S", time.localtime()), rank, logs.tensorboard)
    logger = log.logger
    try:
        device = _device_for(distributed)
        if rank == 0:
            _prepare_work_dir(cfg, work_dir, os.path.abspath(ckpts.out_dir or work_dir), logger)

        # ---- model, optimiser and lr schedule (the model froze its parts in __init__)
        model = model.to(device)
        autocast_dtype, scaler = read_precision(cfg, device, logger)
        optimizer, groups = build_kd_optimizer(model, cfg_get(cfg, "optimizer") or {})
        scheduler = build_lr_scheduler(optimizer, lr_config, schedule.max_iters, schedule.iters_per_epoch,
                                       bool(cfg_get(lr_config, "by_epoch", schedule.by_epoch)))
        logger.info("trainable parameters: %.2f M of %.2f M in %d optimizer groups (lr scale %s)",
                    sum(g["numel"] for g in groups) / 1e6, sum(p.numel() for p in model.parameters()) / 1e6,
                    len(groups), ", ".join("{:.4g}".format(g["lr_scale"]) for g in groups))

        # ---- weights: resume (weights, optimiser, schedule, scaler, RNG, memory) or load_from
        start_iter, rng_to_restore, hook_msgs = 0, None, {}
        resume_from = cfg_get(cfg, "resume_from")
        if not resume_from and cfg_get(cfg, "auto_resume", False):
            resume_from = find_resume_checkpoint(os.path.abspath(ckpts.out_dir or work_dir))
            logger.info("auto-resume: %s", resume_from or "no checkpoint in the work dir, starting fresh")
        if resume_from:
            state = resume(resume_from, model, optimizer, scheduler, scaler, rank, world_size, logger)
            start_iter, rng_to_restore, hook_msgs = state["iter"], state["rng"], state["meta"].get("hook_msgs") or {}
            seed = int(state["meta"].get("seed", seed))  # the batch order of the interrupted run
        elif cfg_get(cfg, "load_from"):
            load_from(model, cfg_get(cfg, "load_from"), logger)

        # ---- DDP, after freezing (find_unused_parameters=False needs it)
        raw_model = model
        model = _wrap_ddp(model, device, cfg) if distributed else model

        # ---- data: batches from data.shuffler_sampler, continuing after start_iter
        loader = build_dataloader(dataset, samples_per_gpu, workers, seed=seed, shuffler_sampler=sampler_cfg,
                                  rank=rank, world_size=world_size, start_iter=start_iter)

        # ---- hooks, and the runner they see
        hooks = build_custom_hooks(cfg_get(cfg, "custom_hooks"))
        runner = LoopRunner(model, optimizer, work_dir, logger, rank, world_size, schedule.max_iters,
                            meta=dict(to_plain(meta or {}), seed=seed, hook_msgs=hook_msgs))
        runner.data_loader = loader
        logger.info("start: %s, %d iterations (%d per epoch), from iteration %d, world size %d, device %s, "
                    "precision %s, sampler %s, hooks %s, work_dir %s", schedule.runner_type, schedule.max_iters,
                    schedule.iters_per_epoch, start_iter, world_size, device,
                    {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32"),
                    cfg_get(sampler_cfg, "type"), [type(h).__name__ for h in hooks], work_dir)
        if rng_to_restore is not None:
            set_rng_state(rng_to_restore)
        run_iterations(runner, hooks, iter(loader), raw_model, scheduler, scaler, autocast_dtype, cfg, schedule,
                       logs, ckpts, log, start_iter)
        return raw_model
    finally:
        log.close()


def _wrap_ddp(model: nn.Module, device: torch.device, cfg: Any) -> nn.Module:
    """DDP over the already frozen model (``find_unused_parameters`` from the config, False by default)."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(cfg_get(cfg, "find_unused_parameters", False)))


def run_iterations(runner: LoopRunner, hooks: Sequence[Any], batches: Any, raw_model: nn.Module, scheduler: Any,
                   scaler: Any, autocast_dtype: Optional[torch.dtype], cfg: Any, schedule: Schedule,
                   logs: LogSettings, ckpts: CheckpointSettings, log: TrainLog, start_iter: int) -> None:
    """The loop: hooks at mmcv 1.x's points around every step; checkpoints and log lines when due.

    ``IterBasedRunner`` configs get ``before_epoch``/``after_epoch`` once around the run, as
    mmcv's IterBasedRunner calls them; ``EpochBasedRunner`` configs get ``before_train_epoch``/
    ``after_train_epoch`` at every epoch boundary. ``runner.outputs`` holds the iteration's loss
    before the optimiser steps (as in mmcv's runner, whose ``OptimizerHook`` steps in
    ``after_train_iter``); the hooks' ``after_train_iter`` follows the step; the checkpoint and
    the log line follow them.
    """
    model, optimizer = runner.model, runner.optimizer
    device = next(raw_model.parameters()).device
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    grad_clip = cfg_get(cfg_get(cfg, "optimizer_config"), "grad_clip")
    base_lr = float(cfg_get(cfg_get(cfg, "optimizer"), "lr", 0.0) or 0.0)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    ipe = schedule.iters_per_epoch
    started, tick = time.time(), time.time()
    model.train()
    _record_scaler(runner, scaler)
    call_hooks(hooks, "before_run", runner)
    if not schedule.by_epoch:
        call_hooks(hooks, "before_epoch", runner)
    for it in range(start_iter, schedule.max_iters):
        runner.iter, (runner.epoch, runner.inner_iter) = it, divmod(it, ipe)
        if schedule.by_epoch and runner.inner_iter == 0:
            call_hooks(hooks, "before_train_epoch", runner)
        call_hooks(hooks, "before_train_iter", runner)
        batch = move_batch_to_device(next(batches), device)
        data_time = time.time() - tick
        with autocast():
            outputs = forward_train(model, batch)
        runner.outputs = outputs  # before the step: an optimizer pre-hook (NonFiniteGuardHook) judges this loss
        grad_norm = optimizer_step(outputs["loss"], optimizer, trainable, grad_clip, scaler)
        _record_scaler(runner, scaler)
        lr = base_lr * scheduler.lr_lambdas[0](it)
        scheduler.step()
        runner.log_buffer.update(outputs.get("log_vars") or {"loss": outputs["loss"]}, outputs.get("num_samples", 1))
        runner.log_buffer.update(dict({} if grad_norm is None else dict(grad_norm=grad_norm),
                                      time=time.time() - tick, data_time=data_time))
        call_hooks(hooks, "after_train_iter", runner)
        done = it + 1
        if ckpts.due(done, schedule):
            _save(runner, raw_model, scheduler, scaler, cfg, schedule, ckpts, done)
        end_of_epoch = done % ipe == 0
        if done == schedule.max_iters or end_of_epoch or \
                (runner.inner_iter + 1 if logs.by_epoch else done) % logs.interval == 0:
            eta = (time.time() - started) / (done - start_iter) * (schedule.max_iters - done)
            _log(runner, log, logs, schedule, done, lr, eta, device)
        if schedule.by_epoch and (end_of_epoch or done == schedule.max_iters):
            call_hooks(hooks, "after_train_epoch", runner)
        tick = time.time()
    runner.iter, (runner.epoch, runner.inner_iter) = schedule.max_iters, divmod(schedule.max_iters, ipe)
    if not schedule.by_epoch:
        call_hooks(hooks, "after_epoch", runner)
    if runner.world_size > 1:
        dist.barrier()
    call_hooks(hooks, "after_run", runner)
    runner.logger.info("training finished: %d iterations", schedule.max_iters)


def _record_scaler(runner: LoopRunner, scaler: Any) -> None:
    """Keep the loss scaler's state in ``runner.meta['fp16']['loss_scaler']``, where ORION's
    ``Fp16OptimizerHook`` keeps it (hooks read the loss scale there)."""
    if scaler is not None:
        runner.meta.setdefault("fp16", {})["loss_scaler"] = dict(scaler.state_dict())


def _save(runner: LoopRunner, raw_model: nn.Module, scheduler: Any, scaler: Any, cfg: Any, schedule: Schedule,
          ckpts: CheckpointSettings, done: int) -> None:
    """Gather every rank's RNG state and temporal memory; rank 0 writes ``epoch_N.pth`` or ``iter_N.pth``
    and ``latest.pth``."""
    state_dict = raw_model.state_dict()
    bad = non_finite_tensors(state_dict)
    if bad:  # every rank holds the same weights (DDP), so every rank stops here
        raise NonFiniteTrainingError(
            "non-finite weights at iteration {}: {} of {} tensors (e.g. {}); not saved, the last checkpoint "
            "(latest.pth) is finite; add NonFiniteGuardHook to custom_hooks, lower optimizer.lr or set "
            "optimizer_config.grad_clip".format(done, len(bad), len(state_dict), bad[:3]))
    per_rank: List[Any] = [(rng_state(), memory_states(raw_model))]
    if runner.world_size > 1:
        per_rank = [None] * runner.world_size
        dist.all_gather_object(per_rank, (rng_state(), memory_states(raw_model)))
    if runner.rank != 0:
        return
    epoch, inner = divmod(done, schedule.iters_per_epoch)
    name = "epoch_{}.pth".format(epoch) if ckpts.by_epoch and inner == 0 else "iter_{}.pth".format(done)
    meta: Dict[str, Any] = dict(to_plain(runner.meta))
    meta.update(epoch=epoch, iter=done, iters_per_epoch=schedule.iters_per_epoch, world_size=runner.world_size,
                config=config_text(cfg), time=time.asctime(), torch_version=str(torch.__version__))
    checkpoint = dict(meta=meta, state_dict=state_dict, optimizer=runner.optimizer.state_dict(),
                      lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                      rng=[state[0] for state in per_rank], memory=[state[1] for state in per_rank], epoch=epoch,
                      iter=done)
    out_dir = os.path.abspath(ckpts.out_dir or runner.work_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = save_checkpoint(out_dir, name, checkpoint, ckpts.max_keep_ckpts)
    runner.logger.info("saved checkpoint %s", path)


def _log(runner: LoopRunner, log: TrainLog, logs: LogSettings, schedule: Schedule, done: int, lr: float, eta: float,
         device: torch.device) -> None:
    """Average the buffer (over ranks too), write the TextLoggerHook line and its JSON/TensorBoard record."""
    averaged, memory = reduce_over_ranks(runner.log_buffer.average(), peak_memory_mb(device), runner.world_size,
                                         device)
    runner.log_buffer.clear()
    values: Dict[str, Any] = dict(lr=lr, eta=str(datetime.timedelta(seconds=int(eta))), time=averaged.pop("time"),
                                  data_time=averaged.pop("data_time"), memory=memory)
    values.update(averaged)
    epoch, inner = runner.epoch + 1, runner.inner_iter + 1
    line = format_log_line(logs.by_epoch, epoch, inner, schedule.iters_per_epoch, done, schedule.max_iters, values)
    scalars = dict(mode="train", epoch=epoch, iter=done, inner_iter=inner)
    scalars.update({k: v for k, v in values.items() if k != "eta"})
    log.record(line, scalars, done)
