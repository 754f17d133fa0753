"""Key/value cache for incremental decoding.

One object serves a whole model: every attention layer stores its entry under itself as the
key. Self-attention entries grow by one step at a time; cross-attention entries (keys and
values of the image tokens) are computed once and reused at every step.

Self-attention entries live in buffers with spare room along the sequence (grown by doubling),
so appending a step writes in place instead of copying everything cached so far; ``append``
returns views of the filled part. (Tensors that require grad are concatenated as before.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["KVCache"]

KV = tuple[torch.Tensor, torch.Tensor]


def _select(buffer: torch.Tensor, length: int, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the filled part of ``buffer``, in a new buffer of the same capacity."""
    if buffer.requires_grad:
        return buffer[..., :length, :].index_select(0, index)
    out = buffer.new_empty((index.shape[0], *buffer.shape[1:]))
    torch.index_select(buffer[..., :length, :], 0, index, out=out[..., :length, :])
    return out


class KVCache:
    """Cache of ``(k, v)`` pairs, each ``(b, kv_heads, n, dim_head)``."""

    def __init__(self) -> None:
        # layer -> (k buffer, v buffer, filled length); buffers are (b, g, capacity, d)
        self._self: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._cross: dict[nn.Module, KV] = {}
        # model-specific per-row state carried between steps (e.g. Flamingo's last media
        # index); tensors here with batch as dim 0 are reordered with the cache
        self.state: dict[str, torch.Tensor] = {}

    def seq_len(self, layer: nn.Module) -> int:
        """Number of positions cached for ``layer`` (0 before its first step)."""
        entry = self._self.get(layer)
        return 0 if entry is None else entry[2]

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Append this step's keys/values for ``layer``; return all keys/values so far."""
        entry = self._self.get(layer)
        n = k.shape[-2]
        if k.requires_grad or v.requires_grad:  # autograd: no in-place writes
            if entry is not None:
                k = torch.cat((entry[0][..., : entry[2], :], k), dim=-2)
                v = torch.cat((entry[1][..., : entry[2], :], v), dim=-2)
            self._self[layer] = (k, v, k.shape[-2])
            return k, v
        if entry is None:
            kb, vb, length = k, v, 0
            capacity = n  # the prompt: exact; room is made on the first append
        else:
            kb, vb, length = entry
            capacity = kb.shape[-2]
            if length + n > capacity:
                capacity = max(2 * capacity, length + n, 16)
                shape = (*kb.shape[:-2], capacity, kb.shape[-1])
                grown_k, grown_v = kb.new_empty(shape), vb.new_empty(shape)
                grown_k[..., :length, :] = kb[..., :length, :]
                grown_v[..., :length, :] = vb[..., :length, :]
                kb, vb = grown_k, grown_v
            kb[..., length : length + n, :] = k
            vb[..., length : length + n, :] = v
        length += n
        self._self[layer] = (kb, vb, length)
        return kb[..., :length, :], vb[..., :length, :]

    def cross(self, layer: nn.Module, compute: Callable[[], KV]) -> KV:
        """Cross-attention keys/values of ``layer``, computed on first use only."""
        entry = self._cross.get(layer)
        if entry is None:
            entry = compute()
            self._cross[layer] = entry
        return entry

    def reorder(self, index: torch.Tensor, *, cross: bool | torch.Tensor = True) -> None:
        """Select batch rows (beam search): every entry becomes ``entry[index]``.

        ``cross``: ``True`` reorders the cross-attention entries with ``index`` too, ``False``
        leaves them, a tensor reorders them with that index instead (e.g. per image when
        several beams share one image's keys/values, see ``CrossAttention``).
        """
        self._self = {m: (_select(k, n, index), _select(v, n, index), n) for m, (k, v, n) in self._self.items()}
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}
        if cross is not False:
            cross_index = index if cross is True else cross
            self._cross = {
                m: (k.index_select(0, cross_index), v.index_select(0, cross_index)) for m, (k, v) in self._cross.items()
            }

    def __len__(self) -> int:
        return len(self._self) + len(self._cross)
