"""HeadImportance, ChannelImportance and BlockImportance: scores of heads / SwiGLU channels / whole blocks, and files.

Heads and channels are ``[blocks, units]`` score matrices with the same file formats (.json, .npz,
.pkl); blocks are one score per teacher block, ``[depth]``, in .json. The ``format`` entry says
which unit a file scores, so a channel or block file is never read as head scores.

The tools compute the scores (``tools/head_pruning/importance.py``); the pruning policy
(``pruning_config.py``) turns them into a selection. Files are written atomically; pickle files
are read only when the caller allows it (unpickling can run code).
Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import torch

from mmcv.models.utils.checkpoint_io import atomic_write, atomic_write_json, json_default

IMPORTANCE_FORMAT = "orion-kd-head-importance"
CHANNEL_IMPORTANCE_FORMAT = "orion-kd-channel-importance"
BLOCK_IMPORTANCE_FORMAT = "orion-kd-block-importance"
_UNIT_OF_FORMAT = {IMPORTANCE_FORMAT: "head", CHANNEL_IMPORTANCE_FORMAT: "channel", BLOCK_IMPORTANCE_FORMAT: "block"}
ScoresLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]


def importance_extension(path: Union[str, "os.PathLike[str]"]) -> str:
    """The lower-case extension of an importance file, which must be .json, .npz or .pkl/.pickle."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".json", ".npz", ".pkl", ".pickle"):
        raise ValueError(f"{os.fspath(path)}: expected a .json, .npz or .pkl file, got extension {ext!r}")
    return ext


def read_json(path: Union[str, "os.PathLike[str]"], what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON is one clear error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def float64_scores(value: Any, owner: str, method: str, shape_text: str, what: str) -> torch.Tensor:
    """``value`` as a finite float64 tensor of the shape ``shape_text`` describes (its rank: the commas + 1)."""
    if isinstance(value, torch.Tensor):
        scores = value.detach().cpu().to(torch.float64)
    else:
        try:
            scores = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"{owner}.scores: expected {what}, got {type(value).__name__} {str(value)[:80]}") from None
    rank = shape_text.split("]")[0].count(",") + 1
    if scores.ndim != rank or min(scores.shape, default=0) < 1:
        raise ValueError(f"{owner}.scores: expected a {shape_text}, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{owner}.scores: contains NaN or inf values ({method})")
    return scores


@dataclass
class HeadImportance:
    """Per-block, per-head importance scores (higher = more important); :class:`ChannelImportance` for channels.

    ``scores``: float64 tensor [layers, heads]; ``method``: how they were computed;
    ``num_samples``: images (or batches for detectors: samples) seen, 0 for magnitude;
    ``source``: what was measured (model class, checkpoint); ``metadata``: method settings and the
    backbone geometry used by the impact analysis.
    """

    scores: torch.Tensor
    method: str
    num_samples: int = 0
    source: str = ""
    metadata: Dict[str, Any] = field(default_factory=dict)

    FORMAT = IMPORTANCE_FORMAT
    UNIT = "heads"

    def __post_init__(self) -> None:
        scores = float64_scores(self.scores, type(self).__name__, self.method, f"[layers, {self.UNIT}] array",
                                "numbers")
        self.scores = scores
        self.num_samples = int(self.num_samples)

    @classmethod
    def coerce(cls, value: Union["HeadImportance", ScoresLike]) -> "HeadImportance":
        """``value`` itself, or bare scores wrapped (method ``''``), checked either way; the other unit is refused."""
        if isinstance(value, (HeadImportance, BlockImportance)) and type(value) is not cls:
            raise ValueError(f"expected {cls.UNIT} importance ({cls.__name__}), got {value.UNIT} importance "
                             f"({type(value).__name__}, method {value.method!r})")
        return value if isinstance(value, cls) else cls(scores=value, method="")

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scores.shape[1])

    def numpy(self) -> np.ndarray:
        return self.scores.numpy().copy()

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=self.FORMAT, version=1, method=self.method, num_samples=self.num_samples,
                    source=self.source, metadata=self.metadata, scores=self.scores.tolist())

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write ``.json`` (readable), ``.npz`` (scores array + JSON header) or ``.pkl`` (plain dict), atomically."""
        ext = importance_extension(path)
        if ext == ".json":
            return atomic_write_json(path, self.to_dict())
        header = {k: v for k, v in self.to_dict().items() if k != "scores"}
        if ext == ".npz":
            text = json.dumps(header, default=json_default)
            return atomic_write(path, lambda f: np.savez(f, scores=self.numpy(), header=np.array(text)), binary=True)
        payload = dict(header, scores=self.numpy())
        return atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4), binary=True)

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"], allow_pickle: bool = False) -> "HeadImportance":
        """Read a file written by :meth:`save`; pickle files only with ``allow_pickle=True`` (they can run code)."""
        path = os.fspath(path)
        ext = importance_extension(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cls.UNIT[:-1]} importance file not found: {path}")
        if ext == ".json":
            payload = read_json(path, f"{cls.UNIT[:-1]} importance file")
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "scores" not in data or "header" not in data:
                    raise ValueError(f"{path}: not an importance file (expected arrays 'scores' and 'header', "
                                     f"got {sorted(data.files)})")
                payload = dict(json.loads(str(data["header"])), scores=data["scores"])
        else:
            if not allow_pickle:
                raise ValueError(f"{path}: refusing to load a pickle file (unpickling can execute arbitrary code); "
                                 f"pass allow_pickle=True if you trust it, or save as .json/.npz")
            with open(path, "rb") as handle:
                payload = pickle.load(handle)
        if not isinstance(payload, Mapping) or payload.get("format") != cls.FORMAT or "scores" not in payload:
            other = _UNIT_OF_FORMAT.get(payload.get("format") if isinstance(payload, Mapping) else None)
            found = f"; it holds {other} importance" if other else ""
            raise ValueError(f"{path}: not a {cls.UNIT[:-1]} importance file (expected format {cls.FORMAT!r}{found})")
        return cls(scores=payload["scores"], method=payload.get("method", ""), num_samples=payload.get("num_samples", 0),
                   source=payload.get("source", ""), metadata=dict(payload.get("metadata") or {}))


@dataclass
class ChannelImportance(HeadImportance):
    """Per-block importance of the SwiGLU hidden channels, ``[layers, hidden]`` (higher = more important)."""

    FORMAT = CHANNEL_IMPORTANCE_FORMAT
    UNIT = "channels"

    @property
    def num_channels(self) -> int:
        return int(self.scores.shape[1])


@dataclass
class BlockImportance:
    """Importance of each whole teacher block (higher = more important): what skipping the block costs.

    ``scores``: float64 tensor [depth], one per teacher block; ``method``: ``'kd_loss'`` (the
    distillation loss of the teacher with the block skipped against the full teacher) or ``'cosine'``
    (ShortGPT's block influence, 1 - cos(block input, block output)), see
    ``tools/head_pruning/block_importance.py``; ``num_samples``: images seen; ``source``: what was
    measured; ``metadata``: settings, the backbone geometry (``backbone``) and, for ``kd_loss``, the
    loss parts and the cosine scores of the same frames.
    """

    scores: torch.Tensor
    method: str
    num_samples: int = 0
    source: str = ""
    metadata: Dict[str, Any] = field(default_factory=dict)

    FORMAT = BLOCK_IMPORTANCE_FORMAT
    UNIT = "blocks"

    def __post_init__(self) -> None:
        scores = float64_scores(self.scores, "BlockImportance", self.method, "[depth] array (one score per block)",
                                "one number per block")
        if not isinstance(self.method, str):
            raise ValueError(f"BlockImportance.method: expected a string, got {self.method!r}")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"BlockImportance.metadata: expected a mapping, got {type(self.metadata).__name__}")
        geometry = self.metadata.get("backbone")
        depth = geometry.get("depth") if isinstance(geometry, Mapping) else None
        if depth is not None and depth != scores.shape[0]:
            raise ValueError(f"BlockImportance: metadata.backbone.depth is {depth} but there are {scores.shape[0]} "
                             f"scores (one per block expected)")
        self.scores = scores
        self.num_samples = int(self.num_samples)
        self.metadata = dict(self.metadata)

    @classmethod
    def coerce(cls, value: Union["BlockImportance", torch.Tensor, np.ndarray, Sequence[float]]) -> "BlockImportance":
        """``value`` itself, or bare scores wrapped (method ``''``), checked either way; head/channel records refused."""
        if isinstance(value, HeadImportance):
            raise ValueError(f"expected block importance (BlockImportance), got {value.UNIT} importance "
                             f"({type(value).__name__}, method {value.method!r})")
        return value if isinstance(value, cls) else cls(scores=value, method="")

    @property
    def num_blocks(self) -> int:
        return int(self.scores.shape[0])

    def order(self) -> List[int]:
        """Block indices from the least to the most important (ties: the lower index first)."""
        return sorted(range(self.num_blocks), key=lambda b: (float(self.scores[b]), b))

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=self.FORMAT, version=1, method=self.method, num_samples=self.num_samples,
                    source=self.source, metadata=self.metadata, scores=self.scores.tolist())

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write the record as ``.json``, atomically."""
        _check_json_path(path)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "BlockImportance":
        """Read a file written by :meth:`save`; anything else is one error naming the file and the key."""
        path = os.fspath(path)
        _check_json_path(path)
        payload = read_json(path, "block importance file")
        if not isinstance(payload, Mapping) or payload.get("format") != cls.FORMAT:
            other = _UNIT_OF_FORMAT.get(payload.get("format") if isinstance(payload, Mapping) else None)
            found = f"; it holds {other} importance" if other else ""
            raise ValueError(f"{path}: not a block importance file (expected format {cls.FORMAT!r}{found})")
        if "scores" not in payload:
            raise ValueError(f"{path}: 'scores': missing (expected one number per block)")
        for key, kinds, what in (("method", str, "a string"), ("num_samples", int, "an integer"),
                                 ("source", str, "a string"), ("metadata", Mapping, "an object")):
            if key in payload and not isinstance(payload[key], kinds) or isinstance(payload.get(key), bool):
                raise ValueError(f"{path}: {key!r}: expected {what}, got {payload[key]!r}")
        try:
            return cls(scores=payload["scores"], method=payload.get("method", ""),
                       num_samples=payload.get("num_samples", 0), source=payload.get("source", ""),
                       metadata=dict(payload.get("metadata") or {}))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _check_json_path(path: Union[str, "os.PathLike[str]"]) -> None:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext != ".json":
        raise ValueError(f"{os.fspath(path)}: block importance files are .json, got extension {ext!r}")


def load_importance(path: Union[str, "os.PathLike[str]"], allow_pickle: bool = False
                    ) -> Union[HeadImportance, BlockImportance]:
    """A head, channel or block importance file, whichever ``path`` holds (:class:`ChannelImportance` for
    channels, :class:`BlockImportance` for blocks)."""
    try:
        return HeadImportance.load(path, allow_pickle=allow_pickle)
    except ValueError as err:
        if "it holds block importance" in str(err):
            return BlockImportance.load(path)
        if "it holds channel importance" not in str(err):
            raise
    return ChannelImportance.load(path, allow_pickle=allow_pickle)


__all__ = ["IMPORTANCE_FORMAT", "CHANNEL_IMPORTANCE_FORMAT", "BLOCK_IMPORTANCE_FORMAT", "ScoresLike", "HeadImportance",
           "ChannelImportance", "BlockImportance", "load_importance", "importance_extension", "read_json"]
