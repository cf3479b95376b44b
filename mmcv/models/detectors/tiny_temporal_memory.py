"""The miniature ORION's temporal memory: what a batch slot saw and predicted in its previous frame.

ORION's heads keep, for every batch slot, query embeddings of earlier frames together with
what they predicted there (reference points, velocities) and fuse them into the current
frame; before each frame they keep the memory of a slot only if its sample has the same
``scene_token`` as the slot's previous sample and lies less than 2 s from it, and zero it
otherwise. The stored memory is detached (no gradient through time). ``SceneMemory`` holds
one such vector per slot with that refresh rule; the detection head decides what goes in
(its pooled fused features and traffic-state probabilities) and how it is fused. The memory
acts in training and in evaluation alike and is not part of the state dict (it belongs to
one process's stream of batches); ``memory_state()`` / ``load_memory_state()`` let the
standalone loop save it per rank, so that a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn


class SceneMemory(nn.Module):
    """One detached vector per batch slot, kept while the slot stays in its scene (ORION's refresh rule)."""

    def __init__(self, max_gap: float = 2.0) -> None:
        super().__init__()
        self.max_gap = float(max_gap)
        self.reset()

    def reset(self) -> None:
        """Forget every slot (a new evaluation or run starts from an empty memory)."""
        self._memory: Optional[Tensor] = None  # [B, D], detached
        self._tokens: List[Optional[str]] = []
        self._times: List[float] = []
        self.last_read: Optional[Tensor] = None  # what the last forward read, [B, D]

    def memory_state(self) -> Dict[str, Any]:
        """The stored memory as CPU tensors and plain types (``weights_only``-loadable)."""
        memory = None if self._memory is None else self._memory.cpu()
        return dict(memory=memory, tokens=list(self._tokens), times=list(self._times))

    def load_memory_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`memory_state` returned."""
        self.reset()
        self._memory = state["memory"]
        self._tokens = list(state["tokens"])
        self._times = [float(t) for t in state["times"]]

    def kept_slots(self, img_metas: Sequence[dict]) -> List[bool]:
        """Which slots keep their memory for these samples: same scene and less than ``max_gap`` s apart."""
        kept = []
        for slot, meta in enumerate(img_metas):
            token, stamp = meta.get("scene_token"), meta.get("timestamp")
            kept.append(slot < len(self._tokens) and token is not None and stamp is not None
                        and token == self._tokens[slot] and abs(float(stamp) - self._times[slot]) < self.max_gap)
        return kept

    def read(self, img_metas: Sequence[dict], like: Tensor, dim: int) -> Tensor:
        """[B, dim] for these samples: each kept slot's previous vector, zeros elsewhere (no state change)."""
        prev = like.new_zeros(len(img_metas), dim)
        if self._memory is not None and self._memory.shape[1] == dim:
            for slot, keep in enumerate(self.kept_slots(img_metas)):
                if keep:
                    prev[slot] = self._memory[slot].to(device=like.device, dtype=like.dtype)
        return prev

    def write(self, vectors: Tensor, img_metas: Sequence[dict]) -> None:
        """Store ``vectors`` [B, D] (detached) as the memory of the samples' slots."""
        self._memory = vectors.detach()
        self._tokens = [meta.get("scene_token") for meta in img_metas]
        self._times = [float(meta.get("timestamp", float("nan"))) for meta in img_metas]


def pooled_per_sample(feats: Tensor, batch: int) -> Tensor:
    """[B*N, C, h, w] -> [B, C]: the maximum over each sample's cameras and cells."""
    return feats.view(batch, -1, *feats.shape[1:]).amax(dim=(1, 3, 4))


__all__ = ["SceneMemory", "pooled_per_sample"]
