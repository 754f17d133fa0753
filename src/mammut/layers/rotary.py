"""Rotary position embeddings (RoFormer), applied to queries and keys.

Positions are explicit integer tensors so that padded rows, appended CLS tokens and
cached decoding can place every token where it belongs.

Two equivalent forms (bitwise the same rotated values in float32):
``apply_rotary(t, cos, sin)`` with ``rotate_half`` (training and whole sequences), and for
decoding ``RotaryEmbedding.tables`` + ``apply_rotary_``: ``t * cos + roll(t, d/2) * sin_signed``
in place, where ``sin_signed`` carries the sign ``rotate_half`` would (``-sin`` on the first
half), built once per decoding call and shared by every layer (see ``KVCache.per_call``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary", "apply_rotary_"]


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` of shape ``(b|1, 1, n, dim_head)`` for integer positions."""

    def __init__(self, dim_head: int, *, theta: float = 10000.0) -> None:
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"dim_head: rotary embeddings need an even size, got {dim_head}")
        self.dim_head, self.theta = dim_head, theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        sign = torch.cat((-torch.ones(dim_head // 2), torch.ones(dim_head // 2)))
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("freq", inv_freq.repeat(2), persistent=False)  # (d,): what cat((freqs, freqs)) multiplies

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``model.to(torch.bfloat16)`` moves these buffers but keeps them float32: in bf16 the
        frequencies lose digits and positions past 256 are not exact."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            device = self.inv_freq.device
            d = self.dim_head
            self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
            self.sign = torch.cat((-torch.ones(d // 2, device=device), torch.ones(d // 2, device=device)))
            self.freq = self.inv_freq.repeat(2)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: ``(n,)`` or ``(b, n)`` integer positions."""
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # b n d/2
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # b 1 n d
        return emb.cos(), emb.sin()

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin_signed`` ``(b|1, n, 1, d)`` for ``apply_rotary_`` on ``(b, n, heads, d)``
        (the projection's own layout, no transpose)."""
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        emb = (positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.freq).unsqueeze(2)  # b n 1 d
        return emb.cos(), emb.sin() * self.sign


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` ``(..., d)`` by angles ``cos, sin`` broadcastable to it (e.g. ``t``
    ``(b, h, n, d)`` with ``(b, 1, n, d)``); computed in fp32, cast back."""
    dtype = t.dtype
    t = t.float()
    return (t * cos + _rotate_half(t) * sin).to(dtype)


def apply_rotary_(t: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` in place (no autograd), with the tables of ``RotaryEmbedding.tables``:
    the same values; on float32 four kernels and no copy."""
    if t.dtype != torch.float32:  # computed in float32 and written back, as apply_rotary
        f = t.float()
        return t.copy_(f * cos + f.roll(t.shape[-1] // 2, -1) * sin_signed)
    rolled = t.roll(t.shape[-1] // 2, -1)
    t.mul_(cos)
    return t.add_(rolled.mul_(sin_signed))
