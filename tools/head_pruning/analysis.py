"""What each pruning ratio and strategy keeps and costs: heads, parameters, analytic MACs, measured fidelity.

Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.head_importance import HeadImportance, ScoresLike
from mmcv.models.utils.pruning_config import STRATEGIES, check_pruning_ratio, create_pruning_config
from tools.head_pruning.batches import features_of, images_of, take_batches
from tools.head_pruning.sites import (AttentionSite, describe_backbone, find_attention_sites, find_backbone,
                                      head_mask_hooks, param_dtype_device, preserved_state)


def _fidelity(backbone: nn.Module, sites: Sequence[AttentionSite], images: Sequence[torch.Tensor],
              references: Sequence[torch.Tensor], selection: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Cosine similarity and relative L2 error of the masked backbone's feature map vs the full one (per image)."""
    dtype, device = param_dtype_device(backbone)
    masks = []
    for site, heads in zip(sites, selection):
        mask = torch.zeros(site.num_heads, dtype=dtype, device=device)
        mask[list(heads)] = 1.0
        masks.append(mask)
    cos, rel = [], []
    with torch.no_grad(), head_mask_hooks(sites, masks):
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


def _macs(geometry: Optional[Mapping[str, Any]], per_block: Sequence[int]) -> Optional[int]:
    if geometry is None or not all(geometry.get(k) for k in ("img_hw", "patch_size", "mlp_hidden")):
        return None
    return analytic_backbone_macs(tuple(geometry["img_hw"]), geometry["patch_size"], geometry["in_chans"],
                                  geometry["embed_dim"], geometry["mlp_hidden"], geometry["head_dim"], per_block,
                                  geometry["window_per_block"])


def _entry(scores: torch.Tensor, ratio: float, strategy: str, min_heads_per_layer: int, block_normalization: str,
           geometry: Optional[Mapping[str, Any]], full_macs: Optional[int]) -> Dict[str, Any]:
    """One row of the analysis without the measured fidelity (an ``error`` row when the request is impossible)."""
    entry: Dict[str, Any] = dict(strategy=strategy, pruning_ratio=float(ratio))
    try:
        config = create_pruning_config(scores, ratio, strategy, min_heads_per_layer, block_normalization)
    except ValueError as err:
        return dict(entry, error=str(err))
    depth, heads = scores.shape
    removed = depth * heads - sum(config.num_heads)
    entry.update(heads_per_block=config.num_heads, heads_kept=sum(config.num_heads), heads_removed=removed,
                 selected_heads_per_layer=config.selected_heads_per_layer,
                 importance_mass_kept=config.metadata["importance_mass_kept"])
    if geometry is not None:
        attn_removed = removed * geometry["attention_params_per_head"]
        entry.update(attention_params_removed=attn_removed, attention_params_removed_fraction=removed / (depth * heads),
                     backbone_params_removed_fraction=attn_removed / geometry["num_params"])
    pruned_macs = _macs(geometry, config.num_heads)
    if pruned_macs is not None and full_macs:
        entry.update(macs=pruned_macs, macs_ratio=pruned_macs / full_macs, speedup_ceiling=full_macs / pruned_macs)
    return entry


def analyze_pruning_impact(importance: Union[HeadImportance, ScoresLike],
                           pruning_ratios: Sequence[float] = (0.25, 0.5, 0.75), model: Optional[nn.Module] = None,
                           dataloader: Optional[Iterable] = None, strategies: Sequence[str] = STRATEGIES,
                           num_batches: Optional[int] = 4, img_size: Optional[Union[int, Sequence[int]]] = None,
                           min_heads_per_layer: int = 1, save_path: Optional[Union[str, "os.PathLike[str]"]] = None,
                           verbose: bool = True, block_normalization: str = "l2") -> Dict[str, Any]:
    """What each pruning ratio and strategy keeps and costs.

    Per (strategy, ratio): heads kept per block, importance mass kept (kept block-normalised scores /
    all of them), attention and backbone parameters removed, analytic MACs per image at the input size
    and the backbone speedup ceiling (full MACs / pruned MACs, ``eva_cost.analytic_backbone_macs``). With
    ``model`` and ``dataloader``: the measured fidelity of the backbone with the pruned heads masked to
    zero (cosine similarity and relative L2 error of the output feature map vs the full backbone, mean
    over images). The geometry comes from ``model`` or from ``importance.metadata['backbone']``.
    ``block_normalization`` goes to ``create_pruning_config`` (how ``global`` compares blocks).
    Prints a table (``verbose``), returns a dict, saves it as JSON when ``save_path`` is given.
    """
    importance = HeadImportance.coerce(importance)
    scores, method = importance.scores, importance.method
    depth, heads = scores.shape
    backbone = find_backbone(model) if model is not None else None
    geometry = _geometry(importance, backbone, depth, heads, img_size)
    if dataloader is not None and model is None:
        raise ValueError("measured fidelity needs the model as well as the dataloader")
    for ratio in pruning_ratios:
        check_pruning_ratio(ratio)
    full_macs = _macs(geometry, [heads] * depth)
    full_info: Dict[str, Any] = dict(depth=depth, num_heads=heads, macs=full_macs,
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
        for strategy in strategies:
            for ratio in pruning_ratios:
                entry = _entry(scores, ratio, strategy, min_heads_per_layer, block_normalization, geometry, full_macs)
                if images is not None and "error" not in entry:
                    entry.update(_fidelity(backbone, sites, images, references, entry["selected_heads_per_layer"]))
                results.append(entry)
    analysis = dict(method=method, block_normalization=block_normalization, full=full_info, results=results,
                    source=importance.source)
    if verbose:
        print(format_impact_table(analysis))
    if save_path is not None:
        atomic_write_json(save_path, analysis)
    return analysis


def format_impact_table(analysis: Mapping[str, Any]) -> str:
    """A text table of :func:`analyze_pruning_impact`'s result."""
    full = analysis.get("full", {})
    head = (f"Head pruning impact ({analysis.get('method') or 'scores'}; {full.get('depth')} blocks x "
            f"{full.get('num_heads')} heads" + (f"; {full['macs'] / 1e9:.4g} GMACs/image at "
                                                f"{full['img_hw'][0]}x{full['img_hw'][1]}" if full.get("macs") else "")
            + ")")
    cols = ("strategy", "ratio", "kept/block", "mass kept", "attn params -", "backbone params -", "GMACs",
            "speedup<=", "cos sim", "rel L2")
    lines = [head, " | ".join(cols)]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in analysis.get("results", []):
        if "error" in r:
            lines.append(f"{r['strategy']} | {r['pruning_ratio']:.3g} | error: {r['error']}")
            continue
        per_block = r["heads_per_block"]
        kept = str(per_block[0]) if len(set(per_block)) == 1 else f"{min(per_block)}-{max(per_block)}"
        lines.append(" | ".join([
            r["strategy"], f"{r['pruning_ratio']:.3g}", kept, fmt(r.get("importance_mass_kept"), ".3f"),
            fmt(r.get("attention_params_removed_fraction"), ".1%"), fmt(r.get("backbone_params_removed_fraction"), ".1%"),
            fmt(r["macs"] / 1e9 if r.get("macs") else None, ".4g"), fmt(r.get("speedup_ceiling"), ".3f"),
            fmt(r.get("cosine_similarity"), ".4f"), fmt(r.get("relative_l2_error"), ".4f")]))
    return "\n".join(lines)


__all__ = ["analyze_pruning_impact", "format_impact_table"]
