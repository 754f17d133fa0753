"""The skeleton every contrastive captioner (MaMMUT, CoCa) shares: its training objective and
its ``forward``, written once. A subclass provides the image side
(``image_embed_and_context(tokens) -> (embedding (b, l), context (b, m, d))``), the text side
(``embed_text``), the decoder (``decode_hidden``/``decode``), ``self.contrastive`` (the loss
module) and :meth:`ContrastiveCaptioner.text_and_caption_loss` (how its two sides read the
text, e.g. MaMMUT's two passes over shared weights or CoCa's one unimodal pass).

Legend: ``b`` batch, ``n`` text tokens, ``m`` image tokens, ``d`` width, ``l`` latent, ``v`` vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._base import ModelBase
from ._checks import check_labels, check_text

__all__ = ["ContrastiveCaptioner", "LossOutput"]


class LossOutput(NamedTuple):
    """Weighted total and the parts (the caption part weighted by ``token_share`` if given), for logging."""

    total: torch.Tensor
    caption: torch.Tensor
    contrastive: torch.Tensor


class ContrastiveCaptioner(ModelBase):
    def text_and_caption_loss(self, text: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                              context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embeddings ``(b, l)`` of ``text``, caption loss of the decoder reading ``inputs``
        ``(b, n')`` against ``labels`` ``(b, n')`` with the image ``context``)."""
        raise NotImplementedError

    def compute_losses(
        self,
        text: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_share: torch.Tensor | None = None,
    ) -> LossOutput:
        """Both losses. Without ``labels`` the decoder reads ``text[:, :-1]`` and predicts
        ``text[:, 1:]``; the text embedding always reads all of ``text``. ``labels`` ``(b, n)`` (as
        ``text``): the target of each position of ``text``, an id in ``[0, num_tokens)``, or
        ``pad_id`` / ``-100`` for none (ignored alike). ``token_share`` weighs the caption loss
        (``mammut.tasks.token_shares``: exact token means across micro-batches and ranks)."""
        cfg = self.config
        check_text(text, cfg.num_tokens, cfg.pad_id, min_len=1 if labels is not None else 2)
        if labels is not None:
            check_labels(labels, cfg.num_tokens, shape=tuple(text.shape))
        tokens = self.image_tokens(images, image_tokens)
        self.check_batch(text, tokens)
        inputs, labels = (text[:, :-1], text[:, 1:]) if labels is None else (text, labels)
        image_embeds, context = self.image_embed_and_context(tokens)
        text_embeds, cap = self.text_and_caption_loss(text, inputs, labels, context)
        con = self.contrastive(text_embeds, image_embeds)
        if token_share is not None:
            cap = cap.float() * token_share.to(cap.device)
        total = cfg.caption_loss_weight * cap + cfg.contrastive_loss_weight * con
        return LossOutput(total, cap, con)

    def forward(
        self,
        text: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool = False,
        return_embeddings: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The seed API: ``return_loss`` -> the weighted total loss (scalar); ``return_embeddings``
        -> L2-normalised ``(text (b, l), image (b, l))``; else caption logits ``(b, n, v)``."""
        if return_loss:
            return self.compute_losses(text, images, image_tokens=image_tokens, labels=labels).total
        cfg = self.config
        check_text(text, cfg.num_tokens, cfg.pad_id)
        tokens = self.image_tokens(images, image_tokens)
        self.check_batch(text, tokens)
        image_embeds, context = self.image_embed_and_context(tokens)
        if return_embeddings:
            return self.embed_text(text), image_embeds
        return self.forward_logits(text, context)

    def forward_logits(self, text: torch.Tensor, context: Any) -> torch.Tensor:
        """Caption logits ``(b, n, v)`` of a whole (checked) text reading the image ``context``."""
        return self.decode(text, context)
