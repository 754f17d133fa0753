"""Moving-emoji clips: deterministic, held-out splits, motion that no single frame shows."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from mammut.data.moving_emoji import (DIRECTIONS, HELDOUT_COMBINATIONS, KINDS, MovingEmoji, _reverse_combination,
                                      heldout_clips, motion_variants)
from mammut.data.video_questions import (QUESTION_TYPES, VideoQuestions, answer_to, heldout_questions,
                                         single_frame_share)


@pytest.fixture(scope="module")
def train() -> MovingEmoji:
    return MovingEmoji(32, 8, 40)


@pytest.fixture(scope="module")
def heldout() -> MovingEmoji:
    return MovingEmoji(32, 8, 40, split="heldout")


def test_clips_are_pure_functions_of_the_index(train):
    a, b = train.clip(7), MovingEmoji(32, 8, 40).clip(7)
    assert a.frames.shape == (8, 3, 32, 32) and a.frames.dtype == torch.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0
    assert torch.equal(a.frames, b.frames) and a.caption == b.caption
    assert not torch.equal(train.clip(8).frames, a.frames)
    assert MovingEmoji(32, 12, 40).clip(7).frames.shape[0] == 12


def test_every_kind_occurs_with_captions_of_verbs_in_order(train):
    clips = [train.clip(i) for i in range(300)]
    assert set(Counter(c.kind for c in clips)) == set(KINDS)
    for c in clips:
        assert c.caption.startswith("a ") and (", then " in c.caption) == (len(c.events) == 2)
        if c.kind == "move_appear":
            assert c.caption == f"a {c.names[0]} moves {c.events[0].direction}, then a {c.names[1]} appears"


def test_a_clip_played_backwards_has_the_same_frames_and_the_opposite_caption(train):
    for c in (train.clip(i) for i in range(60)):
        back = train.reverse(c)
        torch.testing.assert_close(back.frames, c.frames.flip(0), rtol=0, atol=0)
        if c.kind == "move":
            assert back.caption == c.caption.replace(c.events[0].direction, {"left": "right", "right": "left",
                                                                             "up": "down", "down": "up"}[c.events[0].direction])


def test_the_middle_frame_does_not_depend_on_the_directions(train):
    """Every path is laid out around its middle-frame position, drawn before the direction."""
    um = (train.frames // 2) / (train.frames - 1)
    for d1, d2 in itertools.product(DIRECTIONS, DIRECTIONS):
        from mammut.data.moving_emoji import Track

        track = Track(0, train.size, train._path((10.0, 12.0), d1, d2, 5.0))
        assert track.at(um) == pytest.approx((10.0, 12.0))
    # measured: which way a moving emoji goes is not predictable from where it is at the middle frame
    moves = [c for c in (train.clip(i) for i in range(400)) if c.kind == "move"]
    xs = {d: [c.tracks[0].at(um)[0] for c in moves if c.events[0].direction == d] for d in ("left", "right")}
    assert abs(sum(xs["left"]) / len(xs["left"]) - sum(xs["right"]) / len(xs["right"])) < 2.0


def test_most_captions_and_questions_cannot_be_read_from_any_single_frame(train):
    assert single_frame_share(train, 200) > 0.8
    assert single_frame_share(train, 200, questions=True) > 0.6  # "exists" (a quarter) is answerable


def test_heldout_pairs_and_motion_combinations_never_occur_in_training(train, heldout):
    _, held_pairs = train.scenes.split_pairs()
    for c in (train.clip(i) for i in range(400)):
        if len(c.emoji_ids) == 2:
            assert (min(c.emoji_ids), max(c.emoji_ids)) not in held_pairs
        if len(c.events) == 2:
            assert (c.events[0].signature, c.events[1].signature) not in HELDOUT_COMBINATIONS
    twins = [train.twin_clip(i) for i in range(200)]
    for c in twins:
        if len(c.events) == 2:
            assert (c.events[0].signature, c.events[1].signature) not in HELDOUT_COMBINATIONS
    seen = set()
    for c in (heldout.clip(i) for i in range(300)):
        if len(c.emoji_ids) == 2:
            assert (min(c.emoji_ids), max(c.emoji_ids)) in held_pairs
        if len(c.events) == 2:
            seen.add((c.events[0].signature, c.events[1].signature))
    assert seen and seen <= HELDOUT_COMBINATIONS
    assert all(_reverse_combination(c) in HELDOUT_COMBINATIONS for c in HELDOUT_COMBINATIONS)


def test_twins_are_the_clip_before_played_backwards(train):
    a, b = train.twin_clip(10), train.twin_clip(11)
    assert torch.equal(a.frames, train.clip(5).frames)
    if b.caption != train.reverse(a).caption:  # a swap keeps its caption backwards: an unrelated clip then
        assert a.kind == "swap"
    else:
        assert torch.equal(b.frames, a.frames.flip(0))


def test_questions_are_balanced_and_exact(heldout):
    qs = VideoQuestions(heldout, 0)
    items = [qs.sample(i) for i in range(160)]
    assert [q.qtype for q in items[:4]] == list(QUESTION_TYPES)
    for t in QUESTION_TYPES:
        answers = Counter(q.answer for q in items if q.qtype == t)
        assert max(answers.values()) - min(answers.values()) <= 1, (t, answers)
    for q in items:
        assert answer_to(q.clip, q) == q.answer, q
    direction = [q for q in items if q.qtype == "direction"]
    assert set(q.answer for q in direction) == set(DIRECTIONS)


def test_heldout_helpers_and_motion_variants():
    clips = heldout_clips(12, frames=8, image_size=32, num_emoji=40)
    assert len(clips) == 12 and clips[0].video_id == "moving-emoji-heldout-000000"
    assert torch.equal(clips[3].frames, heldout_clips(4, frames=8, image_size=32, num_emoji=40)[3].frames)
    with_motion = [(c, v) for c in clips if (v := motion_variants(c)) is not None]
    assert with_motion
    for c, v in with_motion:
        assert len(v) == 4 and len(set(v)) == 4 and c.caption in v
    qs = heldout_questions(8, frames=8, image_size=32, num_emoji=40, types=("direction",))
    assert all(q.question.startswith("which way does the") for q in qs)


@pytest.mark.parametrize("kwargs, match", [({"frames": 2}, "frames"), ({"image_size": 16}, "image_size"),
                                           ({"kinds": ("fly",)}, "kinds")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MovingEmoji(**{"image_size": 32, "frames": 8, **kwargs})
    with pytest.raises(ValueError, match="index"):
        MovingEmoji(32, 8, 40).clip(-1)
