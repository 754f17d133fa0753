"""Input checks shared by the models: clear errors before any heavy compute."""

from __future__ import annotations

from typing import Iterable

import torch

from ..checks import check_finite
from ..constants import IGNORE_INDEX
from ..losses import check_labels

__all__ = ["IGNORE_INDEX", "check_choice", "check_text", "check_labels", "check_finite", "check_image_batch"]


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_text(text: torch.Tensor, num_tokens: int, pad_id: int | None = None, *, min_len: int = 1) -> None:
    """``text`` must be an integer ``(b, n)`` tensor of ids in ``[0, num_tokens)``, with at
    least one real (non-pad) token per row."""
    if not torch.is_tensor(text) or text.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"text: expected an integer tensor of token ids, got {type(text).__name__} {getattr(text, 'dtype', '')}")
    if text.ndim != 2:
        raise ValueError(f"text: expected shape (batch, length), got {tuple(text.shape)}")
    if text.shape[1] < min_len or text.shape[0] == 0:
        raise ValueError(f"text: expected at least {min_len} token(s) per row, got shape {tuple(text.shape)}")
    lo, hi = torch.stack(torch.aminmax(text)).tolist()  # one host sync for both ends
    if lo < 0 or hi >= num_tokens:
        hint = ""
        if bool((text == IGNORE_INDEX).any()):
            hint = f" ({IGNORE_INDEX}, the ignore index, is for labels=, not for the input text)"
        raise ValueError(f"text: expected token ids in [0, {num_tokens}) (num_tokens), got values in [{lo}, {hi}]{hint}")
    if pad_id is not None:
        empty = (text == pad_id).all(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()[:8]
            raise ValueError(f"text: rows {rows} are empty (only pad_id={pad_id} tokens)")


def check_image_batch(image_tokens: torch.Tensor, name: str = "image_tokens") -> None:
    if not torch.is_tensor(image_tokens) or not image_tokens.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor (b, m, d), got {type(image_tokens).__name__}")
    if image_tokens.ndim != 3:
        raise ValueError(f"{name}: expected shape (batch, tokens, dim), got {tuple(image_tokens.shape)}")
    check_finite(name, image_tokens)
