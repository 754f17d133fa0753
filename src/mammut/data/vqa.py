"""Questions with exact answers about emoji scenes, balanced so that a guess from the text alone is weak.

VQA lives in three layers, each its own concern: this module makes the emoji-scene questions
(data, no model) and their prompt / answer token ids (:class:`VqaEncoder`); :mod:`mammut.tasks.vqa` trains and scores a run on them (``train.task: vqa``);
:mod:`mammut.eval.vqa` is the VQAv2 scoring rule both use plus the ``mammut eval vqa`` benchmark
on VQAv2 files (its command-line options: :mod:`mammut.eval.benchmarks.vqa`).

Question types (``QUESTION_TYPES``), each answer read off the scene's metadata:

- ``exists``: "is there a {name}?" -> "yes" / "no". Yes and no alternate (exactly 50/50);
  a "no" names an emoji drawn uniformly from those *not* in the scene, a "yes" one of the
  scene's own (scenes draw their emoji uniformly, so the name says nothing about the answer).
- ``count``: "how many emoji are there?" -> "1" .. "3". The target count cycles through
  ``min_objects .. max_objects`` (exactly balanced); a scene with that many emoji is picked.
- ``relation``: "what is {left of|right of|above|below} the {name}?" -> the one emoji in that
  relation to it (relations from the boxes, ``relation_from_boxes``; asked only when exactly
  one emoji of the scene stands in it). The relation cycles through the four.
- ``spatial``: "is the {a} {relation} the {b}?" -> "yes" / "no"; a "no" asks the opposite of
  the true relation (``left of`` <-> ``right of``, ``above`` <-> ``below``), so it is never
  ambiguous. Yes and no alternate, and the asked relation cycles through the four for both.

Sample ``i`` is a pure function of ``(seed, split, i)`` and the scene settings: its type is
``types[i % T]``, its balanced answer (or relation) cycles with ``i // T``, and its scene is
the first of a seeded stream of scene indices that fits (``attempt`` starts a different
stream, for a caller that must replace a sample, e.g. one too long for ``data.max_len``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .scenes import RELATIONS, EmojiScenes, Scene, relation_from_boxes

__all__ = ["QUESTION_TYPES", "OPPOSITE", "VqaSample", "EmojiQuestions", "question_texts", "ANSWER_PROMPT", "VqaEncoder"]

QUESTION_TYPES: tuple[str, ...] = ("exists", "count", "relation", "spatial")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ANSWER_PROMPT = "answer:"  # what ends every question prompt (the model answers after it)
_MULTI = ("relation", "spatial")  # types that need two emoji or more
_SALT = 0x5A17_0F_0A  # separates the question stream from the scene streams
_MAX_TRIES = 512  # scenes tried per sample before giving up (the odds of a miss are < 1e-30)


@dataclass(frozen=True)
class VqaSample:
    """One question: the scene (image ``(3, H, W)`` in [0, 1] and metadata), the question
    text (ending in ``"?"``), its exact answer and its type."""

    scene: Scene
    question: str
    answer: str
    qtype: str
    index: int  # the global sample index

    @property
    def image(self) -> torch.Tensor:
        return self.scene.image


def _relations(scene: Scene) -> dict[tuple[int, int], str]:
    """Relation of object ``a`` to object ``b`` for every ordered pair that has one."""
    out = {}
    for a, b in itertools.permutations(range(scene.n_objects), 2):
        rel = relation_from_boxes(scene.boxes[a], scene.boxes[b])
        if rel is not None:
            out[(a, b)] = rel
    return out


class EmojiQuestions:
    """Balanced questions over an :class:`EmojiScenes` split; ``qs[i]`` -> :class:`VqaSample`.

    Args:
        scenes: the scenes to ask about (their ``split`` is the questions' split).
        seed: seed of the question stream (the run's ``train.seed``; held-out: a fixed one).
        types: question types to ask, cycled in this order (default all of ``QUESTION_TYPES``).
    """

    def __init__(self, scenes: EmojiScenes, seed: int = 0, types: Sequence[str] = QUESTION_TYPES) -> None:
        types = tuple(types)
        unknown = [t for t in types if t not in QUESTION_TYPES]
        if not types or unknown:
            raise ValueError(f"types: expected a non-empty subset of {QUESTION_TYPES}, got {types!r}")
        if scenes.max_objects < 2 and any(t in _MULTI for t in types):
            raise ValueError(f"data.max_objects: question types {[t for t in types if t in _MULTI]} need scenes with "
                             f"2 or more emoji, expected max_objects >= 2, got {scenes.max_objects}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.scenes, self.seed, self.types = scenes, int(seed), types
        self.names = scenes.class_names()
        self.counts = tuple(range(scenes.min_objects, scenes.max_objects + 1))

    @property
    def split(self) -> str:
        return self.scenes.split

    def sample(self, i: int, attempt: int = 0) -> VqaSample:
        """Question ``i`` (``attempt > 0``: a replacement drawn from another scene stream)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"index: expected an int >= 0, got {i!r}")
        i, t = int(i), len(self.types)
        qtype, cycle = self.types[i % t], i // t
        rng = np.random.default_rng([self.seed, _SALT, i, attempt])
        ask = getattr(self, f"_{qtype}")
        for _ in range(_MAX_TRIES):
            scene = self.scenes.scene(int(rng.integers(0, 2**62)))
            qa = ask(scene, cycle, rng)
            if qa is not None:
                return VqaSample(scene, qa[0], qa[1], qtype, i)
        raise RuntimeError(f"question {i} ({qtype}): no fitting scene in {_MAX_TRIES} tries "
                           f"(data.min_objects / data.max_objects too narrow?)")

    __getitem__ = sample

    # each returns (question, answer), or None when the scene does not fit
    def _exists(self, scene: Scene, cycle: int, rng: np.random.Generator) -> tuple[str, str] | None:
        if cycle % 2 == 0:
            name = scene.names[int(rng.integers(scene.n_objects))]
            return f"is there a {name}?", "yes"
        absent = [j for j in range(len(self.names)) if j not in scene.emoji_ids]
        if not absent:
            return None
        return f"is there a {self.names[absent[int(rng.integers(len(absent)))]]}?", "no"

    def _count(self, scene: Scene, cycle: int, rng: np.random.Generator) -> tuple[str, str] | None:
        if scene.n_objects != self.counts[cycle % len(self.counts)]:
            return None
        return "how many emoji are there?", str(scene.n_objects)

    def _relation(self, scene: Scene, cycle: int, rng: np.random.Generator) -> tuple[str, str] | None:
        rel = RELATIONS[cycle % len(RELATIONS)]
        pairs = _relations(scene)
        # anchors b with exactly one object a such that "a rel b"
        anchors = [b for b in range(scene.n_objects) if sum(1 for (a, bb), r in pairs.items() if bb == b and r == rel) == 1]
        if not anchors:
            return None
        b = anchors[int(rng.integers(len(anchors)))]
        a = next(a for (a, bb), r in pairs.items() if bb == b and r == rel)
        return f"what is {rel} the {scene.names[b]}?", scene.names[a]

    def _spatial(self, scene: Scene, cycle: int, rng: np.random.Generator) -> tuple[str, str] | None:
        yes = cycle % 2 == 0
        asked = RELATIONS[(cycle // 2) % len(RELATIONS)]
        true = asked if yes else OPPOSITE[asked]
        pairs = sorted(p for p, r in _relations(scene).items() if r == true)
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"is the {scene.names[a]} {asked} the {scene.names[b]}?", "yes" if yes else "no"


def question_texts(names: Sequence[str], pairs: int = 2000, seed: int = 0) -> list[str]:
    """Question prompts and answers to train a BPE on, without rendering: every question form
    over every name (and over random name pairs), the answers and :data:`ANSWER_PROMPT`."""
    rng = np.random.default_rng(seed)
    texts = ["how many emoji are there?", ANSWER_PROMPT, "yes", "no", *(str(k) for k in range(1, 4))]
    for name in names:
        texts += [f"is there a {name}?", *(f"what is {rel} the {name}?" for rel in RELATIONS), name]
    if len(names) > 1:
        for _ in range(pairs):
            a, b = rng.choice(len(names), size=2, replace=False)
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            texts.append(f"is the {names[a]} {rel} the {names[b]}? {ANSWER_PROMPT}")
    return texts


class VqaEncoder:
    """Token ids of a prompt (``BOS [<image>] question "answer:"``) and of an answer (``answer EOS``),
    with a run's tokenizer (``bos_id``, ``eos_id``, ``hf``); ``media_id``: the media token a media
    model (FlamingoPaLM) reads right after BOS, else None. Training (``mammut.tasks.vqa``) and the
    evaluation of a VQA run (``mammut.eval.model_source``) build their prompts with it."""

    def __init__(self, tokenizer: Any, media_id: int | None = None) -> None:
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise ValueError("data.tokenizer: the vqa task needs a tokenizer with bos and eos tokens, got one without")
        self.tokenizer, self.media_id, self.suffix = tokenizer, media_id, f" {ANSWER_PROMPT}"

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.hf.encode(text, add_special_tokens=False).ids)

    def prompt(self, question: str) -> list[int]:
        media = [self.media_id] if self.media_id is not None else []
        return [self.tokenizer.bos_id, *media, *self._ids(question + self.suffix)]

    def answer(self, answer: str) -> list[int]:
        return [*self._ids(answer), self.tokenizer.eos_id]
