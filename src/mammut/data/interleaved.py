"""Interleaved image-text sequences from emoji scenes (Flamingo-style training data).

Legend: ``b`` sequences in a batch, ``t`` scenes (media) in a sequence, ``T`` the most
scenes per sequence (the model's ``num_time_embeds``), ``n`` tokens, ``H``/``W`` pixels.

A sequence of ``t`` scenes is the token sequence::

    [BOS] <image> caption 1 <image> caption 2 ... <image> caption t [EOS]

with one media token (``<image>``) right before each scene's caption, and the ``t`` images
``(t, 3, H, W)`` in the same order. Captions are tokenized on their own (exactly the tokens
the ``pretrain`` task gives them) and joined by id, never by string, so no stray whitespace
piece appears around a media token.

Sequence ``i`` of a split is a pure function of ``(seed, split, i)``: its scene count ``t``
(uniform in ``min_media..T``, from a generator seeded with ``(seed, split, i)``) and its scenes
``EmojiScenes(split).scene(i * T + k)`` for ``k < t``, so sequences never share a scene and the
held-out split's sequences hold only held-out scenes (emoji pairs never seen in training).

Length: a sequence longer than ``max_len`` tokens loses trailing scenes until it fits (at least
one stays); a single scene still too long is cut (``truncate``, EOS kept) or is an error.

Batches (:class:`InterleavedCollate`): ``text`` (b, n) right-padded with ``pad_id`` to the
longest row, ``labels`` (b, n) with ``labels[:, j]`` the target of position ``j`` (the next
token; ``-100`` for media tokens, padding and the last column: never targets), and ``images``
(b, t_max, 3, H, W), rows with fewer scenes padded with zero images. FlamingoPaLM never reads
a padded image: a text token attends to the media item its running media-token count names,
and a row with ``t`` media tokens never counts past ``t`` (the perceiver resamples each item on
its own), so no ``time_mask`` is needed for training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..losses import IGNORE_INDEX
from .scenes import EmojiScenes

log = logging.getLogger(__name__)

__all__ = ["InterleavedSample", "InterleavedSource", "InterleavedCollate", "build_sequence", "build_prompt",
           "caption_ids", "sequence_labels"]

_SPLIT_SALT = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class InterleavedSample:
    """One sequence of ``t`` scenes: ``images`` (t, 3, H, W) in [0, 1], their ``captions`` and
    emoji ``names`` in order, the scene indices in the split's ``EmojiScenes`` and the
    sequence's global ``index``."""

    images: torch.Tensor
    captions: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    scene_indices: tuple[int, ...]
    index: int

    @property
    def num_media(self) -> int:
        return len(self.captions)


class InterleavedSource:
    """Global sequence index -> :class:`InterleavedSample` (see the module docstring).

    ``scenes``: the split's ``EmojiScenes``; ``max_media`` (``T``): the most scenes per
    sequence; ``min_media``: the fewest; ``seed``: the scene-count stream (``train.seed``).
    """

    def __init__(self, scenes: EmojiScenes, max_media: int, seed: int, *, min_media: int = 1) -> None:
        if isinstance(max_media, bool) or not isinstance(max_media, int) or max_media < 1:
            raise ValueError(f"model.num_time_embeds: expected an int >= 1 (the most scenes per sequence), got {max_media!r}")
        if not 1 <= min_media <= max_media:
            raise ValueError(f"min_media: expected an int in [1, {max_media}] (model.num_time_embeds), got {min_media!r}")
        self.scenes, self.max_media, self.min_media, self.seed = scenes, max_media, min_media, int(seed)
        self.salt = _SPLIT_SALT[scenes.split]

    def num_media(self, i: int) -> int:
        """Scenes in sequence ``i``: uniform in ``min_media..max_media``, a function of (seed, split, i)."""
        if self.min_media == self.max_media:
            return self.max_media
        rng = np.random.default_rng((self.seed, self.salt, int(i)))
        return int(rng.integers(self.min_media, self.max_media + 1))

    def scene_indices(self, i: int) -> tuple[int, ...]:
        return tuple(i * self.max_media + k for k in range(self.num_media(i)))

    def __call__(self, i: int) -> InterleavedSample:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"index: expected an int >= 0, got {i!r}")
        idx = self.scene_indices(int(i))
        scenes = [self.scenes.scene(j) for j in idx]
        return InterleavedSample(torch.stack([s.image for s in scenes]), tuple(s.caption for s in scenes),
                                 tuple(s.names for s in scenes), idx, int(i))


def caption_ids(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Each caption's token ids on its own, without BOS/EOS (the ids ``pretrain`` gives it)."""
    return [list(enc.ids) for enc in tokenizer.hf.encode_batch(list(captions), add_special_tokens=False)]


def build_sequence(captions: Sequence[Sequence[int]], *, media_id: int, bos_id: int | None, eos_id: int | None) -> list[int]:
    """``[BOS] <image> c_1 <image> c_2 ... <image> c_t [EOS]`` from caption ids (BOS/EOS left out when None)."""
    ids = [] if bos_id is None else [bos_id]
    for c in captions:
        ids += [media_id, *c]
    return ids if eos_id is None else [*ids, eos_id]


def build_prompt(context: Sequence[Sequence[int]], *, media_id: int, bos_id: int | None) -> list[int]:
    """The prompt that asks for the caption of the last image: ``[BOS] <image> c_1 ... <image> c_k <image>``
    (``k = len(context)`` earlier scenes with their captions; ``k = 0``: ``[BOS] <image>``)."""
    return build_sequence(context, media_id=media_id, bos_id=bos_id, eos_id=None) + [media_id]


def sequence_labels(text: torch.Tensor, media_id: int, pad_id: int) -> torch.Tensor:
    """Targets ``(b, n)`` of ``text`` ``(b, n)``: ``labels[:, j] = text[:, j + 1]``, with media
    tokens, padding and the last column ``-100`` (never targets)."""
    labels = torch.full_like(text, IGNORE_INDEX)
    nxt = text[:, 1:]
    labels[:, :-1] = nxt.masked_fill((nxt == media_id) | (nxt == pad_id), IGNORE_INDEX)
    return labels


class InterleavedCollate:
    """Samples -> a batch ``{"images": (b, t_max, 3, H, W), "text": (b, n), "labels": (b, n)}``
    (see the module docstring); sequences over ``max_len`` tokens lose trailing scenes.

    ``tokenizer``: a ``mammut.data.tokenizer.Tokenizer`` with BOS, EOS and the media token.
    """

    def __init__(self, tokenizer: Any, media_id: int, max_len: int, *, truncate: bool = True) -> None:
        for what, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)):
            if value is None:
                raise ValueError(f"data.tokenizer: expected a tokenizer with a {what} token for interleaved sequences, got none")
        self.tokenizer, self.media_id, self.max_len, self.truncate = tokenizer, int(media_id), int(max_len), truncate
        self.dropped_scenes = 0  # trailing scenes dropped to fit max_len (this process)
        self._shortened = 0  # sequences shortened (the first few are logged as warnings)
        if self.max_len < 4:
            raise ValueError(f"data.max_len: expected >= 4 tokens ([BOS] <image> a word [EOS]), got {max_len}")

    def fit(self, sample: InterleavedSample) -> tuple[list[int], int]:
        """The sequence's ids within ``max_len`` and how many of its scenes they hold."""
        tok = self.tokenizer
        caps = caption_ids(tok, sample.captions)
        t = len(caps)
        ids = build_sequence(caps, media_id=self.media_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
        while len(ids) > self.max_len and t > 1:
            t -= 1
            ids = build_sequence(caps[:t], media_id=self.media_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
        if len(ids) > self.max_len:
            if not self.truncate:
                raise ValueError(f"data.max_len: sequence {sample.index} holds one scene of {len(ids)} tokens > "
                                 f"data.max_len={self.max_len} ({sample.captions[0]!r}); raise data.max_len or set "
                                 f"data.truncate: true")
            ids = [*ids[: self.max_len - 1], tok.eos_id]
        if t < len(caps):
            self.dropped_scenes += len(caps) - t
            self._shortened += 1
            level = logging.WARNING if self._shortened <= 5 else logging.DEBUG
            log.log(level, "sequence %d: kept %d of %d scenes to fit data.max_len=%d tokens; %d scenes dropped so far",
                    sample.index, t, len(caps), self.max_len, self.dropped_scenes)
        return ids, t

    def __call__(self, samples: Sequence[InterleavedSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("samples: expected at least one sequence, got none")
        fitted = [self.fit(s) for s in samples]
        n = max(len(ids) for ids, _ in fitted)
        t_max = max(t for _, t in fitted)
        pad = self.tokenizer.pad_id
        text = torch.full((len(samples), n), pad, dtype=torch.long)
        images = samples[0].images.new_zeros((len(samples), t_max, *samples[0].images.shape[1:]))
        for row, (s, (ids, t)) in enumerate(zip(samples, fitted)):
            text[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            images[row, :t] = s.images[:t]
        return {"images": images, "text": text, "labels": sequence_labels(text, self.media_id, pad)}
