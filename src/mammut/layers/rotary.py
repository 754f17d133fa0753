"""Rotary position embeddings (RoFormer), applied to queries and keys.

Positions are explicit integer tensors so that padded rows, appended CLS tokens and
cached decoding can place every token where it belongs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` of shape ``(b|1, 1, n, dim_head)`` for integer positions."""

    def __init__(self, dim_head: int, *, theta: float = 10000.0) -> None:
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"dim_head: rotary embeddings need an even size, got {dim_head}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: ``(n,)`` or ``(b, n)`` integer positions."""
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # b n d/2
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # b 1 n d
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` ``(..., d)`` by angles ``cos, sin`` broadcastable to it (e.g. ``t``
    ``(b, h, n, d)`` with ``(b, 1, n, d)``); computed in fp32, cast back."""
    dtype = t.dtype
    t = t.float()
    return (t * cos + _rotate_half(t) * sin).to(dtype)
