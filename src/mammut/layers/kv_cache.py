"""Key/value cache for incremental decoding.

One object serves a whole model: every attention layer stores its entry under itself as the
key. Self-attention entries grow by one step at a time; cross-attention entries (keys and
values of the image tokens) are computed once and reused at every step.

Self-attention entries live in buffers with spare room along the sequence (grown by doubling),
so appending a step writes in place instead of copying everything cached so far; ``append``
returns views of the filled part. (Tensors that require grad are concatenated as before.)

``StaticKVCache`` keeps every shape fixed from step to step (buffers of a set capacity,
written at a column held in a tensor), so a compiled decoding step is traced once and
reused for every token (see ``generate(..., compile=True)``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["KVCache", "StaticKVCache"]

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

    static = False  # masks may depend on what is cached so far (see ``masks.decoder_mask``)

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

    def new_keep(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        """The columns of ``keep`` (the real-token mask over the whole sequence, ``(b, cached +
        n)``) that belong to this call's ``n`` new tokens: its last ``n``."""
        return keep[:, keep.shape[1] - n:]

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


class StaticKVCache(KVCache):
    """A cache whose shapes do not change from step to step, for compiled decoding.

    Every self-attention entry is a ``(b, kv_heads, capacity, dim_head)`` buffer, allocated
    on the first call (the prompt, which fills columns ``0 .. p-1`` and gets back just those).
    Later calls take one token each and write it in place at column ``index`` (a ``(1,)``
    long tensor the caller sets with :meth:`at` before the step, so no Python number changes
    inside a compiled step) and return the whole buffers: columns not written yet hold
    zeros, and the caller's key mask (``keep`` over all ``capacity`` columns) must exclude
    them. Used that way, a step computes exactly what ``KVCache`` does, over a longer (masked)
    key axis.
    """

    static = True

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.index: torch.Tensor | None = None
        self._column = 0

    def at(self, column: int, device: torch.device | str | None = None) -> None:
        """The next single-token call writes column ``column`` (``0 <= column < capacity``)."""
        if not 0 <= column < self.capacity:
            raise ValueError(f"column: expected an integer in [0, {self.capacity}) (capacity), got {column!r}")
        self.index = torch.full((1,), column, dtype=torch.long, device=device)
        self._column = column

    def seq_len(self, layer: nn.Module) -> int:
        return self._column if layer in self._self else 0

    def new_keep(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        """After the prompt, ``keep`` spans the whole capacity: the new token's column is
        ``index``, not the last one."""
        if not self._self:  # the prompt: keep covers just its columns
            return keep[:, keep.shape[1] - n:]
        self._check_step(n)
        return keep.index_select(1, self.index)

    def _check_step(self, n: int) -> None:
        if n != 1 or self.index is None:
            raise ValueError("StaticKVCache: after the prompt, one token per call, at the column set with at()")

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> KV:
        entry = self._self.get(layer)
        if entry is None:  # the prompt: columns 0 .. n-1
            n = k.shape[-2]
            if n > self.capacity:
                raise ValueError(f"StaticKVCache: the prompt has {n} tokens, more than capacity={self.capacity}")
            kb = k.new_zeros((*k.shape[:-2], self.capacity, k.shape[-1]))
            vb = v.new_zeros((*v.shape[:-2], self.capacity, v.shape[-1]))
            kb[..., :n, :] = k
            vb[..., :n, :] = v
            self._self[layer] = (kb, vb, self.capacity)
            self._column = n
            return k, v
        self._check_step(k.shape[-2])
        kb, vb, _ = entry
        kb.index_copy_(2, self.index, k)
        vb.index_copy_(2, self.index, v)
        return kb, vb
