"""The text tokenizer, which lives in the library: :mod:`mammut.tokenizer` (``mammut.load``
returns it, checkpoints save it). Re-exported here for the data pipeline and older imports."""

from __future__ import annotations

from ..tokenizer import SPECIAL_TOKENS, Tokenizer, TokenSpec, call_texts, train_bpe
from ..tokenizer import BOS, EOS, MASK, PAD, UNK

__all__ = ["Tokenizer", "train_bpe", "call_texts", "SPECIAL_TOKENS", "TokenSpec", "PAD", "BOS", "EOS", "UNK", "MASK"]
