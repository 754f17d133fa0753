"""Normalisation layers: LayerNorm (bias optional) and RMSNorm."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "RMSNorm", "make_norm"]


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with an optional bias (PaLM drops it)."""

    def __init__(self, dim: int, *, bias: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` as a plain function, weights bound once (decoding steps); a subclass
        gets itself (its own ``forward``)."""
        if type(self) is not LayerNorm:
            return self
        shape, weight, bias, eps = tuple(self.weight.shape), self.weight, self.bias, self.eps
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)  # F.layer_norm's kernel, one call less


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` as a plain function, weights bound once (decoding steps); a subclass
        gets itself (its own ``forward``)."""
        if type(self) is not RMSNorm:
            return self
        shape, weight, eps = tuple(self.weight.shape), self.weight, self.eps
        return lambda x: F.rms_norm(x, shape, weight, eps)


def norm_function(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm.function()`` for mammut's norms, the module itself (called as usual) for any other."""
    return norm.function() if type(norm) in (LayerNorm, RMSNorm) else norm


def make_norm(kind: str, dim: int, *, bias: bool = False) -> nn.Module:
    """``kind`` is ``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(dim, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm: expected 'layernorm' or 'rmsnorm', got {kind!r}")
