"""Checkpoint and result-file I/O shared by the plugin, the training loop and the tools.

One home for: loading a checkpoint without unpickling user objects (``weights_only=True``,
memory-mapped where torch allows), finding its state dict and dropping DDP's ``module.``
prefix, and writing files atomically (temporary file in the same folder, fsync, then
``os.replace``), so a crash never leaves a half-written checkpoint, JSON or text file.
Temporary files are named ``.<name>.tmp.<pid>``; :func:`remove_stale_temp_files` deletes
the ones a killed process left behind.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def load_checkpoint_file(path: PathLike) -> Any:
    """Load ``path`` on the CPU with ``weights_only=True`` (and ``mmap=True`` on torch >= 2.1).

    Raises FileNotFoundError for a missing file, ``pickle.UnpicklingError`` naming the
    file when it holds objects other than tensors and plain types, and
    :class:`CheckpointError` for a file that is not a readable torch checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("checkpoint not found: {}".format(path))
    with warnings.catch_warnings():  # torch warns about a non-default pickle protocol before refusing it
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return _load_weights_only(path)


def _load_weights_only(path: str) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except TypeError:  # torch < 2.1 has no mmap argument
            return torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:
            if "mmap" in str(err) or "zipfile" in str(err):  # legacy (non-zip) files cannot be mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise pickle.UnpicklingError("{}: refused to unpickle (weights_only=True allows tensors and plain types "
                                     "only; user files are never unpickled): {}".format(path, detail)) from None
    except Exception as err:  # torch raises many types for non-torch or truncated files
        raise CheckpointError("{}: {}".format(path, _unreadable_reason(path, err))) from None


def _unreadable_reason(path: str, err: Exception) -> str:
    """Why torch could not read ``path``, in words a user can act on."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes; an interrupted save or copy?): save or copy it again"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated or corrupted ({} bytes; the zip archive of a torch checkpoint is incomplete): save or " \
               "copy it again".format(size)
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return "not a torch checkpoint (starts with {!r}, expected a zip archive from torch.save)".format(head)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return "not a readable torch checkpoint ({}: {})".format(type(err).__name__, first[:200])


def non_finite_tensors(named: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors in ``named`` that hold a NaN or an infinity.

    One device synchronisation per device, not one per tensor (it runs after every training step).
    """
    floats = [(name, t) for name, t in named.items() if torch.is_tensor(t) and t.is_floating_point()]
    by_device: Dict[Any, List[int]] = {}
    for index, (_, tensor) in enumerate(floats):
        by_device.setdefault(tensor.device, []).append(index)
    bad: List[int] = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(floats[i][1]).all() for i in indices]).tolist()
        bad.extend(i for i, ok in zip(indices, finite) if not ok)
    return [floats[i][0] for i in sorted(bad)]


def require_finite(named: Mapping[str, Any], label: str, fix: str) -> None:
    """Raise :class:`CheckpointError` naming ``label`` and the first tensors when any tensor is non-finite."""
    bad = non_finite_tensors(named)
    if bad:
        raise CheckpointError("{}: {} of {} tensors hold NaN or infinite values (e.g. {}); {}".format(
            label, len(bad), len(named), bad[:3], fix))


def strip_module_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict with DDP's ``module.`` prefix removed from every key that has it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def state_dict_of(checkpoint: Any, label: str = "checkpoint") -> Dict[str, Any]:
    """The model weights of an ORION/mmcv checkpoint (``state_dict`` key) or of a bare state dict.

    ``label`` names the source in errors (usually the file path).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError("{}: expected a dict (a checkpoint or a state dict), got {}".format(
            label, type(checkpoint).__name__))
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError("{}: 'state_dict' must be a dict of tensors, got {}".format(label, type(state).__name__))
    return strip_module_prefix(state)


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (what ``sha256sum`` prints), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_path_for(path: PathLike) -> str:
    """The temporary name used while ``path`` is being written (same folder, hidden, pid-tagged)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, ".{}.tmp.{}".format(name, os.getpid()))


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> str:
    """Write ``path`` through ``write(handle)`` into a temporary file, fsync, then rename it into place."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            try:
                write(handle)
            except OSError as err:  # name the file that could not be written (disk full, quota)
                raise OSError(err.errno, err.strerror or str(err), path) from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class _WriteErrorRecorder:
    """A binary file handle that remembers the first ``OSError`` of a write (ENOSPC, EFBIG, EIO)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: Any = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: PathLike) -> str:
    """``torch.save(obj)`` to ``path`` atomically."""
    def write(handle: Any) -> None:
        recorder = _WriteErrorRecorder(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:  # torch.save reports a failed write (disk full) as RuntimeError
            if recorder.error is not None:
                raise recorder.error from None
            raise

    return atomic_write(path, write, binary=True)


def atomic_write_text(path: PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` hook: tensors and numpy values become lists and numbers."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    for attr in ("tolist", "item"):  # numpy arrays and scalars without importing numpy here
        if callable(getattr(value, attr, None)) and type(value).__module__ == "numpy":
            return getattr(value, attr)()
    raise TypeError("not JSON serialisable: {}".format(type(value).__name__))


def atomic_write_json(path: PathLike, payload: Any, indent: int = 2) -> str:
    """Write ``payload`` as JSON to ``path`` atomically (numpy/torch values become lists/numbers)."""
    text = json.dumps(payload, indent=indent, default=json_default) + "\n"
    return atomic_write_text(path, text)


def remove_stale_temp_files(folder: PathLike) -> List[str]:
    """Delete temporary files in ``folder`` left by processes that no longer run; return their paths.

    Only names of the form written by :func:`temp_path_for` are touched, and only when the
    process id in the name is not alive (a live writer keeps its file).
    """
    folder = os.fspath(folder)
    removed: List[str] = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        match = _TMP_RE.match(name)
        if not match or _pid_alive(int(match.group("pid"))):
            continue
        path = os.path.join(folder, name)
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "CheckpointError", "load_checkpoint_file", "non_finite_tensors", "require_finite", "strip_module_prefix", "state_dict_of", "temp_path_for",
    "atomic_write", "atomic_torch_save", "atomic_write_text", "atomic_write_json", "json_default", "remove_stale_temp_files",
]
