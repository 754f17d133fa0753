"""Key/value cache for incremental decoding.

One object serves a whole model: every attention layer stores its entry under itself as the
key. Self-attention entries grow by one step at a time; cross-attention entries (keys and
values of the image tokens) are computed once and reused at every step.

A self-attention entry is one buffer ``(2, b, g, capacity, d)`` holding keys (``[0]``) and
values (``[1]``) with spare room along the sequence: appending a step is one in-place copy of
this step's keys and values together, and ``append`` returns views of the filled part
(``(b, g, n, d)`` each, batch and heads foldable into one matmul batch without a copy). The
room is ``reserve`` columns when the caller knows the final length (generation does), else it
grows by doubling. (Tensors that require grad are concatenated instead, never written in place.)

Per call: a model calls ``begin_call()`` at the start of each decoding call; layers then
share what is the same for all of them in that call (rotary tables of the positions, the
additive form of the key mask) through ``per_call`` instead of each computing it again.
Without ``begin_call`` (or while ``torch.compile`` traces, which deduplicates by itself)
``per_call`` just computes.

``StaticKVCache`` keeps every shape and every buffer address fixed from step to step (buffers
of a set capacity, written at a column held in a tensor, rows reordered in place), so a
compiled decoding step is traced once and a CUDA graph of it can be replayed for every token
(see ``generate(..., compile=True)``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["KVCache", "StaticKVCache"]

KV = tuple[torch.Tensor, torch.Tensor]


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


class _Entry:
    """A layer's self-attention buffer ``(2, b, g, capacity, d)``, the filled length, and its
    keys and values ``(b, g, capacity, d)`` (views made once per buffer)."""

    __slots__ = ("buf", "length", "k", "v")

    def __init__(self, buf: torch.Tensor, length: int) -> None:
        self.buf, self.length = buf, length
        self.k, self.v = buf[0], buf[1]


class KVCache:
    """Cache of keys and values, each ``(b, kv_heads, n, dim_head)``.

    ``reserve``: columns to allocate on a layer's first call (at least what that call needs),
    e.g. prompt + new tokens; ``None`` grows by doubling as steps come.
    """

    static = False  # masks may depend on what is cached so far (see ``masks.decoder_mask``)

    def __init__(self, reserve: int | None = None) -> None:
        if reserve is not None and (isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 1):
            raise ValueError(f"reserve: expected an integer >= 1 or None, got {reserve!r}")
        self.reserve = reserve
        self._self: dict[nn.Module, _Entry] = {}
        self._cross: dict[nn.Module, KV] = {}
        # model-specific per-row state carried between steps (e.g. Flamingo's last media
        # index); tensors here with batch as dim 0 are reordered with the cache
        self.state: dict[str, torch.Tensor] = {}
        self._call: dict[tuple[str, int], tuple[Any, Any]] | None = None
        # a model's one-token step functions, built once per cache (see ``token_step.token_plan``)
        self.plans: dict[nn.Module, Any] = {}

    # ---------------------------------------------------------------- per call
    def begin_call(self) -> None:
        """A decoding call starts: forget what the previous call's layers shared."""
        self._call = None if _compiling() else {}

    def per_call(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per call for a given ``name`` and ``key`` object (compared by
        identity, e.g. the positions tensor every layer receives)."""
        memo = self._call
        if memo is None:
            return compute()
        hit = memo.get((name, id(key)))
        if hit is not None and hit[0] is key:
            return hit[1]
        value = compute()
        memo[(name, id(key))] = (key, value)
        return value

    # ---------------------------------------------------------------- self-attention
    def seq_len(self, layer: nn.Module) -> int:
        """Number of positions cached for ``layer`` (0 before its first step)."""
        entry = self._self.get(layer)
        return 0 if entry is None else entry.length

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Append this step's keys/values ``(b, g, n, d)`` for ``layer``; return all keys/values so far."""
        return self.append_kv(layer, torch.stack((k, v)))

    def append_kv(self, layer: nn.Module, kv: torch.Tensor) -> KV:
        """As ``append`` with keys and values stacked, ``kv`` ``(2, b, g, n, d)`` (any strides,
        e.g. a strided view of a fused projection's output): one copy for both."""
        entry = self._write(layer, kv)
        n = entry.length
        return entry.k.narrow(-2, 0, n), entry.v.narrow(-2, 0, n)

    def _write(self, layer: nn.Module, kv: torch.Tensor) -> _Entry:
        entry = self._self.get(layer)
        n = kv.shape[-2]
        if kv.requires_grad:  # autograd: no in-place writes
            if entry is not None:
                kv = torch.cat((entry.buf[..., : entry.length, :], kv), dim=-2)
            entry = self._self[layer] = _Entry(kv, kv.shape[-2])
            return entry
        if entry is None:
            buf = kv.new_empty((*kv.shape[:-2], max(n, self.reserve or 0), kv.shape[-1]))
            entry = self._self[layer] = _Entry(buf, 0)
        elif entry.length + n > entry.buf.shape[-2]:
            buf, length = entry.buf, entry.length
            grown = buf.new_empty((*buf.shape[:-2], max(2 * buf.shape[-2], length + n, 16), buf.shape[-1]))
            grown[..., :length, :] = buf[..., :length, :]
            entry = self._self[layer] = _Entry(grown, length)
        entry.buf.narrow(-2, entry.length, n).copy_(kv)
        entry.length += n
        return entry

    def new_keep(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        """The columns of ``keep`` (the real-token mask over the whole sequence, ``(b, cached +
        n)``) that belong to this call's ``n`` new tokens: its last ``n``."""
        return keep[:, keep.shape[1] - n:]

    # ---------------------------------------------------------------- cross-attention
    def cross(self, layer: nn.Module, compute: Callable[[], KV]) -> KV:
        """Cross-attention keys/values of ``layer``, computed on first use only."""
        entry = self._cross.get(layer)
        if entry is None:
            entry = compute()
            self._cross[layer] = entry
        return entry

    # ---------------------------------------------------------------- rows
    def set_state(self, key: str, value: torch.Tensor) -> None:
        """``state[key] = value`` (a static cache writes into the existing tensor when the
        shape allows, so its address stays the same for a CUDA graph)."""
        self.state[key] = value

    def reorder(self, index: torch.Tensor, *, cross: bool | torch.Tensor = True) -> None:
        """Select batch rows (beam search, finished rows): every entry becomes ``entry[index]``.

        ``cross``: ``True`` reorders the cross-attention entries with ``index`` too, ``False``
        leaves them, a tensor reorders them with that index instead (e.g. per image when
        several beams share one image's keys/values, see ``CrossAttention``).
        """
        self._self = {m: _Entry(self._select(e.buf, e.length, index), e.length) for m, e in self._self.items()}
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}
        if cross is not False:
            cross_index = index if cross is True else cross
            self._cross = {
                m: (k.index_select(0, cross_index), v.index_select(0, cross_index)) for m, (k, v) in self._cross.items()
            }
        self._call = None

    @staticmethod
    def _select(buf: torch.Tensor, length: int, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the filled part of ``buf`` ``(2, b, ...)``, in a new buffer of the
        same capacity (keys and values each selected along their first dimension, the fast
        path of ``index_select``)."""
        if buf.requires_grad:
            return buf[..., :length, :].index_select(1, index)
        out = buf.new_empty((buf.shape[0], index.shape[0], *buf.shape[2:]))
        for i in range(buf.shape[0]):
            torch.index_select(buf[i, ..., :length, :], 0, index, out=out[i, ..., :length, :])
        return out

    def __len__(self) -> int:
        return len(self._self) + len(self._cross)


class StaticKVCache(KVCache):
    """A cache whose shapes and buffer addresses do not change from step to step, for
    compiled decoding and CUDA graphs.

    Every self-attention entry is a ``(2, b, kv_heads, capacity, dim_head)`` buffer, allocated
    on the first call (the prompt, which fills columns ``0 .. p-1`` and gets back just those).
    Later calls take one token each and write it in place at column ``index`` (a ``(1,)``
    long tensor, always the same one, that the caller sets with :meth:`at` before the step, so
    no Python number changes inside a compiled step) and return the whole buffers: columns
    not written yet hold zeros, and the caller's key mask (``keep`` over all ``capacity``
    columns) must exclude them. Used that way, a step computes exactly what ``KVCache`` does,
    over a longer (masked) key axis. ``stable=True`` (CUDA graphs, which read and write the
    buffers at their addresses) also reorders rows in place when their number stays the same
    (beam search) and writes ``set_state`` values into the existing tensors; otherwise a reorder
    makes new buffers (one copy instead of two).
    """

    static = True

    def __init__(self, capacity: int, *, stable: bool = False) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected an integer >= 1, got {capacity!r}")
        self.capacity, self.stable = capacity, stable
        self.index: torch.Tensor | None = None
        self._column = 0

    def at(self, column: int, device: torch.device | str | None = None) -> None:
        """The next single-token call writes column ``column`` (``0 <= column < capacity``)."""
        if not 0 <= column < self.capacity:
            raise ValueError(f"column: expected an integer in [0, {self.capacity}) (capacity), got {column!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.index is None or self.index.device != device:
            self.index = torch.full((1,), column, dtype=torch.long, device=device)
        else:
            self.index.fill_(column)  # the same tensor: a CUDA graph reads it at its address
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

    def append_kv(self, layer: nn.Module, kv: torch.Tensor) -> KV:
        entry, n = self._write(layer, kv)
        return (entry.k, entry.v) if n is None else (entry.k.narrow(-2, 0, n), entry.v.narrow(-2, 0, n))

    def _write(self, layer: nn.Module, kv: torch.Tensor) -> tuple[_Entry, int | None]:  # type: ignore[override]
        """-> (entry, prompt length) for the prompt, (entry, None) for a step."""
        entry = self._self.get(layer)
        if entry is None:  # the prompt: columns 0 .. n-1
            n = kv.shape[-2]
            if n > self.capacity:
                raise ValueError(f"StaticKVCache: the prompt has {n} tokens, more than capacity={self.capacity}")
            buf = kv.new_zeros((*kv.shape[:-2], self.capacity, kv.shape[-1]))
            buf[..., :n, :] = kv
            self._self[layer] = _Entry(buf, self.capacity)
            self._column = n
            return self._self[layer], n
        self._check_step(kv.shape[-2])
        if _compiling():  # keys, then values: what inductor writes in place into the graph's inputs
            entry.k.index_copy_(-2, self.index, kv[0])
            entry.v.index_copy_(-2, self.index, kv[1])
        else:
            entry.buf.index_copy_(-2, self.index, kv)
        return entry, None

    def set_state(self, key: str, value: torch.Tensor) -> None:
        old = self.state.get(key)
        if self.stable and old is not None and old.shape == value.shape and old.dtype == value.dtype:
            old.copy_(value)
        else:
            self.state[key] = value

    def reorder(self, index: torch.Tensor, *, cross: bool | torch.Tensor = True) -> None:
        rows = next((e.buf.shape[1] for e in self._self.values()), None)
        if not self.stable or rows is None or index.shape[0] != rows or cross is not False:
            super().reorder(index, cross=cross)
            return
        for e in self._self.values():  # same number of rows: in place, same addresses
            for half in (e.k, e.v):
                half.copy_(half.index_select(0, index))
        for value in self.state.values():
            value.copy_(value.index_select(0, index))
        self._call = None

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of ``state`` (restored with :meth:`restore` after warm-up runs of a step)."""
        return {k: v.clone() for k, v in self.state.items()}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for k, v in saved.items():
            self.state[k].copy_(v)
