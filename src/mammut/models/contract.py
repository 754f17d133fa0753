"""The model contract: what a model offers, as typing Protocols, and what its registry entry says.

Everything outside ``models/`` (training, evaluation, generation, the CLI, the apps) asks what a
model can do with ``isinstance(model, <Protocol>)`` (all are ``@runtime_checkable``) or
:func:`capabilities`, never by probing attributes, so an object of any class that has the
members (a wrapper, another library's model) is accepted alike. A model implements the sides it
has:

- :class:`ImageEmbedder`: ``embed_image`` (contrastive image embedding);
- :class:`TextEmbedder`: ``embed_text`` (contrastive text embedding);
  :class:`ContrastiveEmbedder` is both;
- :class:`Decoder` (defined in :mod:`mammut.generation.protocol`, which ``generate`` checks):
  ``config``, ``image_context`` (what the decoder reads, encoded once) and ``decode`` with a
  KV cache; :class:`PositionBounded` adds ``decode_positions()`` (learned position tables);
- :class:`Captioner`: ``generate`` (``ModelBase`` gives it to every decoder, with ``caption``);
- :class:`MediaDecoder`: a decoder whose images come as media sequences ``(b, t, c, h, w)``,
  each item marked in the text by ``media_token_id`` (FlamingoPaLM);
- :class:`ImageSized`: ``image_size``, the side of the square images its encoder expects.

MaMMUT and CoCa: ``ContrastiveEmbedder``, ``Captioner``, ``PositionBounded``, ``ImageSized``;
FlamingoPaLM: ``Captioner``, ``MediaDecoder``, ``ImageSized`` and no embedding
(``tests/test_registry.py`` checks every registered model against its family's list).

Training is not a Protocol: the tasks a model trains on are its registry entry's ``tasks``, and
each task calls the method its objective needs (``compute_losses(text, images, token_share=)``
of the contrastive captioners for ``pretrain``, ``caption_loss(text, images, labels=,
token_share=)`` of every decoder for ``vqa`` / ``interleaved``). The model weighs its own
tokens: ``batch["token_share"]`` (set by the task's ``prepare_step``) is this micro-batch's
share of the whole step's tokens over all ranks and micro-batches, so the mean over
micro-batches and ranks of the returned caption loss is the token mean of the whole batch.

What a registered model takes as images is its entry's ``inputs`` (:data:`INPUT_KINDS`).

Legend: ``b`` batch, ``t`` frames or media per row, ``c, h, w`` one image, ``n`` text tokens,
``l`` latent width, ``v`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..generation.protocol import Decoder, PositionBounded, missing_members, protocol_members

__all__ = ["ImageEmbedder", "TextEmbedder", "ContrastiveEmbedder", "Decoder", "PositionBounded", "Captioner",
           "MediaDecoder", "ImageSized", "PROTOCOLS", "capabilities", "missing_members", "protocol_members",
           "Batch", "INPUT_KINDS", "ModelSpec"]

Batch = dict[str, Any]
"""A training or evaluation batch: ``images`` (b, c, h, w) or (b, t, c, h, w), ``text`` (b, n)
token ids, and per task ``labels`` (b, n) (``-100`` / pad: no target), ``loss_mask``,
``media`` ..., plus ``token_share`` (a 0-d tensor) set by the task before the forward pass."""


@runtime_checkable
class ImageEmbedder(Protocol):
    def embed_image(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None, *,
                    normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(b, l)`` of pixels ``(b, c, h, w)`` (or precomputed encoder
        tokens), L2-normalised unless ``normalize=False``."""
        ...


@runtime_checkable
class TextEmbedder(Protocol):
    def embed_text(self, text: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(b, l)`` of token ids ``(b, n)``, L2-normalised unless ``normalize=False``."""
        ...


@runtime_checkable
class ContrastiveEmbedder(ImageEmbedder, TextEmbedder, Protocol):
    """Both embeddings, in one latent space (retrieval, zero-shot classification)."""


@runtime_checkable
class Captioner(Protocol):
    """Writes text for images (captions, answers): what the embedder, the evaluation and the
    apps call. ``ModelBase`` gives every mammut decoder ``generate`` (and ``caption``, its
    decoded strings) on top of :class:`Decoder`."""

    def generate(self, images: torch.Tensor | None = None, prompt: Any = None, **kwargs: Any) -> Any:
        """New token ids ``(b, n)`` for ``images`` (a tensor, or an object with ``sequences``;
        ``mammut.generation.generate``'s options), after ``prompt`` (one id list per row) when given."""
        ...


@runtime_checkable
class MediaDecoder(Decoder, Protocol):
    """A decoder reading media sequences: images ``(b, t, c, h, w)`` (one item per row:
    ``(b, 1, c, h, w)``), item ``k`` of a row marked by the ``k``-th ``media_token_id`` in its
    text (a prompt starts ``[bos_id, media_token_id]``)."""

    @property
    def media_token_id(self) -> int:
        ...


@runtime_checkable
class ImageSized(Protocol):
    @property
    def image_size(self) -> int | None:
        """Side of the square images the image encoder expects (``None`` when it does not say)."""
        ...


PROTOCOLS: tuple[type, ...] = (ImageEmbedder, TextEmbedder, ContrastiveEmbedder, Decoder, PositionBounded, Captioner,
                               MediaDecoder, ImageSized)
"""Every Protocol of the contract, for :func:`capabilities`."""


def capabilities(model: Any) -> frozenset[str]:
    """The names of the contract's Protocols ``model`` satisfies (e.g. ``{"ImageEmbedder",
    "TextEmbedder", "ContrastiveEmbedder", "Decoder", "Captioner", ...}``)."""
    return frozenset(p.__name__ for p in PROTOCOLS if isinstance(model, p))


INPUT_KINDS: dict[str, str] = {
    "image": "images (b, c, h, w)",
    "video": "videos (b, t, c, h, w): t frames, each an image (c, h, w)",
    "media_sequence": "media (b, t, c, h, w): t images per row, each marked in the text by a media token "
                      "(videos: (b, t, f, c, h, w))",
}
"""What a registered model can take as ``images``: the values of ``ModelSpec.inputs``."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the class, a tiny config for tests and smoke runs, the blocks that
    activation checkpointing, ``torch.compile`` and FSDP2 wrap, the tasks it trains on, and the
    kinds of input it takes as images (``inputs``, keys of :data:`INPUT_KINDS`: ``("image",)``
    for MaMMUT / CoCa, ``("media_sequence",)`` for FlamingoPaLM)."""

    name: str
    cls: type[nn.Module]
    tiny: Mapping[str, Any] = field(default_factory=dict)
    block_types: tuple[type[nn.Module], ...] = ()
    tasks: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("image",)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str) or not self.inputs or any(k not in INPUT_KINDS for k in self.inputs):
            raise ValueError(f"inputs: expected a non-empty tuple of {sorted(INPUT_KINDS)}, got {self.inputs!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))

    @property
    def media(self) -> bool:
        """Whether images come as media sequences with media tokens in the text (read-only;
        ``"media_sequence" in inputs``)."""
        return "media_sequence" in self.inputs

    @property
    def config_class(self) -> type | None:
        """The class's config dataclass (``None`` for a class without one)."""
        return getattr(self.cls, "config_class", None)

    def build_tiny(self, **overrides: Any) -> nn.Module:
        """The tiny model (tests, smoke runs)."""
        if self.config_class is None:
            return self.cls(**{**self.tiny, **overrides})
        return self.cls(self.config_class(**{**self.tiny, **overrides}))
