"""open_clip's CLIP BPE tokenizer behind the interface of :class:`mammut.tokenizer.Tokenizer`
(``encode`` -> right-padded ids, ``decode`` -> strings, ``pad_id``/``bos_id``/``eos_id``).

The BPE merges (``bpe_simple_vocab_16e6.txt.gz``, MIT) and the tokenizer code ship in the
open-clip-torch wheel; this wrapper uses them from there (the ``interop`` extra) and adds no
copy. Ids: vocabulary 49408, start of text 49406, end of text 49407, padding 0 — the ids of
open_clip's CoCa checkpoints (context 76 tokens).

``tokenizer(texts, context_length=None)`` is open_clip's call (``open_clip.get_tokenizer(name)``):
a string or a list of strings -> ``LongTensor (b, context_length)``, start and end tokens
added, right-padded with 0, longer texts truncated with the end token kept (as open_clip).
``encode`` keeps its stricter contract (a text that does not fit is an error unless
``truncate=True``).

Part of the library (a checkpoint converted from open_clip is saved and loaded with it);
``mammut.convert.clip_tokenizer`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["CLIPTokenizer"]


class CLIPTokenizer:
    """CLIP BPE (lower-cased, whitespace-cleaned text, as open_clip's ``SimpleTokenizer``)."""

    vocab_size = 49408
    bos_id = 49406
    eos_id = 49407
    pad_id = 0

    def __init__(self, context_length: int = 76) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length: expected an int >= 3, got {context_length!r}")
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("CLIPTokenizer needs open_clip: pip install 'mammut-vl[interop]' (open-clip-torch)") from e
        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        if (self._tok.sot_token_id, self._tok.eot_token_id, self._tok.vocab_size) != (self.bos_id, self.eos_id, self.vocab_size):
            raise RuntimeError("CLIPTokenizer: open_clip's tokenizer ids differ from the CLIP BPE ids this wrapper expects")

    @property
    def bpe_path(self) -> Path:
        """The ``bpe_simple_vocab_16e6.txt.gz`` file inside the installed open_clip."""
        from open_clip.tokenizer import default_bpe

        return Path(default_bpe())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self,
        texts: Sequence[str],
        max_len: int | None = None,
        add_bos: bool = True,
        add_eos: bool = True,
        truncate: bool = False,
    ) -> torch.Tensor:
        """``texts`` -> right-padded ids ``(len(texts), max_len)`` (default ``context_length``).
        Texts that do not fit raise ``ValueError`` unless ``truncate=True`` (keeps start/end)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
        max_len = self.context_length if max_len is None else max_len
        n_special = int(add_bos) + int(add_eos)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= n_special:
            raise ValueError(f"max_len: expected an int > {n_special} (room for text), got {max_len!r}")
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self._tok.encode(text)
            if len(ids) > max_len - n_special:
                if not truncate:
                    raise ValueError(
                        f"texts: text {row} has {len(ids)} tokens + {n_special} special > max_len={max_len} "
                        f"(pass truncate=True to cut it): {text[:80]!r}"
                    )
                ids = ids[: max_len - n_special]
            ids = [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None, *, truncate: bool = True) -> torch.Tensor:
        """open_clip's tokenizer call: a string or a list of strings -> ids ``(b, context_length)``
        (default :attr:`context_length`), right-padded; a longer text is truncated, its start and
        end tokens kept (``truncate=False``: a ``ValueError`` instead)."""
        texts = [texts] if isinstance(texts, str) else texts
        return self.encode(texts, self.context_length if context_length is None else context_length, truncate=truncate)

    def decode(self, ids: Any) -> list[str]:
        """Id rows (tensor or lists) -> strings: drops the start token, stops at the end
        token, skips padding."""
        if torch.is_tensor(ids):
            if ids.ndim not in (1, 2):
                raise ValueError(f"ids: expected a 1-D or 2-D tensor, got shape {tuple(ids.shape)}")
            rows = [ids.tolist()] if ids.ndim == 1 else ids.tolist()
        elif isinstance(ids, Sequence) and all(isinstance(i, int) for i in ids):
            rows = [list(ids)]
        elif isinstance(ids, Sequence):
            rows = [list(r) for r in ids]
        else:
            raise TypeError(f"ids: expected a tensor or a list of ids, got {type(ids).__name__}")
        out = []
        for row in rows:
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            row = [int(i) for i in row if i not in (self.bos_id, self.pad_id)]
            out.append(self._tok.decode(row).strip())
        return out
