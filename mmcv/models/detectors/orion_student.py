"""OrionStudent: ORION with a head-pruned backbone that learns from a frozen copy of the original.

``OrionStudent(base_detector='Orion', ...)`` builds a real subclass of the base detector (ORION's
registered ``Orion`` in an ORION checkout, ``TinyOrion`` in the miniature world), so ORION's own
test and inference code works on it. Only ``img_backbone.*`` trains. The neck, heads and LLM are
frozen (``requires_grad=False``) but keep ORION's training-mode behaviour by default; the teacher
backbone is frozen, in eval mode, outside the state dict, and runs in the student's precision.
One training step:

    student backbone (inside the base forward, input captured after GridMask) -> task losses
    teacher backbone (same input, no autograd)                                -> taps
    CombinedKDLoss(student taps, teacher taps)                                -> distillation parts
    total_loss = (1 - alpha) * task_loss + alpha * backbone_distill_loss

``_parse_losses`` is overridden so that the optimised loss IS ``total_loss`` (ORION's version
sums every key containing 'loss'). Alpha follows the iteration (``resolve_distillation_alpha``,
set by ``mmcv/runner/hooks/kd_hooks.py``). Which blocks, heads and SwiGLU channels the student keeps:
``mmcv/models/utils/student_selection.py``; the teacher always keeps all. Distillation taps are keyed by
teacher block: a depth-pruned student records teacher block ``t`` at its kept block ``block_map[t]``
(``eva_taps.default_block_map``, overridden by ``kd_config.block_map``). With
``kd_config.label_fraction < 1`` every frame is distilled but the task loss reaches the student only
through the labelled frames (``mmcv/models/utils/label_subset.py``). This file is a plugin: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import inspect
import json
import os
import time
import zlib
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from mmcv.models.backbones.eva_taps import resolve_block_maps
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.builder import DETECTORS, build_backbone, build_loss
from mmcv.models.utils.checkpoint_io import (atomic_torch_save, atomic_write, load_checkpoint_file, require_finite,
                                            state_dict_of)
from mmcv.models.utils.eva_surgery import (BACKBONE_PREFIX, CHANNEL_INDEX_SUFFIX, HEAD_INDEX_SUFFIX, KEPT_BLOCKS_KEY,
                                           apply_slice_plan, backbone_subdict, pruning_slice_plan,
                                           select_teacher_blocks, split_block_key, teacher_block_count)
from mmcv.models.utils.kd_config import distillation_loss_config, resolve_distillation_alpha, resolve_kd_config
from mmcv.models.utils.label_subset import detach_unlabelled, labelled_mask
from mmcv.models.utils.student_selection import resolve_student_selection

#: Only parameters under this prefix train; everything else is frozen.
TRAINABLE_PREFIX = BACKBONE_PREFIX
#: Children that follow ``train()`` even when ``frozen_parts_mode="eval"`` (the backbone and its augmentation).
TRAINING_CHILDREN = ("img_backbone", "grid_mask")


_TEACHER_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type`` right now; None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _autocast(device_type: str, dtype: Optional[torch.dtype]) -> Any:
    """Autocast in ``dtype``, or autocast switched off (plain fp32) when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def _student_class_for(base: type) -> type:
    """The (cached) class that is both OrionStudent and ``base``."""
    cached = OrionStudent._specialised.get(base)
    if cached is None:
        cached = type("OrionStudent", (OrionStudent, base), {"__module__": __name__, "__qualname__": "OrionStudent",
                                                              "base_detector_cls": base})
        OrionStudent._specialised[base] = cached
    return cached


def _resolve_base(base_detector: Union[str, type]) -> type:
    if isinstance(base_detector, type):
        return base_detector
    base = DETECTORS.get(base_detector)
    if base is None:
        raise KeyError(f"OrionStudent: base_detector {base_detector!r} is not registered in DETECTORS; in an "
                       f"ORION checkout use 'Orion' (import ORION's mmcv.models first), standalone use 'TinyOrion'")
    if isinstance(base, type) and issubclass(base, OrionStudent):
        raise ValueError("OrionStudent: base_detector must be the plain detector, not OrionStudent")
    return base


@DETECTORS.register_module()
class OrionStudent(nn.Module):
    """Knowledge-distillation wrapper that IS the base detector with a pruned ``img_backbone``.

    Args:
        base_detector: registered name (or class) of the detector to extend.
        teacher_backbone_path: ORION checkpoint holding the unpruned model (read once, memory-mapped):
            fills the teacher backbone, the sliced student backbone and every frozen part.
        freeze_non_backbone: only ``img_backbone.*`` requires gradients (the guide's setting).
        kd_config: the guide's KD keys (see ``KD_CONFIG_KEYS``; unknown keys are errors).
        distillation_loss: a ``CombinedKDLoss`` config; its weights/temperature are ``kd_config``'s (a value
            given in both places must agree).
        pruning_config: which heads (and SwiGLU channels, and blocks) the student keeps: a configuration file
            written by ``tools/head_pruning_utils.py prune-config`` (``PruningConfig.save``), a ``PruningConfig``,
            a dict with ``selected_heads_per_layer`` (+ ``selected_channels_per_layer``, ``selected_blocks``) or
            the head lists. A pruned student needs exactly one of this, ``img_backbone.selected_heads_per_layer``
            / ``selected_channels_per_layer`` / ``selected_blocks`` or ``kd_config.head_selection='magnitude'``
            (heads and channels) per unit kind. A file decides the counts per block; a budgeted one
            (``metadata.budget``) is not checked against ``kd_config.pruning_ratio`` / ``mlp_pruning_ratio``
            (one log line says so). Without a file, ``img_backbone.num_heads`` defaults to
            ``kd_config.pruning_ratio``'s count (``student_selection``).
        teacher_backbone: config of the teacher backbone; default: the student's config with every
            head kept (``EVAViTStudent``, ORION's arithmetic on the fused attention path).
        load_base_weights: fill the frozen parts from the teacher checkpoint (default True).
        **base_kwargs: everything the base detector takes (``img_backbone`` included).
    """

    _specialised: Dict[type, type] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> "OrionStudent":
        if cls is OrionStudent:
            cls = _student_class_for(_resolve_base(kwargs.get("base_detector", "Orion")))
        return super().__new__(cls)

    def __init__(self, base_detector: Union[str, type] = "Orion", teacher_backbone_path: Optional[str] = None,
                 freeze_non_backbone: Optional[bool] = None, kd_config: Optional[Mapping[str, Any]] = None,
                 distillation_loss: Optional[Mapping[str, Any]] = None,
                 pruning_config: Union[str, Mapping[str, Any], Sequence[Sequence[int]], None] = None,
                 teacher_backbone: Optional[Mapping[str, Any]] = None, load_base_weights: bool = True,
                 img_backbone: Optional[Mapping[str, Any]] = None, **base_kwargs: Any) -> None:
        kd = resolve_kd_config(kd_config, teacher_backbone_path, freeze_non_backbone)
        distill_loss = build_loss(distillation_loss_config(kd, kd_config, distillation_loss))  # before the teacher
        if img_backbone is None or img_backbone.get("type") != "EVAViTStudent":
            raise ValueError(f"OrionStudent: img_backbone must be dict(type='EVAViTStudent', ...), got "
                             f"{None if img_backbone is None else img_backbone.get('type')!r}")
        teacher_path = kd.get("teacher_backbone_path")
        if not teacher_path:
            raise ValueError("OrionStudent: teacher_backbone_path is required (the unpruned ORION checkpoint, "
                             "e.g. ckpts/Orion.pth)")
        if not os.path.isfile(teacher_path):
            raise FileNotFoundError(f"Teacher model not found at {teacher_path}: put the fully trained ORION "
                                    f"checkpoint there or set model.kd_config.teacher_backbone_path (miniature world: "
                                    f"python tools/train_tiny_teacher.py --materialize)")
        started = time.time()
        checkpoint = load_checkpoint_file(teacher_path)
        full_state = state_dict_of(checkpoint, teacher_path)
        backbone_state = backbone_subdict(full_state)
        if not backbone_state:
            raise ValueError(f"{teacher_path}: no 'img_backbone.*' keys; expected a full ORION "
                             f"checkpoint with the unpruned backbone")
        require_finite(backbone_state, f"teacher {teacher_path} (img_backbone)",
                       "a teacher must be finite: use the trained ORION checkpoint, not a diverged one")

        student_cfg, selection_source = resolve_student_selection(dict(img_backbone), pruning_config, kd,
                                                                  backbone_state, teacher_path, log=self._print)
        super().__init__(img_backbone=student_cfg, **base_kwargs)

        self.kd_config = kd
        self.base_detector_name = base_detector if isinstance(base_detector, str) else base_detector.__name__
        self.student_backbone_cfg = student_cfg
        self.freeze_non_backbone = bool(kd["freeze_non_backbone"])
        # Iteration 0 lies in the warm-up iff it has any length, whatever the epoch size.
        self.distillation_alpha = resolve_distillation_alpha(kd, 0, iters_per_epoch=1)
        self.head_selection_source = selection_source
        self.distill_loss = distill_loss
        if getattr(self.distill_loss, "vl_distill_weight", 0.0) > 0 and not callable(getattr(self, "vl_tokens", None)):
            raise ValueError(f"OrionStudent: vl_distill_weight > 0 but {self.base_detector_name} has no side-effect-"
                             f"free vl_tokens(img_feats, **data) (ORION's heads keep temporal memory); set "
                             f"vl_distill_weight=0")

        self._check_block_map()
        teacher_cfg = dict(teacher_backbone) if teacher_backbone else self._default_teacher_cfg(student_cfg)
        teacher = build_backbone(teacher_cfg)
        if not isinstance(teacher, EVAViTStudent) or teacher.teacher_num_heads != self.img_backbone.teacher_num_heads:
            raise ValueError("OrionStudent: teacher_backbone must be an EVA backbone with all "
                             f"{self.img_backbone.teacher_num_heads} heads")
        teacher.load_from_teacher(backbone_state)
        self.img_backbone.load_from_teacher(backbone_state)
        for param in teacher.parameters():
            param.requires_grad = False
        teacher.eval()
        # Held outside the module tree: not in state_dict(), parameters(), DDP or the optimizer.
        object.__setattr__(self, "_teacher_backbone", teacher)

        self.load_report = self._load_frozen_parts(full_state, teacher_path) if load_base_weights \
            else dict(loaded=0, unexpected=[])
        del checkpoint, full_state, backbone_state
        self._register_load_state_dict_pre_hook(self._slice_teacher_shaped_backbone_keys)
        if self.freeze_non_backbone:
            self._freeze_non_backbone()
        self.train(self.training)
        channels = (f", SwiGLU channels kept per block {self.img_backbone.mlp_hidden_per_layer} of "
                    f"{self.img_backbone.teacher_mlp_hidden}" if self.img_backbone.prunes_channels else "")
        if self.img_backbone.prunes_blocks:
            channels += (f", blocks kept {list(self.img_backbone.kept_blocks)} ({self.img_backbone.num_blocks} of "
                         f"{self.img_backbone.depth})")
        self._print(f"[OrionStudent] base={self.base_detector_name} heads kept per block "
                    f"{self.img_backbone.num_heads_per_layer} of {self.img_backbone.teacher_num_heads}{channels} "
                    f"({selection_source}); teacher from {teacher_path} in {time.time() - started:.1f}s; "
                    f"trainable {sum(p.numel() for p in self.parameters() if p.requires_grad) / 1e6:.2f} M of "
                    f"{sum(p.numel() for p in self.parameters()) / 1e6:.2f} M parameters")
        self._print("[OrionStudent] teacher heads kept, per teacher block: " + "; ".join(
            f"{block}: {heads}" for block, heads in zip(self.img_backbone.kept_blocks,
                                                        self.img_backbone.selected_heads)))

    # ------------------------------------------------------------------ configuration


    def _check_block_map(self) -> None:
        """Refuse, when the model is built, a ``kd_config.block_map`` or a depth selection the taps cannot serve.

        Checks the map (ranges, kept blocks, window/global kinds) and that the attention part still has a
        block to distil: the attention of removed teacher blocks is dropped unless the map names it, and
        explicitly configured ``attention_blocks`` must all be recorded.
        """
        backbone = self.img_backbone
        try:
            _, attn_map = resolve_block_maps(backbone.depth, backbone.kept_blocks, backbone.window_block_indexes,
                                             self.kd_config.get("block_map"))
        except ValueError as err:
            raise ValueError(f"OrionStudent: kd_config.{err}" if str(err).startswith("block_map") else
                             f"OrionStudent: {err}") from None
        _, attn_blocks, _ = self.distill_loss.tap_request(backbone.depth)
        dropped = [t for t in attn_blocks if t not in attn_map]
        explicit = getattr(self.distill_loss, "attention_blocks", None) is not None
        if dropped and (explicit or len(dropped) == len(attn_blocks)):
            raise ValueError(f"OrionStudent: the attention part distils teacher blocks {attn_blocks} but the student "
                             f"removes {dropped} (it keeps {list(backbone.kept_blocks)}); map them to kept blocks of "
                             f"the same kind with kd_config.block_map, choose distillation_loss.attention_blocks "
                             f"among the kept ones, or set kd_config.attention_distill_weight=0")

    @staticmethod
    def _default_teacher_cfg(student_cfg: Mapping[str, Any]) -> Dict[str, Any]:
        cfg = dict(student_cfg)
        cfg.update(type="EVAViTStudent", num_heads=cfg["teacher_num_heads"], selected_heads_per_layer=None,
                   mlp_hidden=None, selected_channels_per_layer=None, selected_blocks=None, with_cp=False,
                   drop_path_rate=0.0, frozen=True)
        return cfg

    # ------------------------------------------------------------------ weights

    def _load_frozen_parts(self, full_state: Mapping[str, torch.Tensor], label: str) -> Dict[str, Any]:
        """Copy every non-backbone tensor from the checkpoint; missing or mis-shaped ones are errors."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(TRAINABLE_PREFIX)}
        missing = [k for k in own if k not in full_state]
        misshaped = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(full_state[k].shape)}"
                     for k in own if k in full_state and tuple(full_state[k].shape) != tuple(own[k].shape)]
        if missing or misshaped:
            parts = ([f"missing {len(missing)} key(s), e.g. {missing[:4]}"] if missing else []) + \
                    ([f"mis-shaped: {'; '.join(misshaped[:4])}"] if misshaped else [])
            raise ValueError(f"{label}: checkpoint does not fit {self.base_detector_name}'s frozen parts: "
                             + "; ".join(parts))
        require_finite({k: full_state[k] for k in own}, f"teacher {label} (frozen parts)",
                       "a teacher must be finite: use the trained ORION checkpoint, not a diverged one")
        unexpected = sorted(k for k in full_state if not k.startswith(TRAINABLE_PREFIX) and k not in own)
        with torch.no_grad():
            targets = dict(self.named_parameters())
            targets.update(dict(self.named_buffers()))
            for key in own:
                if key in targets:
                    targets[key].copy_(full_state[key])
        if unexpected:
            self._print(f"[OrionStudent] {label}: {len(unexpected)} checkpoint key(s) not used by the model, "
                        f"e.g. {unexpected[:3]}")
        return dict(loaded=len(own), unexpected=unexpected)

    def _slice_teacher_shaped_backbone_keys(self, state_dict: Dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """Load-time hook: cut teacher-shaped ``img_backbone`` attention and MLP tensors to the kept heads/channels.

        ORION's loader is non-strict and only warns on shape mismatches; without this hook a
        ``load_from`` of the original checkpoint would leave the pruned units random. A block whose
        heads (channels) are cut here gets its ``head_index`` (``channel_index``) entry, so that the
        selection check of the load passes. A depth-pruned student first takes the kept blocks of a
        checkpoint that holds all ``depth`` teacher blocks and no ``kept_blocks`` (the original one).
        """
        backbone = self.img_backbone
        root = f"{prefix}{TRAINABLE_PREFIX}"
        if backbone.prunes_blocks and root + KEPT_BLOCKS_KEY not in state_dict and \
                teacher_block_count(state_dict, root) == backbone.depth:
            renamed = select_teacher_blocks(state_dict, backbone.kept_blocks, prefix=root)
            state_dict.clear()
            state_dict.update(renamed)
            state_dict[root + KEPT_BLOCKS_KEY] = torch.tensor(backbone.kept_blocks, dtype=torch.long)
        plans = pruning_slice_plan(backbone.selected_heads, backbone.head_dim, backbone.teacher_num_heads,
                                   backbone.selected_channels, backbone.teacher_mlp_hidden)
        sliced = apply_slice_plan(state_dict, plans, prefix=root, label="load_state_dict", teacher_shaped_only=True)
        for key in sliced:
            layer, suffix = split_block_key(key[len(root):])
            index_suffix = HEAD_INDEX_SUFFIX if suffix.startswith("attn.") else CHANNEL_INDEX_SUFFIX
            index = backbone.blocks[layer].attn if suffix.startswith("attn.") else backbone.blocks[layer].mlp
            state_dict.setdefault(f"{root}blocks.{layer}.{index_suffix}",
                                  getattr(index, index_suffix.split(".")[1]).clone())

    def _freeze_non_backbone(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(TRAINABLE_PREFIX)

    @property
    def teacher_backbone(self) -> EVAViTStudent:
        """The frozen, unpruned backbone (not part of the state dict)."""
        return self._teacher_backbone

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "OrionStudent":
        super()._apply(fn, *args, **kwargs)
        self._teacher_backbone._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "OrionStudent":
        """Set the mode; the frozen parts follow it unless ``kd_config.frozen_parts_mode='eval'``.

        In ``'train'`` mode (the default) the frozen neck, heads and LLM behave as in ORION's own
        training (denoising queries, activation checkpointing, dropout) with ``requires_grad=False``,
        so the task loss is ORION's objective. The teacher backbone is always in eval mode.
        """
        super().train(mode)
        if self.freeze_non_backbone:
            if self.kd_config["frozen_parts_mode"] == "eval":
                for name, child in self.named_children():
                    if name not in TRAINING_CHILDREN:
                        child.eval()
            self._freeze_non_backbone()
        self._teacher_backbone.eval()
        return self

    def init_weights(self) -> None:
        """No-op: every weight already came from the teacher checkpoint (ORION's train.py calls this)."""

    def set_distillation_alpha(self, alpha: float) -> None:
        """Weight of the distillation loss; ``KDAlphaScheduleHook`` sets it before every iteration."""
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"distillation alpha must lie in [0, 1], got {alpha}")
        self.distillation_alpha = float(alpha)

    # ------------------------------------------------------------------ forward

    def forward_train(self, **data: Any) -> Dict[str, torch.Tensor]:
        """Base task losses on the student backbone plus backbone distillation from the teacher."""
        alpha = self.distillation_alpha
        # Taps are keyed by teacher block (depth = the teacher's); the student records teacher block t at its
        # kept block block_map[t] and drops the attention of removed blocks that kd_config.block_map leaves out.
        hidden_blocks, attn_blocks, num_queries = self.distill_loss.tap_request(self.img_backbone.depth)
        block_map = self.kd_config.get("block_map")
        if alpha < 1.0:
            captured: List[Tuple[torch.Tensor, Optional[torch.dtype]]] = []

            def capture(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
                captured.append((inputs[0], autocast_dtype(inputs[0].device.type)))

            handles = [self.img_backbone.register_forward_pre_hook(capture)]
            if self.kd_config["label_fraction"] < 1.0:
                labelled = labelled_mask(data["img_metas"], self.kd_config["label_fraction"])
                handles.append(self.img_backbone.register_forward_hook(
                    lambda module, inputs, output: detach_unlabelled(output, labelled) if torch.is_tensor(output)
                    else type(output)(detach_unlabelled(f, labelled) for f in output)))
            try:
                with self.img_backbone.tapping(hidden_blocks, attn_blocks, num_queries,
                                               block_map=block_map) as student_taps:
                    losses = super().forward_train(**data)
            finally:
                for handle in handles:
                    handle.remove()
            if len(captured) != 1:
                raise RuntimeError(f"OrionStudent: the student backbone ran {len(captured)} times in one training "
                                   f"step; distillation expects exactly one call")
            backbone_input, run_dtype = captured[0]
            task_loss = sum(value.mean() if torch.is_tensor(value) else sum(v.mean() for v in value)
                            for key, value in losses.items() if "loss" in key)
        else:
            backbone_input = self.backbone_input(data["img"])
            run_dtype = self._backbone_run_dtype(backbone_input.device.type)
            with _autocast(backbone_input.device.type, run_dtype):
                student_taps = self.img_backbone.forward_with_taps(backbone_input, hidden_blocks, attn_blocks,
                                                                   num_queries, block_map=block_map)
            losses = OrderedDict()
            task_loss = backbone_input.new_zeros((), dtype=torch.float32)
        teacher_taps = self._teacher_taps(backbone_input, hidden_blocks, student_taps.attn_blocks, num_queries,
                                          student_taps.query_index, run_dtype)
        vl_kwargs = {}
        if getattr(self.distill_loss, "vl_distill_weight", 0.0) > 0:
            vl_kwargs = dict(student_vl_tokens=self.vl_tokens(self._image_features(student_taps.features, data), **data),
                             teacher_vl_tokens=self.vl_tokens(self._image_features(teacher_taps.features, data), **data))
        parts = self.distill_loss(student_taps, teacher_taps, **vl_kwargs)
        distill = parts["backbone_distill_loss"]
        task_loss = torch.as_tensor(task_loss, dtype=torch.float32, device=distill.device)
        losses["task_loss"] = task_loss.detach()
        losses.update({k: v.detach() for k, v in parts.items()})
        losses["total_loss"] = (1.0 - alpha) * task_loss + alpha * distill
        losses["alpha"] = distill.new_tensor(alpha)
        return losses

    def backbone_input(self, img: torch.Tensor) -> torch.Tensor:
        """The tensor the base detector hands its backbone: cameras flattened, GridMask in training."""
        if img.dim() == 5:
            img = img.flatten(0, 1)
        if getattr(self, "use_grid_mask", False) and self.training and getattr(self, "grid_mask", None) is not None:
            img = self.grid_mask(img)
        return img

    def _backbone_run_dtype(self, device_type: str) -> Optional[torch.dtype]:
        """The precision the base detector's ``extract_feat`` would run the backbone in right now.

        An enclosing autocast wins; otherwise ORION's ``auto_fp16`` (``fp16_enabled`` set by the
        fp16 optimizer hook) runs it under CUDA fp16 autocast; otherwise fp32 (None).
        """
        active = autocast_dtype(device_type)
        if active is not None:
            return active
        return torch.float16 if device_type == "cuda" and getattr(self, "fp16_enabled", False) else None

    def _teacher_taps(self, backbone_input: torch.Tensor, hidden_blocks: Sequence[int], attn_blocks: Sequence[int],
                      num_queries: int, query_index: Mapping[int, torch.Tensor], run_dtype: Optional[torch.dtype]
                      ) -> Any:
        """Teacher forward without autograd, in ``kd_config.teacher_dtype`` or else the student's precision."""
        dtype = _TEACHER_DTYPES.get(self.kd_config.get("teacher_dtype"), run_dtype)
        with torch.no_grad(), _autocast(backbone_input.device.type, dtype):
            return self._teacher_backbone.forward_with_taps(backbone_input.detach(), hidden_blocks, attn_blocks,
                                                            num_queries, query_index=query_index)

    def _image_features(self, features: List[torch.Tensor], data: Mapping[str, Any]) -> Any:
        """Backbone output -> what ``extract_img_feat`` returns ([B, N, C, H, W], neck applied)."""
        img = data["img"]
        feats = self.img_neck(features) if getattr(self, "img_neck", None) is not None else features
        if img.dim() == 5:
            b, n = img.shape[:2]
            return [f.view(b, n, *f.shape[1:]) for f in feats] if isinstance(feats, (list, tuple)) \
                else feats.view(b, n, *feats.shape[1:])
        return feats

    def _parse_losses(self, losses: Mapping[str, Any]) -> Tuple[torch.Tensor, "OrderedDict[str, float]"]:
        """The optimised loss is ``total_loss``; every key is logged, averaged over ranks in a fixed order."""
        if "total_loss" not in losses:
            raise KeyError("OrionStudent._parse_losses: no 'total_loss' in the losses")
        values = OrderedDict()
        for key in sorted(losses):
            value = losses[key]
            if torch.is_tensor(value):
                values[key] = value.detach().float().mean()
            elif isinstance(value, (list, tuple)):
                values[key] = sum(v.detach().float().mean() for v in value)
            else:
                values[key] = torch.tensor(float(value))
        loss = losses["total_loss"]
        values["loss"] = loss.detach().float()
        if dist.is_available() and dist.is_initialized():
            check_same_log_keys(list(values), loss.device)
            stacked = torch.stack([v.to(loss.device) for v in values.values()])
            dist.all_reduce(stacked.div_(dist.get_world_size()))
            values = OrderedDict(zip(values.keys(), stacked.unbind(0)))
        return loss, OrderedDict((k, v.item()) for k, v in values.items())

    # ------------------------------------------------------------------ export

    def export_student(self, path: Union[str, os.PathLike], backbone_safetensors: bool = True) -> Dict[str, str]:
        """Write an ORION-format checkpoint of the student detector (no teacher) and the backbone alone.

        The checkpoint's ``meta`` carries the pruning configuration and KD settings; the base detector
        built with ``img_backbone=meta['img_backbone']`` loads its ``state_dict`` strictly.
        """
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        backbone_cfg = {k: v for k, v in self.student_backbone_cfg.items()}
        meta = dict(
            orion_kd_version="0.1.0", base_detector=self.base_detector_name, img_backbone=backbone_cfg,
            pruning=self._pruning_meta(),
            kd_config={k: v for k, v in self.kd_config.items()}, created=time.strftime("%Y-%m-%d %H:%M:%S"))
        state = OrderedDict((k, v.detach().cpu().clone()) for k, v in self.state_dict().items())
        require_finite(state, f"export to {path}", "not exported: the student's weights diverged")
        atomic_torch_save(dict(meta=meta, state_dict=state), path)
        written = dict(checkpoint=path)
        if backbone_safetensors:
            try:
                from safetensors.torch import save as safetensors_bytes
            except ImportError:
                self._print("[OrionStudent] safetensors is not installed: skipped the backbone-only export")
            else:
                tensors = {k: v.contiguous() for k, v in backbone_subdict(state).items()}
                target = os.path.splitext(path)[0] + "_backbone.safetensors"
                payload = safetensors_bytes(tensors, metadata={"img_backbone": json.dumps(backbone_cfg)})
                atomic_write(target, lambda handle: handle.write(payload))
                written["backbone"] = target
        return written

    def _pruning_meta(self) -> Dict[str, Any]:
        """What the exported backbone keeps (heads always; SwiGLU channels when the MLPs are pruned; the kept
        blocks when some are removed). One entry per teacher block, as in a configuration file (removed: [] / 0)."""
        backbone = self.img_backbone

        def per_teacher_block(values: Sequence[Any], removed: Any) -> List[Any]:
            full = [removed] * backbone.depth
            for block, value in zip(backbone.kept_blocks, values):
                full[block] = value
            return full

        meta = dict(selected_heads_per_layer=per_teacher_block(backbone.selected_heads, []),
                    num_heads=per_teacher_block(backbone.num_heads_per_layer, 0),
                    teacher_num_heads=backbone.teacher_num_heads, source=self.head_selection_source)
        if backbone.prunes_blocks:
            meta.update(selected_blocks=list(backbone.kept_blocks))
        if backbone.prunes_channels:
            meta.update(selected_channels_per_layer=per_teacher_block(backbone.selected_channels, []),
                        mlp_hidden=per_teacher_block(backbone.mlp_hidden_per_layer, 0),
                        teacher_mlp_hidden=backbone.teacher_mlp_hidden)
        return meta

    @staticmethod
    def _print(message: str) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            print(message, flush=True)


def check_same_log_keys(keys: Sequence[str], device: torch.device) -> None:
    """Fail on every rank, naming the keys, when the ranks' log keys differ (their values cannot be averaged).

    One small all-gather of (count, CRC-32 of the keys) per step; the key lists themselves are gathered
    only to write the error. Without this check the all-reduce of differently sized stacks hangs or mixes
    values of different keys.
    """
    world = dist.get_world_size()
    mine = torch.tensor([len(keys), zlib.crc32("\n".join(keys).encode("utf-8"))], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    per_rank: List[Any] = [None] * world
    dist.all_gather_object(per_rank, list(keys))
    every = sorted(set().union(*per_rank))
    partial = ["{!r} only on rank(s) {}".format(key, [r for r, ks in enumerate(per_rank) if key in ks])
               for key in every if not all(key in ks for ks in per_rank)]
    raise RuntimeError("OrionStudent._parse_losses: ranks log different keys, so their values cannot be averaged: "
                       + ("; ".join(partial) or "same keys in a different order") + " (every rank must produce the "
                       "same loss and log keys in every step)")


def base_detector_config(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """An OrionStudent model config turned into its base detector's config (``type=base_detector``).

    Drops OrionStudent's own arguments; ``img_backbone`` is kept as given (the caller decides its heads).
    Used by the tools to score the teacher's heads on the plain detector.
    """
    own = set(inspect.signature(OrionStudent.__init__).parameters) - {"self", "img_backbone", "base_kwargs"}
    cfg = {k: v for k, v in model_cfg.items() if k not in own and k != "type"}
    base = model_cfg.get("base_detector", "Orion")
    cfg["type"] = base if isinstance(base, str) else base.__name__
    return cfg
