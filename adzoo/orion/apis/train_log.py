"""Logging of the standalone KD loop: mmcv's TextLoggerHook line, JSON lines and TensorBoard.

Values of the iterations since the last line are averaged (``LogBuffer``, weighted
by sample count like mmcv's) and, in distributed runs, over ranks; rank 0 writes
``work_dir/<timestamp>.log`` (and stdout), ``work_dir/<timestamp>.log.json`` and,
with ``TensorboardLoggerHook`` and tensorboard installed, ``work_dir/tf_logs``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.distributed as dist

LOGGER_NAME = "orion_kd"


class LogBuffer:
    """Running weighted means of scalars until ``clear()`` (mmcv's ``log_buffer.update(vars, count)``)."""

    def __init__(self) -> None:
        self._sums: "OrderedDict[str, float]" = OrderedDict()
        self._counts: Dict[str, float] = {}

    def update(self, values: Mapping[str, Any], count: float = 1) -> None:
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean().item()
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * count
            self._counts[key] = self._counts.get(key, 0.0) + count

    def average(self) -> "OrderedDict[str, float]":
        return OrderedDict((key, total / self._counts[key]) for key, total in self._sums.items())

    def clear(self) -> None:
        self._sums.clear()
        self._counts.clear()


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


def peak_memory_mb(device: torch.device) -> int:
    """Peak CUDA memory allocated (MB) on GPU; peak resident set size (MB) of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) / (1024 * 1024))
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak / (1024 * 1024)) if sys.platform == "darwin" else int(peak / 1024)
    except (ImportError, AttributeError):
        return 0


def reduce_over_ranks(values: Dict[str, float], memory: int, world_size: int, device: torch.device
                      ) -> Tuple[Dict[str, float], int]:
    """Average ``values`` over ranks (every rank must log the same keys) and take the max of ``memory``."""
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
    averaged = {k: float(v) / world_size for k, v in zip(keys, t.tolist())}
    return OrderedDict((k, averaged[k]) for k in values), int(m.item())


class TrainLog:
    """Text, JSON-lines and TensorBoard output; only rank 0 writes (other ranks print errors only)."""

    def __init__(self, work_dir: str, timestamp: str, rank: int, tensorboard: bool) -> None:
        self.rank = rank
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: List[logging.Handler] = []
        self.json_path = os.path.join(work_dir, "{}.log.json".format(timestamp))
        self.writer = None
        fmt = logging.Formatter("%(asctime)s - {} - %(levelname)s - %(message)s".format(LOGGER_NAME))
        handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        handlers[0].setLevel(logging.ERROR)
        if rank == 0:
            handlers = [logging.StreamHandler(sys.stdout),
                        logging.FileHandler(os.path.join(work_dir, "{}.log".format(timestamp)), mode="a")]
        for handler in handlers:
            handler.setFormatter(fmt)
            self.logger.addHandler(handler)
            self._handlers.append(handler)
        if rank == 0 and tensorboard:
            self.writer = self._tensorboard(work_dir)

    def _tensorboard(self, work_dir: str) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.logger.warning("TensorboardLoggerHook is configured but tensorboard is not installed: "
                                "no event files (pip install tensorboard)")
            return None
        return SummaryWriter(os.path.join(work_dir, "tf_logs"))

    def record(self, line: str, scalars: Dict[str, Any], step: int) -> None:
        """Write one log line, its JSON record and its TensorBoard scalars (rank 0)."""
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


__all__ = ["LOGGER_NAME", "LogBuffer", "format_log_line", "peak_memory_mb", "reduce_over_ranks", "TrainLog"]
