"""What each pruning ratio and strategy keeps and costs: heads and SwiGLU channels, parameters, analytic MACs,
the speedup ceiling and the measured fidelity (heads masked, which equals pruning them; channels pruned exactly
through ``sites.channel_prune_hooks``, since ``ffn_ln`` makes masking a channel differ from removing it).

Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.head_importance import ChannelImportance, HeadImportance, ScoresLike
from mmcv.models.utils.pruning_config import check_pruning_ratio, create_pruning_config
from mmcv.models.utils.pruning_cost import UnitCosts, analytic_unit_costs
from tools.head_pruning.batches import features_of, images_of, take_batches
from tools.head_pruning.sites import (AttentionSite, channel_prune_hooks, describe_backbone, find_attention_sites,
                                      find_backbone, find_mlp_sites, head_mask_hooks, param_dtype_device,
                                      preserved_state)


def _fidelity(backbone: nn.Module, sites: Sequence[AttentionSite], images: Sequence[torch.Tensor],
              references: Sequence[torch.Tensor], selection: Sequence[Sequence[int]],
              channels: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, float]:
    """Cosine similarity and relative L2 error of the pruned backbone's feature map vs the full one (per image).

    Heads outside ``selection`` are masked to zero (exactly pruning them when ``subln=False``); with
    ``channels`` every SwiGLU runs as if pruned to them (``ffn_ln`` over the kept channels only).
    """
    dtype, device = param_dtype_device(backbone)
    masks = []
    for site, heads in zip(sites, selection):
        mask = torch.zeros(site.num_heads, dtype=dtype, device=device)
        mask[list(heads)] = 1.0
        masks.append(mask)
    pruned_mlps = channel_prune_hooks(find_mlp_sites(backbone), channels) if channels is not None \
        else contextlib.nullcontext()
    cos, rel = [], []
    with torch.no_grad(), head_mask_hooks(sites, masks), pruned_mlps:
        for img, ref in zip(images, references):
            out = features_of(backbone(img)).flatten(1).double()
            full = ref.flatten(1).double()
            cos.extend(F.cosine_similarity(out, full, dim=1).tolist())
            rel.extend(((out - full).norm(dim=1) / full.norm(dim=1).clamp_min(1e-30)).tolist())
    return dict(cosine_similarity=float(np.mean(cos)), relative_l2_error=float(np.mean(rel)), images=len(cos))


def _geometry(importance: HeadImportance, backbone: Optional[nn.Module], depth: int, heads: int,
              img_size: Optional[Union[int, Sequence[int]]]) -> Optional[Dict[str, Any]]:
    """Backbone geometry from the model, else from the importance file's metadata (None without either)."""
    if backbone is not None:
        geometry = describe_backbone(backbone, img_size)
        if (geometry["depth"], geometry["num_heads"]) != (depth, heads):
            raise ValueError(f"importance has {depth} blocks x {heads} heads but the model has "
                             f"{geometry['depth']} x {geometry['num_heads']}")
        return geometry
    if isinstance(importance.metadata.get("backbone"), Mapping):
        geometry = dict(importance.metadata["backbone"])
        if img_size is not None:
            geometry["img_hw"] = [img_size, img_size] if isinstance(img_size, int) else [int(v) for v in img_size]
        return geometry
    return None


def _macs(geometry: Optional[Mapping[str, Any]], per_block: Sequence[int],
          mlp_hidden: Optional[Sequence[int]] = None) -> Optional[int]:
    if geometry is None or not all(geometry.get(k) for k in ("img_hw", "patch_size", "mlp_hidden")):
        return None
    return analytic_backbone_macs(tuple(geometry["img_hw"]), geometry["patch_size"], geometry["in_chans"],
                                  geometry["embed_dim"], geometry["mlp_hidden"] if mlp_hidden is None else mlp_hidden,
                                  geometry["head_dim"], per_block, geometry["window_per_block"])


class _Request(NamedTuple):
    """One analysis row's request: the importances and the allocation settings."""

    heads: HeadImportance
    channels: Optional[ChannelImportance]
    ratio: float
    mlp_ratio: Optional[float]
    strategy: str
    min_heads_per_layer: int
    block_normalization: str
    channel_multiple: int
    unit_costs: Optional[UnitCosts]


def _entry(request: _Request, geometry: Optional[Mapping[str, Any]], full_macs: Optional[int]) -> Dict[str, Any]:
    """One row of the analysis without the measured fidelity (an ``error`` row when the request is impossible)."""
    entry: Dict[str, Any] = dict(strategy=request.strategy, pruning_ratio=float(request.ratio))
    if request.mlp_ratio is not None:
        entry["mlp_pruning_ratio"] = float(request.mlp_ratio)
    try:
        config = create_pruning_config(request.heads, request.ratio, request.strategy, request.min_heads_per_layer,
                                       request.block_normalization, channel_importance=request.channels,
                                       mlp_pruning_ratio=request.mlp_ratio, unit_costs=request.unit_costs,
                                       channel_multiple=request.channel_multiple)
    except ValueError as err:
        return dict(entry, error=str(err))
    depth, heads = request.heads.scores.shape
    removed = depth * heads - sum(config.num_heads)
    entry.update(heads_per_block=config.num_heads, heads_kept=sum(config.num_heads), heads_removed=removed,
                 selected_heads_per_layer=config.selected_heads_per_layer,
                 importance_mass_kept=config.metadata["importance_mass_kept"])
    channels_removed = 0
    if config.prunes_channels:
        channels_removed = depth * config.teacher_mlp_hidden - sum(config.mlp_hidden)
        entry.update(mlp_hidden_per_block=config.mlp_hidden, channels_kept=sum(config.mlp_hidden),
                     channels_removed=channels_removed, selected_channels_per_layer=config.selected_channels_per_layer,
                     channel_importance_mass_kept=config.metadata["channel_importance_mass_kept"])
    if geometry is not None:
        attn_removed = removed * geometry["attention_params_per_head"]
        mlp_removed = channels_removed * (geometry.get("mlp_params_per_channel") or 0)
        entry.update(attention_params_removed=attn_removed, attention_params_removed_fraction=removed / (depth * heads),
                     backbone_params_removed_fraction=(attn_removed + mlp_removed) / geometry["num_params"])
        if config.prunes_channels:
            entry.update(mlp_params_removed=mlp_removed)
    pruned_macs = _macs(geometry, config.num_heads, config.mlp_hidden if config.prunes_channels else None)
    if pruned_macs is not None and full_macs:
        entry.update(macs=pruned_macs, macs_ratio=pruned_macs / full_macs, speedup_ceiling=full_macs / pruned_macs)
    return entry


def analyze_pruning_impact(importance: Union[HeadImportance, ScoresLike],
                           pruning_ratios: Sequence[float] = (0.25, 0.5, 0.75), model: Optional[nn.Module] = None,
                           dataloader: Optional[Iterable] = None, strategies: Sequence[str] = ("uniform", "global"),
                           num_batches: Optional[int] = 4, img_size: Optional[Union[int, Sequence[int]]] = None,
                           min_heads_per_layer: int = 1, save_path: Optional[Union[str, "os.PathLike[str]"]] = None,
                           verbose: bool = True, block_normalization: str = "l2",
                           channel_importance: Optional[Union[ChannelImportance, ScoresLike]] = None,
                           mlp_pruning_ratios: Optional[Sequence[float]] = None, channel_multiple: int = 1,
                           unit_costs: Optional[UnitCosts] = None) -> Dict[str, Any]:
    """What each pruning ratio and strategy keeps and costs.

    Per (strategy, ratio[, MLP ratio]): heads (and SwiGLU channels) kept per block, importance mass kept
    (kept block-normalised scores / all of them), attention, MLP and backbone parameters removed,
    analytic MACs per image at the input size and the backbone speedup ceiling (full MACs / pruned MACs,
    ``eva_cost.analytic_backbone_macs``). With ``model`` and ``dataloader``: the measured fidelity of the
    pruned backbone (cosine similarity and relative L2 error of the output feature map vs the full
    backbone, mean over images; heads masked, channels pruned exactly). The geometry comes from ``model``
    or from ``importance.metadata['backbone']``. With ``channel_importance`` every ratio is combined with
    every ``mlp_pruning_ratios`` entry (joint rows). ``block_normalization``, ``channel_multiple`` and
    ``unit_costs`` (strategy ``cost``; default: analytic MACs) go to ``create_pruning_config``.
    Prints a table (``verbose``), returns a dict, saves it as JSON when ``save_path`` is given.
    """
    importance = HeadImportance.coerce(importance)
    depth, heads = importance.scores.shape
    backbone = find_backbone(model) if model is not None else None
    geometry = _geometry(importance, backbone, depth, heads, img_size)
    if dataloader is not None and model is None:
        raise ValueError("measured fidelity needs the model as well as the dataloader")
    for ratio in pruning_ratios:
        check_pruning_ratio(ratio)
    channels = None if channel_importance is None else ChannelImportance.coerce(channel_importance)
    if (channels is None) != (mlp_pruning_ratios is None):
        raise ValueError("joint analysis needs both channel_importance and mlp_pruning_ratios")
    if "cost" in strategies and unit_costs is None and geometry is not None:
        unit_costs = analytic_unit_costs(geometry)
    requests = [_Request(importance, channels, ratio, mlp_ratio, strategy, min_heads_per_layer, block_normalization,
                         channel_multiple, unit_costs)
                for strategy in strategies for ratio in pruning_ratios for mlp_ratio in (mlp_pruning_ratios or [None])]
    full_macs = _macs(geometry, [heads] * depth)
    full_info: Dict[str, Any] = dict(depth=depth, num_heads=heads, macs=full_macs,
                                     mlp_hidden=geometry.get("mlp_hidden") if geometry else None,
                                     num_params=geometry.get("num_params") if geometry else None,
                                     img_hw=geometry.get("img_hw") if geometry else None)
    results: List[Dict[str, Any]] = []
    with contextlib.nullcontext() if model is None else preserved_state(model):
        images = references = None
        if dataloader is not None:
            sites = find_attention_sites(backbone)
            dtype, device = param_dtype_device(backbone)
            images = [images_of(b, dtype, device) for b in take_batches(dataloader, num_batches, "collect images", False)]
            with torch.no_grad():
                references = [features_of(backbone(img)).detach() for img in images]
            full_info["fidelity_images"] = sum(int(i.shape[0]) for i in images)
        for request in requests:
            entry = _entry(request, geometry, full_macs)
            if images is not None and "error" not in entry:
                entry.update(_fidelity(backbone, sites, images, references, entry["selected_heads_per_layer"],
                                       entry.get("selected_channels_per_layer")))
            results.append(entry)
    analysis = dict(method=importance.method, channel_method=channels.method if channels is not None else None,
                    block_normalization=block_normalization, full=full_info, results=results,
                    source=importance.source)
    if verbose:
        print(format_impact_table(analysis))
    if save_path is not None:
        atomic_write_json(save_path, analysis)
    return analysis


def format_impact_table(analysis: Mapping[str, Any]) -> str:
    """A text table of :func:`analyze_pruning_impact`'s result (MLP columns for joint rows)."""
    full = analysis.get("full", {})
    joint = any("mlp_pruning_ratio" in r for r in analysis.get("results", []))
    head = (f"Pruning impact ({analysis.get('method') or 'scores'}"
            + (f" / channels {analysis.get('channel_method') or 'scores'}" if joint else "")
            + f"; {full.get('depth')} blocks x {full.get('num_heads')} heads"
            + (f", MLP {full.get('mlp_hidden')}" if joint else "")
            + (f"; {full['macs'] / 1e9:.4g} GMACs/image at {full['img_hw'][0]}x{full['img_hw'][1]}"
               if full.get("macs") else "") + ")")
    cols = ["strategy", "ratio"] + (["mlp ratio"] if joint else []) + ["kept/block"] + \
        (["mlp kept/block"] if joint else []) + ["mass kept", "attn params -", "backbone params -", "GMACs",
                                                 "speedup<=", "cos sim", "rel L2"]
    lines = [head, " | ".join(cols)]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def spread(per_block: Sequence[int]) -> str:
        return str(per_block[0]) if len(set(per_block)) == 1 else f"{min(per_block)}-{max(per_block)}"

    for r in analysis.get("results", []):
        ratios = [r["strategy"], f"{r['pruning_ratio']:.3g}"] + ([fmt(r.get("mlp_pruning_ratio"), ".3g")] if joint else [])
        if "error" in r:
            lines.append(" | ".join(ratios) + f" | error: {r['error']}")
            continue
        kept = [spread(r["heads_per_block"])] + ([spread(r["mlp_hidden_per_block"])] if joint else [])
        lines.append(" | ".join(ratios + kept + [
            fmt(r.get("importance_mass_kept"), ".3f"),
            fmt(r.get("attention_params_removed_fraction"), ".1%"), fmt(r.get("backbone_params_removed_fraction"), ".1%"),
            fmt(r["macs"] / 1e9 if r.get("macs") else None, ".4g"), fmt(r.get("speedup_ceiling"), ".3f"),
            fmt(r.get("cosine_similarity"), ".4f"), fmt(r.get("relative_l2_error"), ".4f")]))
    return "\n".join(lines)


__all__ = ["analyze_pruning_impact", "format_impact_table"]
