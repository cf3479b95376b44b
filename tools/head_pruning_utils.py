"""Attention-head importance, pruning configurations and pruning-impact analysis.

Works on any backbone whose attention blocks have ORION's EVA-02 layout
(``blocks[i].attn`` with ``q_proj/k_proj/v_proj/proj/rope``, optional
``q_bias/v_bias/inner_attn_ln``, ``attn.num_heads``): ORION's own ``EVAViT``,
``EVAViTStudent`` or anything shaped alike. Everything goes through forward
hooks; no conversion, no model-specific fast path.

Importance (one score per block and head, higher = more important):
  - :func:`compute_head_importance_magnitude`  weight norms, no data;
  - :func:`compute_head_importance_gradient`   Michel et al. (2019), |dL/d mask_h|;
  - :func:`compute_head_importance_entropy`    max entropy minus mean attention entropy;
  - :func:`compute_head_importance_activation` Minitron's mean norm of each head's output.
Pruning: :func:`create_pruning_config` (``pruning_ratio`` = fraction REMOVED),
:func:`validate_pruning_config`. Analysis: :func:`analyze_pruning_impact`,
:func:`plot_head_importance`, :func:`plot_fidelity_vs_ratio`.

Command line (run from the repository root, standalone or inside ORION)::

    python tools/head_pruning_utils.py importance --config CFG --checkpoint CKPT --method magnitude --out imp.json
    python tools/head_pruning_utils.py prune-config --importance imp.json --pruning-ratio 0.5 --out prune.json
    python tools/head_pruning_utils.py analyze --importance imp.json --config CFG --checkpoint CKPT --out a.json
    python tools/head_pruning_utils.py plot --importance imp.json --pruning-config prune.json --out heads.png

This file is a plugin: it is copied into ORION (Python 3.8, torch 2.0-2.4, no mmengine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

if __name__ == "__main__" and not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.backbones.eva_vit_student import (analytic_backbone_macs, extract_backbone_state_dict,
                                                   resolve_head_selection)
from mmcv.models.utils.checkpoint_io import (atomic_write, atomic_write_json, json_default, load_checkpoint_file,
                                            state_dict_of)

METHODS = ("magnitude", "gradient", "entropy", "activation")
STRATEGIES = ("uniform", "global")
_FORMAT = "orion-kd-head-importance"
_CONFIG_FORMAT = "orion-kd-pruning-config"
ScoresLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]

__all__ = [
    "HeadImportance", "PruningConfig", "AttentionSite", "find_backbone", "find_attention_sites",
    "compute_head_importance", "compute_head_importance_magnitude", "compute_head_importance_gradient",
    "compute_head_importance_entropy", "compute_head_importance_activation", "create_pruning_config",
    "validate_pruning_config", "describe_backbone", "analyze_pruning_impact", "plot_head_importance",
    "plot_fidelity_vs_ratio", "head_mask_hooks", "main",
]


# --------------------------------------------------------------------------- files


def _extension(path: Union[str, os.PathLike]) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".json", ".npz", ".pkl", ".pickle"):
        raise ValueError(f"{os.fspath(path)}: expected a .json, .npz or .pkl file, got extension {ext!r}")
    return ext


# --------------------------------------------------------------------------- result objects


@dataclass
class HeadImportance:
    """Per-block, per-head importance scores (higher = more important).

    ``scores``: float64 tensor [layers, heads]; ``method``: how they were computed;
    ``num_samples``: images (or batches for detectors: samples) seen, 0 for magnitude;
    ``source``: what was measured (model class, checkpoint); ``metadata``: method settings and the
    backbone geometry used by :func:`analyze_pruning_impact`.
    """

    scores: torch.Tensor
    method: str
    num_samples: int = 0
    source: str = ""
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.scores, torch.Tensor):
            scores = self.scores.detach().cpu().to(torch.float64)
        else:
            scores = torch.as_tensor(np.asarray(self.scores, dtype=np.float64))
        if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
            raise ValueError(f"HeadImportance.scores: expected a [layers, heads] array, got shape {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"HeadImportance.scores: contains NaN or inf values ({self.method})")
        self.scores = scores
        self.num_samples = int(self.num_samples)

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scores.shape[1])

    def numpy(self) -> np.ndarray:
        return self.scores.numpy().copy()

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=_FORMAT, version=1, method=self.method, num_samples=self.num_samples,
                    source=self.source, metadata=self.metadata, scores=self.scores.tolist())

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write ``.json`` (readable), ``.npz`` (scores array + JSON header) or ``.pkl`` (plain dict), atomically."""
        ext = _extension(path)
        if ext == ".json":
            return atomic_write_json(path, self.to_dict())
        header = {k: v for k, v in self.to_dict().items() if k != "scores"}
        if ext == ".npz":
            text = json.dumps(header, default=json_default)
            return atomic_write(path, lambda f: np.savez(f, scores=self.numpy(), header=np.array(text)), binary=True)
        payload = dict(header, scores=self.numpy())
        return atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4), binary=True)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], allow_pickle: bool = False) -> "HeadImportance":
        """Read a file written by :meth:`save`; pickle files only with ``allow_pickle=True`` (they can run code)."""
        path = os.fspath(path)
        ext = _extension(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"head importance file not found: {path}")
        if ext == ".json":
            with open(path) as handle:
                payload = json.load(handle)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "scores" not in data or "header" not in data:
                    raise ValueError(f"{path}: not a head importance file (expected arrays 'scores' and 'header', "
                                     f"got {sorted(data.files)})")
                payload = dict(json.loads(str(data["header"])), scores=data["scores"])
        else:
            if not allow_pickle:
                raise ValueError(f"{path}: refusing to load a pickle file (unpickling can execute arbitrary code); "
                                 f"pass allow_pickle=True if you trust it, or save as .json/.npz")
            with open(path, "rb") as handle:
                payload = pickle.load(handle)
        if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT or "scores" not in payload:
            raise ValueError(f"{path}: not a head importance file (expected format {_FORMAT!r})")
        return cls(scores=payload["scores"], method=payload.get("method", ""), num_samples=payload.get("num_samples", 0),
                   source=payload.get("source", ""), metadata=dict(payload.get("metadata") or {}))


@dataclass
class PruningConfig:
    """Which teacher heads each block keeps.

    ``selected_heads_per_layer``: sorted teacher head indices per block (what
    ``EVAViTStudent(selected_heads_per_layer=...)`` takes); ``num_heads``: heads kept per block;
    ``pruning_ratio``: fraction of heads REMOVED that was asked for. Iterating over the object
    yields the per-block lists, so it can also be passed where a list of lists is expected.
    """

    selected_heads_per_layer: List[List[int]]
    teacher_num_heads: int
    pruning_ratio: float
    strategy: str = "uniform"
    method: str = ""
    min_heads_per_layer: int = 1
    num_heads: List[int] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selected_heads_per_layer = validate_pruning_config(
            self.selected_heads_per_layer, depth=len(self.selected_heads_per_layer),
            teacher_num_heads=self.teacher_num_heads, num_heads=self.num_heads or None)
        self.num_heads = [len(h) for h in self.selected_heads_per_layer]
        _check_ratio(self.pruning_ratio)

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.selected_heads_per_layer)

    def __len__(self) -> int:
        return len(self.selected_heads_per_layer)

    def __getitem__(self, index: int) -> List[int]:
        return self.selected_heads_per_layer[index]

    @property
    def depth(self) -> int:
        return len(self.selected_heads_per_layer)

    def to_model_kwargs(self) -> Dict[str, Any]:
        """Arguments for ``EVAViTStudent``: ``num_heads``, ``teacher_num_heads``, ``selected_heads_per_layer``."""
        return dict(num_heads=list(self.num_heads), teacher_num_heads=self.teacher_num_heads,
                    selected_heads_per_layer=[list(h) for h in self.selected_heads_per_layer])

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=_CONFIG_FORMAT, version=1, selected_heads_per_layer=self.selected_heads_per_layer,
                    num_heads=self.num_heads, teacher_num_heads=self.teacher_num_heads,
                    pruning_ratio=self.pruning_ratio, strategy=self.strategy, method=self.method,
                    min_heads_per_layer=self.min_heads_per_layer, metadata=self.metadata)

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the configuration as JSON (atomically)."""
        if os.path.splitext(os.fspath(path))[1].lower() != ".json":
            raise ValueError(f"{os.fspath(path)}: pruning configurations are saved as .json")
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PruningConfig":
        """Read and validate a configuration written by :meth:`save`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pruning configuration not found: {path}")
        with open(path) as handle:
            payload = json.load(handle)
        if not isinstance(payload, Mapping) or payload.get("format") != _CONFIG_FORMAT:
            raise ValueError(f"{path}: not a pruning configuration (expected format {_CONFIG_FORMAT!r})")
        selection = payload["selected_heads_per_layer"]
        validate_pruning_config(selection, depth=len(selection), teacher_num_heads=payload["teacher_num_heads"],
                                num_heads=payload.get("num_heads"))
        return cls(selected_heads_per_layer=selection, teacher_num_heads=int(payload["teacher_num_heads"]),
                   pruning_ratio=float(payload["pruning_ratio"]), strategy=payload.get("strategy", "uniform"),
                   method=payload.get("method", ""), min_heads_per_layer=int(payload.get("min_heads_per_layer", 1)),
                   num_heads=list(payload.get("num_heads") or []), metadata=dict(payload.get("metadata") or {}))


# --------------------------------------------------------------------------- model discovery


@dataclass
class AttentionSite:
    """One attention block found by layout: ``block`` (``blocks[index]``), ``attn`` and its head geometry."""

    index: int
    block: nn.Module
    attn: nn.Module
    num_heads: int
    head_dim: int

    @property
    def head_input(self) -> nn.Module:
        """Module whose input is the concatenation of the heads' outputs (inner LayerNorm, else ``proj``)."""
        ln = getattr(self.attn, "inner_attn_ln", None)
        return ln if isinstance(ln, nn.LayerNorm) else self.attn.proj


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(model, "blocks"):
        model = model.module  # DataParallel / DistributedDataParallel
    return model


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone whose heads are scored.

    An OrionStudent-like detector (``teacher_backbone`` attribute): the teacher (its heads are the
    ones being pruned); a detector: ``img_backbone``; otherwise ``model`` itself when it has ``blocks``.
    """
    model = _unwrap(model)
    for name in ("teacher_backbone", "img_backbone"):
        candidate = getattr(model, name, None)
        if isinstance(candidate, nn.Module):
            return candidate
    if hasattr(model, "blocks"):
        return model
    raise ValueError(f"{type(model).__name__}: expected a backbone with 'blocks' or a detector with 'img_backbone' "
                     f"(or 'teacher_backbone'), found neither")


def find_attention_sites(backbone: nn.Module) -> List[AttentionSite]:
    """Attention blocks of an EVA-02-layout backbone: ``blocks[i].attn`` with q/k/v/proj and ``num_heads``."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(backbone).__name__}: expected attention blocks at '.blocks', found none")
    sites = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "proj") if not hasattr(attn, n)]
        if attn is None or missing:
            raise ValueError(f"blocks[{i}]: expected ORION's attention layout (attn.q_proj/k_proj/v_proj/proj), "
                             f"missing {missing or ['attn']}")
        heads = getattr(attn, "num_heads", None)
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"blocks[{i}].attn: expected an int attribute num_heads >= 1, got {heads!r}")
        rows = attn.q_proj.weight.shape[0]
        if rows % heads:
            raise ValueError(f"blocks[{i}].attn: q_proj has {rows} output rows, not divisible by num_heads {heads}")
        sites.append(AttentionSite(i, block, attn, heads, rows // heads))
    counts = sorted({s.num_heads for s in sites})
    if len(counts) != 1:
        raise ValueError(f"head importance needs the unpruned backbone (the same head count in every block); "
                         f"found blocks with {counts} heads")
    return sites


def _param_dtype_device(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for param in module.parameters():
        return param.dtype, param.device
    return torch.float32, torch.device("cpu")


def _source_label(model: nn.Module, backbone: nn.Module) -> str:
    model = _unwrap(model)
    if model is backbone:
        return type(backbone).__name__
    return f"{type(model).__name__}.{'teacher_backbone' if getattr(model, 'teacher_backbone', None) is backbone else 'img_backbone'} ({type(backbone).__name__})"


def describe_backbone(backbone: nn.Module, img_size: Optional[Union[int, Sequence[int]]] = None) -> Dict[str, Any]:
    """Geometry used for parameter and MAC counts (stored in importance metadata)."""
    sites = find_attention_sites(backbone)
    attn0 = sites[0].attn
    embed_dim = int(attn0.q_proj.weight.shape[1])
    patch = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    patch_size = int(patch.kernel_size[0]) if isinstance(patch, nn.Conv2d) else None
    in_chans = int(patch.in_channels) if isinstance(patch, nn.Conv2d) else 3
    mlp = getattr(sites[0].block, "mlp", None)
    first = getattr(mlp, "w1", None) or getattr(mlp, "fc1", None)
    mlp_hidden = int(first.weight.shape[0]) if first is not None else None
    windows = [int(getattr(s.block, "window_size", 0) or 0) for s in sites]
    if img_size is None:
        img_size = getattr(backbone, "img_size", None)
        if img_size is None and patch_size:  # the global rope table covers the whole token grid
            glb = [s for s, w in zip(sites, windows) if w == 0 and getattr(s.attn, "rope", None) is not None]
            table = getattr(glb[0].attn.rope, "freqs_cos", None) if glb else None
            if table is not None:
                img_size = int(round(math.sqrt(table.shape[0]))) * patch_size
    if isinstance(img_size, int):
        img_hw = [img_size, img_size]
    else:
        img_hw = [int(v) for v in img_size] if img_size is not None else None
    has_bias = getattr(attn0, "q_bias", None) is not None or getattr(attn0.q_proj, "bias", None) is not None
    per_head = _attention_params_per_head(attn0, sites[0].head_dim)
    return dict(backbone_class=type(backbone).__name__, depth=len(sites), num_heads=sites[0].num_heads,
                head_dim=sites[0].head_dim, embed_dim=embed_dim, patch_size=patch_size, in_chans=in_chans,
                mlp_hidden=mlp_hidden, window_per_block=windows, img_hw=img_hw, qkv_bias=bool(has_bias),
                subln=isinstance(getattr(attn0, "inner_attn_ln", None), nn.LayerNorm),
                attention_params_per_head=per_head,
                num_params=int(sum(p.numel() for p in backbone.parameters())))


def _attention_params_per_head(attn: nn.Module, head_dim: int) -> int:
    """Parameters that one head owns: q/k/v rows, q/v(/k) bias slices, ``proj`` columns, inner-LN slices."""
    count = 0
    for name, bias_name in (("q_proj", "q_bias"), ("k_proj", "k_bias"), ("v_proj", "v_bias")):
        lin = getattr(attn, name)
        count += head_dim * lin.weight.shape[1]
        bias = getattr(attn, bias_name, None)
        if bias is None:
            bias = getattr(lin, "bias", None)
        if bias is not None:
            count += head_dim
    count += attn.proj.weight.shape[0] * head_dim
    ln = getattr(attn, "inner_attn_ln", None)
    if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine:
        count += head_dim * (2 if ln.bias is not None else 1)
    return count


# --------------------------------------------------------------------------- state, data, progress


@contextlib.contextmanager
def _preserved_state(model: nn.Module, requires_grad: Optional[bool] = None,
                     disable_checkpointing: bool = False) -> Iterator[None]:
    """Eval mode inside; every module's ``training`` flag, every ``requires_grad`` and checkpoint flags restored.

    Covers ``model`` and the backbone :func:`find_backbone` picks (a hidden teacher is not a registered child).
    """
    roots = [model]
    with contextlib.suppress(ValueError):
        roots.append(find_backbone(model))
    modules = list({id(m): m for root in roots for m in root.modules()}.values())
    params = list({id(p): p for m in modules for p in m.parameters(recurse=False)}.values())
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for p in params]
    flags = []
    if disable_checkpointing:
        for m in modules:
            for name in ("with_cp", "use_checkpoint", "grad_checkpointing"):
                if getattr(m, name, None) is True:
                    flags.append((m, name))
                    setattr(m, name, False)
    try:
        for root in roots:
            root.eval()
        if requires_grad is not None:
            for p, _ in grads:
                p.requires_grad_(requires_grad)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, name in flags:
            setattr(m, name, True)


def _progress(iterable: Iterable, total: Optional[int], desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _batches(dataloader: Iterable, num_batches: Optional[int], desc: str, progress: bool) -> Iterator[Any]:
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches: expected >= 1 (or None for the whole loader), got {num_batches}")
    total = num_batches
    if total is None:
        with contextlib.suppress(TypeError):
            total = len(dataloader)  # type: ignore[arg-type]
    seen = 0
    for batch in _progress(dataloader, total, desc, progress):
        if num_batches is not None and seen >= num_batches:
            break
        seen += 1
        yield batch
    if seen == 0:
        raise ValueError(f"{desc}: the dataloader yielded no batches")


def _unwrap_containers(value: Any) -> Any:
    """mmcv ``DataContainer`` -> its single-device payload (what ``MMDataParallel`` scatters); recursive."""
    if type(value).__name__ == "DataContainer" and hasattr(value, "data"):
        data = value.data
        return _unwrap_containers(data[0] if isinstance(data, list) and data else data)
    if isinstance(value, Mapping):
        return {k: _unwrap_containers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap_containers(v) for v in value) if isinstance(value, list) else \
            tuple(_unwrap_containers(v) for v in value)
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def _images(batch: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Backbone input from a batch: a tensor or a dict with 'img'; [B, N, 3, H, W] flattened to [B*N, 3, H, W]."""
    batch = _unwrap_containers(batch)
    img = batch.get("img") if isinstance(batch, Mapping) else batch
    if isinstance(img, (list, tuple)) and len(img) == 1 and isinstance(img[0], torch.Tensor):
        img = img[0]
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"expected batches that are image tensors or dicts with an 'img' tensor, "
                         f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    if img.ndim == 5:
        img = img.flatten(0, 1)
    if img.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W] or [B, N, 3, H, W], got shape {tuple(img.shape)}")
    return img.to(device=device, dtype=dtype)


def _features(output: Any) -> torch.Tensor:
    """The backbone's output feature map (ORION returns a list with one tensor)."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"expected the backbone to return a tensor or a list of tensors, got {type(output).__name__}")
    return output


# --------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def head_mask_hooks(sites: Sequence[AttentionSite], masks: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
    """Multiply head ``h`` of block ``l``'s output (before inner LN / ``proj``) by ``masks[l][h]`` while active.

    Works on any module tree found by :func:`find_attention_sites`; differentiable in the masks.
    """
    handles = []

    def make(site: AttentionSite, mask: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            x = args[0]
            scaled = (x.unflatten(-1, (site.num_heads, site.head_dim)) * mask.to(x.dtype)[:, None]).flatten(-2)
            return (scaled,) + tuple(args[1:])
        return hook

    try:
        for site, mask in zip(sites, masks):
            if mask is None:
                continue
            if mask.shape != (site.num_heads,):
                raise ValueError(f"mask of block {site.index}: expected shape ({site.num_heads},), got {tuple(mask.shape)}")
            handles.append(site.head_input.register_forward_pre_hook(make(site, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _GeometryRecorder:
    """Records each block's input shape to tell real tokens from window padding in attention sequences."""

    def __init__(self, sites: Sequence[AttentionSite]) -> None:
        self.sites = sites
        self.shapes: Dict[int, Tuple[int, ...]] = {}
        self.handles: List[Any] = []

    def __enter__(self) -> "_GeometryRecorder":
        for site in self.sites:
            def hook(module: nn.Module, args: Tuple[Any, ...], index: int = site.index) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    self.shapes[index] = tuple(args[0].shape)
            self.handles.append(site.block.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def valid(self, site: AttentionSite, sequences: int, length: int, device: torch.device) -> torch.Tensor:
        """[sequences, length] float mask: 1 for real tokens, 0 for the zero padding of window blocks."""
        shape = self.shapes.get(site.index)
        window = int(getattr(site.block, "window_size", 0) or 0)
        ones = torch.ones(sequences, length, device=device)
        if shape is None or len(shape) != 4 or window <= 0 or length != window * window:
            return ones
        b, h, w = shape[0], shape[1], shape[2]
        hp, wp = -(-h // window) * window, -(-w // window) * window
        if sequences != b * (hp // window) * (wp // window):
            return ones
        grid = torch.zeros(hp, wp, device=device)
        grid[:h, :w] = 1.0
        per_image = grid.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, length)
        return per_image.repeat(b, 1)


def _qk_rows(site: AttentionSite, x: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q of the sampled query rows and k of all keys, [S, heads, Q|N, head_dim], with biases and rope, q scaled."""
    attn = site.attn
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    s, n, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)
    q_bias = attn.q_proj.bias if q_bias is None else q_bias
    k_bias = getattr(attn, "k_bias", None)
    k_bias = attn.k_proj.bias if k_bias is None else k_bias
    q = F.linear(x, attn.q_proj.weight, q_bias).view(s, n, site.num_heads, site.head_dim).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight, k_bias).view(s, n, site.num_heads, site.head_dim).transpose(1, 2)
    rope = getattr(attn, "rope", None)
    if rope is not None:
        q, k = rope(q), rope(k)
    scale = getattr(attn, "scale", None) or site.head_dim ** -0.5
    return q[:, :, rows] * scale, k


# --------------------------------------------------------------------------- importance


def _finish(scores: torch.Tensor, method: str, num_samples: int, model: nn.Module, backbone: nn.Module,
            settings: Dict[str, Any], save_path: Optional[Union[str, os.PathLike]], seconds: float) -> HeadImportance:
    metadata = dict(settings, seconds=round(seconds, 3))
    with contextlib.suppress(Exception):
        metadata["backbone"] = describe_backbone(backbone)
    result = HeadImportance(scores=scores, method=method, num_samples=num_samples,
                            source=_source_label(model, backbone), metadata=metadata)
    if save_path is not None:
        result.save(save_path)
    return result


def compute_head_importance_magnitude(model: nn.Module, save_path: Optional[Union[str, os.PathLike]] = None,
                                     include_proj: bool = False) -> HeadImportance:
    """Weight-magnitude importance (no data).

    ``I[l, h] = sqrt(||Wq[h]||_F^2 + ||Wk[h]||_F^2 + ||Wv[h]||_F^2 (+ ||Wproj[:, h]||_F^2 with include_proj))``
    where ``W*[h]`` are the ``head_dim`` output rows of head ``h`` in block ``l``'s q/k/v projection and
    ``Wproj[:, h]`` the matching input columns of ``proj``; biases are not counted.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    rows = []
    with torch.no_grad():
        for site in sites:
            total = torch.zeros(site.num_heads, dtype=torch.float64)
            for name in ("q_proj", "k_proj", "v_proj"):
                w = getattr(site.attn, name).weight.detach()
                total += w.view(site.num_heads, site.head_dim, -1).double().pow(2).sum(dim=(1, 2)).cpu()
            if include_proj:
                w = site.attn.proj.weight.detach()
                total += w.view(w.shape[0], site.num_heads, site.head_dim).double().pow(2).sum(dim=(0, 2)).cpu()
            rows.append(total.sqrt())
    return _finish(torch.stack(rows), "magnitude", 0, model, backbone, dict(include_proj=include_proj),
                   save_path, time.perf_counter() - start)


def _loss_of(output: Any) -> torch.Tensor:
    """The scalar loss from a detector's output: ``output['loss']``, else the sum of keys containing 'loss'."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("loss"), torch.Tensor):
            return output["loss"]
        parts = []
        for key, value in output.items():
            if "loss" in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                parts.extend(v for v in values if isinstance(v, torch.Tensor))
        if parts:
            return sum(p.sum() for p in parts)
    raise ValueError(f"expected the model to return a dict with a 'loss' tensor, got "
                     f"{sorted(output) if isinstance(output, Mapping) else type(output).__name__}")


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


def compute_head_importance_gradient(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                                    normalize: bool = True, save_path: Optional[Union[str, os.PathLike]] = None,
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
    loss_fn = loss_fn or getattr(_unwrap(model), "loss_fn", None)
    is_backbone = _unwrap(model) is backbone
    if is_backbone and loss_fn is None:
        raise ValueError("gradient importance of a bare backbone needs loss_fn(outputs, batch) "
                         "(argument or model.loss_fn); or pass a detector that returns a loss")
    dtype, device = _param_dtype_device(backbone)
    masks = [torch.ones(s.num_heads, dtype=dtype, device=device, requires_grad=True) for s in sites]
    total = torch.zeros(len(sites), sites[0].num_heads, dtype=torch.float64)
    samples = 0
    batches = 0
    with _preserved_state(model, requires_grad=False, disable_checkpointing=True), \
            _teacher_in_place(_unwrap(model)), head_mask_hooks(sites, masks), torch.enable_grad():
        for batch in _batches(dataloader, num_batches, "gradient importance", progress):
            if is_backbone:
                img = _images(batch, dtype, device)
                loss = loss_fn(model(img), batch)
                samples += img.shape[0]
            else:
                data = _to_device(_unwrap_containers(batch), device)
                loss = _loss_of(model(data, return_loss=True) if loss_fn is None else loss_fn(model, data))
                samples += _batch_size(data)
            if loss.ndim:
                loss = loss.sum()
            grads = torch.autograd.grad(loss, masks, allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:
                    total[i] += grad.detach().abs().double().cpu()
            batches += 1
    scores = total / batches
    if not bool(scores.abs().sum() > 0):
        raise ValueError("gradient importance: the loss does not depend on any attention head (all gradients are "
                         "zero); check that the loss uses the backbone's output")
    if normalize:
        scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return _finish(scores, "gradient", samples, model, backbone, dict(normalize=normalize, batches=batches),
                   save_path, time.perf_counter() - start)


def _batch_size(data: Any) -> int:
    img = data.get("img") if isinstance(data, Mapping) else data
    if isinstance(img, (list, tuple)) and img and isinstance(img[0], torch.Tensor):
        img = img[0]
    return int(img.shape[0]) if isinstance(img, torch.Tensor) and img.ndim >= 1 else 1


def _data_pass(model: nn.Module, dataloader: Iterable, num_batches: Optional[int], desc: str, progress: bool,
               backbone: nn.Module) -> int:
    """Run the backbone over the images of ``num_batches`` batches without autograd; returns the image count."""
    dtype, device = _param_dtype_device(backbone)
    images = 0
    with torch.no_grad():
        for batch in _batches(dataloader, num_batches, desc, progress):
            img = _images(batch, dtype, device)
            backbone(img)
            images += img.shape[0]
    return images


def _data_pass_with_pre_hooks(model: nn.Module, hooks: Sequence[Tuple[nn.Module, Callable]], dataloader: Iterable,
                              num_batches: Optional[int], desc: str, progress: bool, backbone: nn.Module) -> int:
    """:func:`_data_pass` with forward pre-hooks attached to the given modules for its duration."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        return _data_pass(model, dataloader, num_batches, desc, progress, backbone)
    finally:
        for handle in handles:
            handle.remove()


def compute_head_importance_entropy(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                   num_query_samples: Optional[int] = 64, seed: int = 0, chunk_size: int = 64,
                                   save_path: Optional[Union[str, os.PathLike]] = None,
                                   progress: bool = True) -> HeadImportance:
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

    def make(site: AttentionSite, recorder: _GeometryRecorder) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            x = args[0]
            seq = x.reshape(x.shape[0], -1, x.shape[-1])
            s, n = seq.shape[0], seq.shape[1]
            if num_query_samples is None or num_query_samples >= n:
                rows = torch.arange(n)
            else:
                rows = torch.randperm(n, generator=generator)[:num_query_samples].sort().values
            valid = recorder.valid(site, s, n, x.device)[:, rows.to(x.device)]
            for lo in range(0, s, chunk_size):
                q, k = _qk_rows(site, seq[lo:lo + chunk_size], rows.to(x.device))
                logp = torch.log_softmax((q @ k.transpose(-2, -1)).float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)  # [S, heads, Q]
                weight = valid[lo:lo + chunk_size]
                sums[site.index] += (entropy * weight[:, None, :]).sum(dim=(0, 2)).double().cpu()
                counts[site.index] += float(weight.sum())
            max_entropy[site.index] = math.log(n)
        return hook

    with _preserved_state(model), _GeometryRecorder(sites) as recorder:
        images = _data_pass_with_pre_hooks(model, [(site.attn, make(site, recorder)) for site in sites], dataloader,
                                           num_batches, "entropy importance", progress, backbone)
    mean_entropy = sums / counts.clamp_min(1.0)[:, None]
    scores = max_entropy[:, None] - mean_entropy
    return _finish(scores, "entropy", images, model, backbone,
                   dict(num_query_samples=num_query_samples, seed=seed, max_entropy=max_entropy.tolist()),
                   save_path, time.perf_counter() - start)


def compute_head_importance_activation(model: nn.Module, dataloader: Iterable, num_batches: Optional[int] = 8,
                                      save_path: Optional[Union[str, os.PathLike]] = None,
                                      progress: bool = True) -> HeadImportance:
    """Activation importance (Minitron): ``I[l, h] = mean_{images, tokens} ||o_{l,h,t}||_2``.

    ``o_{l,h,t}`` is head ``h``'s attention output (``softmax(q k^T) v``, ``head_dim`` channels) at token
    ``t`` of block ``l``, read before inner LN / ``proj``; window padding tokens are excluded. No labels.
    """
    start = time.perf_counter()
    backbone = find_backbone(model)
    sites = find_attention_sites(backbone)
    sums = torch.zeros(len(sites), sites[0].num_heads, dtype=torch.float64)
    counts = torch.zeros(len(sites), dtype=torch.float64)

    def make(site: AttentionSite, recorder: _GeometryRecorder) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            out = args[0]
            out = out.reshape(out.shape[0], -1, site.num_heads, site.head_dim)
            norms = out.float().norm(dim=-1)  # [S, N, heads]
            valid = recorder.valid(site, out.shape[0], out.shape[1], out.device)
            sums[site.index] += (norms * valid[..., None]).sum(dim=(0, 1)).double().cpu()
            counts[site.index] += float(valid.sum())
        return hook

    with _preserved_state(model), _GeometryRecorder(sites) as recorder:
        images = _data_pass_with_pre_hooks(model, [(site.head_input, make(site, recorder)) for site in sites],
                                           dataloader, num_batches, "activation importance", progress, backbone)
    scores = sums / counts.clamp_min(1.0)[:, None]
    return _finish(scores, "activation", images, model, backbone, {}, save_path, time.perf_counter() - start)


def compute_head_importance(model: nn.Module, method: str = "magnitude", dataloader: Optional[Iterable] = None,
                            save_path: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> HeadImportance:
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


# --------------------------------------------------------------------------- pruning configurations


def _check_ratio(pruning_ratio: Any) -> float:
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, (int, float)) or \
            not math.isfinite(float(pruning_ratio)) or not 0.0 <= float(pruning_ratio) < 1.0:
        raise ValueError(f"pruning_ratio: expected the fraction of heads REMOVED in [0, 1) (0.5 keeps half), "
                         f"got {pruning_ratio!r}")
    return float(pruning_ratio)


def _kept_per_block(num_heads: int, pruning_ratio: float) -> int:
    """``round(num_heads * (1 - pruning_ratio))``, half up (8 of 16 for 0.5)."""
    return int(math.floor(num_heads * (1.0 - pruning_ratio) + 0.5 + 1e-9))


def _as_scores(importance: Union[HeadImportance, ScoresLike]) -> Tuple[torch.Tensor, str]:
    if isinstance(importance, HeadImportance):
        return importance.scores, importance.method
    return HeadImportance(scores=importance, method="").scores, ""


def create_pruning_config(importance: Union[HeadImportance, ScoresLike], pruning_ratio: float = 0.5,
                          strategy: str = "uniform", min_heads_per_layer: int = 1) -> PruningConfig:
    """Choose the heads to keep from importance scores.

    ``pruning_ratio`` is the fraction of heads REMOVED (0.5: 16 -> 8 heads). Each block keeps
    ``k = round(H * (1 - pruning_ratio))`` heads (half up; when ``H * (1 - ratio)`` is not a whole number
    a warning says so and ``metadata['effective_pruning_ratio']`` records ``1 - k / H``).
    ``uniform``: every block keeps its top-``k`` heads. ``global``: the same total budget ``depth * k``,
    every block first keeps its top ``min_heads_per_layer`` heads, the rest goes to the highest scores
    of the whole network (non-uniform allocation). Ties go to the lower head index.
    """
    scores, method = _as_scores(importance)
    ratio = _check_ratio(pruning_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    depth, heads = scores.shape
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int) or \
            not 1 <= min_heads_per_layer <= heads:
        raise ValueError(f"min_heads_per_layer: expected an int in [1, {heads}], got {min_heads_per_layer!r}")
    keep = _kept_per_block(heads, ratio)
    if keep < 1:
        raise ValueError(f"pruning_ratio {ratio} removes every head of a {heads}-head block "
                         f"(round({heads} * {1 - ratio:.4g}) = 0); the largest ratio that keeps one head is "
                         f"{1 - 1 / heads:.4g}")
    if abs(heads * (1.0 - ratio) - keep) > 1e-6:
        warnings.warn(f"pruning_ratio {ratio}: {heads} * (1 - {ratio}) = {heads * (1 - ratio):.4g} heads is not a "
                      f"whole number; keeping {keep} per block (effective ratio {1 - keep / heads:.4g})")
    budget = depth * keep
    if strategy == "uniform":
        if keep < min_heads_per_layer:
            raise ValueError(f"uniform pruning at ratio {ratio} keeps {keep} heads per block, fewer than "
                             f"min_heads_per_layer={min_heads_per_layer}")
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        selection = [sorted(order[l, :keep].tolist()) for l in range(depth)]
    else:
        if budget < depth * min_heads_per_layer:
            raise ValueError(f"global pruning at ratio {ratio} keeps {budget} heads in total, fewer than the floor "
                             f"of {min_heads_per_layer} per block x {depth} blocks")
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        chosen = torch.zeros(depth, heads, dtype=torch.bool)
        for l in range(depth):
            chosen[l, order[l, :min_heads_per_layer]] = True
        remaining = budget - int(chosen.sum())
        flat = scores.flatten()
        flat_order = torch.sort(flat, descending=True, stable=True).indices
        for idx in flat_order.tolist():
            if remaining <= 0:
                break
            l, h = divmod(idx, heads)
            if not chosen[l, h]:
                chosen[l, h] = True
                remaining -= 1
        selection = [torch.nonzero(chosen[l]).flatten().tolist() for l in range(depth)]
    kept_mask = torch.zeros(depth, heads, dtype=torch.bool)
    for l, hs in enumerate(selection):
        kept_mask[l, hs] = True
    total_mass = float(scores.sum())
    metadata = dict(effective_pruning_ratio=1.0 - budget / (depth * heads), heads_kept_total=budget,
                    importance_mass_kept=(float(scores[kept_mask].sum()) / total_mass) if total_mass > 0 else None)
    if isinstance(importance, HeadImportance):
        metadata.update(importance_source=importance.source, importance_num_samples=importance.num_samples)
    return PruningConfig(selected_heads_per_layer=selection, teacher_num_heads=heads, pruning_ratio=ratio,
                         strategy=strategy, method=method, min_heads_per_layer=min_heads_per_layer,
                         num_heads=[len(h) for h in selection], metadata=metadata)


def validate_pruning_config(selected_heads_per_layer: Union[PruningConfig, Sequence[Sequence[int]]], depth: int,
                            teacher_num_heads: int, num_heads: Optional[Union[int, Sequence[int]]] = None,
                            pruning_ratio: Optional[float] = None) -> List[List[int]]:
    """Check a head selection and return it as lists of ints; every problem raises ``ValueError``.

    Checks: one list per block, integer indices in ``[0, teacher_num_heads)``, unique, sorted, at least one
    head per block, agreement with ``num_heads`` (int or per block) and with ``pruning_ratio`` (the fraction
    REMOVED: ``depth * round(H * (1 - ratio))`` heads in total, the budget of both strategies).
    """
    if isinstance(selected_heads_per_layer, PruningConfig):
        selected_heads_per_layer = selected_heads_per_layer.selected_heads_per_layer
    for name, value in (("depth", depth), ("teacher_num_heads", teacher_num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(selected_heads_per_layer, (str, bytes)) or not isinstance(selected_heads_per_layer, Sequence):
        raise ValueError(f"selected_heads_per_layer: expected one list of head indices per block, "
                         f"got {type(selected_heads_per_layer).__name__}")
    selection = list(selected_heads_per_layer)
    if len(selection) != depth:
        raise ValueError(f"selected_heads_per_layer: expected {depth} blocks, got {len(selection)}")
    cleaned = []
    for layer, heads in enumerate(selection):
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
            raise ValueError(f"selected_heads_per_layer[{layer}]: expected a list of head indices, got {heads!r}")
        values = list(heads)
        if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for h in values):
            raise ValueError(f"selected_heads_per_layer[{layer}]: expected integers, got {values}")
        cleaned.append([int(h) for h in values])
    counts: Union[int, List[int]]
    if num_heads is None:
        counts = [min(max(len(h), 1), teacher_num_heads) for h in cleaned]
    elif isinstance(num_heads, (int, np.integer)) and not isinstance(num_heads, bool):
        counts = int(num_heads)
    else:
        counts = [int(n) if isinstance(n, np.integer) else n for n in num_heads]
    result = resolve_head_selection(depth, teacher_num_heads, counts, cleaned)
    if pruning_ratio is not None:
        ratio = _check_ratio(pruning_ratio)
        keep = _kept_per_block(teacher_num_heads, ratio)
        kept = sum(len(h) for h in result)
        if kept != depth * keep:
            per_block = kept / depth
            message = (f"pruning_ratio {ratio} is the fraction of heads REMOVED: it keeps {keep} of "
                       f"{teacher_num_heads} heads per block ({depth * keep} in total), but the selection keeps "
                       f"{kept} ({per_block:g} per block on average)")
            other_reading = ratio > 0 and kept == depth * _kept_per_block(teacher_num_heads, 1.0 - ratio)
            if other_reading:
                message += (f"; that is pruning_ratio {1 - ratio:g} in this code base ({ratio:g} would be the kept "
                            f"fraction, the other reading)")
            raise ValueError(message)
    return result


# --------------------------------------------------------------------------- impact analysis


def _collect_images(dataloader: Iterable, num_batches: Optional[int], dtype: torch.dtype,
                    device: torch.device) -> List[torch.Tensor]:
    return [_images(batch, dtype, device) for batch in _batches(dataloader, num_batches, "collect images", False)]


def _fidelity(backbone: nn.Module, sites: Sequence[AttentionSite], images: Sequence[torch.Tensor],
              references: Sequence[torch.Tensor], selection: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Cosine similarity and relative L2 error of the masked backbone's feature map vs the full one (per image)."""
    dtype, device = _param_dtype_device(backbone)
    masks = []
    for site, heads in zip(sites, selection):
        mask = torch.zeros(site.num_heads, dtype=dtype, device=device)
        mask[list(heads)] = 1.0
        masks.append(mask)
    cos, rel = [], []
    with torch.no_grad(), head_mask_hooks(sites, masks):
        for img, ref in zip(images, references):
            out = _features(backbone(img)).flatten(1).double()
            full = ref.flatten(1).double()
            cos.extend(F.cosine_similarity(out, full, dim=1).tolist())
            rel.extend(((out - full).norm(dim=1) / full.norm(dim=1).clamp_min(1e-30)).tolist())
    return dict(cosine_similarity=float(np.mean(cos)), relative_l2_error=float(np.mean(rel)), images=len(cos))


def analyze_pruning_impact(importance: Union[HeadImportance, ScoresLike],
                           pruning_ratios: Sequence[float] = (0.25, 0.5, 0.75), model: Optional[nn.Module] = None,
                           dataloader: Optional[Iterable] = None, strategies: Sequence[str] = STRATEGIES,
                           num_batches: Optional[int] = 4, img_size: Optional[Union[int, Sequence[int]]] = None,
                           min_heads_per_layer: int = 1, save_path: Optional[Union[str, os.PathLike]] = None,
                           verbose: bool = True) -> Dict[str, Any]:
    """What each pruning ratio and strategy keeps and costs.

    Per (strategy, ratio): heads kept per block, importance mass kept (kept scores / all scores),
    attention and backbone parameters removed, analytic MACs per image at the input size and the
    backbone speedup ceiling (full MACs / pruned MACs, from ``analytic_backbone_macs``). With ``model``
    and ``dataloader``: the measured fidelity of the backbone with the pruned heads masked to zero
    (cosine similarity and relative L2 error of the output feature map vs the full backbone, mean over
    images). The geometry comes from ``model`` or from ``importance.metadata['backbone']``.
    Prints a table (``verbose``), returns a dict, saves it as JSON when ``save_path`` is given.
    """
    scores, method = _as_scores(importance)
    depth, heads = scores.shape
    geometry = None
    backbone = sites = None
    if model is not None:
        backbone = find_backbone(model)
        sites = find_attention_sites(backbone)
        geometry = describe_backbone(backbone, img_size)
        if (geometry["depth"], geometry["num_heads"]) != (depth, heads):
            raise ValueError(f"importance has {depth} blocks x {heads} heads but the model has "
                             f"{geometry['depth']} x {geometry['num_heads']}")
    elif isinstance(importance, HeadImportance) and isinstance(importance.metadata.get("backbone"), Mapping):
        geometry = dict(importance.metadata["backbone"])
        if img_size is not None:
            geometry["img_hw"] = [img_size, img_size] if isinstance(img_size, int) else [int(v) for v in img_size]
    if dataloader is not None and model is None:
        raise ValueError("measured fidelity needs the model as well as the dataloader")
    for ratio in pruning_ratios:
        _check_ratio(ratio)

    full_macs = None
    macs_ready = geometry is not None and all(geometry.get(k) for k in ("img_hw", "patch_size", "mlp_hidden"))

    def macs(per_block: Sequence[int]) -> Optional[int]:
        if not macs_ready:
            return None
        return analytic_backbone_macs(tuple(geometry["img_hw"]), geometry["patch_size"], geometry["in_chans"],
                                      geometry["embed_dim"], geometry["mlp_hidden"], geometry["head_dim"],
                                      per_block, geometry["window_per_block"])

    full_macs = macs([heads] * depth)
    images = references = None
    full_info: Dict[str, Any] = dict(depth=depth, num_heads=heads, macs=full_macs,
                                     num_params=geometry.get("num_params") if geometry else None,
                                     img_hw=geometry.get("img_hw") if geometry else None)
    restore = contextlib.nullcontext() if model is None else _preserved_state(model)
    results = []
    with restore:
        if dataloader is not None:
            dtype, device = _param_dtype_device(backbone)
            images = _collect_images(dataloader, num_batches, dtype, device)
            with torch.no_grad():
                references = [_features(backbone(img)).detach() for img in images]
            full_info["fidelity_images"] = sum(int(i.shape[0]) for i in images)
        total_mass = float(scores.sum())
        for strategy in strategies:
            for ratio in pruning_ratios:
                entry: Dict[str, Any] = dict(strategy=strategy, pruning_ratio=float(ratio))
                try:
                    config = create_pruning_config(scores, ratio, strategy, min_heads_per_layer)
                except ValueError as err:
                    entry["error"] = str(err)
                    results.append(entry)
                    continue
                per_block = config.num_heads
                kept_total = sum(per_block)
                removed = depth * heads - kept_total
                kept_mask = torch.zeros(depth, heads, dtype=torch.bool)
                for l, hs in enumerate(config.selected_heads_per_layer):
                    kept_mask[l, hs] = True
                entry.update(heads_per_block=per_block, heads_kept=kept_total, heads_removed=removed,
                             selected_heads_per_layer=config.selected_heads_per_layer,
                             importance_mass_kept=(float(scores[kept_mask].sum()) / total_mass) if total_mass > 0
                             else None)
                if geometry is not None:
                    attn_removed = removed * geometry["attention_params_per_head"]
                    entry.update(attention_params_removed=attn_removed,
                                 attention_params_removed_fraction=removed / (depth * heads),
                                 backbone_params_removed_fraction=attn_removed / geometry["num_params"])
                pruned_macs = macs(per_block)
                if pruned_macs is not None:
                    entry.update(macs=pruned_macs, macs_ratio=pruned_macs / full_macs,
                                 speedup_ceiling=full_macs / pruned_macs)
                if images is not None:
                    entry.update(_fidelity(backbone, sites, images, references, config.selected_heads_per_layer))
                results.append(entry)
    analysis = dict(method=method, full=full_info, results=results,
                    source=importance.source if isinstance(importance, HeadImportance) else "")
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


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: Any, path: Union[str, os.PathLike]) -> str:
    if os.path.splitext(os.fspath(path))[1].lower() != ".png":
        raise ValueError(f"{os.fspath(path)}: plots are written as .png")
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)


def plot_head_importance(importance: Union[HeadImportance, ScoresLike], path: Union[str, os.PathLike],
                         pruning_config: Optional[PruningConfig] = None, title: Optional[str] = None) -> str:
    """Heat map of the scores (blocks x heads); heads kept by ``pruning_config`` are outlined. PNG."""
    scores, method = _as_scores(importance)
    depth, heads = scores.shape
    if pruning_config is not None and (pruning_config.depth, pruning_config.teacher_num_heads) != (depth, heads):
        raise ValueError(f"pruning_config is for {pruning_config.depth} x {pruning_config.teacher_num_heads} heads, "
                         f"the scores are {depth} x {heads}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, heads * 0.45 + 2), max(3.0, depth * 0.32 + 1.5)))
    try:
        image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=f"{method or 'importance'} score")
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(depth))
        ax.tick_params(labelsize=7)
        label = title or f"Head importance ({method or 'scores'})"
        if pruning_config is not None:
            from matplotlib.patches import Rectangle
            for l, hs in enumerate(pruning_config.selected_heads_per_layer):
                for h in hs:
                    ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
            label += f": kept heads outlined ({pruning_config.strategy}, ratio {pruning_config.pruning_ratio:g} removed)"
        ax.set_title(label, fontsize=9)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_fidelity_vs_ratio(analysis: Mapping[str, Any], path: Union[str, os.PathLike]) -> str:
    """Cosine similarity (or importance mass kept without fidelity) and speedup ceiling vs pruning ratio. PNG."""
    results = [r for r in analysis.get("results", []) if "error" not in r]
    if not results:
        raise ValueError("plot_fidelity_vs_ratio: the analysis holds no successful results")
    measured = all("cosine_similarity" in r for r in results)
    key, label = ("cosine_similarity", "feature cosine similarity") if measured else \
        ("importance_mass_kept", "importance mass kept")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        for strategy in sorted({r["strategy"] for r in results}):
            rows = sorted((r for r in results if r["strategy"] == strategy), key=lambda r: r["pruning_ratio"])
            ratios = [r["pruning_ratio"] for r in rows]
            axes[0].plot(ratios, [r.get(key) for r in rows], marker="o", label=strategy)
            if all(r.get("speedup_ceiling") for r in rows):
                axes[1].plot(ratios, [r["speedup_ceiling"] for r in rows], marker="s", label=strategy)
        axes[0].set_xlabel("pruning ratio (fraction of heads removed)")
        axes[0].set_ylabel(label)
        axes[0].legend()
        axes[0].grid(alpha=0.3)
        axes[1].set_xlabel("pruning ratio (fraction of heads removed)")
        axes[1].set_ylabel("backbone speedup ceiling (analytic MACs)")
        axes[1].grid(alpha=0.3)
        fig.suptitle(f"Pruning impact ({analysis.get('method') or 'scores'})", fontsize=10)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- command line


def _load_config(path: str) -> Any:
    from mmcv.utils import Config
    cfg = Config.fromfile(path)
    imports = cfg.get("custom_imports", None)
    if imports:
        from mmcv.utils import import_modules_from_strings
        import_modules_from_strings(**imports) if isinstance(imports, Mapping) else import_modules_from_strings(imports)
    return cfg


def _teacher_backbone_cfg(cfg: Any) -> Dict[str, Any]:
    """``cfg.model.img_backbone`` with all heads (a student config's backbone becomes its teacher)."""
    model_cfg = cfg.get("model", None)
    if model_cfg is None or model_cfg.get("img_backbone", None) is None:
        raise ValueError("config: expected model.img_backbone (an ORION-style detector config)")
    backbone = dict(model_cfg["img_backbone"])
    teacher_heads = backbone.get("teacher_num_heads")
    if teacher_heads is not None or "selected_heads_per_layer" in backbone:
        backbone.pop("selected_heads_per_layer", None)
        if teacher_heads is not None:
            backbone["num_heads"] = int(teacher_heads)
    backbone["with_cp"] = False
    backbone["frozen"] = False
    return backbone


def _checkpoint_path(args: argparse.Namespace, cfg: Any) -> Optional[str]:
    if args.checkpoint:
        return args.checkpoint
    model_cfg = cfg.get("model", {}) or {}
    return model_cfg.get("teacher_backbone_path") or cfg.get("load_from", None)


def _build_backbone_from(cfg: Any, checkpoint: Optional[str]) -> nn.Module:
    from mmcv.models.builder import build_backbone
    backbone = build_backbone(_teacher_backbone_cfg(cfg))
    if checkpoint:
        state = extract_backbone_state_dict(checkpoint)
        result = backbone.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("head_index")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{checkpoint}: backbone weights do not match the config's backbone: missing "
                             f"{missing[:4]} ({len(missing)}), unexpected {result.unexpected_keys[:4]} "
                             f"({len(result.unexpected_keys)})")
    else:
        warnings.warn("no checkpoint given: the backbone keeps its random initialisation")
    return backbone


def _build_detector_from(cfg: Any, checkpoint: Optional[str]) -> nn.Module:
    from mmcv.models.builder import build_model
    model_cfg = dict(cfg.model)
    model_cfg["img_backbone"] = _teacher_backbone_cfg(cfg)  # a student config's detector gets all the heads
    model = build_model(model_cfg, train_cfg=cfg.get("train_cfg", None), test_cfg=cfg.get("test_cfg", None))
    if checkpoint and not hasattr(model, "teacher_backbone"):
        state = state_dict_of(load_checkpoint_file(checkpoint), checkpoint)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.startswith("img_backbone.") and not k.endswith("head_index")]
        if missing:
            raise ValueError(f"{checkpoint}: {len(missing)} backbone weights missing, e.g. {missing[:4]}")
        if result.missing_keys or result.unexpected_keys:
            warnings.warn(f"{checkpoint}: {len(result.missing_keys)} missing and {len(result.unexpected_keys)} "
                          f"unexpected keys outside the backbone")
    elif not checkpoint:
        warnings.warn("no checkpoint given: the detector keeps its initial weights")
    return model


class _RandomImages:
    """``count`` batches of random images (smoke tests and timing only: no real importance)."""

    def __init__(self, count: int, batch_size: int, img_hw: Tuple[int, int], seed: int = 0) -> None:
        self.count, self.batch_size, self.img_hw, self.seed = count, batch_size, img_hw, seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.count):
            yield torch.randn(self.batch_size, 3, self.img_hw[0], self.img_hw[1], generator=generator)


def _build_loader(cfg: Any, args: argparse.Namespace, backbone: Optional[nn.Module]) -> Iterable:
    if args.synthetic_data:
        geometry = describe_backbone(backbone) if backbone is not None else {}
        hw = geometry.get("img_hw") or [224, 224]
        warnings.warn("--synthetic-data: random images, useful for smoke tests and timing only")
        return _RandomImages(args.num_batches, args.batch_size, (hw[0], hw[1]), args.seed)
    data_cfg = (cfg.get("data", None) or {}).get(args.split, None)
    if data_cfg is None:
        raise ValueError(f"config: expected data.{args.split} (a dataset config), or pass --synthetic-data")
    from mmcv.datasets import build_dataset
    dataset = build_dataset(data_cfg)
    collate = getattr(dataset, "collate_fn", None)  # the miniature world's datasets carry their own
    if collate is None:
        with contextlib.suppress(ImportError):
            from functools import partial

            from mmcv.parallel import collate as mmcv_collate  # ORION's DataContainer-aware collate
            collate = partial(mmcv_collate, samples_per_gpu=args.batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0,
                                       collate_fn=collate)


def _importance_from_args(args: argparse.Namespace) -> HeadImportance:
    if getattr(args, "importance", None):
        return HeadImportance.load(args.importance, allow_pickle=args.allow_pickle)
    if not args.config:
        raise ValueError("give --importance FILE, or --config (and --checkpoint) to compute it")
    cfg = _load_config(args.config)
    checkpoint = _checkpoint_path(args, cfg)
    device = torch.device(args.device)
    if args.method == "gradient":
        model = _build_detector_from(cfg, checkpoint).to(device)
        loader = _build_loader(cfg, args, find_backbone(model))
        return compute_head_importance_gradient(model, loader, num_batches=args.num_batches,
                                                normalize=not args.no_normalize)
    backbone = _build_backbone_from(cfg, checkpoint).to(device)
    if args.method == "magnitude":
        return compute_head_importance_magnitude(backbone, include_proj=args.include_proj)
    loader = _build_loader(cfg, args, backbone)
    if args.method == "entropy":
        return compute_head_importance_entropy(backbone, loader, num_batches=args.num_batches,
                                               num_query_samples=args.num_query_samples, seed=args.seed)
    return compute_head_importance_activation(backbone, loader, num_batches=args.num_batches)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Attention-head importance, pruning configurations, impact analysis "
                                                 "(pruning_ratio = fraction of heads REMOVED).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="ORION-style config (model.img_backbone, data.train/val)")
        p.add_argument("--checkpoint", help="checkpoint with the (teacher) weights; default: "
                                            "model.teacher_backbone_path or load_from")
        p.add_argument("--method", choices=METHODS, default="magnitude")
        p.add_argument("--importance", help="importance file (.json/.npz/.pkl) instead of computing it")
        p.add_argument("--allow-pickle", action="store_true", help="allow loading a .pkl importance file")
        p.add_argument("--num-batches", type=int, default=8)
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--split", choices=("train", "val", "test"), default="train")
        p.add_argument("--num-query-samples", type=int, default=64)
        p.add_argument("--no-normalize", action="store_true", help="gradient: no per-layer L2 normalisation")
        p.add_argument("--include-proj", action="store_true", help="magnitude: count proj columns too")
        p.add_argument("--synthetic-data", action="store_true", help="random images (smoke tests, timing)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("importance", help="compute head importance and save it")
    common(p)
    p.add_argument("--out", required=True, help=".json, .npz or .pkl")
    p = sub.add_parser("prune-config", help="choose the heads to keep")
    common(p)
    p.add_argument("--pruning-ratio", type=float, default=0.5, help="fraction of heads REMOVED (0.5: 16 -> 8)")
    p.add_argument("--strategy", choices=STRATEGIES, default="uniform")
    p.add_argument("--min-heads-per-layer", type=int, default=1)
    p.add_argument("--out", required=True, help=".json")
    p = sub.add_parser("analyze", help="impact of several pruning ratios and strategies")
    common(p)
    p.add_argument("--pruning-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--strategies", choices=STRATEGIES, nargs="+", default=list(STRATEGIES))
    p.add_argument("--img-size", type=int, nargs="+", help="input size for MACs (default: the backbone's)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the measured fidelity (no data pass)")
    p.add_argument("--plot", help="also write the fidelity-vs-ratio plot here (.png)")
    p.add_argument("--out", required=True, help=".json")
    p = sub.add_parser("plot", help="heat map of head importance (kept heads outlined)")
    common(p)
    p.add_argument("--pruning-config", help="pruning configuration (.json) whose kept heads are outlined")
    p.add_argument("--out", required=True, help=".png")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "importance":
        importance = _importance_from_args(args)
        importance.save(args.out)
        print(f"{importance.method} importance of {importance.num_layers} blocks x {importance.num_heads} heads "
              f"({importance.num_samples} samples, {importance.metadata.get('seconds', 0):.2f} s) -> {args.out}")
    elif args.command == "prune-config":
        config = create_pruning_config(_importance_from_args(args), args.pruning_ratio, args.strategy,
                                       args.min_heads_per_layer)
        config.save(args.out)
        print(f"{config.strategy} pruning, ratio {config.pruning_ratio:g} removed: heads per block {config.num_heads}"
              f" -> {args.out}")
    elif args.command == "analyze":
        importance = _importance_from_args(args)
        model = loader = None
        if args.config and not args.no_fidelity:
            cfg = _load_config(args.config)
            model = _build_backbone_from(cfg, _checkpoint_path(args, cfg)).to(torch.device(args.device))
            loader = _build_loader(cfg, args, model)
        img_size = None if not args.img_size else (args.img_size[0] if len(args.img_size) == 1 else args.img_size)
        analysis = analyze_pruning_impact(importance, args.pruning_ratios, model=model, dataloader=loader,
                                          strategies=args.strategies, num_batches=args.num_batches,
                                          img_size=img_size, save_path=args.out)
        if args.plot:
            plot_fidelity_vs_ratio(analysis, args.plot)
    else:
        config = PruningConfig.load(args.pruning_config) if args.pruning_config else None
        plot_head_importance(_importance_from_args(args), args.out, pruning_config=config)
        print(f"heat map -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
