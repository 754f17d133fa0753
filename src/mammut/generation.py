"""Text generation for every decoder that follows the decoder protocol (MaMMUT, CoCa,
FlamingoPaLM): greedy search, beam search and sampling, with a KV cache.

Legend: ``b`` batch (images), ``k`` beams, ``r`` active rows (``b`` or ``b * k``, fewer once
rows finish), ``p`` prompt columns (left-padded), ``n`` new tokens, ``v`` vocabulary.

The decoder protocol (reference implementation: ``MaMMUT.image_context`` / ``MaMMUT.decode``):
``model.image_context(images=... | image_tokens=...)`` encodes the images once;
``model.decode(text, context, keep=, positions=, cache=)`` returns logits for the new tokens
``text`` given a ``KVCache`` holding what came before; ``model.config`` has ``pad_id``,
``bos_id``, ``eos_id`` and ``num_tokens``.

How it runs:

- the image is encoded once; beams and row drops only ``index_select`` the context; the
  cache's cross-attention keys/values are projected once, on the first step, and in beam
  search kept as one copy per image that all its beams read (see ``CrossAttention``);
- prompts of different lengths are left-padded so every row ends in the same column;
  ``keep`` (real-token mask over the whole sequence so far) and ``positions`` (count of real
  tokens before each token) make every row decode exactly as it would alone;
- with the cache (default) the prompt is decoded once, then one token per step; in beam search
  the prompt is decoded once per image, not once per beam;
- rows (greedy, sampling) or images (beam search) that are done are dropped from the active
  batch, and the loop stops as soon as all are done. Output rows are right-padded with
  ``pad_id`` after their ``eos_id``.

Static cache and compiled steps (``static_cache=True``, ``compile=True``): the cache is a
``StaticKVCache`` of ``capacity`` columns (prompt + new tokens, rounded up to a multiple of
``STATIC_ROUND`` so captions of similar lengths share one compiled step) and every step after
the prompt has the same shapes: one token per row, keys over all ``capacity`` columns (those
not written yet masked out), and done rows stay in the batch (their outputs are discarded)
instead of being dropped. ``compile=True`` runs that step through ``torch.compile``
(``dynamic=False``): traced on the first call for a given model, batch and capacity, then
reused for every token (torch keeps at most ``torch._dynamo.config.recompile_limit``, by
default 8, such graphs per process, then runs the step eagerly with a warning). Logits equal
the dynamic cache's up to float rounding, hence the same tokens and scores unless two
candidates tie within that rounding (greedy and beam search); sampling draws random numbers for done rows too, so once a row is done the other
rows' samples differ from the dynamic path's (still exact samples of the same distributions).

Scores: a token's score is its log-probability under the processed distribution
(repetition penalty, the ban on ``pad_id`` (never a training target, never generated unless
it is also ``eos_id``), the min-length ban on eos and, when sampling, temperature, top-k and
top-p); a sequence's score is the sum over its new tokens (eos included) divided by
``length ** length_penalty``, the same convention for every strategy.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .generation_inputs import (
    Context,
    PromptLike,
    check_float,
    check_int,
    check_token,
    context_batch,
    context_tensors,
    prepare_prompt,
    select_context,
)
from .layers.dropout import Dropout, no_dropout
from .layers.kv_cache import KVCache, StaticKVCache
from .layers.masks import positions_from_mask
from .models import _checks

__all__ = ["GenerationOutput", "generate", "caption", "select_context", "STRATEGIES", "STATIC_ROUND"]

logger = logging.getLogger(__name__)

STRATEGIES = ("greedy", "beam", "sample")
STATIC_ROUND = 64  # a static cache's capacity is a multiple of this


class GenerationOutput(NamedTuple):
    """What ``generate(..., return_scores=True)`` returns.

    tokens ``(b, n)`` new ids, ``pad_id`` after each row's eos; scores ``(b,)`` sequence
    scores (see the module docstring); token_scores ``(b, n)`` per-token log-probabilities
    (0 at padding); logits ``(b, n, v)`` the raw model logits of every step
    (``return_logits=True``, greedy and sampling only; 0 at padding), else ``None``.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    token_scores: torch.Tensor
    logits: torch.Tensor | None = None


class _Processor:
    """Turns raw next-token logits ``(r, v)`` into the processed scores tokens are chosen
    and scored by: repetition penalty, a ban on pad (unless it is also eos) and, before
    ``min_new_tokens``, on eos, then (sampling) temperature, top-k and top-p."""

    def __init__(self, *, sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float, eos_id: int | None, pad_id: int, min_new_tokens: int) -> None:
        self.sample, self.temperature, self.top_k, self.top_p = sample, temperature, top_k, top_p
        self.penalty, self.eos_id, self.min_new_tokens = repetition_penalty, eos_id, min_new_tokens
        self.pad_id = None if pad_id == eos_id else pad_id

    def __call__(self, logits: torch.Tensor, step: int, seen: torch.Tensor | None) -> torch.Tensor:
        scores = logits.float()
        if seen is not None:  # CTRL-style: shrink the logits of tokens already in the sequence
            scores = torch.where(seen, torch.where(scores > 0, scores / self.penalty, scores * self.penalty), scores)
        scores = scores.clone() if scores is logits else scores
        if self.pad_id is not None:  # pad is never a target in training: never generated
            scores[:, self.pad_id] = -math.inf
        if self.eos_id is not None and step < self.min_new_tokens:
            scores[:, self.eos_id] = -math.inf
        if not self.sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p  # mass before the token already reaches top_p
            drop[:, 0] = False
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
        return scores


def _decode_last(model: nn.Module, text: torch.Tensor, context: Context, keep: torch.Tensor,
                 positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits ``(r, v)`` of the last of the tokens ``text`` ``(r, n)``."""
    return model.decode(text, context, keep=keep, positions=positions, cache=cache)[:, -1]


_compiled_decode_last: Any = None


def _compiled_step() -> Any:
    """``_decode_last`` through ``torch.compile`` (created once; dynamo keeps one graph per
    model, batch and cache capacity)."""
    global _compiled_decode_last
    if _compiled_decode_last is None:
        logger.info("generate: compile=True, the decoding step compiles on its first call (seconds to a minute)")
        _compiled_decode_last = torch.compile(_decode_last, dynamic=False)
    return _compiled_decode_last


class _Rows:
    """The active rows' growing sequences: ids and keep ``(r, p + n)`` preallocated (``(r,
    capacity)`` with a static cache), the number of real tokens per row, the
    repetition-penalty mask and the KV cache."""

    def __init__(self, ids: torch.Tensor, keep: torch.Tensor, max_new: int, pad_id: int, *,
                 vocab: int, track_seen: bool, use_cache: bool, static: bool = False, compiled: bool = False) -> None:
        r, p = ids.shape
        self.prompt_len, self.len = p, p
        width = -(-(p + max_new) // STATIC_ROUND) * STATIC_ROUND if static else p + max_new
        self.ids = torch.cat((ids, ids.new_full((r, width - p), pad_id)), dim=1)
        self.keep = torch.cat((keep, keep.new_zeros(r, width - p)), dim=1)
        self.count = keep.sum(dim=1)  # real tokens per row
        self.seen = None
        if track_seen:
            self.seen = torch.zeros(r, vocab, dtype=torch.bool, device=ids.device)
            self.seen.scatter_(1, ids, keep)  # real prompt tokens only (pad_id is never a real one)
        self.static = static
        self.cache = (StaticKVCache(width) if static else KVCache()) if use_cache else None
        self.step = _compiled_step() if compiled else _decode_last

    def next_logits(self, model: nn.Module, context: Context) -> torch.Tensor:
        """Logits ``(r, v)`` for the next token of every active row."""
        n = self.len
        if self.cache is None or n == self.prompt_len:  # no cache, or the first step: the whole prompt
            keep = self.keep[:, :n]
            return _decode_last(model, self.ids[:, :n], context, keep, positions_from_mask(keep), self.cache)
        # one new token at the position after the real tokens before it
        text, positions = self.ids[:, n - 1:n], (self.count - 1).unsqueeze(1)
        if not self.static:
            return self.step(model, text, context, self.keep[:, :n], positions, self.cache)
        self.cache.at(n - 1, self.ids.device)  # type: ignore[union-attr]
        return self.step(model, text, context, self.keep, positions, self.cache)

    def append(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Append one token per row; ``live`` (static shapes: rows still generating) stops the
        position count of finished rows, whose later tokens are discarded anyway."""
        self.ids[:, self.len] = tokens
        self.keep[:, self.len] = True
        self.len += 1
        self.count = self.count + (1 if live is None else live.long())
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)

    def select(self, index: torch.Tensor, *, cross: bool | torch.Tensor = True) -> None:
        """Keep (and reorder / repeat) rows ``index``; ``cross`` as in ``KVCache.reorder``."""
        self.ids, self.keep = self.ids.index_select(0, index), self.keep.index_select(0, index)
        self.count = self.count.index_select(0, index)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index, cross=cross)

    def generated(self) -> torch.Tensor:
        """New tokens so far ``(r, steps)``."""
        return self.ids[:, self.prompt_len:self.len]


def _normalise(total: torch.Tensor, length: torch.Tensor | int, length_penalty: float) -> torch.Tensor:
    if not torch.is_tensor(length):
        return total / float(length) ** length_penalty
    return total / length.clamp(min=1).to(total.dtype).pow(length_penalty)


# ---------------------------------------------------------------------------- search
def _greedy_or_sample(model: nn.Module, context: Context, rows: _Rows, proc: _Processor, *, sample: bool,
                      max_new: int, eos_id: int | None, pad_id: int, generator: torch.Generator | None,
                      return_logits: bool, length_penalty: float) -> GenerationOutput:
    b = rows.ids.shape[0]
    device = rows.ids.device
    tokens = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    token_scores = torch.zeros(b, max_new, device=device)
    all_logits = None
    lengths = torch.full((b,), max_new, dtype=torch.long, device=device)
    active = torch.arange(b, device=device)  # original row of each active row
    # static shapes: done rows stay in the batch, ``live`` says which rows still count
    live = torch.ones(b, dtype=torch.bool, device=device) if rows.static else None
    steps = 0
    for step in range(max_new):
        logits = rows.next_logits(model, context)
        scores = proc(logits, step, rows.seen)
        logp = scores.log_softmax(dim=-1)
        if sample:
            chosen = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        chosen_logp = logp.gather(1, chosen.unsqueeze(1)).squeeze(1)
        if live is not None:
            tokens[:, step] = chosen.masked_fill(~live, pad_id)
            token_scores[:, step] = chosen_logp.masked_fill(~live, 0.0)
        else:
            tokens[active, step] = chosen
            token_scores[active, step] = chosen_logp
        if return_logits:
            if all_logits is None:
                all_logits = logits.new_zeros(b, max_new, logits.shape[-1])
            all_logits[active, step] = logits if live is None else logits.masked_fill(~live[:, None], 0.0)
        steps = step + 1
        if step + 1 == max_new:
            break
        rows.append(chosen, live)
        if eos_id is not None and live is not None:
            done = (chosen == eos_id) & live
            lengths = torch.where(done, step + 1, lengths)
            live = live & ~done
            if not bool(live.any()):
                break
        elif eos_id is not None:
            done = chosen == eos_id
            if bool(done.any()):
                lengths[active[done]] = step + 1
                if bool(done.all()):
                    break
                index = (~done).nonzero().squeeze(1)
                active = active[index]
                rows.select(index)
                context = select_context(context, index)
    tokens, token_scores = tokens[:, :steps], token_scores[:, :steps]
    if all_logits is not None:
        all_logits = all_logits[:, :steps]
    scores = _normalise(token_scores.sum(dim=1), lengths.clamp(max=steps), length_penalty)
    return GenerationOutput(tokens, scores, token_scores, all_logits)


def _beam_search(model: nn.Module, context: Context, rows: _Rows, proc: _Processor, *, num_beams: int,
                 max_new: int, eos_id: int | None, pad_id: int, length_penalty: float,
                 early_stopping: bool) -> GenerationOutput:
    k = num_beams
    b = rows.ids.shape[0]
    device = rows.ids.device
    # finished hypotheses per image: the k best so far
    fin_score = torch.full((b, k), -math.inf, device=device)
    fin_tokens = torch.full((b, k, max_new), pad_id, dtype=torch.long, device=device)
    fin_logp = torch.zeros(b, k, max_new, device=device)
    fin_len = torch.ones(b, k, dtype=torch.long, device=device)
    items = torch.arange(b, device=device)  # original image of each active item
    beam_sum = torch.zeros(b, 1, device=device)  # running log-prob sums (items, beams so far)
    hist = torch.zeros(b, 0, device=device)  # per-token log-probs of the running beams (rows, steps)
    ranks = torch.arange(2 * k, device=device)
    # static shapes: done images keep their rows, ``live`` says which images still count
    live = torch.ones(b, dtype=torch.bool, device=device) if rows.static else None

    def add_finished(cand_score: torch.Tensor, cand_tokens: torch.Tensor, cand_logp: torch.Tensor, length: int) -> None:
        """Merge candidates ``(a, c)`` (scores, ``-inf`` = none) into the finished sets of ``items``."""
        a, c = cand_score.shape
        if live is not None:  # done images take no more candidates
            cand_score = cand_score.masked_fill(~live[:, None], -math.inf)
        pad = max_new - cand_tokens.shape[-1]
        cand_tokens = F.pad(cand_tokens, (0, pad), value=pad_id)
        cand_logp = F.pad(cand_logp, (0, pad))
        score = torch.cat((fin_score[items], cand_score), dim=1)
        toks = torch.cat((fin_tokens[items], cand_tokens), dim=1)
        logps = torch.cat((fin_logp[items], cand_logp), dim=1)
        lens = torch.cat((fin_len[items], fin_len.new_full((a, c), length)), dim=1)
        best, order = score.topk(k, dim=1)
        fin_score[items] = best
        fin_tokens[items] = toks.gather(1, order[..., None].expand(-1, -1, max_new))
        fin_logp[items] = logps.gather(1, order[..., None].expand(-1, -1, max_new))
        fin_len[items] = lens.gather(1, order)

    for step in range(max_new):
        a, kk = beam_sum.shape  # kk = 1 on the first step: one row per image, beams not split yet
        logits = rows.next_logits(model, context)
        logp = proc(logits, step, rows.seen).log_softmax(dim=-1)  # (a * kk, v)
        v = logp.shape[-1]
        cand = (beam_sum.unsqueeze(-1) + logp.view(a, kk, v)).view(a, kk * v)
        width = min(2 * k, kk * v)
        top, flat = cand.topk(width, dim=1)
        src, tok = flat // v, flat % v  # (a, width)
        src_row = torch.arange(a, device=device).unsqueeze(1) * kk + src  # rows of `rows`
        tok_logp = logp[src_row, tok]
        length = step + 1
        last = step + 1 == max_new
        if eos_id is not None:
            is_eos = tok == eos_id
            finish = is_eos & (ranks[:width] < k) & torch.isfinite(top)
            if bool(finish.any()):
                prev = rows.generated()[src_row]  # (a, width, step)
                prev_logp = hist[src_row]
                cand_tokens = torch.cat((prev, tok.unsqueeze(-1)), dim=-1)
                cand_logp = torch.cat((prev_logp, tok_logp.unsqueeze(-1)), dim=-1)
                add_finished(torch.where(finish, _normalise(top, length, length_penalty), -math.inf), cand_tokens, cand_logp, length)
            # the next beams: the k best candidates that are not eos (at most k of 2k are eos)
            order = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :k]
        else:
            order = ranks[:k].expand(a, -1)
        order = order[:, : min(k, width)]
        beam_sum = top.gather(1, order)
        next_rows = src_row.gather(1, order).reshape(-1)
        next_tok = tok.gather(1, order).reshape(-1)
        next_logp = tok_logp.gather(1, order).reshape(-1)
        hist = torch.cat((hist.index_select(0, next_rows), next_logp.unsqueeze(1)), dim=1)
        if last:  # running beams finish at max length (no need to reorder the cache)
            kk = beam_sum.shape[1]
            generated = torch.cat((rows.generated().index_select(0, next_rows), next_tok.unsqueeze(1)), dim=1)
            add_finished(_normalise(beam_sum, length, length_penalty), generated.view(a, kk, -1), hist.view(a, kk, -1), length)
            break
        if step == 0:  # split every image into k beams; its cross keys/values stay one copy
            context = select_context(context, next_rows)
        rows.select(next_rows, cross=False)
        rows.append(next_tok, None if live is None else live.repeat_interleave(next_rows.numel() // live.numel()))
        # images whose best possible running score cannot beat their k-th finished one are done
        full = torch.isfinite(fin_score[items, -1])
        if early_stopping:
            done = full
        else:
            best = beam_sum.max(dim=1).values
            bound = _normalise(best, max_new if length_penalty > 0 else length, length_penalty)
            done = full & (fin_score[items, -1] >= bound)
        if live is not None:
            live = live & ~done
            if not bool(live.any()):
                break
        elif bool(done.any()):
            if bool(done.all()):
                break
            keep_items = (~done).nonzero().squeeze(1)
            kk = beam_sum.shape[1]
            index = (keep_items.unsqueeze(1) * kk + torch.arange(kk, device=device)).reshape(-1)
            items, beam_sum = items[keep_items], beam_sum[keep_items]
            rows.select(index, cross=keep_items)
            hist = hist.index_select(0, index)
            context = select_context(context, index)
    best = fin_score.argmax(dim=1)
    ar = torch.arange(b, device=device)
    lengths = fin_len[ar, best]
    steps = int(lengths.max())
    tokens = fin_tokens[ar, best, :steps]
    token_scores = fin_logp[ar, best, :steps]
    return GenerationOutput(tokens, fin_score[ar, best], token_scores, None)


# ---------------------------------------------------------------------------- API
def generate(
    model: nn.Module,
    images: torch.Tensor | None = None,
    prompt: PromptLike = None,
    *,
    image_tokens: torch.Tensor | None = None,
    context: Context = None,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    strategy: str = "greedy",
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static_cache: bool = False,
    compile: bool = False,
    return_scores: bool = False,
    return_logits: bool = False,
    **image_kwargs: Any,
) -> torch.Tensor | GenerationOutput:
    """Generate up to ``max_new_tokens`` new tokens per image with ``model`` (any decoder
    following the decoder protocol).

    Inputs (exactly one): ``images`` (whatever ``model.image_context`` takes, batch first),
    ``image_tokens`` (precomputed encoder tokens) or ``context`` (the output of
    ``model.image_context``); ``image_kwargs`` go to ``model.image_context`` (e.g. Flamingo's
    ``time_mask``).

    prompt: ``None`` (start from ``model.config.bos_id``), a LongTensor ``(b, p)`` padded with
        ``pad_id`` (right-padded as a tokenizer gives; left-padded works too), or a list of
        ``b`` 1-D tensors / id lists of any lengths. Taken verbatim (add a start token
        yourself if the model expects one); the output holds only the new tokens.
    strategy: ``"greedy"``, ``"beam"`` (``num_beams``, ``length_penalty``, ``early_stopping``:
        ``True`` stops an image once it has ``num_beams`` finished hypotheses, ``False`` once no
        running beam can beat them) or ``"sample"`` (``temperature``, ``top_k``, ``top_p``,
        ``generator`` for reproducibility). ``repetition_penalty`` (> 1 discourages tokens
        already in the prompt or output) and ``min_new_tokens`` (eos banned before) apply to all.
    eos_id, pad_id: default to ``model.config``'s; with no eos every row runs to
        ``max_new_tokens``.
    use_cache: ``False`` re-runs the whole sequence every step (for testing; same result).
    static_cache: fixed shapes from step to step (see the module docstring); ``compile``: run
        the step through ``torch.compile`` (implies ``static_cache``; the first call per
        model, batch size and capacity traces and compiles it, seconds to a minute, later
        calls reuse it). Same tokens as the default path (up to float-rounding ties).

    Returns new token ids ``(b, n)``, ``n <= max_new_tokens`` (the longest row), rows
    right-padded with ``pad_id`` after their eos; with ``return_scores`` / ``return_logits`` a
    ``GenerationOutput``.

    Train / eval mode: ``generate`` never calls ``.train()`` / ``.eval()`` and changes no
    module state, so it is safe on a model that other threads use (e.g. one being trained).
    It always decodes without dropout: mammut's dropout, attention dropout, ViT patch dropout
    and cropped positional embeddings stand down inside ``mammut.layers.no_dropout()``, a
    switch local to the calling thread, so a model in train mode generates exactly what it
    generates in eval mode, while a training step in another thread keeps its dropout.
    Modules that are not mammut's (a timm / Hugging Face / vit-pytorch encoder, ``nn.Dropout``
    or ``nn.BatchNorm`` of your own) cannot be switched that way: if any is in train mode it
    keeps its train-mode behaviour and ``generate`` logs a warning naming it (once per model);
    call ``model.eval()`` first for deterministic captions from such a model.

    Inputs are checked once, before any compute: NaN or inf ``images`` / ``image_tokens`` /
    ``context`` are a ``ValueError`` naming the argument and counting the bad values.
    """
    missing = [name for name in ("image_context", "decode", "config") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"model: expected a decoder following the decoder protocol, {type(model).__name__} lacks {missing}")
    cfg = model.config
    num_tokens = int(cfg.num_tokens)
    # ---- arguments, all checked before any compute
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens: expected at most max_new_tokens={max_new_tokens}, got {min_new_tokens}")
    num_beams = check_int("num_beams", num_beams, 1)
    length_penalty = check_float("length_penalty", length_penalty, positive=False)
    temperature = check_float("temperature", temperature, positive=True)
    repetition_penalty = check_float("repetition_penalty", repetition_penalty, positive=True)
    if top_k is not None:
        top_k = check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if strategy != "sample" and (temperature != 1.0 or top_k is not None or top_p is not None):
        logger.warning("generate: temperature / top_k / top_p only apply to strategy='sample'; ignored for %r", strategy)
    for name, flag in (("use_cache", use_cache), ("static_cache", static_cache), ("compile", compile)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    static_cache = static_cache or compile
    if static_cache and not use_cache:
        raise ValueError("static_cache / compile: need use_cache=True (they change how the cache is kept)")
    if strategy == "beam" and return_logits:
        raise ValueError("return_logits: not available with strategy='beam' (use 'greedy' or 'sample')")
    eos_id = cfg.eos_id if eos_id is None else eos_id
    if eos_id is not None:
        eos_id = check_token("eos_id", eos_id, num_tokens)
    pad_id = check_token("pad_id", cfg.pad_id if pad_id is None else pad_id, num_tokens)
    bos_id = getattr(cfg, "bos_id", None)
    if prompt is None and bos_id is not None:
        bos_id = check_token("bos_id", bos_id, num_tokens)
    given = [name for name, x in (("images", images), ("image_tokens", image_tokens), ("context", context)) if x is not None]
    if len(given) != 1:
        raise ValueError(f"images / image_tokens / context: expected exactly one of them, got {given or 'none'}")
    if context is not None and image_kwargs:
        raise ValueError(f"{sorted(image_kwargs)}: image_context arguments given with a precomputed context=")
    source = images if images is not None else image_tokens if image_tokens is not None else context
    batch = context_batch(source)
    if batch is None or batch < 1:
        raise ValueError(f"{given[0]}: expected a batch-first tensor (or tuple/dict of them) with at least one row")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids, keep = prepare_prompt(prompt, batch, pad_id=pad_id, bos_id=bos_id, num_tokens=num_tokens, device=device)

    if context is not None:  # images / image_tokens are checked by model.image_context
        for tensor in context_tensors(context):
            _checks.check_finite("context", tensor)
    _warn_outside_no_dropout(model)

    # the model's mode is left alone (other threads may be training it): mammut's dropout,
    # attention dropout and patch dropout stand down in this thread only (see the docstring)
    with no_dropout(), torch.inference_mode():
        if context is None:  # NaN / inf pixels or tokens: a ValueError here, once, not per step
            context = model.image_context(images=images, **image_kwargs) if images is not None else \
                model.image_context(image_tokens=image_tokens, **image_kwargs)
        proc = _Processor(sample=strategy == "sample", temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, eos_id=eos_id, pad_id=pad_id,
                          min_new_tokens=min_new_tokens)
        rows = _Rows(ids, keep, max_new_tokens, pad_id, vocab=num_tokens,
                     track_seen=repetition_penalty != 1.0, use_cache=use_cache, static=static_cache,
                     compiled=compile)
        if strategy == "beam":
            out = _beam_search(model, context, rows, proc, num_beams=num_beams, max_new=max_new_tokens, eos_id=eos_id,
                               pad_id=pad_id, length_penalty=length_penalty, early_stopping=early_stopping)
        else:
            out = _greedy_or_sample(model, context, rows, proc, sample=strategy == "sample", max_new=max_new_tokens,
                                    eos_id=eos_id, pad_id=pad_id, generator=generator, return_logits=return_logits,
                                    length_penalty=length_penalty)
    return out if (return_scores or return_logits) else out.tokens


# torch.nn modules whose forward depends on train mode (no_dropout() cannot reach them)
_TORCH_MODE_DEPENDENT = (
    nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.MultiheadAttention, nn.RNNBase,
)
_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _outside_no_dropout(model: nn.Module) -> list[str]:
    """Names of the modules in train mode that may still act at random (or update running
    statistics) inside ``no_dropout()``: torch.nn dropout / batch norm / ... and any module
    that is neither mammut's nor torch's (its descendants are not listed again)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not module.training or any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(module, Dropout) or any(c.__module__.startswith("mammut.") for c in type(module).__mro__):
            continue  # mammut's (or a subclass of one): no_dropout() reaches it, its children are checked
        if type(module).__module__.startswith("torch."):
            if isinstance(module, _TORCH_MODE_DEPENDENT) and (
                getattr(module, "p", None) or getattr(module, "dropout", None)
                or getattr(module, "track_running_stats", False)
            ):
                found.append(name or type(module).__name__)
            continue
        found.append(name or type(module).__name__)  # a third-party module: its train mode is unknown to us
    return found


def _warn_outside_no_dropout(model: nn.Module) -> None:
    if model in _warned:
        return
    found = _outside_no_dropout(model)
    if found:
        _warned.add(model)
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        logger.warning(
            "generate: %s is in train mode and is not a mammut module, so generation cannot switch its "
            "dropout / batch statistics off without changing the model; call model.eval() first for "
            "deterministic decoding (warned once per model)", shown,
        )


def caption(model: nn.Module, images: torch.Tensor | None, tokenizer: Any, **kwargs: Any) -> list[str]:
    """Captions as strings: ``generate(model, images, **kwargs)`` then ``tokenizer.decode``
    (any object with ``decode(ids (b, n)) -> list[str]``, e.g. ``mammut.data.tokenizer.Tokenizer``).
    Like ``generate`` it leaves the model's train / eval mode alone and decodes without dropout."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer: expected an object with decode(ids) -> list[str], got {type(tokenizer).__name__}")
    if kwargs.get("return_scores") or kwargs.get("return_logits"):
        raise ValueError("return_scores / return_logits: not available in caption(); call generate()")
    tokens = generate(model, images, **kwargs)
    return list(tokenizer.decode(tokens.cpu()))
