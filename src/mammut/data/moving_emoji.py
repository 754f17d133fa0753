"""Moving emoji: a deterministic, unbounded video-caption dataset that ships with the package.

Each clip is ``t`` frames ``(t, 3, H, W)`` in [0, 1] of one or two emoji (the sprites, vocabulary
and held-out emoji pairs of :class:`mammut.data.scenes.EmojiScenes`) on a plain background,
with a caption made of verbs in order, e.g. ``"a cat moves left, then a dog appears"``.

Clip kinds (``KINDS``), each a script of one or two events over normalised time ``u`` in [0, 1]
(frame ``f`` is at ``u = f / (t - 1)``; two events split the clip at ``u = 0.5``):

- ``move``: "a cat moves left" (one emoji, the whole clip);
- ``appear`` / ``disappear``: "a cat appears" / "a cat disappears" (at a time between frames);
- ``swap``: "a cat and a dog swap places" (both move, in opposite directions);
- ``pass``: "a cat moves up past a dog" (the other one stays);
- ``move_move``: "a cat moves left, then moves up";
- ``move_appear``: "a cat moves left, then a dog appears";
- ``appear_move``: "a cat appears, then moves down";
- ``move_disappear``: "a cat moves right, then disappears".

**Single frames say nothing about motion.** Every emoji's position at the middle frame
(``t // 2``) is drawn first, uniformly in a box that leaves room for any direction, and the
path is laid out around it, so the middle frame is independent of every direction in the
clip; appear / disappear times are drawn symmetrically around the middle. More generally a
clip played backwards (:meth:`MovingEmoji.reverse`, exactly ``frames.flip(0)``) has the same
frames, so any caption or answer that changes under time reversal cannot be read from any
single frame (nor from the set of frames):
:func:`mammut.data.video_questions.single_frame_share` measures that share.

**Held out for evaluation** (split ``"heldout"``): the emoji pairs ``EmojiScenes`` holds out
(``is_heldout_pair``) in two-emoji clips, and a fixed quarter of the two-event motion
combinations (e.g. "moves left, then moves up"; ``heldout_combination``); the ``"train"`` split
never shows either. One-emoji, one-event clips use the same vocabulary in both splits (from
different random streams), as the emoji scenes do.

Questions about the clips, for VideoQA, are :mod:`mammut.data.video_questions`'s.

Clip ``i`` is a pure function of ``(seed, split, i)`` and the settings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .scenes import EmojiScenes

__all__ = ["DIRECTIONS", "KINDS", "Event", "Clip", "MovingEmoji", "heldout_combination", "HELDOUT_COMBINATIONS",
           "heldout_clips", "motion_variants", "caption_texts", "HELDOUT_SEED"]

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image coordinates
KINDS: tuple[str, ...] = ("move", "appear", "disappear", "swap", "pass", "move_move", "move_appear", "appear_move",
                          "move_disappear")
_KIND_WEIGHTS = (3, 1, 1, 1, 2, 2, 1, 1, 1)  # move-heavy: directions are what a video model must learn
_TWO_EMOJI = ("swap", "pass", "move_appear")
HELDOUT_SEED = 0  # held-out clips and questions: the same for every run
_SPLIT_CODE = {"train": 0, "heldout": 1}
_CLIP_SALT = 0x0C11_9E
_COMBO_SALT = 0x00C0_4B0
_MAX_TRIES = 256
_TWIN_SPARE = 1 << 48  # twin_clip: clips that replace a reversal with the same caption


@dataclass(frozen=True)
class Event:
    """One event of a clip: ``verb`` ("moves", "appears", "disappears", "swap", "passes") by
    emoji ``actor`` (a name), with a ``direction`` for motion and the ``other`` emoji (swap, pass)."""

    verb: str
    actor: str
    direction: str | None = None
    other: str | None = None

    def reversed(self) -> "Event":
        """The event played backwards."""
        verb = {"appears": "disappears", "disappears": "appears"}.get(self.verb, self.verb)
        direction = OPPOSITE[self.direction] if self.direction is not None else None
        return Event(verb, self.actor, direction, self.other)

    @property
    def signature(self) -> str:
        """What it does, without who: "moves left", "appears", ..."""
        return f"{self.verb} {self.direction}" if self.direction else self.verb


def caption_of(events: Sequence[Event]) -> str:
    """The caption of events in order, e.g. "a cat moves left, then a dog appears"."""
    parts = []
    for j, ev in enumerate(events):
        if ev.verb == "swap":
            parts.append(f"a {ev.actor} and a {ev.other} swap places")
            continue
        same = j > 0 and events[j - 1].actor == ev.actor and events[j - 1].verb != "swap"
        who = "" if same else f"a {ev.actor} "
        what = ev.verb + (f" {ev.direction}" if ev.direction else "")
        if ev.verb == "passes":
            what = f"moves {ev.direction} past a {ev.other}"
        parts.append(who + what)
    return ", then ".join(parts)


def _combo_hash(first: str, second: str) -> float:
    """A fixed number in [0, 1) per ordered combination (FNV-1a of its text)."""
    h = 0xCBF29CE484222325 ^ _COMBO_SALT
    for byte in f"{first}|{second}".encode():
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return h / float(1 << 64)


def _combinations() -> dict[str, list[tuple[str, str]]]:
    """The ordered two-event combinations (signatures) of each two-event kind."""
    return {
        "move_move": [(f"moves {a}", f"moves {b}") for a, b in itertools.permutations(DIRECTIONS, 2)],
        "move_appear": [(f"moves {d}", "appears") for d in DIRECTIONS],
        "appear_move": [("appears", f"moves {d}") for d in DIRECTIONS],
        "move_disappear": [(f"moves {d}", "disappears") for d in DIRECTIONS],
    }


def _reverse_combination(combo: tuple[str, str]) -> tuple[str, str]:
    """The combination played backwards: ("moves left", "appears") -> ("disappears", "moves right")."""
    return Event(*_parse(combo[1])).reversed().signature, Event(*_parse(combo[0])).reversed().signature


def _parse(signature: str) -> tuple[str, str, str | None]:
    verb, _, direction = signature.partition(" ")
    return verb, "", direction or None


def _heldout_combinations() -> frozenset[tuple[str, str]]:
    """A quarter of each two-event kind's combinations (at least one), by a fixed hash; closed
    under time reversal (a held-out combination played backwards is held out too), so a training
    clip played backwards never shows a held-out combination."""
    held: set[tuple[str, str]] = set()
    for combos in _combinations().values():
        for c in sorted(combos, key=lambda c: _combo_hash(*c)):
            if sum(x in held for x in combos) >= max(1, len(combos) // 4):
                break
            if c not in held:
                held |= {c, _reverse_combination(c)}
    return frozenset(held)


HELDOUT_COMBINATIONS = _heldout_combinations()


def heldout_combination(first: str, second: str) -> bool:
    """Whether the ordered two-event combination (signatures, e.g. "moves left", "appears") is
    held out for evaluation: a quarter of each two-event kind's combinations, by a fixed hash."""
    return (first, second) in HELDOUT_COMBINATIONS


@dataclass(frozen=True)
class Track:
    """One emoji's path: positions (top-left x, y) at ``u`` = 0, 0.5, 1 (piecewise linear) and
    the time interval ``[on, off)`` it is visible in."""

    eid: int
    size: int
    keys: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    on: float = -1.0
    off: float = 2.0

    def at(self, u: float) -> tuple[float, float] | None:
        if not self.on <= u < self.off:
            return None
        (x0, y0), (x1, y1), (x2, y2) = self.keys
        if u <= 0.5:
            a = u / 0.5
            return x0 + a * (x1 - x0), y0 + a * (y1 - y0)
        a = (u - 0.5) / 0.5
        return x1 + a * (x2 - x1), y1 + a * (y2 - y1)

    def reversed(self) -> "Track":
        return Track(self.eid, self.size, self.keys[::-1], 1.0 - self.off, 1.0 - self.on)


@dataclass(frozen=True)
class Clip:
    """One generated clip. ``names`` / ``emoji_ids``: the main actor first."""

    frames: torch.Tensor  # (t, 3, H, W) float32 in [0, 1]
    caption: str
    kind: str
    names: tuple[str, ...]
    emoji_ids: tuple[int, ...]
    events: tuple[Event, ...]
    index: int
    split: str
    tracks: tuple[Track, ...] = ()
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def video_id(self) -> str:
        return f"moving-emoji-{self.split}-{self.index:06d}"

    @property
    def middle_frame(self) -> torch.Tensor:
        """Frame ``t // 2`` ``(3, H, W)``: the single-frame baseline's input."""
        return self.frames[self.frames.shape[0] // 2]


class MovingEmoji:
    """Deterministic, unbounded moving-emoji clips; ``ds[i]`` -> :class:`Clip`.

    Args:
        image_size: frame side in pixels (>= 32).
        frames: frames per clip (4..64; 8-16 is the intended range).
        num_emoji / vocab_seed / heldout_fraction / asset_path: the emoji vocabulary and held-out
            pairs, as :class:`~mammut.data.scenes.EmojiScenes` (the same emoji for the same values).
        split: ``"train"`` or ``"heldout"``.
        seed: seed of the per-clip random stream.
        kinds: the clip kinds to draw (default all ``KINDS``, weighted towards motion).
    """

    def __init__(self, image_size: int = 64, frames: int = 8, num_emoji: int | None = 300, split: str = "train",
                 seed: int = 0, *, kinds: Sequence[str] = KINDS, vocab_seed: int = 0, heldout_fraction: float = 0.2,
                 asset_path: str | None = None) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size: expected an int >= 32, got {image_size!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 4 <= frames <= 64:
            raise ValueError(f"frames: expected an int in [4, 64], got {frames!r}")
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {kinds!r}")
        self.scenes = EmojiScenes(image_size, num_emoji, 2, split=split, seed=seed, vocab_seed=vocab_seed,
                                  heldout_fraction=heldout_fraction, asset_path=asset_path)
        self.image_size, self.frames, self.split, self.seed = image_size, frames, split, int(seed)
        self.kinds = kinds
        w = np.array([_KIND_WEIGHTS[KINDS.index(k)] for k in kinds], dtype=np.float64)
        self._kind_p = w / w.sum()
        self.names = self.scenes.class_names()
        self.size = max(8, round(image_size * 0.25))  # sprite side
        self.travel = round(image_size * 0.45)  # a whole-clip move; half of it per half-clip move
        held = split == "heldout"  # two-event kinds: each split's own combinations of signatures
        self._combos = {k: [c for c in v if heldout_combination(*c) == held] for k, v in _combinations().items()}

    # ---------------------------------------------------------------- vocabulary
    @property
    def num_emoji(self) -> int:
        return self.scenes.num_emoji

    def class_names(self) -> list[str]:
        return list(self.names)

    # ---------------------------------------------------------------- generation
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], _CLIP_SALT, index])

    def _pair(self, rng: np.random.Generator) -> tuple[int, int]:
        pairs = self.scenes._pairs  # this split's unordered emoji pairs (held-out pairs only in "heldout")
        a, b = (int(x) for x in pairs[rng.integers(len(pairs))])
        return (a, b) if rng.random() < 0.5 else (b, a)

    def _combo(self, rng: np.random.Generator, kind: str) -> tuple[str | None, str | None]:
        """This split's directions ``(first, second)`` for a two-event kind (None: no motion)."""
        combos = self._combos[kind]
        first, second = combos[int(rng.integers(len(combos)))]
        return (first[6:] if first.startswith("moves ") else None, second[6:] if second.startswith("moves ") else None)

    def _mid_box(self, rng: np.random.Generator, margin: int) -> tuple[float, float]:
        """A middle-frame position with ``margin`` pixels of room on every side (any direction fits)."""
        lo, hi = margin, self.image_size - self.size - margin
        return float(rng.integers(lo, hi + 1)), float(rng.integers(lo, hi + 1))

    def _path(self, mid: tuple[float, float], d1: str | None, d2: str | None, dist: float) -> tuple[Any, Any, Any]:
        """Keys at u = 0, 0.5, 1 for moves ``d1`` (first half) and ``d2`` (second half) of ``dist``
        each, positioned so that the middle frame (``t // 2``, at u_m) is at ``mid``."""
        um = (self.frames // 2) / (self.frames - 1)
        v1 = np.array(_STEP[d1]) * dist if d1 else np.zeros(2)
        v2 = np.array(_STEP[d2]) * dist if d2 else np.zeros(2)
        k1 = np.array(mid) - v2 * (um - 0.5) / 0.5  # the middle frame lies just past u = 0.5
        return tuple(k1 - v1), tuple(k1), tuple(k1 + v2)  # type: ignore[return-value]

    def _switch_time(self, rng: np.random.Generator, lo: float, hi: float) -> float:
        """A time between two frames in ``[lo, hi]`` (never on a frame, so reversal is exact)."""
        t = self.frames
        slots = [(f + 0.5) / (t - 1) for f in range(t - 1) if lo <= (f + 0.5) / (t - 1) <= hi]
        return slots[int(rng.integers(len(slots)))]

    def _symmetric_switch(self, rng: np.random.Generator) -> float:
        """Appear / disappear time of a one-event clip: as likely before the middle frame as after."""
        t = self.frames
        m = t // 2
        before = [(f + 0.5) / (t - 1) for f in range(0 if t < 8 else 1, m)]  # visible at the middle if it appears
        after = [(f + 0.5) / (t - 1) for f in range(m, t - 1 if t < 8 else t - 2)]
        k = min(len(before), len(after))
        side = before[-k:] if rng.random() < 0.5 else after[:k]
        return side[int(rng.integers(len(side)))]

    def _script(self, rng: np.random.Generator, kind: str) -> tuple[list[Event], list[Track]] | None:
        s, travel = self.size, self.travel
        names = self.names
        if kind in _TWO_EMOJI:
            a, b = self._pair(rng)
        else:
            a, b = int(rng.integers(self.num_emoji)), -1
        d = DIRECTIONS[int(rng.integers(4))]
        full = travel  # whole-clip move; each half of it is travel / 2
        half = travel / 2
        if kind == "move":
            track = Track(a, s, self._path(self._mid_box(rng, round(full * 0.6)), d, d, half))
            return [Event("moves", names[a], d)], [track]
        if kind in ("appear", "disappear"):
            x, y = self._mid_box(rng, 0)
            tau = self._symmetric_switch(rng)
            track = Track(a, s, ((x, y),) * 3, on=tau if kind == "appear" else -1.0, off=2.0 if kind == "appear" else tau)
            return [Event(kind + "s", names[a])], [track]
        if kind in self._combos:
            d1, d2 = self._combo(rng, kind)
            d = d1 or d2  # type: ignore[assignment]
        if kind == "move_move":
            d = d1  # type: ignore[assignment]
            track = Track(a, s, self._path(self._mid_box(rng, round(half * 1.2)), d, d2, half))
            return [Event("moves", names[a], d), Event("moves", names[a], d2)], [track]
        if kind == "appear_move":
            tau = self._switch_time(rng, 0.1, 0.4)
            track = Track(a, s, self._path(self._mid_box(rng, round(half)), None, d, half), on=tau)
            return [Event("appears", names[a]), Event("moves", names[a], d)], [track]
        if kind == "move_disappear":
            tau = self._switch_time(rng, 0.6, 0.9)
            track = Track(a, s, self._path(self._mid_box(rng, round(half * 1.2)), d, None, half), off=tau)
            return [Event("moves", names[a], d), Event("disappears", names[a])], [track]
        if kind == "move_appear":
            ta = Track(a, s, self._path(self._mid_box(rng, round(half * 1.2)), d, None, half))
            tau = self._switch_time(rng, 0.6, 0.9)
            tb = Track(b, s, (self._mid_box(rng, 0),) * 3, on=tau)
            if _overlaps(ta, tb, self.frames):
                return None
            return [Event("moves", names[a], d), Event("appears", names[b])], [ta, tb]
        if kind == "pass":  # a crosses b's place: a starts on one side of b, ends on the other
            dist = s * 1.1  # per half: a starts and ends clear of b
            bx, by = self._mid_box(rng, round(dist * 1.2))
            tb = Track(b, s, ((bx, by),) * 3)
            ta = Track(a, s, self._path((bx, by), d, d, dist))
            return [Event("passes", names[a], d, names[b])], [tb, ta]  # a drawn on top
        if kind == "swap":  # a and b trade places along one axis
            dist = s * 0.6  # per half: they start and end clear of each other
            mx, my = self._mid_box(rng, round(dist * 1.2) + 1)
            ta = Track(a, s, self._path((mx, my), d, d, dist))
            tb = Track(b, s, self._path((mx, my), OPPOSITE[d], OPPOSITE[d], dist))
            return [Event("swap", names[a], d, names[b])], [ta, tb]
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")

    def _background(self, rng: np.random.Generator) -> tuple[float, float, float]:
        if rng.random() < 0.3:
            return (1.0, 1.0, 1.0)
        return tuple(float(c) for c in 1.0 - rng.uniform(0.0, 0.2, size=3))  # type: ignore[return-value]

    def render(self, tracks: Sequence[Track], background: Sequence[float]) -> torch.Tensor:
        """Frames ``(t, 3, H, W)`` of ``tracks`` (drawn in order) over a plain ``background``."""
        t, n = self.frames, self.image_size
        canvas = np.empty((t, n, n, 3), dtype=np.float32)
        canvas[:] = np.asarray(background, dtype=np.float32)
        for f in range(t):
            u = f / (t - 1)
            for tr in tracks:
                pos = tr.at(u)
                if pos is None:
                    continue
                rgb, alpha = self.scenes._sprite(tr.size)  # premultiplied sprites of the emoji scenes
                x, y = int(round(round(pos[0], 6))), int(round(round(pos[1], 6)))  # the same either way in time
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + tr.size, n), min(y + tr.size, n)
                if x0 >= x1 or y0 >= y1:
                    continue
                sx, sy = x0 - x, y0 - y
                region = canvas[f, y0:y1, x0:x1]
                region *= 1.0 - alpha[tr.eid, sy:sy + y1 - y0, sx:sx + x1 - x0]
                region += rgb[tr.eid, sy:sy + y1 - y0, sx:sx + x1 - x0]
        return torch.from_numpy(canvas.clip(0.0, 1.0)).permute(0, 3, 1, 2).contiguous()

    def clip(self, index: int) -> Clip:
        """Clip ``index`` (a pure function of seed, split, index and settings)."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index: expected an int >= 0, got {index!r}")
        index = int(index)
        rng = self._rng(index)
        for _ in range(_MAX_TRIES):
            kind = self.kinds[int(rng.choice(len(self.kinds), p=self._kind_p))]
            script = self._script(rng, kind)
            if script is not None:
                break
        else:  # pragma: no cover - the odds are below 1e-30
            raise RuntimeError(f"clip {index}: no script in {_MAX_TRIES} tries")
        events, tracks = script
        background = self._background(rng)
        main = [tr for tr in tracks if self.names[tr.eid] == events[0].actor]
        order = main + [tr for tr in tracks if tr not in main]
        return Clip(self.render(tracks, background), caption_of(events), kind,
                    tuple(self.names[tr.eid] for tr in order), tuple(tr.eid for tr in order), tuple(events), index,
                    self.split, tuple(tracks), background)

    __getitem__ = clip

    def twin_clip(self, index: int) -> Clip:
        """Training clips in time-reversed pairs: ``2k`` is clip ``k``, ``2k + 1`` the same clip
        played backwards (the same frames, another caption: a hard negative only motion tells
        apart); a clip whose caption reversal keeps (a swap) is followed by an unrelated clip."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index: expected an int >= 0, got {index!r}")
        base = self.clip(int(index) // 2)
        if index % 2 == 0:
            return base
        back = self.reverse(base)
        return back if back.caption != base.caption else self.clip(_TWIN_SPARE + int(index))

    def reverse(self, clip: Clip) -> Clip:
        """``clip`` played backwards: frames ``clip.frames.flip(0)`` (rendered again from the
        reversed paths), events reversed in order and meaning ("moves left" <-> "moves right",
        "appears" <-> "disappears")."""
        tracks = tuple(tr.reversed() for tr in clip.tracks)
        events = tuple(ev.reversed() for ev in reversed(clip.events))
        return replace(clip, frames=self.render(tracks, clip.background), caption=caption_of(events), events=events,
                       tracks=tracks, kind="reversed " + clip.kind)


def _overlaps(a: Track, b: Track, frames: int) -> bool:
    """Whether two visible sprites overlap in some frame."""
    for f in range(frames):
        u = f / (frames - 1)
        pa, pb = a.at(u), b.at(u)
        if pa is not None and pb is not None and abs(pa[0] - pb[0]) < a.size and abs(pa[1] - pb[1]) < a.size:
            return True
    return False


def motion_variants(clip: Clip) -> list[str] | None:
    """Captions of ``clip`` that differ only in motion: the caption with its (one) direction
    replaced by each of ``DIRECTIONS`` (the true one included, in ``DIRECTIONS`` order); None
    for a clip with no direction or two (``move_move``)."""
    dirs = [j for j, ev in enumerate(clip.events) if ev.direction is not None]
    if len(dirs) != 1 or clip.events[dirs[0]].verb == "swap":
        return None
    j = dirs[0]
    return [caption_of([replace(ev, direction=d) if k == j else ev for k, ev in enumerate(clip.events)])
            for d in DIRECTIONS]


# ----------------------------------------------------------------------------- shared helpers


def heldout_clips(n: int = 256, *, frames: int = 8, image_size: int = 64, num_emoji: int | None = 300,
                  vocab_seed: int = 0) -> list[Clip]:
    """The first ``n`` held-out clips (a fixed seed: the same clips for every run and benchmark)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    ds = MovingEmoji(image_size, frames, num_emoji, "heldout", HELDOUT_SEED, vocab_seed=vocab_seed)
    return [ds.clip(i) for i in range(n)]


def caption_texts(names: Sequence[str], n: int = 4000, seed: int = 0) -> list[str]:
    """Captions to train a BPE on, without rendering: every verb and direction with every name."""
    rng = np.random.default_rng(seed)
    texts = []
    for name in names:
        for d in DIRECTIONS:
            texts.append(caption_of([Event("moves", name, d)]))
        texts += [f"a {name} appears", f"a {name} disappears"]
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        d, d2 = rng.choice(DIRECTIONS, size=2, replace=False)
        texts.append(caption_of([Event("moves", names[a], str(d)), Event("appears", names[b])]))
        texts.append(caption_of([Event("passes", names[a], str(d), names[b])]))
        texts.append(caption_of([Event("swap", names[a], str(d), names[b])]))
        texts.append(caption_of([Event("moves", names[a], str(d)), Event("moves", names[a], str(d2))]))
    return texts
