"""Beam search: ``num_beams`` running hypotheses per image, the ``num_beams`` best finished
ones kept in ``BeamHypotheses``.

The prompt is decoded once per image; after the first step every image splits into its beams
(the cross-attention keys/values stay one copy per image, shared by its beams, see
``CrossAttention``). At each step the ``2 * num_beams`` best continuations of an image are
ranked: those ending in eos (among the first ``num_beams``) become finished hypotheses, the
best ``num_beams`` others continue. An image is done once it has ``num_beams`` finished
hypotheses (``early_stopping=True``) or once no running beam can beat its worst one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .batch import DecodeRows
from .config import GenerationConfig, GenerationOutput
from .loop import Processor, normalise

__all__ = ["BeamHypotheses", "beam_search"]


class BeamHypotheses:
    """The ``k`` best finished hypotheses of each of ``b`` images: ``score`` ``(b, k)``
    (``-inf`` = none yet), ``tokens`` / ``logp`` ``(b, k, max_new)`` (new tokens, their
    log-probabilities), ``length`` ``(b, k)``."""

    def __init__(self, b: int, k: int, max_new: int, pad_id: int, device: torch.device) -> None:
        self.k, self.max_new, self.pad_id = k, max_new, pad_id
        self.score = torch.full((b, k), -math.inf, device=device)
        self.tokens = torch.full((b, k, max_new), pad_id, dtype=torch.long, device=device)
        self.logp = torch.zeros(b, k, max_new, device=device)
        self.length = torch.ones(b, k, dtype=torch.long, device=device)

    def add(self, items: torch.Tensor, score: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor, length: int) -> None:
        """Merge candidates of images ``items`` ``(a,)``: ``score`` ``(a, c)`` (``-inf`` = not
        a candidate), ``tokens`` / ``logp`` ``(a, c, length)``."""
        a, c = score.shape
        pad = self.max_new - tokens.shape[-1]
        tokens = F.pad(tokens, (0, pad), value=self.pad_id)
        logp = F.pad(logp, (0, pad))
        all_score = torch.cat((self.score[items], score), dim=1)
        best, order = all_score.topk(self.k, dim=1)
        pick = order[..., None].expand(-1, -1, self.max_new)
        self.tokens[items] = torch.cat((self.tokens[items], tokens), dim=1).gather(1, pick)
        self.logp[items] = torch.cat((self.logp[items], logp), dim=1).gather(1, pick)
        self.length[items] = torch.cat((self.length[items], self.length.new_full((a, c), length)), dim=1).gather(1, order)
        self.score[items] = best

    def worst(self, items: torch.Tensor) -> torch.Tensor:
        """The ``k``-th best score of images ``items`` (``-inf`` until ``k`` are finished)."""
        return self.score[items, -1]

    def best(self) -> GenerationOutput:
        """The best hypothesis of every image, tokens cut to the longest."""
        b = self.score.shape[0]
        best = self.score.argmax(dim=1)
        ar = torch.arange(b, device=best.device)
        steps = int(self.length[ar, best].max())
        return GenerationOutput(self.tokens[ar, best, :steps], self.score[ar, best], self.logp[ar, best, :steps], None)


def beam_search(model: nn.Module, batch: DecodeRows, proc: Processor, config: GenerationConfig, *,
                eos_id: int | None) -> GenerationOutput:
    k, max_new, lp = config.num_beams, config.max_new_tokens, config.length_penalty
    b = batch.rows
    device = batch.ids.device
    hyps = BeamHypotheses(b, k, max_new, batch.pad_id, device)
    items = torch.arange(b, device=device)  # original image of each active item
    beam_sum = torch.zeros(b, 1, device=device)  # running log-prob sums (items, beams so far)
    ranks = torch.arange(2 * k, device=device)
    for step in range(max_new):
        a, kk = beam_sum.shape  # kk = 1 on the first step: one row per image, beams not split yet
        logp = proc(batch.next_logits(model), step, batch.seen).log_softmax(dim=-1)  # (a * kk, v)
        v = logp.shape[-1]
        cand = (beam_sum.unsqueeze(-1) + logp.view(a, kk, v)).view(a, kk * v)
        width = min(2 * k, kk * v)
        top, flat = cand.topk(width, dim=1)
        src, tok = flat // v, flat % v  # (a, width)
        src_row = torch.arange(a, device=device).unsqueeze(1) * kk + src  # rows of the batch
        tok_logp = logp[src_row, tok]
        length = step + 1
        live = batch.live.view(a, kk)[:, :1]  # images still searching (a static cache keeps done ones)
        if eos_id is not None:
            is_eos = tok == eos_id
            finish = is_eos & (ranks[:width] < k) & torch.isfinite(top) & live
            if bool(finish.any()):
                cand_tokens = torch.cat((batch.generated()[src_row], tok.unsqueeze(-1)), dim=-1)  # (a, width, length)
                cand_logp = torch.cat((batch.logp[:, :step][src_row], tok_logp.unsqueeze(-1)), dim=-1)
                hyps.add(items, torch.where(finish, normalise(top, length, lp), -math.inf), cand_tokens, cand_logp, length)
            # the next beams: the k best candidates that are not eos (at most k of 2k are eos)
            order = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :k]
        else:
            order = ranks[:k].expand(a, -1)
        order = order[:, : min(k, width)]
        beam_sum = top.gather(1, order)
        next_rows = src_row.gather(1, order).reshape(-1)
        next_tok = tok.gather(1, order).reshape(-1, 1)
        next_logp = tok_logp.gather(1, order).reshape(-1, 1)
        if step + 1 == max_new:  # running beams finish at max length (no need to reorder the cache)
            kk = beam_sum.shape[1]
            generated = torch.cat((batch.generated().index_select(0, next_rows), next_tok), dim=1).view(a, kk, -1)
            hist = torch.cat((batch.logp[:, :step].index_select(0, next_rows), next_logp), dim=1).view(a, kk, -1)
            hyps.add(items, normalise(beam_sum, length, lp).masked_fill(~live, -math.inf), generated, hist, length)
            break
        # the first step splits every image into its beams; its cross keys/values stay one copy
        batch.select(next_rows, cross=False, context=step == 0)
        batch.append(next_tok, next_logp, step)
        kk = beam_sum.shape[1]
        # images whose best possible running score cannot beat their k-th finished one are done
        worst = hyps.worst(items)
        done = torch.isfinite(worst)
        if not config.early_stopping:
            bound = normalise(beam_sum.max(dim=1).values, max_new if lp > 0 else length, lp)
            done = done & (worst >= bound)
        if eos_id is not None and batch.finish(~done.repeat_interleave(kk).unsqueeze(1), group=kk):
            break
        if batch.kept is not None:
            items, beam_sum = items[batch.kept], beam_sum[batch.kept]
    return hyps.best()
