"""Questions about moving-emoji clips (:mod:`mammut.data.moving_emoji`), for VideoQA: a
deterministic, balanced, unbounded question set over a :class:`~mammut.data.moving_emoji.MovingEmoji`
split, each answer read off the clip's script (its events).

Question types (``QUESTION_TYPES``): ``direction`` ("which way does the cat move?" -> left /
right / up / down), ``order`` ("does the cat move first?" -> yes / no), ``event`` ("does the dog
appear or disappear?" -> appears / disappears) and ``exists`` ("is there a cat?" -> yes / no,
the one type a single frame answers). Answers are balanced by cycling. ``MOTION_TYPES``: the
motion questions of the proof (``benchmarks/video_motion.py``).

A clip played backwards (:meth:`MovingEmoji.reverse`) has the same frames, so an answer (or a
caption) that changes under time reversal cannot be read from any single frame:
:func:`single_frame_share` measures that share; :func:`answer_to` answers a question about
another clip (its reversal, say).

Question ``i`` of a split is a pure function of ``(seed, split, i, attempt)`` and the clips'
settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .moving_emoji import DIRECTIONS, HELDOUT_SEED, OPPOSITE, Clip, MovingEmoji

__all__ = ["QUESTION_TYPES", "MOTION_TYPES", "VideoQuestion", "VideoQuestions", "answer_to", "heldout_questions",
           "single_frame_share", "video_question_texts"]

QUESTION_TYPES: tuple[str, ...] = ("direction", "order", "event", "exists")
MOTION_TYPES: tuple[str, ...] = ("direction",)  # the motion questions of the proof (benchmarks/video_motion.py)
_SPLIT_CODE = {"train": 0, "heldout": 1}  # as the clips': a question stream is what it always was
_QUESTION_SALT = 0x7A5C_0E
_MAX_TRIES = 256  # clips tried per question before giving up


@dataclass(frozen=True)
class VideoQuestion:
    """One question about a clip: its text (ending in "?"), exact answer and type."""

    clip: Clip
    question: str
    answer: str
    qtype: str
    index: int

    @property
    def frames(self) -> torch.Tensor:
        return self.clip.frames


def _ask(clip: Clip, qtype: str, cycle: int, names: Sequence[str], rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of type ``qtype`` about ``clip`` for balance slot ``cycle``, or None."""
    ev = clip.events
    if qtype == "direction":  # an emoji that moves in exactly one direction
        movers: dict[str, str] = {}
        for e in ev:
            if e.direction is None:
                continue
            movers.setdefault(e.actor, e.direction)
            if movers[e.actor] != e.direction:
                movers[e.actor] = ""
            if e.verb == "swap" and e.other is not None:
                movers[e.other] = OPPOSITE[e.direction]
        want = DIRECTIONS[cycle % 4]
        who = [a for a, d in movers.items() if d == want]
        if not who:
            return None
        return f"which way does the {who[int(rng.integers(len(who)))]} move?", want
    if qtype == "order":  # two events: "does the X <verb> first?"
        if len(ev) != 2:
            return None
        yes = cycle % 2 == 0
        e = ev[0] if yes else ev[1]
        verb = {"moves": "move", "appears": "appear", "disappears": "disappear"}[e.verb]
        if ev[0].actor == ev[1].actor and ev[0].verb == ev[1].verb:
            return None  # "does the cat move first?" is ambiguous for move_move
        return f"does the {e.actor} {verb} first?", "yes" if yes else "no"
    if qtype == "event":  # appears or disappears
        want = ("appears", "disappears")[cycle % 2]
        who = [e.actor for e in ev if e.verb == want]
        if not who:
            return None
        return f"does the {who[0]} appear or disappear?", want
    if qtype == "exists":
        if cycle % 2 == 0:
            return f"is there a {clip.names[int(rng.integers(len(clip.names)))]}?", "yes"
        absent = [n for n in names if n not in clip.names]
        return f"is there a {absent[int(rng.integers(len(absent)))]}?", "no"
    raise ValueError(f"qtype: expected one of {QUESTION_TYPES}, got {qtype!r}")


class VideoQuestions:
    """Balanced questions over a :class:`MovingEmoji` split; ``qs[i]`` -> :class:`VideoQuestion`.

    Question ``i`` has type ``types[i % T]`` and a balanced answer that cycles with ``i // T``;
    its clip is the first of a seeded stream of clip indices that fits (``attempt`` starts
    another stream, for a caller that must replace a question)."""

    def __init__(self, clips: MovingEmoji, seed: int = 0, types: Sequence[str] = QUESTION_TYPES) -> None:
        types = tuple(types)
        unknown = [t for t in types if t not in QUESTION_TYPES]
        if not types or unknown:
            raise ValueError(f"types: expected a non-empty subset of {QUESTION_TYPES}, got {types!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.clips, self.seed, self.types = clips, int(seed), types

    @property
    def split(self) -> str:
        return self.clips.split

    def sample(self, i: int, attempt: int = 0) -> VideoQuestion:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"index: expected an int >= 0, got {i!r}")
        i = int(i)
        qtype, cycle = self.types[i % len(self.types)], i // len(self.types)
        rng = np.random.default_rng([self.seed, _QUESTION_SALT, _SPLIT_CODE[self.split], i, attempt])
        for _ in range(_MAX_TRIES):
            clip = self.clips.clip(int(rng.integers(0, 2**62)))
            qa = _ask(clip, qtype, cycle, self.clips.names, rng)
            if qa is not None:
                return VideoQuestion(clip, qa[0], qa[1], qtype, i)
        raise RuntimeError(f"question {i} ({qtype}): no fitting clip in {_MAX_TRIES} tries (clip kinds too narrow?)")

    __getitem__ = sample

    def reversed_answer(self, q: VideoQuestion) -> str | None:
        """The answer to the same question about the clip played backwards (None: not askable)."""
        back = self.clips.reverse(q.clip)
        return answer_to(back, q)


def answer_to(clip: Clip, q: VideoQuestion) -> str | None:
    """The answer ``clip`` gives to ``q``'s question text (the same question, another clip)."""
    if q.qtype == "direction":
        name = q.question[len("which way does the "):-len(" move?")]
        dirs = {e.direction for e in clip.events if e.actor == name and e.direction}
        dirs |= {OPPOSITE[e.direction] for e in clip.events if e.verb == "swap" and e.other == name and e.direction}
        return dirs.pop() if len(dirs) == 1 else None
    if q.qtype == "order":
        name, verb = q.question[len("does the "):-len(" first?")].rsplit(" ", 1)
        first = clip.events[0]
        return "yes" if first.actor == name and first.verb == verb + "s" else "no"
    if q.qtype == "event":
        name = q.question[len("does the "):-len(" appear or disappear?")]
        verbs = [e.verb for e in clip.events if e.actor == name and e.verb in ("appears", "disappears")]
        return verbs[0] if verbs else None
    if q.qtype == "exists":
        name = q.question[len("is there a "):-1]
        return "yes" if name in clip.names else "no"
    raise ValueError(f"qtype: expected one of {QUESTION_TYPES}, got {q.qtype!r}")


# ----------------------------------------------------------------------------- shared helpers


def heldout_questions(n: int = 256, *, frames: int = 8, image_size: int = 64, num_emoji: int | None = 300,
                      vocab_seed: int = 0, types: Sequence[str] = QUESTION_TYPES) -> list[VideoQuestion]:
    """The first ``n`` held-out questions (a fixed seed), cycling through ``types``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    ds = MovingEmoji(image_size, frames, num_emoji, "heldout", HELDOUT_SEED, vocab_seed=vocab_seed)
    qs = VideoQuestions(ds, HELDOUT_SEED, types)
    return [qs.sample(i) for i in range(n)]


def single_frame_share(ds: MovingEmoji, n: int = 512, *, questions: bool = False) -> float:
    """Share of the first ``n`` captions (or questions) whose caption (answer) changes when the
    clip is played backwards. A clip and its reverse hold exactly the same frames, so none of
    these can be read from any single frame (nor from the unordered set of frames)."""
    if questions:
        qs = VideoQuestions(ds, HELDOUT_SEED)
        items = [qs.sample(i) for i in range(n)]
        return sum(qs.reversed_answer(q) != q.answer for q in items) / n
    return sum(ds.reverse(c).caption != c.caption for c in (ds.clip(i) for i in range(n))) / n


def video_question_texts(names: Sequence[str]) -> list[str]:
    """Question prompts and answers to train a BPE on, without rendering."""
    texts = ["answer:", "yes", "no", "appears", "disappears", *DIRECTIONS]
    for name in names:
        texts += [f"which way does the {name} move?", f"does the {name} appear or disappear?",
                  f"is there a {name}?", *(f"does the {name} {v} first?" for v in ("move", "appear", "disappear"))]
    return texts
