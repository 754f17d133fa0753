"""Poolers: masked mean over tokens, and an attention pooler (learned queries)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention
from .norms import make_norm

__all__ = ["masked_mean", "AttentionPooler"]


def masked_mean(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """x ``(b, n, d)``, keep ``(b, n)`` bool -> mean over kept tokens ``(b, d)``."""
    if keep is None:
        return x.mean(dim=1)
    w = keep.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class AttentionPooler(nn.Module):
    """``num_queries`` learned queries cross-attend to tokens ``(b, m, context_dim)``
    and return ``(b, num_queries, dim)`` (normed).

    ``norm_queries`` also norms the queries before the attention (open_clip's pooler);
    ``bias`` / ``norm_bias`` add biases to the projections / the norms.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_queries: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        norm: str = "layernorm",
        norm_queries: bool = False,
        bias: bool = False,
        norm_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries: expected >= 1, got {num_queries}")
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.query_norm = make_norm(norm, dim, bias=norm_bias) if norm_queries else None
        self.attn = CrossAttention(
            dim, context_dim=context_dim, heads=heads, dim_head=dim_head, norm_context=True, norm=norm,
            bias=bias, norm_bias=norm_bias,
        )
        self.norm = make_norm(norm, dim, bias=norm_bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries if self.query_norm is None else self.query_norm(self.queries)
        return self.norm(self.attn(q.unsqueeze(0), tokens, context_mask=mask))  # queries projected once
