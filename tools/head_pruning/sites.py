"""Where the units are: the backbone, its attention blocks and SwiGLU MLPs, mask hooks and the geometry.

Works on any backbone whose blocks have ORION's EVA-02 layout (``blocks[i].attn`` with
``q_proj/k_proj/v_proj/proj/rope``, optional ``q_bias/v_bias/inner_attn_ln``, ``attn.num_heads``;
``blocks[i].mlp`` with ``w1/w2/ffn_ln/w3``): ORION's own ``EVAViT``, ``EVAViTStudent`` or anything
shaped alike. Everything goes through forward hooks; no conversion, no model-specific fast path.
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcv.models.utils.eva_surgery import CHANNEL_SLICES, HEAD_SLICES
from mmcv.models.utils.unwrap import unwrap_model


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


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone whose heads are scored.

    An OrionStudent-like detector (``teacher_backbone`` attribute): the teacher (its heads are the
    ones being pruned); a detector: ``img_backbone``; otherwise ``model`` itself when it has ``blocks``.
    """
    model = unwrap_model(model)
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


@dataclass
class MLPSite:
    """One SwiGLU MLP found by layout: ``block`` (``blocks[index]``), ``mlp`` and its hidden width."""

    index: int
    block: nn.Module
    mlp: nn.Module
    hidden: int


def find_mlp_sites(backbone: nn.Module) -> List[MLPSite]:
    """SwiGLU MLPs of an EVA-02-layout backbone: ``blocks[i].mlp`` with ``w1``, ``w2``, ``ffn_ln`` (LayerNorm), ``w3``."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(backbone).__name__}: expected blocks at '.blocks', found none")
    sites = []
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        missing = [n for n in ("w1", "w2", "ffn_ln", "w3") if not hasattr(mlp, n)]
        if mlp is None or missing or not isinstance(mlp.ffn_ln, nn.LayerNorm):
            raise ValueError(f"blocks[{i}]: expected ORION's SwiGLU layout (mlp.w1/w2/ffn_ln/w3, ffn_ln a LayerNorm), "
                             f"missing {missing or ['mlp' if mlp is None else 'a LayerNorm ffn_ln']}")
        sites.append(MLPSite(i, block, mlp, int(mlp.w1.weight.shape[0])))
    widths = sorted({s.hidden for s in sites})
    if len(widths) != 1:
        raise ValueError(f"channel importance needs the unpruned backbone (the same MLP width in every block); "
                         f"found widths {widths}")
    return sites


@contextlib.contextmanager
def channel_mask_hooks(sites: Sequence[MLPSite], masks: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
    """Multiply hidden channel ``c`` of block ``l``'s SwiGLU by ``masks[l][c]`` at the input of ``w3``.

    The mask scales what ``w3`` reads, after ``ffn_ln`` (whose statistics keep every channel): the
    channel's own contribution to the block output. Differentiable in the masks.
    """
    def make(mask: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
        return hook

    for site, mask in zip(sites, masks):
        if mask is not None and mask.shape != (site.hidden,):
            raise ValueError(f"channel mask of block {site.index}: expected shape ({site.hidden},), "
                             f"got {tuple(mask.shape)}")
    with forward_pre_hooks([(site.mlp.w3, make(mask)) for site, mask in zip(sites, masks) if mask is not None]):
        yield


@contextlib.contextmanager
def channel_prune_hooks(sites: Sequence[MLPSite], kept: Sequence[Sequence[int]]) -> Iterator[None]:
    """Run each SwiGLU as if pruned to ``kept[l]``: ``ffn_ln`` normalises over the kept channels only and the others
    read as zero in ``w3``. Exactly the arithmetic of a backbone built with those channels (not a mask)."""
    def make(site: MLPSite, channels: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            index = channels.to(output.device)
            kept_in = args[0].index_select(-1, index)
            normed = F.layer_norm(kept_in, (kept_in.shape[-1],), module.weight.index_select(0, index),
                                  module.bias.index_select(0, index), module.eps)
            return torch.zeros_like(output).index_copy(-1, index, normed)
        return hook

    if len(kept) != len(sites):
        raise ValueError(f"channel selection: expected {len(sites)} blocks, got {len(kept)}")
    handles = []
    try:
        for site, channels in zip(sites, kept):
            if len(channels) != site.hidden:
                index = torch.as_tensor(list(channels), dtype=torch.long)
                handles.append(site.mlp.ffn_ln.register_forward_hook(make(site, index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def param_dtype_device(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for param in module.parameters():
        return param.dtype, param.device
    return torch.float32, torch.device("cpu")


def source_label(model: nn.Module, backbone: nn.Module) -> str:
    """What was measured, e.g. ``'OrionStudent.teacher_backbone (EVAViTStudent)'``."""
    model = unwrap_model(model)
    if model is backbone:
        return type(backbone).__name__
    attr = "teacher_backbone" if getattr(model, "teacher_backbone", None) is backbone else "img_backbone"
    return f"{type(model).__name__}.{attr} ({type(backbone).__name__})"


def params_per_channel(site: MLPSite) -> int:
    """Parameters one hidden channel owns: its share of every tensor in ``eva_surgery.CHANNEL_SLICES``."""
    owned = dict(site.block.named_parameters())
    return sum(owned[rule.suffix].numel() for rule in CHANNEL_SLICES if rule.suffix in owned) // site.hidden


def params_per_head(site: AttentionSite) -> int:
    """Parameters one head owns: its share of every tensor in ``eva_surgery.HEAD_SLICES`` present in the block."""
    owned = dict(site.block.named_parameters())
    return sum(owned[rule.suffix].numel() for rule in HEAD_SLICES if rule.suffix in owned) // site.num_heads


def _img_hw(backbone: nn.Module, sites: Sequence[AttentionSite], windows: Sequence[int], patch_size: Optional[int],
            img_size: Optional[Union[int, Sequence[int]]]) -> Optional[List[int]]:
    if img_size is None:
        img_size = getattr(backbone, "img_size", None)
        if img_size is None and patch_size:  # the global rope table covers the whole token grid
            glb = [s for s, w in zip(sites, windows) if w == 0 and getattr(s.attn, "rope", None) is not None]
            table = getattr(glb[0].attn.rope, "freqs_cos", None) if glb else None
            if table is not None:
                img_size = int(round(math.sqrt(table.shape[0]))) * patch_size
    if isinstance(img_size, int):
        return [img_size, img_size]
    return [int(v) for v in img_size] if img_size is not None else None


def describe_backbone(backbone: nn.Module, img_size: Optional[Union[int, Sequence[int]]] = None) -> Dict[str, Any]:
    """Geometry used for parameter and MAC counts (stored in importance metadata)."""
    sites = find_attention_sites(backbone)
    attn0 = sites[0].attn
    patch = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    patch_size = int(patch.kernel_size[0]) if isinstance(patch, nn.Conv2d) else None
    mlp = getattr(sites[0].block, "mlp", None)
    first = getattr(mlp, "w1", None) or getattr(mlp, "fc1", None)
    windows = [int(getattr(s.block, "window_size", 0) or 0) for s in sites]
    return dict(backbone_class=type(backbone).__name__, depth=len(sites), num_heads=sites[0].num_heads,
                head_dim=sites[0].head_dim, embed_dim=int(attn0.q_proj.weight.shape[1]), patch_size=patch_size,
                in_chans=int(patch.in_channels) if isinstance(patch, nn.Conv2d) else 3,
                mlp_hidden=int(first.weight.shape[0]) if first is not None else None, window_per_block=windows,
                img_hw=_img_hw(backbone, sites, windows, patch_size, img_size),
                qkv_bias=getattr(attn0, "q_bias", None) is not None or getattr(attn0.q_proj, "bias", None) is not None,
                subln=isinstance(getattr(attn0, "inner_attn_ln", None), nn.LayerNorm),
                attention_params_per_head=params_per_head(sites[0]),
                mlp_params_per_channel=_params_per_channel_or_none(backbone),
                num_params=int(sum(p.numel() for p in backbone.parameters())))


def _params_per_channel_or_none(backbone: nn.Module) -> Optional[int]:
    try:
        return params_per_channel(find_mlp_sites(backbone)[0])
    except ValueError:
        return None


@contextlib.contextmanager
def preserved_state(model: nn.Module, requires_grad: Optional[bool] = None,
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


@contextlib.contextmanager
def forward_pre_hooks(hooks: Sequence[Tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Attach ``(module, hook)`` forward pre-hooks for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class GeometryRecorder:
    """Records each block's input shape to tell real tokens from window padding in attention sequences."""

    def __init__(self, sites: Sequence[AttentionSite]) -> None:
        self.sites = sites
        self.shapes: Dict[int, Tuple[int, ...]] = {}
        self.handles: List[Any] = []

    def __enter__(self) -> "GeometryRecorder":
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


__all__ = [
    "AttentionSite", "MLPSite", "find_backbone", "find_attention_sites", "find_mlp_sites",
    "channel_mask_hooks", "channel_prune_hooks", "param_dtype_device", "source_label", "params_per_head",
    "params_per_channel", "describe_backbone", "preserved_state", "head_mask_hooks", "forward_pre_hooks",
    "GeometryRecorder",
]
