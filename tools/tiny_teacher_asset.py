"""The shipped miniature teacher: a converged TinyOrion kept in the repository as safetensors + sha256.

    ckpt/orion_tiny/orion_tiny_teacher.safetensors   weights; metadata: config text, training meta (JSON)
    ckpt/orion_tiny/orion_tiny_teacher.sha256        ``<sha256>  orion_tiny_teacher.safetensors``

Training the converged teacher takes ~20 minutes on 2 cores, so the demo, the study and the tests
read this file instead (``python tools/train_tiny_teacher.py --ship`` remakes it). OrionStudent and
``load_tiny_teacher`` read ORION-format ``.pth`` checkpoints (``{'meta', 'state_dict'}``, loaded
weights-only), so :func:`materialize_teacher_checkpoint` writes one from the verified safetensors
file at run time (``ckpt/orion_tiny/orion_tiny.pth``, git-ignored); its ``meta['shipped_sha256']``
says which shipped file it came from, and :func:`check_materialized` refuses a cached file that
came from anything else (an older architecture, a retrained teacher) with one line naming the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from mmcv.models.utils.checkpoint_io import file_sha256
from tools.metric_direction import HEADLINE_METRICS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TEACHER = REPO_ROOT / "ckpt" / "orion_tiny" / "orion_tiny_teacher.safetensors"
SHIPPED_CHECKSUM = SHIPPED_TEACHER.with_suffix(".sha256")
MATERIALIZED_CHECKPOINT = REPO_ROOT / "ckpt" / "orion_tiny" / "orion_tiny.pth"
CURVE_PLOT = REPO_ROOT / "docs" / "tiny_teacher_curve.png"
PathLike = Union[str, os.PathLike]


class TeacherAssetError(ValueError):
    """The shipped teacher or a checkpoint written from it cannot be used; the message names the file and the fix."""


def expected_sha256(checksum_file: PathLike = SHIPPED_CHECKSUM) -> str:
    """The checksum recorded next to the shipped file (``sha256sum`` format)."""
    if not os.path.isfile(checksum_file):
        raise TeacherAssetError(f"{checksum_file}: missing; it ships with the repository (git checkout -- "
                                f"{os.path.relpath(checksum_file, REPO_ROOT)}) or is remade by "
                                f"`python tools/train_tiny_teacher.py --ship`")
    text = Path(checksum_file).read_text().split()
    if not text or len(text[0]) != 64:
        raise TeacherAssetError(f"{checksum_file}: expected '<64 hex digits>  <file name>', got {' '.join(text)[:80]!r}")
    return text[0].lower()


def verify_shipped_teacher(path: PathLike = SHIPPED_TEACHER, checksum_file: PathLike = SHIPPED_CHECKSUM) -> str:
    """The file's sha256 after checking it against ``checksum_file``; one-line errors otherwise."""
    if not os.path.isfile(path):
        raise TeacherAssetError(f"{path}: the shipped tiny teacher is missing; restore it with `git checkout -- "
                                f"{os.path.relpath(path, REPO_ROOT)}` (or `git lfs pull` if your clone keeps large "
                                f"files elsewhere)")
    expected, got = expected_sha256(checksum_file), file_sha256(path)
    if got != expected:
        raise TeacherAssetError(f"{path}: sha256 {got[:16]}... does not match {os.path.basename(checksum_file)} "
                                f"({expected[:16]}...); the file is damaged or replaced: `git checkout -- "
                                f"{os.path.relpath(path, REPO_ROOT)}`, or remake both with "
                                f"`python tools/train_tiny_teacher.py --ship`")
    return got


def read_shipped_teacher(path: PathLike = SHIPPED_TEACHER, checksum_file: PathLike = SHIPPED_CHECKSUM
                         ) -> Dict[str, Any]:
    """``{'state_dict', 'meta', 'sha256'}`` of the verified shipped file (``meta['config']`` holds the config)."""
    from safetensors import safe_open

    digest = verify_shipped_teacher(path, checksum_file)
    state: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        for key in handle.keys():
            state[key] = handle.get_tensor(key)
    if "meta" not in header:
        raise TeacherAssetError(f"{path}: no 'meta' in the safetensors metadata; remake it with "
                                f"`python tools/train_tiny_teacher.py --ship`")
    return dict(state_dict=state, meta=json.loads(header["meta"]), sha256=digest)


def write_shipped_teacher(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                          path: PathLike = SHIPPED_TEACHER, checksum_file: PathLike = SHIPPED_CHECKSUM) -> str:
    """Write the weights (contiguous fp32 copies) and ``meta`` as safetensors, then its checksum file; atomic."""
    from safetensors.torch import save

    from mmcv.models.utils.checkpoint_io import atomic_write, atomic_write_text

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = {"meta": json.dumps(dict(meta), default=str, sort_keys=True), "format": "orion_tiny_teacher/1"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = save(tensors, metadata=metadata)
    atomic_write(path, lambda handle: handle.write(payload))
    digest = file_sha256(path)
    atomic_write_text(checksum_file, f"{digest}  {Path(path).name}\n")
    return digest


def materialize_teacher_checkpoint(out: PathLike = MATERIALIZED_CHECKPOINT, verbose: bool = True) -> str:
    """Write the ORION-format ``.pth`` that OrionStudent and ``load_tiny_teacher`` read, from the shipped file."""
    from mmcv.models.utils.checkpoint_io import atomic_torch_save

    shipped = read_shipped_teacher()
    meta = dict(shipped["meta"], shipped_sha256=shipped["sha256"], shipped_file=str(SHIPPED_TEACHER.name))
    atomic_torch_save(dict(meta=meta, state_dict=shipped["state_dict"]), out)
    if verbose:
        print(f"[tiny teacher] wrote {out} from {os.path.relpath(SHIPPED_TEACHER, REPO_ROOT)} "
              f"(sha256 {shipped['sha256'][:16]}... verified)")
    return str(out)


def check_materialized(path: PathLike) -> None:
    """Refuse a cached ``path`` that was not written from the current shipped teacher (one line, with the fix)."""
    from mmcv.models.utils.checkpoint_io import load_checkpoint_file

    expected = expected_sha256()
    try:
        meta = (load_checkpoint_file(path) or {}).get("meta") or {}
    except Exception as err:  # unreadable files get the same fix
        meta = {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    got = meta.get("shipped_sha256") if isinstance(meta, dict) else None
    if got != expected:
        origin = f"written from shipped teacher {got[:16]}..." if got else "not written from the shipped teacher"
        raise TeacherAssetError(f"{path}: stale tiny teacher ({origin}; the shipped one is {expected[:16]}...): "
                                f"delete it and rerun (it is rewritten from "
                                f"{os.path.relpath(SHIPPED_TEACHER, REPO_ROOT)}), or point "
                                f"model.teacher_backbone_path at your own teacher")


def compare_with_shipped(state_dict: Mapping[str, torch.Tensor], metrics: Optional[Mapping[str, float]]
                         ) -> List[str]:
    """Lines saying whether a retrained teacher equals the shipped one (weights and headline metrics)."""
    shipped = read_shipped_teacher()
    ref = shipped["state_dict"]
    if set(ref) != set(state_dict) or any(ref[k].shape != state_dict[k].shape for k in ref):
        return ["differs from the shipped teacher: another architecture (different keys or shapes)"]
    max_diff = max(float((ref[k].float() - state_dict[k].detach().float()).abs().max()) for k in ref)
    lines = ["identical to the shipped teacher" if max_diff == 0.0 else
             f"differs from the shipped teacher: largest weight difference {max_diff:.3g} (another seed, thread "
             f"count, torch version or config gives another teacher)"]
    shipped_metrics = shipped["meta"].get("metrics") or {}
    for key in HEADLINE_METRICS:
        if metrics and key in metrics and key in shipped_metrics:
            lines.append(f"  {key:<10} shipped {shipped_metrics[key]:.4f}  retrained {metrics[key]:.4f}")
    return lines


def plot_curve(curve: List[Mapping[str, float]], chance: Mapping[str, float], path: PathLike = CURVE_PLOT,
               stage_starts: Sequence[int] = ()) -> str:
    """Validation metrics against the training iteration (one panel per metric, chance dashed, a dotted line
    where each later training stage starts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.head_pruning.plots import save_figure

    keys = [k for k in curve[0] if k != "iter"]
    cols = 4
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    steps = [point["iter"] for point in curve]
    for ax, key in zip(axes.ravel(), keys):
        ax.plot(steps, [point[key] for point in curve], marker="o", markersize=3)
        if key in chance:
            ax.axhline(chance[key], linestyle="--", color="grey", linewidth=1, label="chance")
        for start in stage_starts:
            ax.axvline(start, linestyle=":", color="black", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    stages = ", dotted: next training stage" if stage_starts else ""
    fig.suptitle(f"tiny teacher: validation metrics vs training iteration (dashed: image-blind chance{stages})",
                 fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


__all__ = ["SHIPPED_TEACHER", "SHIPPED_CHECKSUM", "MATERIALIZED_CHECKPOINT", "TeacherAssetError", "file_sha256",
           "expected_sha256", "verify_shipped_teacher", "read_shipped_teacher", "write_shipped_teacher",
           "materialize_teacher_checkpoint", "check_materialized", "compare_with_shipped", "plot_curve"]
