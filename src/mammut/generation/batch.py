"""The rows being decoded and the one policy for rows that are done.

``DecodeRows`` holds every row's growing sequence (ids and real-token mask, preallocated to the
final width), the position of its last real token, the log-probability of each new token, the
KV cache and the image context; the loops (``loop.py``, ``beam.py``) only choose tokens.

Rows that are done (eos, or a beam-search image whose hypotheses are final) are handled one
way, whatever the strategy: ``live`` turns off for them and ``finish`` then either drops them
from the batch (dynamic cache: the remaining rows keep decoding, their outputs stashed by
original row) or keeps them, computing on with their outputs discarded (static cache: every
step keeps one shape). Per step that is a handful of tensor ops and one host read (how many
rows are live), and none at all without an eos.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers.kv_cache import KVCache, StaticKVCache
from ..layers.masks import positions_from_mask
from .config import STATIC_ROUND
from .inputs import Context, select_context

__all__ = ["DecodeRows", "StepFn", "decode_last", "step_function", "logits_of_decode_hidden"]

StepFn = Callable[[nn.Module, torch.Tensor, Context, torch.Tensor, torch.Tensor, KVCache | None], torch.Tensor]


def _hidden_last(model: nn.Module, text: torch.Tensor, context: Context, keep: torch.Tensor,
                 positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits ``(r, v)`` of the last of the tokens ``text`` ``(r, n)``: the decoder's last
    state only goes through the vocabulary projection."""
    hidden = model.decode_hidden(text, context, keep=keep, positions=positions, cache=cache)
    return model.to_logits(hidden[:, -1])


def decode_last(model: nn.Module, text: torch.Tensor, context: Context, keep: torch.Tensor,
                positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits ``(r, v)`` of the last of the tokens ``text`` through ``model.decode`` (any
    decoder following the protocol)."""
    return model.decode(text, context, keep=keep, positions=positions, cache=cache)[:, -1]


_PLAIN_DECODE = "__mammut_logits_of_decode_hidden__"


def logits_of_decode_hidden(decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Marks a ``decode`` method that is exactly ``to_logits(decode_hidden(...))``
    (``ModelBase.decode``): generation may then project only the last state to the vocabulary.
    The mark is the function's, so a subclass that overrides ``decode`` loses it."""
    setattr(decode, _PLAIN_DECODE, True)
    return decode


def step_function(model: nn.Module) -> StepFn:
    """``_hidden_last`` for mammut models whose ``decode`` is ``ModelBase.decode``
    (``to_logits(decode_hidden(...))``, so the two are the same: :func:`logits_of_decode_hidden`),
    ``decode_last`` otherwise. The mark is the whole test: a marked ``decode`` calls
    ``decode_hidden`` and ``to_logits`` itself, so both are there."""
    decode = getattr(type(model), "decode", None)  # the function, to read its mark
    plain = getattr(decode, _PLAIN_DECODE, False) is True and "decode" not in vars(model)
    return _hidden_last if plain else decode_last


class DecodeRows:
    """Active rows: ids and keep ``(r, width)`` (``width`` = prompt + new tokens, rounded up
    to ``STATIC_ROUND`` with a static cache), ``last`` (each row's last token), ``last_pos`` /
    ``prompt_pos`` (positions of its last token / last prompt token: their difference counts its
    new tokens while live), ``logp`` ``(r, max_new)``, ``live`` ``(r, 1)``, ``origin`` ``(r,)``
    (original row), the cache and context.

    ``step``: the function for single-token steps (eager, compiled or a CUDA graph of it);
    the prompt always runs through ``first`` (eager). ``stable``: the static cache keeps its
    buffers' addresses (a CUDA graph reads them).
    """

    def __init__(self, ids: torch.Tensor, keep: torch.Tensor, context: Context, *, max_new: int, pad_id: int,
                 vocab: int, track_seen: bool, use_cache: bool, static: bool, first: StepFn, step: StepFn,
                 keep_logits: bool = False, position_limit: int | None = None, stash: bool = True,
                 stable: bool = False) -> None:
        r, p = ids.shape
        device = ids.device
        self.prompt_len = self.len = p
        self.max_new, self.pad_id, self.static = max_new, pad_id, static
        width = -(-(p + max_new) // STATIC_ROUND) * STATIC_ROUND if static else p + max_new
        self.ids = torch.cat((ids, ids.new_full((r, width - p), pad_id)), dim=1)
        # dynamic cache: new columns count as real from the start (steps read keep up to the
        # current length only); static: a column turns real when written (steps read it all)
        self.keep = torch.cat((keep, keep.new_full((r, width - p), not static)), dim=1)
        self.prompt_pos = keep.sum(dim=1, keepdim=True) - 1  # position of each row's last prompt token
        self.last_pos = self.prompt_pos.clone()  # ... and of its last token (its new tokens while live)
        self.last = ids[:, -1:]  # each row's last token, the next step's input
        self.logp = torch.zeros(r, max_new, device=device)
        self.logits: torch.Tensor | None = torch.zeros(r, max_new, vocab, device=device) if keep_logits else None
        self.live = torch.ones(r, 1, dtype=torch.bool, device=device)
        self.origin = torch.arange(r, device=device)
        self.seen: torch.Tensor | None = None
        if track_seen:  # repetition penalty: tokens in the sequence so far
            self.seen = torch.zeros(r, vocab, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, keep)  # real prompt tokens only (pad_id is never a real one)
        self.cache = (StaticKVCache(width, stable=stable) if static else KVCache(reserve=width)) if use_cache else None
        self.context = context
        self.first, self.step = first, step
        self.position_limit = position_limit
        self.kept: torch.Tensor | None = None  # groups kept by the last finish() that dropped rows
        self.stash = stash  # keep the outputs of dropped rows (greedy, sampling; beam search keeps its own)
        # rows dropped so far: (origin, ids of the new tokens, logp, logits or None, lengths)
        self._done: list[tuple[torch.Tensor, ...]] = []

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def next_logits(self, model: nn.Module) -> torch.Tensor:
        """Logits ``(r, v)`` for the next token of every row."""
        n = self.len
        if self.cache is None or n == self.prompt_len:  # no cache, or the first step: the whole prompt
            keep = self.keep[:, :n]
            return self.first(model, self.ids[:, :n], self.context, keep, positions_from_mask(keep), self.cache)
        # one new token, at the position after the real tokens before it
        if self.position_limit is not None:
            self._check_positions()
        if self.static:
            self.cache.at(n - 1, self.ids.device)  # type: ignore[union-attr]
            return self.step(model, self.last, self.context, self.keep, self.last_pos, self.cache)
        return self.step(model, self.last, self.context, self.keep.narrow(1, 0, n), self.last_pos, self.cache)

    def _check_positions(self) -> None:
        top = int(torch.where(self.live, self.last_pos, -1).max())
        if top >= self.position_limit:  # type: ignore[operator]
            raise ValueError(
                f"max_new_tokens: a row reaches position {top}, past the {self.position_limit} positions the decoder "
                "embeds (decode_positions(), e.g. CoCa's max_text_len with learned positions); use a shorter prompt "
                "or fewer new tokens"
            )

    def append(self, tokens: torch.Tensor, logp: torch.Tensor, step: int, logits: torch.Tensor | None = None) -> None:
        """Append one token per row (``tokens``, ``logp`` ``(r, 1)``), chosen at ``step``."""
        n = self.len
        self.ids.narrow(1, n, 1).copy_(tokens)
        self.last = tokens
        if self.static:
            self.keep.narrow(1, n, 1).fill_(True)
        self.logp.narrow(1, step, 1).copy_(logp)
        if self.logits is not None and logits is not None:
            self.logits.select(1, step).copy_(logits)
        self.last_pos.add_(self.live)  # done rows (static cache) stop counting positions, and tokens
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)
        self.len = n + 1

    def finish(self, going: torch.Tensor, group: int = 1) -> bool:
        """Rows not ``going`` ``(r, 1)`` (whole groups of ``group`` rows: one image's beams)
        are done: they stop counting; True when no row is left. Dynamic cache: they leave the
        batch, and ``kept`` holds the kept groups' indices (else ``None``)."""
        self.live.logical_and_(going)
        alive = int(self.live.sum())  # the step's one host read
        self.kept = None
        if alive == 0:
            return True
        if not self.static and alive < self.rows:
            if self.stash:
                self._stash((~self.live[:, 0]).nonzero().squeeze(1))
            kept_groups = self.live[::group, 0].nonzero().squeeze(1)
            rows = (kept_groups.unsqueeze(1) * group + torch.arange(group, device=kept_groups.device)).reshape(-1)
            self.select(rows, cross=kept_groups)
            self.kept = kept_groups
        return False

    def _stash(self, index: torch.Tensor) -> None:
        p = self.prompt_len
        logits = None if self.logits is None else self.logits.index_select(0, index)
        lengths = (self.last_pos - self.prompt_pos).index_select(0, index)
        self._done.append((self.origin.index_select(0, index), self.ids[:, p:p + self.max_new].index_select(0, index),
                           self.logp.index_select(0, index), logits, lengths))

    def select(self, index: torch.Tensor, *, cross: bool | torch.Tensor = True, context: bool = True) -> None:
        """Keep (and reorder / repeat) rows ``index``; ``cross`` as in ``KVCache.reorder``; the
        context follows the rows (``context=False``: it holds the same for every row moved,
        e.g. beams reordered within their image)."""
        for name in ("ids", "keep", "last_pos", "prompt_pos", "last", "logp", "live", "origin", "seen", "logits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        if self.cache is not None:
            self.cache.reorder(index, cross=cross)
        if context:
            self.context = select_context(self.context, index)

    def generated(self) -> torch.Tensor:
        """New tokens so far ``(r, steps)``."""
        return self.ids[:, self.prompt_len:self.len]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """By original row: tokens ``(b, n)`` (``pad_id`` after each row's end), per-token
        log-probs (0 there), logits or ``None``, lengths ``(b,)``; ``n`` = the longest row."""
        self._stash(torch.arange(self.rows, device=self.ids.device))
        parts = list(zip(*self._done))
        origin = torch.cat(parts[0])
        order = torch.empty_like(origin)
        order[origin] = torch.arange(origin.numel(), device=origin.device)
        ids, logp, lengths = (torch.cat(parts[i]).index_select(0, order) for i in (1, 2, 4))
        logits = None if parts[3][0] is None else torch.cat(parts[3]).index_select(0, order)
        lengths = lengths.squeeze(1)
        steps = int(lengths.max())
        valid = torch.arange(steps, device=lengths.device) < lengths.unsqueeze(1)
        tokens = ids[:, :steps].masked_fill(~valid, self.pad_id)
        logp = logp[:, :steps].masked_fill(~valid, 0.0)
        if logits is not None:
            logits = logits[:, :steps].masked_fill(~valid.unsqueeze(-1), 0.0)
        return tokens, logp, logits, lengths

