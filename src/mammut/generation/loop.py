"""Greedy search and sampling, and the logits processing every strategy shares.

Scores: a token's score is its log-probability under the processed distribution (repetition
penalty, the ban on ``pad_id`` (never a training target, never generated unless it is also
``eos_id``), the min-length ban on eos and, when sampling, temperature, top-k and top-p); a
sequence's score is the sum over its new tokens (eos included) divided by
``length ** length_penalty``, the same convention for every strategy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .batch import DecodeRows
from .config import GenerationConfig, GenerationOutput

__all__ = ["Processor", "greedy_or_sample", "normalise"]


class Processor:
    """Turns raw next-token logits ``(r, v)`` into the processed scores tokens are chosen
    and scored by: repetition penalty, a ban on pad (unless it is also eos) and, before
    ``min_new_tokens``, on eos (one precomputed additive bias), then (sampling)
    temperature, top-k and top-p."""

    def __init__(self, config: GenerationConfig, *, eos_id: int | None, pad_id: int, vocab: int,
                 device: torch.device) -> None:
        self.sample = config.strategy == "sample"
        self.temperature, self.top_k, self.top_p = config.temperature, config.top_k, config.top_p
        self.penalty, self.min_new_tokens = config.repetition_penalty, config.min_new_tokens
        ban = torch.zeros(vocab, device=device)
        if pad_id != eos_id:  # pad is never a target in training: never generated
            ban[pad_id] = -math.inf
        self.ban = ban if pad_id != eos_id else None
        self.ban_eos = None
        if eos_id is not None and self.min_new_tokens > 0:
            self.ban_eos = ban.clone()
            self.ban_eos[eos_id] = -math.inf

    def __call__(self, logits: torch.Tensor, step: int, seen: torch.Tensor | None) -> torch.Tensor:
        scores = logits if logits.dtype == torch.float32 else logits.float()
        if seen is not None:  # CTRL-style: shrink the logits of tokens already in the sequence
            scores = torch.where(seen, torch.where(scores > 0, scores / self.penalty, scores * self.penalty), scores)
        ban = self.ban_eos if step < self.min_new_tokens else self.ban
        if ban is not None:
            scores = scores + ban  # x + 0.0 is x: only the banned entries change
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


def normalise(total: torch.Tensor, length: torch.Tensor | int, length_penalty: float) -> torch.Tensor:
    """Sequence score: summed log-probability over ``length ** length_penalty``."""
    if not torch.is_tensor(length):
        return total / float(length) ** length_penalty
    return total / length.clamp(min=1).to(total.dtype).pow(length_penalty)


def greedy_or_sample(model: nn.Module, batch: DecodeRows, proc: Processor, config: GenerationConfig, *,
                     eos_id: int | None, generator: torch.Generator | None) -> GenerationOutput:
    """One token per row and step: the argmax (greedy) or a draw (sampling) of the processed
    scores; rows end at eos (see ``DecodeRows.finish`` for what happens to them)."""
    max_new = config.max_new_tokens
    keep_logits = batch.logits is not None
    for step in range(max_new):
        logits = batch.next_logits(model)
        scores = proc(logits, step, batch.seen)
        logp = scores.log_softmax(dim=-1)
        if proc.sample:
            chosen = torch.multinomial(logp.exp(), 1, generator=generator)
        else:
            chosen = scores.max(dim=-1, keepdim=True).indices  # the first maximum, as argmax (and faster)
        batch.append(chosen, logp.gather(1, chosen), step, logits if keep_logits else None)
        if step + 1 == max_new:
            break
        if eos_id is not None and batch.finish(chosen != eos_id):
            break
    tokens, token_scores, all_logits, lengths = batch.result()
    scores = normalise(token_scores.sum(dim=1), lengths, config.length_penalty)
    return GenerationOutput(tokens, scores, token_scores, all_logits)
