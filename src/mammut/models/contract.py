"""The model contract: what a model offers, as typing Protocols, and what its registry entry says.

Everything outside ``models/`` (training, evaluation, generation, the CLI) talks to a model
through these methods only, never by probing attributes. A model implements the sides it has:

- :class:`ImageSide`: ``embed_image`` (contrastive embedding) and ``image_context`` (what a
  decoder reads);
- :class:`TextSide`: ``embed_text``;
- :class:`Decoder`: ``decode_hidden`` / ``decode`` with a KV cache (``mammut.generation`` drives it);
- :class:`Trainable`: ``training_step(batch, task)`` -> named losses, ``"loss"`` the one to
  minimise. The model weighs its own tokens: ``batch["token_share"]`` (set by the task's
  ``prepare_step``) is this micro-batch's share of the whole step's tokens over all ranks and
  micro-batches, so ``mean over micro-batches and ranks`` of the returned caption loss is the
  token mean of the whole batch.

Legend: ``b`` batch, ``n`` text tokens, ``d`` width, ``l`` latent width, ``v`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ImageSide", "TextSide", "Decoder", "Trainable", "Batch", "ModelSpec"]

Batch = dict[str, Any]
"""A training or evaluation batch: ``images`` (b, c, h, w) or (b, t, c, h, w), ``text`` (b, n)
token ids, and per task ``labels`` (b, n) (``-100`` / pad: no target), ``loss_mask``,
``media`` ..., plus ``token_share`` (a 0-d tensor) set by the task before the forward pass."""


@runtime_checkable
class ImageSide(Protocol):
    def embed_image(self, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(b, l)``, L2-normalised unless ``normalize=False``."""

    def image_context(self, images: torch.Tensor) -> Any:
        """What the decoder cross-attends to (e.g. ``(b, m, d)``)."""


@runtime_checkable
class TextSide(Protocol):
    def embed_text(self, text: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(b, l)`` of token ids ``(b, n)``, L2-normalised unless ``normalize=False``."""


@runtime_checkable
class Decoder(Protocol):
    def decode_hidden(self, text: torch.Tensor, context: Any = None, **kwargs: Any) -> torch.Tensor:
        """Final normed hidden states ``(b, n, d)`` of new tokens, reading/appending ``cache=``."""

    def decode(self, text: torch.Tensor, context: Any = None, **kwargs: Any) -> torch.Tensor:
        """Logits ``(b, n, v)`` of ``decode_hidden``."""


@runtime_checkable
class Trainable(Protocol):
    def training_step(self, batch: Batch, task: str) -> dict[str, torch.Tensor]:
        """Named losses of one micro-batch for ``task``; ``"loss"`` is minimised, the others are logged."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the class, a tiny config for tests and smoke runs, the blocks that
    activation checkpointing, ``torch.compile`` and FSDP2 wrap, the tasks it trains on, and how
    it takes images (``media``: Flamingo-style image sequences with media tokens in the text)."""

    name: str
    cls: type[nn.Module]
    tiny: Mapping[str, Any] = field(default_factory=dict)
    block_types: tuple[type[nn.Module], ...] = ()
    tasks: tuple[str, ...] = ()
    media: bool = False  # images come as (b, t, c, h, w) media, each marked in the text by a media token

    @property
    def config_class(self) -> type:
        return self.cls.config_class  # type: ignore[attr-defined]

    def build_tiny(self, **overrides: Any) -> nn.Module:
        """The tiny model (tests, smoke runs)."""
        return self.cls(self.config_class(**{**self.tiny, **overrides}))
