"""Transformer blocks built from the shared attention and feed-forward layers.

All blocks are pre-norm and residual: ``x (b, n, dim) -> (b, n, dim)``.
- ``ParallelBlock``: PaLM's ``x + attn(norm(x)) + ff(norm(x))`` (one norm, both branches).
- ``TransformerBlock``: the classic sequential ``x + attn(norm1 x)``, then ``+ ff(norm2 x)``
  (``feedforward=False``: attention only).
- ``CrossAttentionBlock``: ``x + xattn(norm(x), context)`` with an optional parallel ff
  (PaLM style) or a sequential one, ``+ ff(norm2 x)`` (CLIP / open_clip CoCa style).
``norm_bias`` gives every LayerNorm of a block a bias (CLIP-style weights); ``bias`` the linears.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention, CrossAttention
from .feedforward import FeedForward
from .kv_cache import KVCache
from .norms import make_norm, norm_function
from .token_step import TokenStep

__all__ = ["ParallelBlock", "TransformerBlock", "CrossAttentionBlock"]


def _plain(block: nn.Module, cls: type, attention: type = Attention) -> bool:
    """Whether ``block`` is exactly ``cls`` with mammut's ``attention`` and feed-forward (their
    own checks go further), so that its step can be a plain function."""
    return type(block) is cls and type(block.attn) is attention and (block.ff is None or type(block.ff) is FeedForward)


def _module_step(block: nn.Module) -> Callable[[torch.Tensor, TokenStep], torch.Tensor]:
    """The block's own ``forward`` for one cached token (a subclass or replaced parts)."""
    return lambda x, s: block(x, causal=True, mask=s.mask, positions=s.positions, cache=s.cache)


class ParallelBlock(nn.Module):
    """PaLM-style parallel attention + feed-forward block."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        ff_mult: float = 4.0,
        activation: str = "swiglu",
        norm: str = "layernorm",
        rotary: bool = True,
        bias: bool = False,
        norm_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, bias=norm_bias)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, rotary=rotary, bias=bias, dropout=dropout)
        self.ff = FeedForward(dim, mult=ff_mult, activation=activation, bias=bias, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        only_last: int | None = None,
    ) -> torch.Tensor:
        """``only_last``: outputs for the last ``only_last`` tokens only (see ``Attention``)."""
        h = self.norm(x)
        out = self.attn(h, causal=causal, mask=mask, positions=positions, cache=cache, only_last=only_last)
        if only_last is not None:
            x, h = x[:, -only_last:], h[:, -only_last:]
        return x + out + self.ff(h)

    def token_step(self) -> Callable[[torch.Tensor, TokenStep], torch.Tensor]:
        """``forward`` for one cached token as a plain function (see ``token_step.py``)."""
        if not _plain(self, ParallelBlock):
            return _module_step(self)
        norm, attn, ff = norm_function(self.norm), self.attn.token_step(), self.ff.function()

        def step(x: torch.Tensor, s: TokenStep) -> torch.Tensor:
            h = norm(x)
            return x + attn(h, s) + ff(h)

        return step


class TransformerBlock(nn.Module):
    """Sequential pre-norm block: attention then feed-forward."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        ff_mult: float = 4.0,
        activation: str = "gelu",
        norm: str = "layernorm",
        rotary: bool = False,
        bias: bool = False,
        norm_bias: bool = False,
        dropout: float = 0.0,
        feedforward: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, bias=norm_bias)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, rotary=rotary, bias=bias, dropout=dropout)
        # feedforward=False: attention only (openMaMMUT's self-attention in layers whose
        # cross-attention block brings the feed-forward, its ``has_mlp=False``)
        self.norm2 = make_norm(norm, dim, bias=norm_bias) if feedforward else None
        self.ff = FeedForward(dim, mult=ff_mult, activation=activation, bias=bias, dropout=dropout) if feedforward else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        only_last: int | None = None,
    ) -> torch.Tensor:
        """``only_last``: outputs for the last ``only_last`` tokens only (see ``Attention``)."""
        out = self.attn(self.norm1(x), causal=causal, mask=mask, positions=positions, cache=cache, only_last=only_last)
        x = (x if only_last is None else x[:, -only_last:]) + out
        return x if self.ff is None else x + self.ff(self.norm2(x))

    def token_step(self) -> Callable[[torch.Tensor, TokenStep], torch.Tensor]:
        """``forward`` for one cached token as a plain function (see ``token_step.py``)."""
        if not _plain(self, TransformerBlock):
            return _module_step(self)
        norm1, attn = norm_function(self.norm1), self.attn.token_step()
        norm2, ff = (None, None) if self.ff is None else (norm_function(self.norm2), self.ff.function())

        def step(x: torch.Tensor, s: TokenStep) -> torch.Tensor:
            x = x + attn(norm1(x), s)
            return x if ff is None else x + ff(norm2(x))

        return step


class CrossAttentionBlock(nn.Module):
    """Text queries attend to image (or media) tokens; ``parallel_ff`` adds a feed-forward
    branch on the same normed input, as in PaLM-style CoCa/MaMMUT decoders;
    ``sequential_ff`` (with ``parallel_ff=False``) a classic one after the attention,
    ``x + ff(norm2(x))``, as in open_clip's CoCa decoder."""

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        ff_mult: float = 4.0,
        parallel_ff: bool = True,
        activation: str = "swiglu",
        norm: str = "layernorm",
        norm_context: bool = True,
        bias: bool = False,
        norm_bias: bool = False,
        sequential_ff: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if parallel_ff and sequential_ff:
            raise ValueError("sequential_ff: expected parallel_ff=False with sequential_ff=True, got both True")
        self.norm = make_norm(norm, dim, bias=norm_bias)
        self.attn = CrossAttention(
            dim, context_dim=context_dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads,
            norm_context=norm_context, norm=norm, bias=bias, norm_bias=norm_bias, dropout=dropout,
        )
        has_ff = parallel_ff or sequential_ff
        self.ff = FeedForward(dim, mult=ff_mult, activation=activation, bias=bias, dropout=dropout) if has_ff else None
        self.norm2 = make_norm(norm, dim, bias=norm_bias) if sequential_ff else None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self.norm(x)
        out = x + self.attn(h, context, context_mask=context_mask, cache=cache)
        if self.norm2 is not None:
            return out + self.ff(self.norm2(out))
        if self.ff is not None:
            out = out + self.ff(h)
        return out

    def token_step(self) -> Callable[[torch.Tensor, torch.Tensor, TokenStep], torch.Tensor]:
        """``forward`` for one cached token (no context mask) as a plain function ``(x,
        context, step)`` (see ``token_step.py``)."""
        if not _plain(self, CrossAttentionBlock, CrossAttention):
            return lambda x, context, s: self(x, context, cache=s.cache)
        norm, attn = norm_function(self.norm), self.attn.token_step()
        ff = None if self.ff is None else self.ff.function()
        norm2 = None if self.norm2 is None else norm_function(self.norm2)

        def step(x: torch.Tensor, context: torch.Tensor, s: TokenStep) -> torch.Tensor:
            h = norm(x)
            out = x + attn(h, context, s)
            if norm2 is not None:
                return out + ff(norm2(out))  # type: ignore[misc]
            return out if ff is None else out + ff(h)

        return step
