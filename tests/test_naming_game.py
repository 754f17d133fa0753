"""``data.kind: naming_game`` of the ``interleaved`` task: sequences whose last caption needs the
earlier pairs (made-up names per sequence), held-out names and emoji, the tokenizer writing
unseen names with seen pieces, the accuracy and its chance, and a tiny run scored at 0..4 shots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammut.data.interleaved import InterleavedCollate
from mammut.data.naming_game import (NamingSource, all_names, emoji_split, find_names, guess_chance, name_split,
                                     names_right, naming_corpus)
from mammut.data.scenes import EmojiScenes
from mammut.data.sources import emoji_corpus
from mammut.data.tokenizer import train_bpe
from mammut.train.build import MEDIA_TOKEN
from mammut.train.config import load_config
from mammut.train.loop import Trainer

PRESET = "flamingo-naming-tiny"


@pytest.fixture(scope="module")
def scenes() -> EmojiScenes:
    return EmojiScenes(32, 20, 2)


def test_names_and_emoji_are_split_and_training_sequences_never_use_the_heldout_ones(scenes):
    train, held = set(name_split("train")), set(name_split("heldout"))
    assert train and held and not train & held and train | held == set(all_names())
    e_train, e_held = set(emoji_split(20, "train")), set(emoji_split(20, "heldout"))
    assert len(e_held) >= 3 and not e_train & e_held and e_train | e_held == set(range(20))
    source = NamingSource(scenes, 5, 0)
    for i in range(200):
        s = source(i)
        assert {n for names in s.names for n in names} <= train
        assert set(s.scene_indices) <= e_train
    held_source = NamingSource(scenes, 5, 0, split="heldout", shots=2, distinct=2)
    for i in range(50):
        s = held_source(i)
        assert {n for names in s.names for n in names} <= held and set(s.scene_indices) <= e_held


def test_the_query_needs_the_examples(scenes):
    """Every query name is defined by an example; the same emoji has other names in other
    sequences, so no model can know the query's caption without the examples."""
    source = NamingSource(scenes, 5, 0, split="heldout", shots=2, distinct=2, max_query_objects=1)
    names_of: dict[int, set[str]] = {}
    for i in range(60):
        s = source(i)
        assert s.num_media == 3 and s.images.shape == (3, 3, 32, 32)
        example_names = {n for names in s.names[:-1] for n in names}
        assert len(example_names) == 2 and set(s.names[-1]) <= example_names
        assert s.captions[:-1] == tuple(f"a {n[0]}" for n in s.names[:-1])
        assert s.captions[-1] == f"a {s.names[-1][0]}"
        names_of.setdefault(s.scene_indices[-1], set()).add(s.names[-1][0])
        assert guess_chance(s) == 0.5
    assert max(len(v) for v in names_of.values()) >= 2
    assert source(7).captions == source(7).captions and bool((source(7).images == source(7).images).all())
    zero = NamingSource(scenes, 5, 0, split="heldout", shots=0)(3)
    assert zero.num_media == 1 and guess_chance(zero) == 0.0


def test_two_emoji_queries_and_the_accuracy(scenes):
    source = NamingSource(scenes, 5, 1, split="train", shots=4, distinct=3)
    pairs = [s for s in (source(i) for i in range(40)) if len(s.names[-1]) == 2]
    assert pairs, "no two-emoji query in 40 sequences"
    s = pairs[0]
    a, b = s.names[-1]
    assert s.captions[-1].startswith(f"a {a} ") and s.captions[-1].endswith(f" a {b}")
    assert guess_chance(s) == pytest.approx(1 / 6)
    assert find_names(f"a {a} left of a {b}") == [a, b]
    assert names_right(f"a {a} above a {b}", [a, b]) and not names_right(f"a {b} above a {a}", [a, b])
    assert not names_right(f"a {a}", [a, b]) and not names_right("a cat", [a])


def test_unseen_names_are_written_with_the_pieces_of_training_names(scenes, tmp_path):
    tok = train_bpe(emoji_corpus(scenes.class_names()) + naming_corpus(), vocab_size=1000, path=tmp_path / "t.json",
                    min_frequency=1, extra_special=(MEDIA_TOKEN,))
    pieces = lambda name: tok.hf.encode(name, add_special_tokens=False).tokens  # noqa: E731
    seen = {p for n in name_split("train") for p in pieces(n)}
    for name in name_split("heldout"):
        got = pieces(name)
        assert len(got) == 3 and got[1] == "-" and set(got) <= seen, (name, got)
        assert tok.decode([tok.hf.encode("a " + name, add_special_tokens=False).ids])[0].strip() == f"a {name}"


def test_sequences_fit_the_preset_and_bad_options_are_refused(scenes, tmp_path):
    cfg = load_config(PRESET)
    tok = train_bpe(emoji_corpus(scenes.class_names()) + naming_corpus(), vocab_size=cfg.data.vocab_size,
                    path=tmp_path / "t.json", min_frequency=1, extra_special=(MEDIA_TOKEN,))
    collate = InterleavedCollate(tok, tok.special_id(MEDIA_TOKEN), cfg.data.max_len, truncate=False)
    source = NamingSource(scenes, cfg.model["num_time_embeds"], 0, shots=4, distinct=3)
    for i in range(30):
        s = source(i)
        assert collate.fit(s)[1] == 5
    with pytest.raises(ValueError, match="shots: expected an int in \\[0, 4\\]"):
        NamingSource(scenes, 5, 0, shots=5)
    with pytest.raises(ValueError, match="model.num_time_embeds"):
        NamingSource(scenes, 1, 0)
    with pytest.raises(ValueError, match="data.num_emoji"):
        emoji_split(4, "train")


def test_tiny_naming_run_trains_and_is_scored_at_each_shot_count(tmp_path):
    from mammut.cli import main

    run = tmp_path / "run"
    cfg = load_config(PRESET, ["--train.out_dir", str(run), "--train.progress", "false", "--train.threads", "1",
                               "--train.steps", "20"])
    result = Trainer(cfg).fit()
    assert result.step == 20 and sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0
    assert main(["eval", str(run), "--n", "8"]) == 0
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    by = metrics["naming_game"]["by_shots"]
    assert sorted(by, key=int) == ["0", "1", "2", "4"]
    assert by["0"]["accuracy"] == 0.0 and by["0"]["chance"] == 0.0
    assert by["1"]["chance"] == 1.0 and by["2"]["chance"] == 0.5 and 0 < by["4"]["chance"] < 0.5
    assert all(by[k]["n"] == 8 for k in by)
    assert set(metrics["fewshot_caption"]["by_shots"]) == set(by)
    assert metrics["caption"] == metrics["fewshot_caption"]["by_shots"]["4"]
    report = (run / "report" / "report.md").read_text()
    assert "naming accuracy" in report and (run / "report" / "naming_prompts.png").is_file()
