"""Text tokenizer: a thin wrapper around Hugging Face ``tokenizers`` (the ``train`` extra).

Part of the library: :func:`mammut.load` returns one and ``save_pretrained(..., tokenizer=)``
writes one beside a checkpoint. ``mammut.data.tokenizer`` re-exports this module (the data
pipeline, part of the application, builds on it).

* :func:`train_bpe` trains a byte-level BPE on captions, with special tokens
  ``[PAD]`` (id 0), ``[BOS]``, ``[EOS]``, ``[UNK]`` and ``[MASK]``, plus any
  ``extra_special`` ones a task asks for (e.g. ``<image>``, where an interleaved text
  holds an image), given the ids right after them.
* :meth:`Tokenizer.from_file` loads any ``tokenizer.json``; pad/bos/eos are found by
  their usual names (``[PAD]``, ``<pad>``, ``<s>``, ``</s>``, ``<|endoftext|>``, ...)
  or given explicitly.
* :meth:`Tokenizer.encode` returns a right-padded ``LongTensor``; captions that do not
  fit raise ``ValueError`` unless ``truncate=True`` is asked for explicitly (the text is
  cut, bos and eos are kept). :meth:`Tokenizer.num_tokens` tells which would not fit.
* ``tokenizer(texts, context_length=None)`` is open_clip's call: a string or a list of
  strings -> ``LongTensor (b, context_length)`` with bos/eos, right-padded, and longer texts
  truncated (the text is cut, bos and eos kept: open_clip keeps its end token the same way).
  ``context_length`` defaults to :attr:`Tokenizer.context_length` (a run's ``data.max_len``
  when the tokenizer comes from ``mammut.load``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["Tokenizer", "train_bpe", "call_texts", "SPECIAL_TOKENS", "TokenSpec", "PAD", "BOS", "EOS", "UNK", "MASK"]

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, MASK = "[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, MASK)

_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<PAD>", "[pad]")
_BOS_NAMES = ("[BOS]", "<s>", "<bos>", "<|startoftext|>", "<|begin_of_text|>", "[CLS]", "<BOS>")
_EOS_NAMES = ("[EOS]", "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "[SEP]", "<EOS>")
_UNK_NAMES = ("[UNK]", "<unk>", "<|unk|>", "<UNK>")

TokenSpec = str | int | None


def _check_context_length(value: object, default: int | None, minimum: int) -> int:
    """The context length of a call: ``value``, else ``default``; an int >= ``minimum``."""
    value = default if value is None else value
    if value is None:
        raise ValueError("context_length: expected an int (this tokenizer has no default context_length; "
                         "pass context_length= or set tokenizer.context_length), got None")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"context_length: expected an int >= {minimum} (room for text between start and end), got {value!r}")
    return value


def call_texts(texts: object) -> list[str]:
    """The ``texts`` of an open_clip-style tokenizer call: one string or a list of strings."""
    return [texts] if isinstance(texts, str) else _check_texts(texts)


def _check_texts(texts: object, arg: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{arg} must be a list of strings, got a single str (wrap it in a list)")
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        bad = type(texts).__name__ if not isinstance(texts, Sequence) else "a sequence with non-str items"
        raise TypeError(f"{arg} must be a list of strings, got {bad}")
    return list(texts)


class Tokenizer:
    """Batch encoder/decoder over a Hugging Face ``tokenizers.Tokenizer``.

    Args:
        tokenizer: the underlying ``tokenizers.Tokenizer``.
        pad, bos, eos: token string or id for padding / begin / end of sequence;
            ``None`` looks the usual names up.  Without a pad token the eos id pads
            (then id 0, with a warning); without bos/eos, ``add_bos``/``add_eos`` raise.
        context_length: default length of ``tokenizer(texts)`` (bos and eos included);
            ``None``: the call must pass one.
    """

    def __init__(self, tokenizer: HFTokenizer, pad: TokenSpec = None, bos: TokenSpec = None, eos: TokenSpec = None,
                 context_length: int | None = None) -> None:
        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        # Special tokens are added by encode() itself, so switch off anything the json configures.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._bos_id = self._resolve("bos", bos, _BOS_NAMES)
        self._eos_id = self._resolve("eos", eos, _EOS_NAMES)
        pad_id = self._resolve("pad", pad, _PAD_NAMES)
        if pad_id is None:
            pad_id = self._eos_id if self._eos_id is not None else 0
            log.warning("tokenizer has no pad token; padding with id %d", pad_id)
        self._pad_id = pad_id
        self._unk_id = self._resolve("unk", None, _UNK_NAMES)
        if context_length is not None:
            _check_context_length(context_length, None, 3)
        self.context_length: int | None = context_length

    def _resolve(self, what: str, spec: TokenSpec, names: Sequence[str]) -> int | None:
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if isinstance(spec, bool):
            raise TypeError(f"{what} must be a token string, an id or None, got bool")
        if isinstance(spec, int):
            if not 0 <= spec < size:
                raise ValueError(f"{what} id must be in [0, {size}), got {spec}")
            return spec
        if isinstance(spec, str):
            idx = self._tok.token_to_id(spec)
            if idx is None:
                raise ValueError(f"{what} token {spec!r} is not in the vocabulary")
            return idx
        if spec is not None:
            raise TypeError(f"{what} must be a token string, an id or None, got {type(spec).__name__}")
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, pad: TokenSpec = None, bos: TokenSpec = None, eos: TokenSpec = None,
                  context_length: int | None = None) -> Tokenizer:
        """Load any ``tokenizer.json``; special tokens found by name unless given."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as exn:  # noqa: BLE001 - `tokenizers` raises a bare Exception; re-raised with the file named
            raise ValueError(f"{p} is not a readable tokenizer.json ({exn})") from exn
        return cls(hf, pad=pad, bos=bos, eos=eos, context_length=context_length)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (parent folders created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(p))
        return p

    # -- properties -----------------------------------------------------------------

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        """Begin-of-sequence id (None if the vocabulary has none)."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (None if the vocabulary has none)."""
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id (None if the vocabulary has none)."""
        return self._unk_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` or None."""
        return self._tok.token_to_id(token)

    def special_id(self, token: str) -> int | None:
        """Id of ``token`` if it is a special token of this vocabulary (one id that is never
        split or merged, dropped by ``decode``), else None (absent, or an ordinary BPE piece)."""
        for idx, added in self._tok.get_added_tokens_decoder().items():
            if added.content == token and added.special:
                return int(idx)
        return None

    # -- encode / decode --------------------------------------------------------------

    def num_tokens(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Length of each text once encoded (with bos/eos as asked), before any truncation or padding.

        ``encode(texts, max_len)`` fits without truncation exactly when every length is <= max_len.
        """
        texts = _check_texts(texts)
        extra = int(add_bos) + int(add_eos)
        out: list[int] = []
        for start in range(0, len(texts), 8192):  # bounded memory for a whole training csv
            out += [len(enc.ids) + extra for enc in self._tok.encode_batch(texts[start:start + 8192], add_special_tokens=False)]
        return out

    def encode(
        self,
        texts: Sequence[str],
        max_len: int,
        add_bos: bool = True,
        add_eos: bool = True,
        truncate: bool = False,
    ) -> torch.Tensor:
        """Encode ``texts`` to a right-padded ``LongTensor`` of shape (len(texts), max_len).

        Sequences longer than ``max_len`` (bos/eos included) raise ``ValueError`` unless
        ``truncate=True``, which cuts the text but keeps bos and eos.
        """
        texts = _check_texts(texts)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        if add_bos and self._bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos token (pass bos= to Tokenizer)")
        if add_eos and self._eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos token (pass eos= to Tokenizer)")
        n_special = int(add_bos) + int(add_eos)
        room = max_len - n_special
        if room < 0 or (truncate and room < 1):
            raise ValueError(f"max_len={max_len} leaves no room for text with add_bos={add_bos}, add_eos={add_eos}")
        out = torch.full((len(texts), max_len), self._pad_id, dtype=torch.long)
        if not texts:
            return out
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        for row, (text, enc) in enumerate(zip(texts, encodings)):
            ids = list(enc.ids)
            if len(ids) > room:
                if not truncate:
                    raise ValueError(
                        f"text {row} has {len(ids)} tokens + {n_special} special > max_len={max_len} "
                        f"(pass truncate=True to cut it): {text[:80]!r}"
                    )
                ids = ids[:room]
            if add_bos:
                ids = [self._bos_id, *ids]
            if add_eos:
                ids = [*ids, self._eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None, *, truncate: bool = True) -> torch.Tensor:
        """open_clip's tokenizer call: ``texts`` (a string or a list of strings) -> ``LongTensor``
        ``(b, context_length)``: bos, text, eos, right-padded with ``pad_id``. ``context_length``
        (bos and eos included) defaults to :attr:`context_length`. A longer text is truncated:
        its tokens are cut so that bos and eos still fit (``truncate=False``: a ``ValueError``
        instead, as ``encode``)."""
        texts = call_texts(texts)
        length = _check_context_length(context_length, self.context_length, 3)
        return self.encode(texts, length, truncate=truncate)

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> list[str]:
        """Decode id rows to strings: drops a leading bos, stops at eos, skips pad/special tokens.

        A 1-D input is one sequence (the result is still a list of one string).
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"ids must be a 1-D or 2-D tensor, got shape {tuple(ids.shape)}")
            rows = [ids.tolist()] if ids.dim() == 1 else ids.tolist()
        elif isinstance(ids, Sequence):
            if len(ids) > 0 and all(isinstance(i, int) for i in ids):
                rows = [list(ids)]  # type: ignore[arg-type]
            elif all(isinstance(r, Sequence) for r in ids):
                rows = [list(r) for r in ids]  # type: ignore[union-attr]
            else:
                raise TypeError("ids must be a tensor, a list of ints or a list of lists of ints")
        else:
            raise TypeError(f"ids must be a tensor or a list, got {type(ids).__name__}")
        cleaned = []
        for row in rows:
            if row and self._bos_id is not None and row[0] == self._bos_id:
                row = row[1:]
            if self._eos_id is not None and self._eos_id in row:
                row = row[: row.index(self._eos_id)]
            cleaned.append([int(i) for i in row if i != self._pad_id and i != self._bos_id])
        return [s.strip() for s in self._tok.decode_batch(cleaned, skip_special_tokens=True)]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 4096,
    path: str | Path | None = None,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    extra_special: Sequence[str] = (),
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; optionally save it to ``path``.

    ``special_tokens`` get the first ids in order (default ``[PAD]``=0, ``[BOS]``=1,
    ``[EOS]``=2, ``[UNK]``=3, ``[MASK]``=4); ``extra_special`` (e.g. ``("<image>",)``, what
    a task's ``special_tokens`` asks for) the ids right after them, so the usual ids never
    move. Each special token is one id that BPE never splits; ``decode`` drops them.  The 256
    byte symbols are always in the vocabulary, so ``vocab_size`` must exceed
    ``256 + len(special_tokens) + len(extra_special)``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, got a single str")
    for arg, value in (("special_tokens", special_tokens), ("extra_special", extra_special)):
        if isinstance(value, str):
            raise TypeError(f"{arg} must be a sequence of token strings, got a single str {value!r} (wrap it in a tuple)")
    specials = list(special_tokens) + list(extra_special)
    if not all(isinstance(s, str) and s for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens + extra_special must be distinct non-empty strings, got {specials!r}")
    floor = 256 + len(specials)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= floor:
        raise ValueError(f"vocab_size must be an int > {floor} (256 bytes + specials), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")

    def checked() -> Iterable[str]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
            yield t

    unk = next((s for s in specials if s in _UNK_NAMES), None)
    tok = HFTokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(checked(), trainer=trainer)
    out = Tokenizer(tok)
    log.info("trained byte-level BPE: %d ids (asked for %d)", out.vocab_size, vocab_size)
    if path is not None:
        out.save(path)
    return out
