"""Self- and cross-attention on ``torch.nn.functional.scaled_dot_product_attention``.

Legend: ``b`` batch, ``n`` query tokens, ``m`` context (key) tokens, ``h`` query heads,
``g`` key/value heads (``g`` divides ``h``: multi-query when ``g == 1``), ``d`` head size.
Masks are bool, ``True`` = may attend, broadcastable to ``(b, h, n, m)`` (see ``masks.py``).
A query row with no key it may attend to gets an exact zero output, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .masks import causal_mask, combine_masks
from .norms import make_norm
from .rotary import RotaryEmbedding, apply_rotary

__all__ = ["attend", "Attention", "CrossAttention"]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q ``(b, h, n, d)``, k/v ``(b, g, m, d)`` -> ``(b, h, n, d)``.

    ``causal`` aligns the queries with the last ``n`` keys (correct with a KV cache).
    """
    h, g = q.shape[1], k.shape[1]
    if h != g:
        k = k.repeat_interleave(h // g, dim=1)
        v = v.repeat_interleave(h // g, dim=1)
    n, m = q.shape[-2], k.shape[-2]
    if mask is None:
        # fast paths: no mask tensor at all
        use_causal = causal and n > 1
        if use_causal and n != m:
            mask = causal_mask(n, m, q.device)
        else:
            return F.scaled_dot_product_attention(q, k, v, is_causal=use_causal, dropout_p=dropout_p)
    elif causal:
        mask = combine_masks(mask, causal_mask(n, m, q.device))
    # rows that may attend to nothing: attend anywhere (finite), then zero them (no host sync)
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, dropout_p=dropout_p)
    return out * has_key.to(out.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, rotary positions and
    grouped-query heads (``kv_heads``).

    forward: x ``(b, n, dim)`` -> ``(b, n, dim)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        rotary: bool = True,
        rotary_theta: float = 10000.0,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_theta) if rotary else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``mask`` covers all keys (cached + new); ``positions`` ``(n,)`` or ``(b, n)``
        default to the next positions after what ``cache`` holds."""
        b, n, _ = x.shape
        h, g, d = self.heads, self.kv_heads, self.dim_head
        q, k, v = self.to_qkv(x).split((h * d, g * d, g * d), dim=-1)
        q = q.view(b, n, h, d).transpose(1, 2)
        k = k.view(b, n, g, d).transpose(1, 2)
        v = v.view(b, n, g, d).transpose(1, 2)
        if self.rotary is not None:
            if positions is None:
                start = cache.seq_len(self) if cache is not None else 0
                positions = torch.arange(start, start + n, device=x.device)
            cos, sin = self.rotary(positions)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self, k, v)
        out = attend(q, k, v, causal=causal, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class CrossAttention(nn.Module):
    """Queries from ``x`` ``(b, n, dim)``, keys/values from ``context`` ``(b, m, context_dim)``.

    ``context_mask``: ``(b, m)`` (key padding) or ``(b, n, m)`` (per query, e.g. Flamingo's
    media masking). With a ``cache`` the context keys/values are projected once.
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        norm_context: bool = False,
        norm: str = "layernorm",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.dropout = dropout
        self.context_norm = make_norm(norm, context_dim) if norm_context else nn.Identity()
        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_kv = nn.Linear(context_dim, 2 * kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context ``(b, m, context_dim)`` -> k, v ``(b, g, m, d)``."""
        b, m, _ = context.shape
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        g, d = self.kv_heads, self.dim_head
        return k.view(b, m, g, d).transpose(1, 2), v.view(b, m, g, d).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.cross(self, lambda: self.project_context(context))
        else:
            k, v = self.project_context(context)
        mask = None
        if context_mask is not None:
            mask = context_mask[:, None, None, :] if context_mask.ndim == 2 else context_mask[:, None]
        out = attend(q, k, v, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
