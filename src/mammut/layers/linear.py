"""``Linear``: ``nn.Linear`` with a faster CPU kernel choice for a handful of rows.

Decoding one token for a few captions multiplies 1-8 rows by every weight matrix. On CPU in
float32, ``F.linear`` (BLAS with the rows as the left operand) then runs 2-3x slower than the
same product taken the other way round, weights on the left: ``(W @ x.T).T`` streams each
weight matrix once (the 25 matrices of the benchmark decoder, 4 rows: 5.6 ms -> 2.1 ms per
step, printed as "floor" by ``benchmarks/generate.py``). The result is the same product, equal
up to float rounding. Training batches and other devices/dtypes take ``F.linear`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear"]

FEW_ROWS = 8  # up to this many rows take the weights-on-the-left product on CPU (float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x ``(..., i)``, weight ``(o, i)`` -> ``(..., o)``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (0 < rows <= FEW_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    # o r; addmm keeps autocast's casting rules of F.linear (bias included)
    out = weight @ flat.t() if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
