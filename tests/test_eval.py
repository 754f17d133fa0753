"""Evaluation plumbing on known inputs: an oracle model must score perfectly, a shifted one at
zero, and the report must hold every figure the issue asks for."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mammut.data.tokenizer import train_bpe
from mammut.eval.evaluate import EmojiEval, evaluate_pairs
from mammut.eval.report import image_text_report, write_report
from mammut.train.config import DataConfig, EvalConfig
from mammut.data.sources import emoji_corpus, emoji_dataset


class Oracle(nn.Module):
    """Knows the answer: scene ``j`` and its caption embed to one-hot ``j`` (``shift`` moves the
    text side, breaking every pair); captions are generated verbatim; a text it has not seen
    (a zero-shot prompt) embeds to the one-hot of the emoji it names, past the scene slots."""

    def __init__(self, images, captions, tokenizer, class_names, shift: int = 0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.images, self.captions, self.tok, self.names, self.shift = images, list(captions), tokenizer, class_names, shift
        self.dim = len(captions) + len(class_names)

    def embed_image(self, images):
        idx = [next(j for j in range(len(self.images)) if torch.equal(self.images[j], im)) for im in images]
        return F.one_hot(torch.tensor(idx), self.dim).float()

    def embed_text(self, ids):
        out = []
        for text in self.tok.decode(ids):
            if text in self.captions:
                out.append((self.captions.index(text) + self.shift) % len(self.captions))
            else:
                out.append(len(self.captions) + next(i for i, n in enumerate(self.names) if text.endswith(n)))
        return F.one_hot(torch.tensor(out), self.dim).float()

    def generate(self, images, max_new_tokens, strategy):
        assert strategy == "greedy"
        caps = [self.captions[int(e.argmax())] for e in self.embed_image(images)]
        return self.tok.encode(caps, 24, add_bos=False)


@pytest.fixture(scope="module")
def setup():
    data = DataConfig(image_size=32, num_emoji=20, max_len=24)
    names = emoji_dataset(data).class_names()
    tok = train_bpe(emoji_corpus(names), vocab_size=1000, min_frequency=1)
    ev = EmojiEval(data, n=48)
    return data, tok, ev, names


def test_heldout_gallery_has_distinct_captions(setup):
    _, _, ev, _ = setup
    held = ev.held
    assert len(held.captions) == 48 and len(set(held.captions)) == 48
    assert set(held.n_objects) == {1, 2}


def test_oracle_scores_perfectly(setup):
    data, tok, ev, names = setup
    held = ev.held
    oracle = Oracle(held.images, held.captions, tok, names)
    metrics, generated = ev(oracle, tok, EvalConfig(n=48, templates=("a {}", "a picture of a {}")))
    r = metrics["retrieval"]
    assert r["gallery_size"] == 48 and r["chance"]["R@1"] == pytest.approx(1 / 48)
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert r[key] == pytest.approx(1.0), key
    cap = metrics["caption"]
    assert generated == held.captions
    assert cap["bleu4"] == pytest.approx(1.0) and cap["cider_d"] > 5.0
    assert cap["emoji_acc_single"] == pytest.approx(1.0) and cap["emoji_acc_pair"] == pytest.approx(1.0)
    assert cap["n_single"] + cap["n_pair"] == 48 and cap["n_single"] == r["n_single"]
    # zero-shot: images embed to scene slots, prompts to emoji slots -> all ties -> pessimistic 0
    zs = metrics["zero_shot"]
    assert zs["n_classes"] == 20 and zs["n_images"] == r["n_single"] and 0.0 <= zs["top1"] <= 1.0
    assert metrics["num_emoji"] == 20


def test_shifted_pairs_score_zero_at_rank_one(setup):
    _, tok, ev, names = setup
    held = ev.held
    oracle = Oracle(held.images, held.captions, tok, names, shift=1)
    metrics, _ = evaluate_pairs(oracle, tok, held.images, held.captions, max_len=24, with_captions=False)
    assert metrics["retrieval"]["i2t_R@1"] == 0.0 and metrics["retrieval"]["t2i_R@1"] == 0.0
    assert "caption" not in metrics


def test_evaluate_pairs_checks_lengths(setup):
    _, tok, ev, names = setup
    oracle = Oracle(ev.held.images, ev.held.captions, tok, names)
    with pytest.raises(ValueError, match="captions: expected one per image"):
        evaluate_pairs(oracle, tok, ev.held.images, ev.held.captions[:-1], max_len=24)


def test_report_files(setup, tmp_path):
    data, tok, ev, names = setup
    held = ev.held
    oracle = Oracle(held.images, held.captions, tok, names)
    metrics, generated = ev(oracle, tok, EvalConfig(n=48))
    metrics.update({"steps": 10, "samples_per_s": 123.0, "wall_time_s": 4.0})
    records = [{"kind": "train", "step": s, "loss": 5.0 / s, "caption": 3.0 / s, "contrastive": 2.0 / s, "lr": 1e-3}
               for s in range(1, 11)] + [{"kind": "eval", "step": 10, "i2t_R@1": 0.5}]
    parts = image_text_report(metrics, held.images, generated, held.captions, grid=8)
    out = write_report(tmp_path / "report", metrics, records, parts)
    for name in ("metrics.json", "loss_curves.png", "scenes.png", "retrieval.md", "report.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["retrieval"]["i2t_R@1"] == 1.0 and saved["caption"]["emoji_acc_single"] == 1.0
    table = (out / "retrieval.md").read_text()
    assert "gallery of 48" in table and "| image -> text | 1.000" in table and "chance" in table
