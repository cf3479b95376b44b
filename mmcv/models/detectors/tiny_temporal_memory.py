"""The miniature ORION's temporal memory: what a batch slot saw in the previous frame.

ORION's heads keep, for every batch slot, queries of earlier frames and fuse
them into the current frame; before each frame they keep the memory of a slot
only if its sample has the same ``scene_token`` as the slot's previous sample
and lies less than 2 s from it, and zero it otherwise. The stored memory is
detached (no gradient through time). ``SceneMemory`` does the same at toy
scale with the detection head's feature map: the fused map of frame ``k`` is
the memory of frame ``k + 1``, so information (a traffic light's state seen
before it left the view) can travel over many frames. The memory acts in
training and in evaluation alike and is not part of the state dict (it belongs
to one process's stream of batches); ``memory_state()`` / ``load_memory_state()``
let the standalone loop save it per rank, so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn


class SceneMemory(nn.Module):
    """Per-slot memory of a [C, h, w] map per camera, refreshed at scene changes; fuses it into the present.

    ``fused = feats + fuse([feats, memory, mean(memory) broadcast])`` with 1x1
    convolutions; the last one starts at zero, so an untrained memory changes nothing.
    """

    def __init__(self, channels: int, max_gap: float = 2.0) -> None:
        super().__init__()
        self.max_gap = float(max_gap)
        self.fuse = nn.Sequential(nn.Conv2d(3 * channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)
        self.reset()

    def reset(self) -> None:
        """Forget every slot (a new evaluation or run starts from an empty memory)."""
        self._memory: Optional[Tensor] = None  # [B, N, C, h, w], detached
        self._tokens: List[str] = []
        self._times: List[float] = []
        self.last_read: Optional[Tensor] = None  # the memory the last forward fused, [B*N, C, h, w]

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
        """Which slots keep their memory for these samples: same scene and less than ``max_gap`` s later."""
        kept = []
        for slot, meta in enumerate(img_metas):
            token, stamp = meta.get("scene_token"), meta.get("timestamp")
            kept.append(slot < len(self._tokens) and token is not None and stamp is not None
                        and token == self._tokens[slot] and abs(float(stamp) - self._times[slot]) < self.max_gap)
        return kept

    def read(self, feats: Tensor, img_metas: Optional[Sequence[dict]]) -> Tensor:
        """The memory for ``feats`` [B*N, C, h, w]: the previous map of each kept slot, zeros elsewhere."""
        prev = torch.zeros_like(feats)
        if img_metas is None or self._memory is None:
            return prev
        b = len(img_metas)
        per_slot = prev.view(b, feats.shape[0] // b, *feats.shape[1:])
        if tuple(self._memory.shape[1:]) != tuple(per_slot.shape[1:]):
            return prev
        for slot, keep in enumerate(self.kept_slots(img_metas)):
            if keep:
                per_slot[slot] = self._memory[slot].to(device=feats.device, dtype=feats.dtype)
        return prev

    def fuse_with(self, feats: Tensor, prev: Tensor) -> Tensor:
        """Fuse a memory map into ``feats`` (pure function, no state change)."""
        context = prev.mean(dim=(2, 3), keepdim=True).expand_as(prev)
        return feats + self.fuse(torch.cat([feats, prev, context], dim=1))

    def forward(self, feats: Tensor, img_metas: Optional[Sequence[dict]]) -> Tensor:
        """Read, fuse, and store the fused map as the memory of the next frame (when ``img_metas`` are given)."""
        if img_metas is not None and feats.shape[0] % max(len(img_metas), 1):
            raise ValueError(f"SceneMemory: {feats.shape[0]} feature maps do not split into {len(img_metas)} samples")
        prev = self.read(feats, img_metas)
        fused = self.fuse_with(feats, prev)
        self.last_read = prev.detach()
        if img_metas is not None:
            self._memory = fused.detach().view(len(img_metas), -1, *fused.shape[1:])
            self._tokens = [meta.get("scene_token") for meta in img_metas]
            self._times = [float(meta.get("timestamp", float("nan"))) for meta in img_metas]
        return fused


__all__ = ["SceneMemory"]
