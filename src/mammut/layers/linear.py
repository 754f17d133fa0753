"""``Linear``: the linear layer every mammut block uses (``nn.Linear``'s parameters and state
dict), and ``linear``, its function.

Both are ``F.linear``: one kernel call, whatever the number of rows. An earlier version took
the product the other way round for a handful of rows on CPU in float32 (``(W @ x.T).T``,
streaming each weight matrix once, which an older BLAS ran faster when decoding); with the
current torch/MKL, ``F.linear`` is as fast or faster for every decoder shape at 1 to 8 rows
and costs one call instead of six (``benchmarks/generate.py`` prints both forms as its
weight-read floor), so the special case is gone. The class and function stay, so that code
which names them (M2PT pathways, the caption loss) keeps one place to change this again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "plain_linear"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x ``(..., i)``, weight ``(o, i)`` -> ``(..., o)``."""
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def plain_linear(*modules: nn.Module) -> bool:
    """Whether every module is exactly a ``Linear`` or ``nn.Linear`` (its forward is
    ``F.linear(x, weight, bias)``), not a subclass or a wrapper (LoRA, quantised) with a
    forward of its own: decoding steps read such modules' weights directly only then."""
    return all(type(m) in (Linear, nn.Linear) for m in modules)
