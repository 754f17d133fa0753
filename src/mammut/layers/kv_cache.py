"""Key/value cache for incremental decoding.

One object serves a whole model: every attention layer stores its entry under itself as the
key. Self-attention entries grow by one step at a time; cross-attention entries (keys and
values of the image tokens) are computed once and reused at every step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["KVCache"]

KV = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    """Cache of ``(k, v)`` pairs, each ``(b, kv_heads, n, dim_head)``."""

    def __init__(self) -> None:
        self._self: dict[nn.Module, KV] = {}
        self._cross: dict[nn.Module, KV] = {}
        # model-specific per-row state carried between steps (e.g. Flamingo's last media
        # index); tensors here with batch as dim 0 are reordered with the cache
        self.state: dict[str, torch.Tensor] = {}

    def seq_len(self, layer: nn.Module) -> int:
        """Number of positions cached for ``layer`` (0 before its first step)."""
        entry = self._self.get(layer)
        return 0 if entry is None else entry[0].shape[-2]

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Append this step's keys/values for ``layer``; return all keys/values so far."""
        entry = self._self.get(layer)
        if entry is not None:
            k = torch.cat((entry[0], k), dim=-2)
            v = torch.cat((entry[1], v), dim=-2)
        self._self[layer] = (k, v)
        return k, v

    def cross(self, layer: nn.Module, compute: Callable[[], KV]) -> KV:
        """Cross-attention keys/values of ``layer``, computed on first use only."""
        entry = self._cross.get(layer)
        if entry is None:
            entry = compute()
            self._cross[layer] = entry
        return entry

    def reorder(self, index: torch.Tensor, *, cross: bool = True) -> None:
        """Select batch rows (beam search): every entry becomes ``entry[index]``."""
        self._self = {m: (k.index_select(0, index), v.index_select(0, index)) for m, (k, v) in self._self.items()}
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}
        if cross:
            self._cross = {m: (k.index_select(0, index), v.index_select(0, index)) for m, (k, v) in self._cross.items()}

    def __len__(self) -> int:
        return len(self._self) + len(self._cross)
