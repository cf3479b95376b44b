"""Timing on the machine: alternating rounds, and the measured cost of one head, one channel and one block.

:func:`time_alternating` runs several callables in turn, round after round, so drift and load hit all
of them alike (the benchmarks and the budget's measured speedup use it). :func:`measure_block_costs`
turns block timings into the unit costs of ``pruning_cost.UnitCosts``: the slope of a block's time in
its heads and in its SwiGLU channels, the overhead a kept block pays beyond them (what removing the
whole block saves on top), per block type, and the stem.
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from mmcv.models.backbones.eva_layers import resize_abs_pos_embed
from mmcv.models.utils.pruning_cost import UnitCosts


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runners: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Run each callable in turn, ``repeats`` rounds (after ``warmup``), so drift and noise hit all of them alike."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def stem_output(backbone: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """What an EVA backbone feeds its first block: patch embedding plus the (resized) absolute position embedding."""
    x = backbone.patch_embed(image.to(backbone.patch_embed.proj.weight.dtype))
    if getattr(backbone, "pos_embed", None) is not None:
        x = x + resize_abs_pos_embed(backbone.pos_embed, backbone.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
    return x


def _first_blocks(backbone: nn.Module) -> Dict[str, int]:
    """The index of the first window block and of the first global block (the types the backbone has)."""
    found: Dict[str, int] = {}
    for index, block in enumerate(backbone.blocks):
        found.setdefault("window" if getattr(block, "window_size", 0) > 0 else "global", index)
    return found


def measure_block_costs(make_backbone: Callable[[int, int], nn.Module], image: torch.Tensor, teacher_heads: int,
                        teacher_hidden: int, repeats: int, warmup: int, device: torch.device,
                        min_channels: int = 64, source: str = "measured block latency",
                        metadata: Optional[Dict[str, object]] = None) -> UnitCosts:
    """Seconds per head, per channel and per block (beyond its units), by block type, and of the stem.

    ``make_backbone(heads, hidden)``: the backbone with every block keeping ``heads`` heads and ``hidden``
    channels. Its first window and first global block run, alternating, at full width, with half the heads,
    with half the channels and at the minimum (1 head, ``min_channels`` channels): the slopes are
    (median full - median reduced) / units removed; the overhead is the minimum block's median minus what
    its head and channels cost by the slopes (0 when noise makes it negative; the raw value is kept in the
    metadata). A slope that is not positive means noise won: the error says so.
    """
    variants = dict(full=(teacher_heads, teacher_hidden), half_heads=(teacher_heads // 2, teacher_hidden),
                    half_mlp=(teacher_heads, teacher_hidden // 2), minimal=(1, min(min_channels, teacher_hidden)))
    models = {name: make_backbone(*counts).to(device).eval() for name, counts in variants.items()}
    with torch.no_grad():
        x = stem_output(models["full"], image)
    kinds = _first_blocks(models["full"])
    runners: Dict[str, Callable[[], None]] = {"stem": lambda: stem_output(models["full"], image)}
    for name, model in models.items():
        for block_type, index in kinds.items():
            runners[f"{block_type}/{name}"] = (lambda block=model.blocks[index]: block(x))
    with torch.no_grad():
        times = time_alternating(runners, repeats, warmup, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    head: Dict[str, float] = {}
    channel: Dict[str, float] = {}
    block: Dict[str, float] = {}
    raw: Dict[str, float] = {}
    for block_type in kinds:
        full = median[f"{block_type}/full"]
        head[block_type] = (full - median[f"{block_type}/half_heads"]) / (teacher_heads - teacher_heads // 2)
        channel[block_type] = (full - median[f"{block_type}/half_mlp"]) / (teacher_hidden - teacher_hidden // 2)
        if head[block_type] <= 0 or channel[block_type] <= 0:
            raise ValueError(f"unit latency: removing units did not make the {block_type} block faster (medians "
                             f"{ {k: round(v * 1e3, 3) for k, v in median.items() if k.startswith(block_type)} } ms); "
                             f"noise won, rerun on an idle machine with more --repeats")
        units = variants["minimal"]
        raw[block_type] = median[f"{block_type}/minimal"] - units[0] * head[block_type] - units[1] * channel[block_type]
        block[block_type] = max(raw[block_type], 0.0)
    info = dict(metadata or {}, median_s=median, repeats=repeats, threads=torch.get_num_threads(),
                overhead_raw_s=raw, minimal_block=list(variants["minimal"]), times_s=times)
    return UnitCosts(head=head, channel=channel, unit="seconds", source=source, metadata=info, block=block,
                     fixed=median["stem"])


__all__ = ["synchronize", "time_alternating", "stem_output", "measure_block_costs"]
