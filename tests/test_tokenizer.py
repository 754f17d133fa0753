"""Tokenizer: BPE training, save/load round trip, special ids, padding and truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from mammut.data.scenes import EmojiScenes
from mammut.data.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def captions() -> list[str]:
    ds = EmojiScenes(num_emoji=50, seed=1)
    return [ds[i].caption for i in range(300)]


@pytest.fixture(scope="module")
def tok(captions: list[str]) -> Tokenizer:
    return train_bpe(captions, vocab_size=400)


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.token_to_id("[MASK]") == 4
    assert 261 < tok.vocab_size <= 400


def test_encode_layout_and_decode(tok: Tokenizer, captions: list[str]) -> None:
    ids = tok.encode(captions[:8], max_len=40)
    assert ids.dtype == torch.long and ids.shape == (8, 40)
    assert (ids[:, 0] == tok.bos_id).all()
    for row in ids:
        n = int((row != tok.pad_id).sum())
        assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
        assert (row[1 : n - 1] > 4).all()  # no special ids inside the text
    assert tok.decode(ids) == captions[:8]
    assert tok.decode(ids[0]) == captions[:1]
    no_special = tok.encode(captions[:2], max_len=40, add_bos=False, add_eos=False)
    assert (no_special[:, 0] != tok.bos_id).all()
    assert tok.decode(no_special) == captions[:2]


def test_save_load_round_trip(tok: Tokenizer, captions: list[str], tmp_path: Path) -> None:
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    loaded = Tokenizer.from_file(path)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
        tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size)
    assert torch.equal(loaded.encode(captions[:16], 48), tok.encode(captions[:16], 48))
    trained = train_bpe(captions, vocab_size=300, path=tmp_path / "t2.json")
    assert (tmp_path / "t2.json").is_file() and trained.vocab_size <= 300


def test_no_silent_truncation(tok: Tokenizer) -> None:
    text = ["a cat face left of a pizza and the pizza above a doughnut"]
    n = int((tok.encode(text, 64) != tok.pad_id).sum())
    with pytest.raises(ValueError, match="truncate=True"):
        tok.encode(text, n - 1)
    cut = tok.encode(text, 6, truncate=True)
    assert cut.shape == (1, 6) and cut[0, 0] == tok.bos_id and cut[0, -1] == tok.eos_id
    assert tok.encode(text, n).shape == (1, n)  # exactly fitting is fine


def test_bad_arguments(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="texts"):
        tok.encode("a cat", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a"], 0)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a b"], vocab_size=100)


def _foreign_tokenizer(path: Path, tokens: list[str]) -> Path:
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    return path


def test_load_foreign_tokenizer_finds_specials_by_name(tmp_path: Path) -> None:
    path = _foreign_tokenizer(tmp_path / "t.json", ["<unk>", "cat", "dog", "</s>", "<s>", "<pad>", "a"])
    t = Tokenizer.from_file(path)
    assert (t.pad_id, t.bos_id, t.eos_id, t.unk_id) == (5, 4, 3, 0)
    ids = t.encode(["a cat"], 5)
    assert ids.tolist() == [[4, 6, 1, 3, 5]]
    # explicit overrides by token string or id
    t2 = Tokenizer.from_file(path, pad="<unk>", bos=6)
    assert t2.pad_id == 0 and t2.bos_id == 6
    with pytest.raises(ValueError, match="pad token"):
        Tokenizer.from_file(path, pad="[NOPE]")


def test_load_tokenizer_without_bos_or_pad(tmp_path: Path) -> None:
    path = _foreign_tokenizer(tmp_path / "t.json", ["<unk>", "<|endoftext|>", "cat", "a"])
    t = Tokenizer.from_file(path)
    assert t.eos_id == 1 and t.pad_id == 1 and t.bos_id is None  # pads with eos
    with pytest.raises(ValueError, match="no bos"):
        t.encode(["a cat"], 6)
    ids = t.encode(["a cat"], 6, add_bos=False)
    assert ids.tolist() == [[3, 2, 1, 1, 1, 1]]
    assert t.decode(ids) == ["a cat"]
