"""Whole-block importance: one score per teacher block, higher = more important, measured by skipping the block.

  - :func:`compute_block_importance_kd_loss` (the default, and what the budget ranks blocks by): the
    distillation loss of the teacher with block ``b`` skipped against the full teacher, with the
    project's own KD loss (``CombinedKDLoss``'s feature and output parts);
  - :func:`compute_block_importance_cosine`: ShortGPT's block influence (Men et al., 2024),
    ``1 - mean cos(x_in, x_out)`` over tokens, from one forward.

Both read TRAINING frames through the batch machinery of the head methods (``batches.py``) and work
on the unpruned teacher: a block is skipped by :func:`skipped_blocks`, which puts a module returning
its input in ``backbone.blocks[b]`` for the duration (no backbone change). :func:`analyze_block_importance`
reports the scores and the fidelity of the teacher with its k least important blocks skipped.
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.backbones.eva_taps import default_block_map
from mmcv.models.losses.kd_losses import CombinedKDLoss
from mmcv.models.utils.checkpoint_io import atomic_write_json
from mmcv.models.utils.eva_cost import analytic_backbone_macs
from mmcv.models.utils.head_importance import BlockImportance
from tools.head_pruning.batches import features_of, images_of, take_batches
from tools.head_pruning.batches import progress as progress_bar
from tools.head_pruning.importance import finish_importance
from tools.head_pruning.sites import describe_backbone, find_backbone, param_dtype_device, preserved_state

BLOCK_METHODS = ("kd_loss", "cosine")
PathLike = Union[str, "os.PathLike[str]"]


class SkippedBlock(nn.Module):
    """Stands in for a removed block: returns its input unchanged, whatever else the backbone passes
    (``EVAViTStudent`` calls ``block(x, mask, taps, i)``, ORION's ``EVAViT`` ``block(x)``)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def find_blocks(backbone: nn.Module) -> nn.ModuleList:
    """``backbone.blocks`` of the unpruned teacher; a backbone holding fewer blocks than its ``depth`` is refused."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(backbone).__name__}: expected blocks at '.blocks' (an nn.ModuleList), found none")
    depth = getattr(backbone, "depth", None)
    if isinstance(depth, int) and depth != len(blocks):
        raise ValueError(f"block importance needs the unpruned teacher: this backbone holds {len(blocks)} of its "
                         f"{depth} blocks")
    return blocks


@contextlib.contextmanager
def skipped_blocks(backbone: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Run ``backbone`` without the blocks ``indices``: each is replaced by a :class:`SkippedBlock`, put back after.

    The residual stream after a skipped block is its input, as in a student built without the block.
    """
    blocks = find_blocks(backbone)
    chosen = sorted({int(i) for i in indices})
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"skipped blocks: expected indices in [0, {len(blocks)}), got {bad}")
    originals = {i: blocks[i] for i in chosen}
    try:
        for i in chosen:
            blocks[i] = SkippedBlock()
        yield
    finally:
        for i, module in originals.items():
            blocks[i] = module


@contextlib.contextmanager
def _forward_hooks(hooks: Sequence[Tuple[nn.Module, Callable]]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _block_output(index: int, output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"blocks[{index}]: expected the block to return a tensor, got {type(output).__name__}")
    return output


def _cosine_hooks(blocks: nn.ModuleList, sums: torch.Tensor, counts: torch.Tensor) -> List[Tuple[nn.Module, Callable]]:
    """Hooks adding ``sum_t cos(x_in_t, x_out_t)`` and the token count of every block to ``sums`` / ``counts``."""
    def make(index: int) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            x_out = _block_output(index, output)
            x_in = args[0]
            c = x_in.shape[-1]
            cos = F.cosine_similarity(x_in.reshape(-1, c).float(), x_out.reshape(-1, c).float(), dim=-1)
            sums[index] += cos.double().sum().cpu()
            counts[index] += cos.numel()
        return hook
    return [(block, make(i)) for i, block in enumerate(blocks)]


def _tapped_forward(backbone: nn.Module, img: torch.Tensor, tap_blocks: Sequence[int],
                    extra: Sequence[Tuple[nn.Module, Callable]] = (), block_map: Optional[Mapping[int, int]] = None
                    ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """The backbone's feature map and the hidden state of each tapped block ``t``: the output of block
    ``block_map[t]`` (``t`` itself by default), read by forward hooks on whatever module sits there."""
    blocks = find_blocks(backbone)
    hidden: Dict[int, torch.Tensor] = {}

    def make(index: int) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            hidden[index] = _block_output(index, output)
        return hook

    source = {t: t if block_map is None else block_map[t] for t in tap_blocks}
    with _forward_hooks([(blocks[source[t]], make(t)) for t in tap_blocks] + list(extra)):
        features = features_of(backbone(img))
    return features, hidden


def _resolve_kd_loss(kd_loss: Union[CombinedKDLoss, Mapping[str, Any], None]) -> CombinedKDLoss:
    """A ``CombinedKDLoss`` (given, built from its config, or the default); it needs a feature or output part."""
    if kd_loss is None:
        kd_loss = CombinedKDLoss()
    elif isinstance(kd_loss, Mapping):
        cfg = dict(kd_loss)
        if cfg.pop("type", "CombinedKDLoss") != "CombinedKDLoss":
            raise ValueError(f"kd_loss: expected a CombinedKDLoss config, got type {kd_loss.get('type')!r}")
        kd_loss = CombinedKDLoss(**cfg)
    if not isinstance(kd_loss, CombinedKDLoss):
        raise ValueError(f"kd_loss: expected a CombinedKDLoss (or its config), got {type(kd_loss).__name__}")
    if kd_loss.feature_distill_weight <= 0 and kd_loss.output_distill_weight <= 0:
        raise ValueError("kd_loss: feature_distill_weight and output_distill_weight are both 0; block importance "
                         "measures the feature and output parts of the distillation loss")
    return kd_loss


def compute_block_importance_cosine(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                    save_path: Optional[PathLike] = None, progress: bool = True) -> BlockImportance:
    """ShortGPT block influence: ``I[b] = 1 - mean_{images, tokens} cos(x_in_t, x_out_t)`` of block ``b``.

    ``x_in`` / ``x_out`` are the block's input and output hidden states ``[B, H, W, C]`` in one forward of
    the full teacher; every token position counts once (no window padding exists at the block level).
    A block that barely turns the residual stream scores near 0. One forward per batch.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    blocks = find_blocks(backbone)
    dtype, device = param_dtype_device(backbone)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    images = batches = 0
    with preserved_state(model, disable_checkpointing=True), torch.no_grad(), \
            _forward_hooks(_cosine_hooks(blocks, sums, counts)):
        for batch in take_batches(dataloader, num_batches, "block importance (cosine)", progress):
            img = images_of(batch, dtype, device)
            backbone(img)
            images += int(img.shape[0])
            batches += 1
    scores = 1.0 - sums / counts.clamp_min(1.0)
    return finish_importance(scores, "cosine", images, model, backbone, dict(num_batches=batches), save_path,
                             time.perf_counter() - start, kind=BlockImportance)


def compute_block_importance_kd_loss(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                     kd_loss: Union[CombinedKDLoss, Mapping[str, Any], None] = None,
                                     save_path: Optional[PathLike] = None, progress: bool = True) -> BlockImportance:
    """Distillation-loss importance: ``I[b] = mean_frames L_KD(teacher without block b, full teacher)``.

    ``L_KD = w_f * FeatureDistillLoss(hidden states at the tapped blocks) + w_o * OutputDistillLoss(feature
    map)``, the feature and output parts of ``kd_loss`` (default ``CombinedKDLoss()``; the CLI uses the
    config's ``kd_config``) with their weights, taps and modes (``tap_request``: by default the last block
    of each quarter). A skipped block's tap is what a student without the block records
    (``eva_taps.default_block_map``): its input, the previous block's output; for block 0, the output of
    block 1, the first block kept. The full
    teacher's loss is 0, so the score is the loss itself, averaged over frames (batches weighted by their
    images). The attention part is not used: a removed block has no attention map to distil.

    The budget ranks blocks by this method by default: it measures what removing the block costs in the
    loss the student is trained on, including what the skip does to every later block and to the output,
    which the cosine (the block's own input against its output) only approximates. It costs one forward
    per block and frame (``depth + 1`` in all, against one for the cosine); ``analyze_block_importance``
    compares the two orders on validation frames. The ``num_batches`` batches are held in memory.
    ``metadata`` keeps the two parts (``feature_loss``, ``output_loss``) and the cosine scores of the same frames
    (``cosine``, from the full teacher's forward).
    """
    start = time.perf_counter()
    loss = _resolve_kd_loss(kd_loss)
    backbone = find_backbone(model)
    blocks = find_blocks(backbone)
    depth = len(blocks)
    if depth < 2:
        raise ValueError("kd_loss block importance needs a teacher of at least 2 blocks (one must stay)")
    tap_blocks = loss.tap_request(depth)[0]
    dtype, device = param_dtype_device(backbone)
    sums, counts = torch.zeros(depth, dtype=torch.float64), torch.zeros(depth, dtype=torch.float64)
    parts = torch.zeros(depth, 2, dtype=torch.float64)
    with preserved_state(model, disable_checkpointing=True), torch.no_grad():
        images = [images_of(b, dtype, device) for b in take_batches(dataloader, num_batches, "block importance",
                                                                     False)]
        references = [_tapped_forward(backbone, img, tap_blocks, _cosine_hooks(blocks, sums, counts))
                      for img in images]
        for b in progress_bar(range(depth), depth, "block importance (kd_loss), blocks", progress):
            block_map = default_block_map(depth, [k for k in range(depth) if k != b])
            with skipped_blocks(backbone, [b]):
                for img, (ref_features, ref_hidden) in zip(images, references):
                    features, hidden = _tapped_forward(backbone, img, tap_blocks, block_map=block_map)
                    if loss.feature_distill_weight > 0:
                        parts[b, 0] += float(loss.feature_loss(hidden, ref_hidden)) * img.shape[0]
                    if loss.output_distill_weight > 0:
                        parts[b, 1] += float(loss.output_loss([features], [ref_features])) * img.shape[0]
    count = sum(int(img.shape[0]) for img in images)
    parts /= count
    scores = loss.feature_distill_weight * parts[:, 0] + loss.output_distill_weight * parts[:, 1]
    settings = dict(num_batches=len(images), feature_distill_weight=loss.feature_distill_weight,
                    output_distill_weight=loss.output_distill_weight, feature_blocks=list(tap_blocks),
                    feature_mode=loss.feature_loss.mode, output_mode=loss.output_loss.mode,
                    feature_loss=parts[:, 0].tolist(), output_loss=parts[:, 1].tolist(),
                    cosine=(1.0 - sums / counts.clamp_min(1.0)).tolist())
    return finish_importance(scores, "kd_loss", count, model, backbone, settings, save_path,
                             time.perf_counter() - start, kind=BlockImportance)


def compute_block_importance(model: nn.Module, dataloader: Iterable, method: str = "kd_loss",
                             num_batches: Optional[int] = 8, kd_loss: Union[CombinedKDLoss, Mapping[str, Any], None] = None,
                             save_path: Optional[PathLike] = None, progress: bool = True) -> BlockImportance:
    """Dispatch to one of :data:`BLOCK_METHODS` (``kd_loss``, the default and the budget's, or ``cosine``)."""
    if method not in BLOCK_METHODS:
        raise ValueError(f"block importance method: expected one of {BLOCK_METHODS}, got {method!r}")
    if method == "cosine":
        if kd_loss is not None:
            raise ValueError("kd_loss is used by method 'kd_loss' only (cosine measures no loss)")
        return compute_block_importance_cosine(model, dataloader, num_batches, save_path, progress)
    return compute_block_importance_kd_loss(model, dataloader, num_batches, kd_loss, save_path, progress)


# --------------------------------------------------------------------------- analysis


BlockImportances = Union[BlockImportance, Sequence[BlockImportance], torch.Tensor, Sequence[float]]


def _records(importance: BlockImportances) -> List[BlockImportance]:
    """One or several block importance records (bare scores are wrapped), all of one depth."""
    if isinstance(importance, (list, tuple)) and importance and all(isinstance(r, BlockImportance)
                                                                     for r in importance):
        records = list(importance)
    else:
        records = [BlockImportance.coerce(importance)]  # type: ignore[arg-type]
    depths = sorted({r.num_blocks for r in records})
    if len(depths) != 1:
        raise ValueError(f"block importances of different depths: {depths} blocks")
    return records


def block_scores_by_method(importance: BlockImportances) -> Dict[str, List[float]]:
    """Scores by method name (``''`` reads ``'scores'``); a ``kd_loss`` record also gives the cosine of its frames."""
    records = _records(importance)
    methods: Dict[str, List[float]] = {}
    for record in records:
        name = record.method or "scores"
        if name in methods:
            raise ValueError(f"two block importances of method {name!r}; give one of each")
        methods[name] = [float(v) for v in record.scores.tolist()]
    for record in records:
        cosine = record.metadata.get("cosine")
        if record.method == "kd_loss" and "cosine" not in methods and isinstance(cosine, list) \
                and len(cosine) == record.num_blocks:
            methods["cosine"] = [float(v) for v in cosine]
    return methods


def _block_geometry(records: Sequence[BlockImportance], backbone: Optional[nn.Module],
                    img_size: Optional[Union[int, Sequence[int]]]) -> Optional[Dict[str, Any]]:
    """Geometry from the backbone, else from a record's metadata (None without either); depths must agree."""
    depth = records[0].num_blocks
    if backbone is not None:
        if len(find_blocks(backbone)) != depth:
            raise ValueError(f"block importance has {depth} blocks but the model has {len(find_blocks(backbone))}")
        return describe_backbone(backbone, img_size)
    for record in records:
        if isinstance(record.metadata.get("backbone"), Mapping):
            geometry = dict(record.metadata["backbone"])
            if img_size is not None:
                geometry["img_hw"] = [img_size, img_size] if isinstance(img_size, int) else [int(v) for v in img_size]
            return geometry
    return None


def skipped_macs(geometry: Optional[Mapping[str, Any]], skipped: Sequence[int]) -> Optional[int]:
    """Analytic MACs per image with the blocks ``skipped`` removed (a removed block costs 0); None without geometry."""
    needed = ("img_hw", "patch_size", "embed_dim", "mlp_hidden", "head_dim", "num_heads", "window_per_block")
    if geometry is None or not all(geometry.get(k) for k in needed):
        return None
    windows = list(geometry["window_per_block"])
    kept = [b not in set(skipped) for b in range(len(windows))]
    return analytic_backbone_macs(tuple(geometry["img_hw"]), geometry["patch_size"], geometry.get("in_chans") or 3,
                                  geometry["embed_dim"], [geometry["mlp_hidden"] if k else 0 for k in kept],
                                  geometry["head_dim"], [geometry["num_heads"] if k else 0 for k in kept], windows)


def _skip_fidelity(backbone: nn.Module, images: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                   skipped: Sequence[int]) -> Dict[str, float]:
    """Cosine similarity and relative L2 error of the feature map with ``skipped`` removed vs the full one (per image)."""
    cos: List[float] = []
    rel: List[float] = []
    with skipped_blocks(backbone, skipped):
        for img, ref in zip(images, references):
            out = features_of(backbone(img)).flatten(1).double()
            full = ref.flatten(1).double()
            cos.extend(F.cosine_similarity(out, full, dim=1).tolist())
            rel.extend(((out - full).norm(dim=1) / full.norm(dim=1).clamp_min(1e-30)).tolist())
    return dict(cosine_similarity=float(np.mean(cos)), relative_l2_error=float(np.mean(rel)))


def _skip_rows(order: Sequence[int], geometry: Optional[Mapping[str, Any]], backbone: Optional[nn.Module],
               images: Optional[List[torch.Tensor]], references: Optional[List[torch.Tensor]]) -> List[Dict[str, Any]]:
    """One row per k = 0..depth-1: the k least important blocks skipped, their MACs and (with images) fidelity."""
    full_macs = skipped_macs(geometry, [])
    rows = []
    for k in range(len(order)):
        skipped = sorted(order[:k])
        row: Dict[str, Any] = dict(k=k, skipped=skipped)
        macs = skipped_macs(geometry, skipped)
        if macs is not None and full_macs:
            row.update(macs=macs, macs_ratio=macs / full_macs, speedup_ceiling=full_macs / macs)
        if backbone is not None and images is not None and references is not None:
            row.update(_skip_fidelity(backbone, images, references, skipped))
        rows.append(row)
    return rows


def analyze_block_importance(importance: BlockImportances, model: Optional[nn.Module] = None,
                             dataloader: Optional[Iterable] = None, num_batches: Optional[int] = 4,
                             img_size: Optional[Union[int, Sequence[int]]] = None, verbose: bool = True,
                             save_path: Optional[PathLike] = None) -> Dict[str, Any]:
    """Per-block importance and what skipping the k least important blocks keeps, for every method given.

    ``importance``: one record or several (e.g. ``kd_loss`` and ``cosine``; a ``kd_loss`` record brings the
    cosine of its frames along). Per method and k = 0..depth-1: the blocks skipped (least important
    first), analytic MACs and the speedup ceiling (geometry from ``model`` or the records' metadata), and
    with ``model`` and ``dataloader`` (validation frames: score on training frames, judge on others) the
    cosine similarity and relative L2 error of the teacher's feature map with those blocks skipped
    against the full teacher, mean over images. Prints a table (``verbose``), returns a dict, saves JSON.
    """
    records = _records(importance)
    methods = block_scores_by_method(records)
    if dataloader is not None and model is None:
        raise ValueError("measured fidelity needs the model as well as the dataloader")
    backbone = find_backbone(model) if model is not None else None
    geometry = _block_geometry(records, backbone, img_size)
    orders = {name: BlockImportance(scores=scores, method=name).order() for name, scores in methods.items()}
    analysis: Dict[str, Any] = dict(depth=records[0].num_blocks, full_macs=skipped_macs(geometry, []),
                                    window_per_block=geometry.get("window_per_block") if geometry else None,
                                    methods={name: dict(scores=methods[name], order=orders[name]) for name in methods},
                                    sources=[r.source for r in records], skip={})
    with contextlib.nullcontext() if model is None else preserved_state(model), torch.no_grad():
        images = references = None
        if backbone is not None and dataloader is not None:
            dtype, device = param_dtype_device(backbone)
            images = [images_of(b, dtype, device) for b in take_batches(dataloader, num_batches, "collect images",
                                                                         False)]
            references = [features_of(backbone(img)).detach() for img in images]
            analysis["fidelity_images"] = sum(int(img.shape[0]) for img in images)
        for name, order in orders.items():
            analysis["skip"][name] = _skip_rows(order, geometry, backbone, images, references)
    if verbose:
        print(format_block_table(analysis))
    if save_path is not None:
        atomic_write_json(save_path, analysis)
    return analysis


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_block_table(analysis: Mapping[str, Any]) -> str:
    """Text tables of :func:`analyze_block_importance`: scores and ranks per block, then the skip rows per method."""
    methods = analysis.get("methods", {})
    names = list(methods)
    depth = int(analysis.get("depth", 0))
    windows = analysis.get("window_per_block")
    lines = [f"Block importance ({depth} blocks; {', '.join(names)}; rank 1 = most important)",
             " | ".join(["block", "kind"] + [c for n in names for c in (n, "rank")])]
    for b in range(depth):
        kind = "-" if not windows else ("window" if windows[b] else "global")
        cells = [str(b), kind]
        for n in names:
            cells += [_fmt(methods[n]["scores"][b], ".4g"), str(depth - methods[n]["order"].index(b))]
        lines.append(" | ".join(cells))
    skip = analysis.get("skip", {})
    if not skip:
        return "\n".join(lines)
    images = analysis.get("fidelity_images")
    lines += ["", f"Skipping the k least important blocks ("
              + (f"teacher feature cosine on {images} images" if images else "no fidelity measured")
              + "; speedup ceiling from analytic MACs)",
              " | ".join(["k"] + [c for n in skip for c in (f"{n}: skipped", "cos sim", "rel L2", "speedup<=")])]
    for k in range(depth):
        cells = [str(k)]
        for n in skip:
            row = skip[n][k]
            cells += [",".join(str(b) for b in row["skipped"]) or "-", _fmt(row.get("cosine_similarity"), ".4f"),
                      _fmt(row.get("relative_l2_error"), ".4f"), _fmt(row.get("speedup_ceiling"), ".3f")]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


__all__ = ["BLOCK_METHODS", "SkippedBlock", "find_blocks", "skipped_blocks", "compute_block_importance",
           "compute_block_importance_kd_loss", "compute_block_importance_cosine", "block_scores_by_method",
           "skipped_macs", "analyze_block_importance", "format_block_table"]
