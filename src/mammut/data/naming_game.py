"""The naming game: interleaved emoji sequences whose last caption needs the earlier ones.

Legend: ``k`` example pairs (shots) in a sequence, ``d`` distinct emoji named in it, ``t = k + 1``
scenes (media), ``H``/``W`` pixels.

Every sequence draws its own made-up names for ``d`` emoji (``d`` in ``1..3``): a name is two
syllables of :data:`SYLLABLES` joined by a hyphen (``"ki-mo"``). The byte-level BPE splits a
word at the hyphen, so every name is always the same three pieces (``" ki"``, ``"-"``, ``"mo"``)
whatever merges the tokenizer learned: a name never seen in training is written with pieces
seen in training. ``k`` single-emoji example scenes show the named emoji (every one at least
once), each captioned ``"a <name>"``; the query (last) scene holds one or two of them, captioned
as the emoji scenes are (``"a ki-mo left of a zo-ta"``), with the names in place of the emoji's
English names. The names are fresh per sequence, so the same query scene has different right
captions in different sequences: only the examples tell which name is right.

Held out for evaluation (split ``"heldout"``): names (:func:`name_split`: a fixed eighth of
the 576 syllable pairs; training sequences never use them) and emoji (:func:`emoji_split`: a
fixed fifth of the ``data.num_emoji`` vocabulary; training sequences never show them). Scene
placement and backgrounds come from a per-sequence random stream of ``(seed, split, i)``.

Accuracy (:func:`names_right`): the made-up names found in the generated caption, in order, equal
the query's names. Chance (:func:`guess_chance`): guessing uniformly among the ``d`` names the
context defines (``1/d`` for a one-emoji query, ``1/(d(d-1))`` for two); with ``k = 0`` no name
is defined and the names are unseen words: chance 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .interleaved import InterleavedSample
from .scenes import EmojiScenes, make_caption

__all__ = ["SYLLABLES", "all_names", "name_split", "emoji_split", "NamingSource", "find_names", "names_right",
           "guess_chance", "naming_corpus", "render"]

SYLLABLES: tuple[str, ...] = ("ba", "be", "di", "do", "fa", "fu", "ga", "ki", "ko", "lu", "me", "mi", "ni", "no", "pa",
                              "po", "ra", "ru", "su", "ti", "to", "vo", "ze", "zu")
_NAME_RE = re.compile(r"\b(?:%s)-(?:%s)\b" % ("|".join(SYLLABLES), "|".join(SYLLABLES)))
_SALT = {"train": 11, "heldout": 12}
_EMOJI_SEED = 0x4E414D45  # fixes the held-out emoji of the game


def all_names() -> list[str]:
    """Every made-up name: ``"<s1>-<s2>"`` for the 576 ordered syllable pairs."""
    return [f"{a}-{b}" for a in SYLLABLES for b in SYLLABLES]


def name_split(split: str) -> list[str]:
    """The names of ``split``: ``"heldout"`` a fixed eighth (pair ``(i, j)`` with
    ``(i + 5 j) % 8 == 0``; every syllable stays in both positions in training), ``"train"`` the rest."""
    _check_split(split)
    n = len(SYLLABLES)
    held = [(i + 5 * j) % 8 == 0 for i in range(n) for j in range(n)]
    return [name for name, h in zip(all_names(), held) if h == (split == "heldout")]


def emoji_split(num_emoji: int, split: str) -> list[int]:
    """Emoji ids of the game's ``split``: ``"heldout"`` a fixed fifth of ``0..num_emoji-1`` (at
    least 3, so a held-out sequence can name 3), ``"train"`` the rest."""
    _check_split(split)
    if num_emoji < 6:
        raise ValueError(f"data.num_emoji: the naming game needs >= 6 emoji (3 held out), got {num_emoji}")
    perm = np.random.default_rng(_EMOJI_SEED).permutation(num_emoji)
    n_held = max(3, num_emoji // 5)
    ids = perm[:n_held] if split == "heldout" else perm[n_held:]
    return sorted(int(i) for i in ids)


def _check_split(split: str) -> None:
    if split not in _SALT:
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")


def render(scenes: EmojiScenes, emoji_ids: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """A scene ``(3, H, W)`` in [0, 1] of the given emoji (1..3, placed and backed as
    :class:`EmojiScenes` places them) and the relations of object ``j`` to ``j + 1``."""
    boxes, relations = scenes._place(rng, len(emoji_ids))
    return scenes.draw(rng, emoji_ids, boxes), relations


class NamingSource:
    """Sequence index -> naming-game :class:`~mammut.data.interleaved.InterleavedSample` (see the
    module docstring); ``captions`` / ``names`` hold the made-up names, ``scene_indices`` the
    emoji ids of each scene.

    ``scenes``: an :class:`EmojiScenes` (its vocabulary, image size and placement; its split is
    not used: ``split`` picks the names and emoji); ``max_media``: the most scenes (``T``; the
    most examples ``T - 1``); ``shots``: a fixed example count ``k`` (None: uniform in
    ``1..T-1``); ``distinct``: the emoji named (None: uniform in ``2..min(3, k)``, 1 for ``k <= 1``; at ``k = 0``
    one emoji, named but never shown); ``max_query_objects``: 1 or 2 emoji in the query; ``names``: the name split
    when it is not ``split`` (a diagnostic: training names on held-out emoji).
    """

    def __init__(self, scenes: EmojiScenes, max_media: int, seed: int, *, split: str = "train",
                 shots: int | None = None, distinct: int | None = None, max_query_objects: int = 2,
                 names: str | None = None) -> None:
        _check_split(split)
        if isinstance(max_media, bool) or not isinstance(max_media, int) or max_media < 2:
            raise ValueError(f"model.num_time_embeds: the naming game needs >= 2 scenes per sequence, got {max_media!r}")
        if shots is not None and not 0 <= shots <= max_media - 1:
            raise ValueError(f"shots: expected an int in [0, {max_media - 1}] (model.num_time_embeds - 1), got {shots!r}")
        if distinct is not None and not 1 <= distinct <= max(1, min(3, shots if shots is not None else 3)):
            raise ValueError(f"distinct: expected an int in [1, min(3, shots)], got {distinct!r}")
        if max_query_objects not in (1, 2):
            raise ValueError(f"max_query_objects: expected 1 or 2, got {max_query_objects!r}")
        self.scenes, self.max_media, self.seed, self.split = scenes, max_media, int(seed), split
        self.shots, self.distinct, self.max_query_objects = shots, distinct, max_query_objects
        self.names = name_split(split if names is None else names)
        self.emoji = emoji_split(scenes.num_emoji, split)
        self.class_names = scenes.class_names()

    def __call__(self, i: int) -> InterleavedSample:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"index: expected an int >= 0, got {i!r}")
        rng = np.random.default_rng((self.seed, _SALT[self.split], int(i)))
        k = self.shots if self.shots is not None else int(rng.integers(1, self.max_media))
        d = self.distinct if self.distinct is not None else (1 if k <= 1 else int(rng.integers(2, min(3, k) + 1)))
        emoji = [self.emoji[j] for j in rng.choice(len(self.emoji), size=d, replace=False)]
        names = [self.names[j] for j in rng.choice(len(self.names), size=d, replace=False)]
        shown = list(range(d))[:k] + [int(x) for x in rng.integers(0, d, size=max(0, k - d))]
        shown = [shown[j] for j in rng.permutation(k)]
        images, captions, scene_names, ids = [], [], [], []
        for j in shown:
            img, _ = render(self.scenes, [emoji[j]], rng)
            images.append(img)
            captions.append(make_caption([names[j]], []))
            scene_names.append((names[j],))
            ids.append(emoji[j])
        pool = sorted(set(shown)) if k else [0]
        n_obj = 2 if (len(pool) >= 2 and self.max_query_objects == 2 and rng.random() < 0.5) else 1
        q = [pool[j] for j in rng.choice(len(pool), size=n_obj, replace=False)]
        img, relations = render(self.scenes, [emoji[j] for j in q], rng)
        images.append(img)
        captions.append(make_caption([names[j] for j in q], relations))
        scene_names.append(tuple(names[j] for j in q))
        ids.append(emoji[q[0]])  # the query: its first emoji
        return InterleavedSample(torch.stack(images), tuple(captions), tuple(scene_names), tuple(ids), int(i))


def find_names(text: str) -> list[str]:
    """The made-up names in ``text``, in order."""
    return _NAME_RE.findall(text.lower())


def names_right(generated: str, truth: Sequence[str]) -> bool:
    """The generated caption's made-up names, in order, are exactly ``truth``."""
    return find_names(generated) == list(truth)


def guess_chance(sample: InterleavedSample) -> float:
    """The accuracy of guessing the query's names uniformly among the distinct names the
    examples define (0 without examples or when the query's names are not all among them)."""
    defined = {n for names in sample.names[:-1] for n in names}
    want = sample.names[-1]
    if not defined or not set(want) <= defined:
        return 0.0
    d = len(defined)
    if len(want) == 1:
        return 1.0 / d
    return 1.0 / (d * (d - 1))


def naming_corpus(repeats: int = 4) -> list[str]:
    """Captions with the training names, for the run's BPE (the held-out names are left out;
    they are written with the same pieces anyway)."""
    names = name_split("train")
    return [make_caption([n], []) for n in names] * repeats


def describe(sample: InterleavedSample) -> dict[str, Any]:
    """A JSON-able view of a sequence: its captions and the query's names."""
    return {"index": sample.index, "captions": list(sample.captions), "query_names": list(sample.names[-1])}
