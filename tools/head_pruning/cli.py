"""Command line of the pruning toolkit (``python tools/head_pruning_utils.py COMMAND ...``).

    importance    --config CFG [--checkpoint CKPT] --method magnitude|gradient|entropy|activation --out imp.json
                  [--unit channels]  (SwiGLU channels: magnitude|gradient|activation)
                  [--unit blocks --method kd_loss|cosine]  (whole blocks, on training frames; kd_loss by default)
    prune-config  --importance imp.json --pruning-ratio 0.5 [--strategy global|cost] --out prune.json
                  [--channel-importance ch.json --mlp-pruning-ratio 0.4375 | --mlp-hidden 1536] [--channel-multiple 64]
                  [--unit-costs latency.json]  (joint heads + channels; cost: measured unit latency)
    prune-config  --importance imp.json --target-speedup 2 --out prune.json [--channel-importance ch.json]
                  [--block-importance blocks.json] [--axes heads,channels,blocks] [--measure | --unit-costs lat.json]
                  [--config CFG [--checkpoint CKPT]]  (a budget: heads, channels and whole blocks chosen by
                  importance per unit of cost; prints the predicted speedup, and with --config the measured one)
    analyze       --importance imp.json [--config CFG --checkpoint CKPT] --out analysis.json [--plot fid.png]
                  [--channel-importance ch.json --mlp-pruning-ratios 0.25 0.4375]
                  [--block-importance blocks.json [cosine.json]]  (per-block scores, fidelity with k blocks skipped)
    plot          --importance imp.json|ch.json|blocks.json [--pruning-config prune.json] --out heads.png
                  [--block-importance blocks.json]  (a bar per block beside the head heat map)

The scored model is always the unpruned teacher: a student config's backbone gets every head, channel
and block back, and an ``OrionStudent`` config is scored on its base detector. ``--checkpoint`` (default: the config's
``teacher_backbone_path``, then ``load_from``) holds the teacher's weights. User errors exit with 2.
Plugin file: Python 3.8, no mmengine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import warnings
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from mmcv.models.utils.checkpoint_io import load_checkpoint_file, state_dict_of
from mmcv.models.utils.eva_surgery import BACKBONE_PREFIX, extract_backbone_state_dict
from mmcv.models.utils.head_importance import BlockImportance, ChannelImportance, HeadImportance, load_importance
from mmcv.models.utils.kd_config import distillation_loss_config, resolve_kd_config
from mmcv.models.utils.pruning_config import BLOCK_NORMALIZATIONS, STRATEGIES, PruningConfig, create_pruning_config
from mmcv.models.utils.pruning_cost import UnitCosts
from mmcv.models.utils.user_errors import check_writable_dir, describe_os_error, is_file_system_error, load_config
from mmcv.models.losses.kd_losses import CombinedKDLoss
from mmcv.models.utils.checkpoint_io import atomic_write_json
from tools.head_pruning.analysis import analyze_pruning_impact
from tools.head_pruning.budget_cli import add_budget_options, run_budget
from tools.head_pruning.block_importance import (BLOCK_METHODS, analyze_block_importance, compute_block_importance,
                                                 format_block_table)
from tools.head_pruning.channel_importance import CHANNEL_METHODS, compute_channel_importance
from tools.head_pruning.importance import (METHODS, compute_head_importance_activation, compute_head_importance_entropy,
                                           compute_head_importance_gradient, compute_head_importance_magnitude)
from tools.head_pruning.plots import (plot_block_importance, plot_channel_importance, plot_fidelity_vs_ratio,
                                      plot_head_importance)
from tools.head_pruning.sites import describe_backbone, find_backbone


def _load_config(path: str) -> Any:
    from mmcv.utils import Config
    cfg = load_config(path, Config.fromfile)
    imports = cfg.get("custom_imports", None)
    if imports:
        from mmcv.utils import import_modules_from_strings
        import_modules_from_strings(**imports) if isinstance(imports, Mapping) else import_modules_from_strings(imports)
    return cfg


def _teacher_backbone_cfg(cfg: Any) -> Dict[str, Any]:
    """``cfg.model.img_backbone`` with all blocks, heads and channels (a student config's backbone becomes its
    teacher)."""
    model_cfg = cfg.get("model", None)
    if model_cfg is None or model_cfg.get("img_backbone", None) is None:
        raise ValueError("config: expected model.img_backbone (an ORION-style detector config)")
    backbone = dict(model_cfg["img_backbone"])
    teacher_heads = backbone.get("teacher_num_heads")
    for key in ("selected_heads_per_layer", "mlp_hidden", "selected_channels_per_layer", "selected_blocks"):
        backbone.pop(key, None)
    if teacher_heads is not None:
        backbone["num_heads"] = int(teacher_heads)
    backbone["with_cp"] = False
    backbone["frozen"] = False
    return backbone


def _checkpoint_path(args: argparse.Namespace, cfg: Any) -> Optional[str]:
    """``--checkpoint``, else the config's teacher (``model`` or ``kd_config`` ``teacher_backbone_path``), else load_from."""
    if args.checkpoint:
        return args.checkpoint
    model_cfg = cfg.get("model", {}) or {}
    kd_cfg = model_cfg.get("kd_config", None) or cfg.get("kd_config", None) or {}
    return model_cfg.get("teacher_backbone_path") or kd_cfg.get("teacher_backbone_path") or cfg.get("load_from", None)


def _build_backbone_from(cfg: Any, checkpoint: Optional[str]) -> nn.Module:
    from mmcv.models.builder import build_backbone
    backbone = build_backbone(_teacher_backbone_cfg(cfg))
    if checkpoint:
        state = extract_backbone_state_dict(checkpoint)
        result = backbone.load_state_dict(state, strict=False)
        missing = result.missing_keys
        if missing or result.unexpected_keys:
            raise ValueError(f"{checkpoint}: backbone weights do not match the config's backbone: missing "
                             f"{missing[:4]} ({len(missing)}), unexpected {result.unexpected_keys[:4]} "
                             f"({len(result.unexpected_keys)})")
    else:
        warnings.warn("no checkpoint given: the backbone keeps its random initialisation")
    return backbone


def _build_detector_from(cfg: Any, checkpoint: Optional[str]) -> nn.Module:
    """The unpruned detector holding ``checkpoint``'s weights; an OrionStudent config gives its base detector.

    Scoring the teacher's heads needs the teacher in the detector and the task loss; for an
    OrionStudent config that is exactly its base detector (e.g. ``Orion``) loaded from the checkpoint,
    so ``--checkpoint`` means the same for every config.
    """
    from mmcv.models.builder import build_model
    from mmcv.models.detectors.orion_student import base_detector_config
    model_cfg = dict(cfg.model)
    if model_cfg.get("type") == "OrionStudent":
        model_cfg = base_detector_config(model_cfg)
    model_cfg["img_backbone"] = _teacher_backbone_cfg(cfg)  # a student config's detector gets all the heads
    model = build_model(model_cfg, train_cfg=cfg.get("train_cfg", None), test_cfg=cfg.get("test_cfg", None))
    if not checkpoint:
        warnings.warn("no checkpoint given: the detector keeps its initial weights")
        return model
    state = state_dict_of(load_checkpoint_file(checkpoint), checkpoint)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(BACKBONE_PREFIX)]
    if missing:
        raise ValueError(f"{checkpoint}: {len(missing)} backbone weights missing, e.g. {missing[:4]}")
    if result.missing_keys or result.unexpected_keys:
        warnings.warn(f"{checkpoint}: {len(result.missing_keys)} missing and {len(result.unexpected_keys)} "
                      f"unexpected keys outside the backbone")
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
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method}: scores whole blocks (importance --unit blocks); heads are scored "
                         f"by {METHODS}")
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


def _channel_importance_from_args(args: argparse.Namespace, method: str) -> ChannelImportance:
    """``--channel-importance FILE``, else computed on ``--config``'s teacher with ``method``."""
    if getattr(args, "channel_importance", None):
        return ChannelImportance.load(args.channel_importance, allow_pickle=args.allow_pickle)
    if not args.config:
        raise ValueError("give --channel-importance FILE, or --config (and --checkpoint) to compute it")
    if method not in CHANNEL_METHODS:
        raise ValueError(f"--method {method}: SwiGLU channels are scored by {CHANNEL_METHODS} (entropy scores heads "
                         f"only); pass --channel-method or --channel-importance")
    cfg = _load_config(args.config)
    checkpoint = _checkpoint_path(args, cfg)
    device = torch.device(args.device)
    kwargs: Dict[str, Any] = {}
    if method == "gradient":
        model = _build_detector_from(cfg, checkpoint).to(device)
        kwargs.update(normalize=not args.no_normalize)
    else:
        model = _build_backbone_from(cfg, checkpoint).to(device)
    if method != "magnitude":
        kwargs.update(dataloader=_build_loader(cfg, args, find_backbone(model)), num_batches=args.num_batches)
    return compute_channel_importance(model, method, **kwargs)


def _kd_loss_from_config(cfg: Any) -> CombinedKDLoss:
    """The config's distillation loss (``model.kd_config`` weights and temperature, ``model.distillation_loss``),
    else ``CombinedKDLoss()``'s defaults: block importance measures the loss the student will be trained on."""
    model_cfg = cfg.get("model", None) or {}
    kd_cfg = model_cfg.get("kd_config", None)
    if kd_cfg is None:
        return CombinedKDLoss()
    kd = resolve_kd_config(dict(kd_cfg))
    loss_cfg = distillation_loss_config(kd, dict(kd_cfg), dict(model_cfg.get("distillation_loss", None) or {}))
    loss_cfg.pop("type", None)
    return CombinedKDLoss(**loss_cfg)


def _block_importance_from_args(args: argparse.Namespace) -> BlockImportance:
    """Block importance of ``--config``'s teacher (``--method kd_loss`` or ``cosine``) on ``--split`` frames."""
    if args.method not in BLOCK_METHODS:
        raise ValueError(f"--unit blocks: expected --method {' or '.join(BLOCK_METHODS)}, got {args.method!r}")
    if not args.config:
        raise ValueError("--unit blocks: give --config (and --checkpoint): block importance is measured on frames")
    cfg = _load_config(args.config)
    backbone = _build_backbone_from(cfg, _checkpoint_path(args, cfg)).to(torch.device(args.device))
    loader = _build_loader(cfg, args, backbone)
    kd_loss = _kd_loss_from_config(cfg) if args.method == "kd_loss" else None
    return compute_block_importance(backbone, loader, args.method, num_batches=args.num_batches, kd_loss=kd_loss)


def _add_common(p: argparse.ArgumentParser, blocks: bool = False) -> None:
    p.add_argument("--config", help="ORION-style config (model.img_backbone, data.train/val)")
    p.add_argument("--checkpoint", help="checkpoint with the teacher's weights (an OrionStudent config is scored "
                                        "on its base detector); default: teacher_backbone_path, then load_from")
    if blocks:
        p.add_argument("--method", choices=METHODS + BLOCK_METHODS, default=None,
                       help="heads/channels: magnitude (default), gradient, entropy (heads), activation; blocks: "
                            "kd_loss (default: the distillation loss with the block skipped) or cosine (ShortGPT block "
                            "influence)")
    else:
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


def _add_allocation(p: argparse.ArgumentParser, joint_ratios: str) -> None:
    """Options shared by prune-config and analyze: normalisation, channels, costs."""
    p.add_argument("--block-normalization", choices=BLOCK_NORMALIZATIONS, default="l2",
                   help="global/cost strategies: scale each block's scores by their L2 norm before ranking (default)")
    p.add_argument("--channel-importance", help="SwiGLU channel importance file: prune MLP width as well (joint)")
    p.add_argument("--channel-method", choices=CHANNEL_METHODS, default=None,
                   help="compute the channel importance with this method (default: --method) when no file is given")
    p.add_argument("--channel-multiple", type=int, default=1,
                   help="every block keeps a multiple of this many channels (64: kernel-friendly widths)")
    p.add_argument("--unit-costs", help="strategy cost: measured cost per head/channel (tools/benchmark_backbone.py "
                                        "--unit-latency); default: analytic MACs")
    if joint_ratios == "one":
        group = p.add_mutually_exclusive_group()
        group.add_argument("--mlp-pruning-ratio", type=float, help="fraction of SwiGLU hidden channels REMOVED")
        group.add_argument("--mlp-hidden", type=int, help="SwiGLU channels kept per block (e.g. 1536 of 2730)")
        p.add_argument("--min-channels-per-layer", type=int, default=1)
    else:
        p.add_argument("--mlp-pruning-ratios", type=float, nargs="+", help="fractions of channels REMOVED (joint rows)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Attention-head, SwiGLU-channel and block importance, pruning "
                                                 "configurations, impact analysis (ratios = fractions REMOVED).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("importance", help="compute head, channel or block importance and save it")
    _add_common(p, blocks=True)
    p.add_argument("--unit", choices=("heads", "channels", "blocks"), default="heads",
                   help="score attention heads, SwiGLU channels or whole blocks")
    p.add_argument("--out", required=True, help=".json, .npz or .pkl")
    p = sub.add_parser("prune-config", help="choose the heads (and SwiGLU channels, and blocks for a budget) to keep")
    _add_common(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--pruning-ratio", type=float, default=0.5, help="fraction of heads REMOVED (0.5: 16 -> 8)")
    target.add_argument("--target-speedup", type=float,
                        help="instead of ratios: the speedup over the teacher to reach; heads, channels and blocks "
                             "are chosen by importance per unit of cost (tools/head_pruning/budget.py)")
    add_budget_options(p)
    p.add_argument("--strategy", choices=STRATEGIES, default="uniform")
    p.add_argument("--min-heads-per-layer", type=int, default=1)
    _add_allocation(p, "one")
    p.add_argument("--out", required=True, help=".json")
    p = sub.add_parser("analyze", help="impact of several pruning ratios and strategies")
    _add_common(p)
    p.add_argument("--pruning-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--strategies", choices=STRATEGIES, nargs="+", default=["uniform", "global"])
    _add_allocation(p, "many")
    p.add_argument("--img-size", type=int, nargs="+", help="input size for MACs (default: the backbone's)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the measured fidelity (no data pass)")
    p.add_argument("--block-importance", nargs="+", metavar="FILE",
                   help="block importance files (importance --unit blocks; e.g. kd_loss and cosine): per-block scores "
                        "and the fidelity with the k least important blocks skipped")
    p.add_argument("--plot", help="also write the fidelity-vs-ratio plot here (.png)")
    p.add_argument("--out", required=True, help=".json")
    p = sub.add_parser("plot", help="heat map of head or channel importance, or bars of block importance (kept units marked)")
    _add_common(p)
    p.add_argument("--pruning-config", help="pruning configuration (.json) whose kept units are marked")
    p.add_argument("--block-importance", metavar="FILE", help="block importance file: a bar per block beside the "
                                                              "head heat map")
    p.add_argument("--out", required=True, help=".png")
    return parser


def _joint_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The channel part of prune-config / analyze (empty without channel options)."""
    ratios = getattr(args, "mlp_pruning_ratios", None)
    single = getattr(args, "mlp_pruning_ratio", None)
    hidden = getattr(args, "mlp_hidden", None)
    wants = args.channel_importance or ratios is not None or single is not None or hidden is not None
    unit_costs = UnitCosts.load(args.unit_costs) if args.unit_costs else None
    if not wants:
        return dict(unit_costs=unit_costs)
    if ratios is None and single is None and hidden is None:
        raise ValueError("--channel-importance given without --mlp-pruning-ratio / --mlp-hidden (how many channels "
                         "to remove)")
    channels = _channel_importance_from_args(args, args.channel_method or args.method)
    if hidden is not None:
        if not 1 <= hidden <= channels.num_channels:
            raise ValueError(f"--mlp-hidden: expected 1..{channels.num_channels} (the teacher's MLP width), got {hidden}")
        single = 1.0 - hidden / channels.num_channels
    options: Dict[str, Any] = dict(channel_importance=channels, unit_costs=unit_costs,
                                   channel_multiple=args.channel_multiple)
    if ratios is not None:
        options["mlp_pruning_ratios"] = ratios
    else:
        options.update(mlp_pruning_ratio=single, min_channels_per_layer=args.min_channels_per_layer)
    return options


def _importance_command(args: argparse.Namespace) -> None:
    """``importance``: compute, save and summarise head, channel or block scores."""
    if args.unit == "blocks":
        blocks = _block_importance_from_args(args)
        blocks.save(args.out)
        print(f"{blocks.method} importance of {blocks.num_blocks} blocks ({blocks.num_samples} samples, "
              f"{blocks.metadata.get('seconds', 0):.2f} s) -> {args.out}")
        summary = analyze_block_importance(blocks, verbose=False)
        print(format_block_table({k: v for k, v in summary.items() if k != "skip"}))
        return
    if args.unit == "channels":
        importance = _channel_importance_from_args(args, args.method)
    else:
        importance = _importance_from_args(args)
    importance.save(args.out)
    print(f"{importance.method} importance of {importance.num_layers} blocks x {importance.scores.shape[1]} "
          f"{importance.UNIT} ({importance.num_samples} samples, {importance.metadata.get('seconds', 0):.2f} s) "
          f"-> {args.out}")


def _plot(args: argparse.Namespace) -> None:
    """``plot``: the heat map of the importance file (bars for block importance), kept units marked."""
    config = PruningConfig.load(args.pruning_config) if args.pruning_config else None
    importance = load_importance(args.importance, allow_pickle=args.allow_pickle) if args.importance else \
        _importance_from_args(args)
    blocks = BlockImportance.load(args.block_importance) if args.block_importance else None
    if blocks is not None and type(importance) is not HeadImportance:
        raise ValueError(f"--block-importance: drawn beside a head importance heat map, but --importance holds "
                         f"{importance.UNIT[:-1]} importance")
    if isinstance(importance, BlockImportance):
        plot_block_importance(importance, args.out, pruning_config=config)
    elif isinstance(importance, ChannelImportance):
        plot_channel_importance(importance, args.out, pruning_config=config)
    else:
        plot_head_importance(importance, args.out, pruning_config=config, block_importance=blocks)
    print(f"{'block importance' if isinstance(importance, BlockImportance) else 'heat map'} -> {args.out}")


def _run(args: argparse.Namespace) -> None:
    if args.command == "importance":
        _importance_command(args)
    elif args.command == "prune-config" and args.target_speedup is not None:
        run_budget(args)
    elif args.command == "prune-config":
        config = create_pruning_config(_importance_from_args(args), args.pruning_ratio, args.strategy,
                                       args.min_heads_per_layer, args.block_normalization, **_joint_options(args))
        config.save(args.out)
        channels = f", SwiGLU channels per block {config.mlp_hidden}" if config.prunes_channels else ""
        print(f"{config.strategy} pruning, ratio {config.pruning_ratio:g} removed: heads per block {config.num_heads}"
              f"{channels} -> {args.out}")
    elif args.command == "analyze":
        _analyze(args)
    else:
        _plot(args)


def _analyze(args: argparse.Namespace) -> None:
    """``analyze``: the head (and channel) table, and with ``--block-importance`` the block table, in one JSON.

    With block importance and neither ``--importance`` nor ``--config``, only the block scores and their
    analytic costs are reported (no head table, no fidelity).
    """
    blocks = [BlockImportance.load(path) for path in args.block_importance or []]
    model = loader = None
    if args.config and not args.no_fidelity:
        cfg = _load_config(args.config)
        model = _build_backbone_from(cfg, _checkpoint_path(args, cfg)).to(torch.device(args.device))
        loader = _build_loader(cfg, args, model)
    img_size = None if not args.img_size else (args.img_size[0] if len(args.img_size) == 1 else args.img_size)
    analysis: Dict[str, Any] = {}
    if blocks and args.plot and not (args.importance or args.config):
        raise ValueError("--plot draws the head fidelity; give --importance or --config as well (block importance "
                         "alone writes the tables and the JSON)")
    if not blocks or args.importance or args.config:
        analysis = analyze_pruning_impact(_importance_from_args(args), args.pruning_ratios, model=model,
                                          dataloader=loader, strategies=args.strategies, num_batches=args.num_batches,
                                          img_size=img_size, block_normalization=args.block_normalization,
                                          **_joint_options(args))
        if args.plot:
            plot_fidelity_vs_ratio(analysis, args.plot)
    if blocks:
        if analysis:
            print()
        analysis["blocks"] = analyze_block_importance(blocks, model=model, dataloader=loader,
                                                      num_batches=args.num_batches, img_size=img_size)
    atomic_write_json(args.out, analysis)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 with one line on stderr for a user error)."""
    args = _parser().parse_args(argv)
    if args.method is None:  # the default method depends on the unit
        args.method = "kd_loss" if getattr(args, "unit", None) == "blocks" else "magnitude"
    try:
        for option in ("out", "plot"):  # an output that cannot be written fails before any computation
            if getattr(args, option, None):
                check_writable_dir(os.path.dirname(os.path.abspath(getattr(args, option))),
                                   f"--{option}: the folder of", "pass a writable path")
        _run(args)
    except (ValueError, KeyError, OSError, pickle.UnpicklingError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            if not is_file_system_error(err):
                raise
            message = describe_os_error(err)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0
