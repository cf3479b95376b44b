"""Export an EVA-02 backbone (the pruned student or the unpruned teacher) to ONNX, checked in ONNX Runtime.

    python tools/export_onnx.py work_dirs/kd/student_pruned.pth                  # -> student_pruned_backbone.onnx
    python tools/export_onnx.py work_dirs/kd/student_pruned_backbone.safetensors --opset 17
    python tools/export_onnx.py ckpts/orion_teacher.pth --backbone-config adzoo/orion/configs/orion_stage3_kd_infer.py

The graph is fixed: one image size (the configuration's ``img_size``, for which the rotary tables are
built), a dynamic batch dimension, input ``img`` [batch, 3, H, W] and output ``last_feat``
[batch, C, H/16, W/16]. The rotary tables, the absolute position embedding at that size, the window
partitioning and the kept heads and SwiGLU channels are constants of the graph: the ONNX file needs no
configuration to run. The teacher (``type='EVAViT'``) goes through the same path, built as an
``EVAViTStudent`` keeping every head (it loads ORION's ``img_backbone.*`` keys unchanged).

Before the ``.onnx`` is kept, ONNX Runtime (CPU) must load it and reproduce PyTorch on random images
(batch 2 and 1, so the dynamic batch is exercised) within ``atol`` (1e-4 in fp32 by default); the
results go into a sidecar JSON (``<out>.json``) with the backbone configuration, the kept units per
block, the sha256 of the weights file it came from and of the backbone tensors, the opset and versions.
Everything is written to temporary files and renamed into place only after the check, so a failed
export leaves nothing behind.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, chosen deliberately.
Once the image size is fixed the backbone has no data-dependent control flow, so tracing records
exactly the operations of one forward; it needs nothing beyond torch (the default exporter of torch >= 2.9
needs ``onnxscript`` and ``torch.export``), exports the tiny backbone in about a second, and is
the one exporter present in every torch that ORION runs (2.0-2.4, whose ``torch.onnx.export`` has no
``dynamo`` argument). It writes opsets up to 20 in torch 2.13; the default, 17, is the first with a
native ``LayerNormalization`` and the one TensorRT 8.6 and later parse.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine (a ``.py`` backbone config is read with ``mmcv.Config``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import os
import pickle
import sys
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch
from torch import nn

from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from mmcv.models.utils.checkpoint_io import (atomic_write_json, file_sha256, load_checkpoint_file, state_dict_of,
                                             temp_path_for)
from mmcv.models.utils.eva_surgery import BACKBONE_PREFIX, backbone_subdict
from mmcv.models.utils.user_errors import describe_os_error, load_config

DEFAULT_OPSET = 17
#: ``scaled_dot_product_attention`` has an ONNX translation from opset 14 on.
MIN_OPSET = 14
DEFAULT_ATOL = 1e-4
INPUT_NAME = "img"
BACKBONE_TYPES = ("EVAViTStudent", "EVAViT")


class OnnxExportError(ValueError):
    """An export that cannot be done or did not pass its check; one line naming the file and the fix."""


# --------------------------------------------------------------------------- dependencies and opsets


def require_onnx_runtime() -> Tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or one line saying which is missing and how to install it."""
    modules = []
    for name in ("onnx", "onnxruntime"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise OnnxExportError("{} is not installed: `pip install onnx onnxruntime` (every export is checked "
                                  "in ONNX Runtime before it is kept); nothing was written".format(name)) from None
    return modules[0], modules[1]


def exporter_max_opset() -> int:
    """The highest opset the TorchScript exporter of this torch writes."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return DEFAULT_OPSET
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET",
                                                                                   DEFAULT_OPSET)))


def check_opset(opset: int) -> int:
    """``opset`` when this torch can write it for the backbone, else one line with the range."""
    top = exporter_max_opset()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise OnnxExportError("opset {!r}: the TorchScript exporter of torch {} writes opsets {}..{} for this "
                              "backbone (scaled_dot_product_attention needs {}); nothing was written".format(
                                  opset, torch.__version__, MIN_OPSET, top, MIN_OPSET))
    return opset


# --------------------------------------------------------------------------- checksums and description


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the backbone tensors: for each key in sorted order, its name, dtype, shape and bytes.

    It identifies the weights whatever file holds them (``.pth``, safetensors, a live model).
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update("{}|{}|{}\n".format(key, str(tensor.dtype).replace("torch.", ""),
                                          list(tensor.shape)).encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_backbone(backbone: EVAViTStudent) -> Dict[str, Any]:
    """What the exported graph computes: geometry, the kept teacher blocks and the kept heads / SwiGLU channels of
    every block (``depth``: the blocks in the graph; ``kept_blocks``: their teacher indices)."""
    return dict(
        img_size=backbone.img_size, patch_size=backbone.patch_size, embed_dim=backbone.embed_dim,
        depth=len(backbone.blocks), kept_blocks=list(backbone.kept_blocks), head_dim=backbone.head_dim,
        teacher_num_heads=backbone.teacher_num_heads,
        teacher_mlp_hidden=backbone.teacher_mlp_hidden, window_block_indexes=list(backbone.window_block_indexes),
        window_per_block=[block.window_size for block in backbone.blocks],
        num_heads=backbone.num_heads_per_layer, mlp_hidden=backbone.mlp_hidden_per_layer,
        selected_heads_per_layer=backbone.selected_heads, selected_channels_per_layer=backbone.selected_channels,
        analytic_gmacs=backbone.analytic_macs() / 1e9)


def _versions(onnx_module: Any, ort: Any) -> Dict[str, str]:
    return dict(torch=torch.__version__, onnx=onnx_module.__version__, onnxruntime=ort.__version__,
                python=sys.version.split()[0])


# --------------------------------------------------------------------------- export and check


def _fp32_eval_copy(backbone: nn.Module) -> nn.Module:
    """The backbone in fp32 eval mode, on the CPU; a copy when that changes anything (the caller's is untouched)."""
    params = list(backbone.parameters()) + list(backbone.buffers())
    if backbone.training or any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
                                for t in params):
        backbone = copy.deepcopy(backbone).to(device="cpu", dtype=torch.float32)
    return backbone.eval()


def _torchscript_export(backbone: nn.Module, example: torch.Tensor, path: str, opset: int, output: str) -> None:
    """``torch.onnx.export`` with the TorchScript exporter: batch dynamic, everything else fixed."""
    kwargs: Dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[output], opset_version=opset,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
                                  do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        # The legacy-exporter notice, and the tracer's note that Python conditions on shapes become constants:
        # they are constants here, since the image size is fixed and no condition depends on the batch.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        with torch.no_grad():
            torch.onnx.export(backbone, (example,), path, **kwargs)


def onnx_runtime_session(path: str, threads: int = 0, label: Optional[str] = None, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session of ``path``; a model it cannot run is one line naming the opset and the fix.

    ``spin=False`` stops ONNX Runtime's idle worker threads from busy-waiting after each run: they would
    otherwise take the cores from whatever runs next in the same process (PyTorch, in the benchmark).
    """
    onnx_module, ort = require_onnx_runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        model = onnx_module.load(path, load_external_data=False)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OnnxExportError("{}: ONNX Runtime {} cannot run this model (opset {}): {}; export with a lower "
                              "--opset or upgrade onnxruntime".format(label or path, ort.__version__, opset,
                                                                      reason[:300])) from None


def parity(backbone: nn.Module, session: Any, inputs: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Max |ONNX Runtime - PyTorch| of the feature map for each named input batch."""
    results = {}
    for name, images in inputs.items():
        images = images.detach().to("cpu", torch.float32).contiguous()
        with torch.no_grad():
            reference = backbone(images)[0].numpy()
        got = session.run(None, {INPUT_NAME: images.numpy()})[0]
        if got.shape != reference.shape:
            raise OnnxExportError("parity on {}: ONNX Runtime returned shape {}, PyTorch {}".format(
                name, tuple(got.shape), tuple(reference.shape)))
        results[name] = dict(batch=int(images.shape[0]), max_abs_diff=float(abs(got - reference).max()),
                             max_abs_value=float(abs(reference).max()))
    return results


def random_inputs(img_size: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Normalised-image-like random batches of 2 and 1 (the export traced a batch of 2)."""
    generator = torch.Generator().manual_seed(seed)
    return {"random_batch2": torch.randn(2, 3, img_size, img_size, generator=generator),
            "random_batch1": torch.randn(1, 3, img_size, img_size, generator=generator)}


def export_backbone_onnx(backbone: EVAViTStudent, path: str, opset: int = DEFAULT_OPSET,
                         atol: float = DEFAULT_ATOL, config: Optional[Mapping[str, Any]] = None,
                         source: Optional[str] = None, extra_inputs: Optional[Mapping[str, torch.Tensor]] = None,
                         ) -> Dict[str, Any]:
    """Export ``backbone`` to ``path`` (``.onnx``) with a sidecar ``<path>.json``; returns the sidecar.

    ``config``: the backbone config it was built from (recorded); ``source``: the weights file it came
    from (its sha256 is recorded); ``extra_inputs``: named image batches [B, 3, H, W] checked for parity
    besides the random ones. Raises :class:`OnnxExportError` (nothing written) when a dependency is
    missing, the opset cannot be written or run, or ONNX Runtime differs from PyTorch by more than ``atol``.
    """
    onnx_module, ort = require_onnx_runtime()
    check_opset(opset)
    if not isinstance(backbone, EVAViTStudent):
        raise OnnxExportError("export_backbone_onnx: expected an EVAViTStudent or EVAViT backbone, got {}".format(
            type(backbone).__name__))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    weights_sha256 = tensors_sha256(backbone.state_dict())
    model = _fp32_eval_copy(backbone)
    inputs = random_inputs(model.img_size)
    inputs.update(extra_inputs or {})
    output = model._out_features[0]
    tmp = temp_path_for(path)
    try:
        _torchscript_export(model, inputs["random_batch2"], tmp, opset, output)
        onnx_module.checker.check_model(tmp)
        session = onnx_runtime_session(tmp, label=path)
        checked = parity(model, session, inputs)
        worst = max(checked.items(), key=lambda item: item[1]["max_abs_diff"])
        if not worst[1]["max_abs_diff"] <= atol:
            raise OnnxExportError("{}: ONNX Runtime differs from PyTorch by {:.3g} on {}, where the features reach "
                                  "{:.3g} (allowed: --atol {:g}); nothing was written".format(
                                      path, worst[1]["max_abs_diff"], worst[0], worst[1]["max_abs_value"], atol))
        sidecar = _sidecar(model, path, tmp, opset, atol, checked, config, source, weights_sha256,
                           _versions(onnx_module, ort))
        atomic_write_json(path + ".json", sidecar)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sidecar


def _sidecar(model: EVAViTStudent, path: str, tmp: str, opset: int, atol: float, checked: Dict[str, Any],
             config: Optional[Mapping[str, Any]], source: Optional[str], weights_sha256: str,
             versions: Dict[str, str]) -> Dict[str, Any]:
    size = model.img_size
    grid = size // model.patch_size
    return dict(
        onnx=os.path.basename(path), onnx_sha256=file_sha256(tmp), opset=opset,
        exporter="torch.onnx.export (TorchScript, dynamo=False)",
        input=dict(name=INPUT_NAME, shape=["batch", 3, size, size], dtype="float32"),
        output=dict(name=model._out_features[0], shape=["batch", model.embed_dim, grid, grid], dtype="float32"),
        source=dict(path=source, sha256=file_sha256(source)) if source else None,
        weights_sha256=weights_sha256, img_backbone=dict(config) if config else None,
        backbone=describe_backbone(model),
        parity=dict(runtime="onnxruntime CPUExecutionProvider", atol=atol, inputs=checked), versions=versions)


# --------------------------------------------------------------------------- checkpoints


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Backbone tensors and the ``img_backbone`` config a file carries (``meta`` of a .pth, safetensors metadata).

    ``.pth`` files load with ``weights_only=True``; keys under ``img_backbone.`` are taken when present.
    """
    if not os.path.isfile(path):
        raise OnnxExportError("checkpoint not found: {}".format(path))
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        config = json.loads(metadata["img_backbone"]) if "img_backbone" in metadata else None
    else:
        checkpoint = load_checkpoint_file(path)
        state = state_dict_of(checkpoint, path)
        meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
        config = meta.get("img_backbone") if isinstance(meta, Mapping) else None
    if any(key.startswith(BACKBONE_PREFIX) for key in state):
        state = backbone_subdict(state)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, config


def read_backbone_config(path: str) -> Dict[str, Any]:
    """``img_backbone`` of a config: a JSON dict (itself or under ``img_backbone``) or an ORION .py config."""
    if not os.path.isfile(path):
        raise OnnxExportError("backbone config not found: {}".format(path))
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except ValueError as err:
            raise OnnxExportError("{}: not valid JSON ({})".format(path, err)) from None
        config = data.get("img_backbone", data) if isinstance(data, dict) else None
    else:
        from mmcv import Config
        model = load_config(path, Config.fromfile).get("model") or {}
        config = model.get("img_backbone") if hasattr(model, "get") else None
    if not isinstance(config, Mapping) or config.get("type") not in BACKBONE_TYPES:
        raise OnnxExportError("{}: expected an img_backbone dict of type {}, got {!r}".format(
            path, " or ".join(BACKBONE_TYPES), config if not isinstance(config, Mapping) else config.get("type")))
    return dict(config)


def build_backbone(config: Mapping[str, Any], label: str) -> EVAViTStudent:
    """An ``EVAViTStudent`` from an ``img_backbone`` config; ``EVAViT`` (the teacher) keeps every head."""
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if config.get("type") == "EVAViT":
        kwargs["teacher_num_heads"] = kwargs.get("num_heads", 12)
    elif config.get("type") != "EVAViTStudent":
        raise OnnxExportError("{}: img_backbone type {!r} cannot be exported here; expected {}".format(
            label, config.get("type"), " or ".join(BACKBONE_TYPES)))
    kwargs.update(drop_path_rate=0.0, with_cp=False, frozen=False)
    try:
        return EVAViTStudent(**kwargs)
    except (TypeError, ValueError) as err:
        raise OnnxExportError("{}: the img_backbone config cannot be built: {}".format(label, err)) from None


def load_backbone(checkpoint: str, backbone_config: Optional[str] = None) -> Tuple[EVAViTStudent, Dict[str, Any]]:
    """The backbone of ``checkpoint`` built from its own config (or ``backbone_config``), loaded strictly.

    Weights whose kept heads/channels or shapes differ from the config fail with one line naming both files.
    """
    state, own_config = read_weights(checkpoint)
    if backbone_config:
        config, where = read_backbone_config(backbone_config), backbone_config
    elif own_config is not None:
        config, where = dict(own_config), "its own meta"
    else:
        raise OnnxExportError("{}: carries no img_backbone config (meta['img_backbone'] of an exported student or "
                              "safetensors metadata); pass --backbone-config".format(checkpoint))
    backbone = build_backbone(config, backbone_config or checkpoint)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        first = problems[0] if problems else str(err)
        more = " (and {} more)".format(len(problems) - 1) if len(problems) > 1 else ""
        raise OnnxExportError("{}: the weights do not match the backbone config from {}: {}{}".format(
            checkpoint, where, first[:400], more)) from None
    return backbone.eval(), config


def default_output(checkpoint: str) -> str:
    """``<stem>_backbone.onnx`` next to the checkpoint (``<stem>.onnx`` when the stem already ends in _backbone)."""
    stem = os.path.splitext(checkpoint)[0]
    return stem + (".onnx" if stem.endswith("_backbone") else "_backbone.onnx")


def export_checkpoint_onnx(checkpoint: str, out: Optional[str] = None, backbone_config: Optional[str] = None,
                           opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL) -> Dict[str, Any]:
    """Export the backbone of a checkpoint file (see :func:`load_backbone`); returns the sidecar."""
    require_onnx_runtime()
    check_opset(opset)
    backbone, config = load_backbone(checkpoint, backbone_config)
    return export_backbone_onnx(backbone, out or default_output(checkpoint), opset=opset, atol=atol, config=config,
                                source=checkpoint)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an exported student (.pth with meta, or _backbone.safetensors) or any "
                                           "checkpoint with --backbone-config")
    parser.add_argument("--backbone-config", help="img_backbone config: a .json dict or an ORION .py config "
                                                  "(default: the checkpoint's own)")
    parser.add_argument("--out", help="the .onnx to write (default: <checkpoint stem>_backbone.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="largest |ONNX Runtime - PyTorch| allowed on the feature map (fp32)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = _parser().parse_args(argv)
    try:
        sidecar = export_checkpoint_onnx(args.checkpoint, args.out, args.backbone_config, args.opset, args.atol)
    except (OnnxExportError, FileNotFoundError, ValueError, pickle.UnpicklingError) as err:
        print("error: {}".format(str(err).splitlines()[0] if str(err) else type(err).__name__), file=sys.stderr)
        raise SystemExit(2)
    except OSError as err:  # an output folder that cannot be made or written
        print("error: {}".format(describe_os_error(err)), file=sys.stderr)
        raise SystemExit(2)
    out = args.out or default_output(args.checkpoint)
    worst = max(result["max_abs_diff"] for result in sidecar["parity"]["inputs"].values())
    print("[export_onnx] wrote {} (opset {}, {} heads, MLP {} per block) and {}.json; ONNX Runtime vs PyTorch: "
          "max |diff| {:.2e}".format(out, sidecar["opset"], sidecar["backbone"]["num_heads"],
                                     sidecar["backbone"]["mlp_hidden"], out, worst))
    return sidecar


__all__: List[str] = [
    "OnnxExportError", "DEFAULT_OPSET", "DEFAULT_ATOL", "require_onnx_runtime", "check_opset", "exporter_max_opset",
    "tensors_sha256", "describe_backbone", "onnx_runtime_session", "parity", "random_inputs", "export_backbone_onnx",
    "read_weights", "read_backbone_config", "build_backbone", "load_backbone", "export_checkpoint_onnx",
    "default_output", "main",
]

if __name__ == "__main__":
    main()
