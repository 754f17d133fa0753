"""Bring any image encoder: normalise its output to tokens ``(b, n, d)``.

Accepted outputs: a tensor ``(b, n, d)`` or ``(b, d)`` (one token), an object with
``last_hidden_state`` (Hugging Face), or a tuple/list whose last item is such a tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["as_image_tokens", "encode_images"]


def as_image_tokens(out: Any) -> torch.Tensor:
    """Turn an encoder's output into ``(b, n, d)``."""
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    elif isinstance(out, (tuple, list)) and out:
        out = out[-1]
    if not torch.is_tensor(out):
        raise TypeError(f"img_encoder: expected it to return a tensor (b, n, d) or (b, d), got {type(out).__name__}")
    if out.ndim == 2:
        return out.unsqueeze(1)
    if out.ndim != 3:
        raise ValueError(f"img_encoder: expected output of shape (b, n, d) or (b, d), got {tuple(out.shape)}")
    return out


def encode_images(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``encoder`` on ``images`` ``(b, c, h, w)`` and return tokens ``(b, n, d)``."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise TypeError(f"images: expected a float tensor (b, c, h, w), got {type(images).__name__} {getattr(images, 'dtype', '')}")
    check = getattr(encoder, "check_images", None)
    if callable(check):
        check(images)
    elif images.ndim != 4:
        raise ValueError(f"images: expected shape (batch, channels, height, width), got {tuple(images.shape)}")
    tokens = as_image_tokens(encoder(images))
    if tokens.shape[0] != images.shape[0]:
        raise ValueError(f"img_encoder: returned batch {tokens.shape[0]} for {images.shape[0]} images")
    return tokens
