"""Feed-forward layers: SwiGLU (PaLM) and GELU / QuickGELU MLP (ViT / CLIP)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout
from .linear import Linear, plain_linear

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """x ``(..., dim)`` -> ``(..., dim)`` through a hidden layer of ``int(mult * dim)``.

    ``activation="swiglu"`` (gated SiLU, one fused input projection), ``"gelu"`` (exact, erf)
    or ``"quickgelu"`` (``x * sigmoid(1.702 x)``, OpenAI CLIP).
    """

    def __init__(
        self,
        dim: int,
        *,
        mult: float = 4.0,
        activation: str = "swiglu",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu", "quickgelu"):
            raise ValueError(f"activation: expected 'swiglu', 'gelu' or 'quickgelu', got {activation!r}")
        inner = int(dim * mult)
        self.activation = activation
        self.proj_in = Linear(dim, inner * (2 if activation == "swiglu" else 1), bias=bias)
        self.proj_out = Linear(inner, dim, bias=bias)
        self.dropout = Dropout(dropout)  # stands down inside no_dropout() (generation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.dropout(_activate(self.proj_in(x), self.activation)))

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` without dropout as a plain function, weights bound once (decoding
        steps, see ``token_step.py``); the module itself (called as usual) when it or its
        projections are not exactly mammut's / torch's classes (e.g. wrapped by an adapter)."""
        if type(self) is not FeedForward or not plain_linear(self.proj_in, self.proj_out) or type(self.dropout) is not Dropout:
            return self
        w_in, b_in, w_out, b_out, activation = self.proj_in.weight, self.proj_in.bias, self.proj_out.weight, \
            self.proj_out.bias, self.activation
        return lambda x: F.linear(_activate(F.linear(x, w_in, b_in), activation), w_out, b_out)


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        h, gate = h.chunk(2, dim=-1)
        return F.silu(gate) * h
    if activation == "quickgelu":
        return h * torch.sigmoid(1.702 * h)
    return F.gelu(h)
