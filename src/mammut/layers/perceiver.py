"""Perceiver resampler (Flamingo, arXiv 2204.14198): a fixed number of learned latents
read a variable number of media tokens.

Legend: ``b`` batch, ``t`` media (images or videos) per row, ``f`` frames per video,
``n`` tokens per image or frame, ``L`` latents, ``d`` width, ``e`` width of the media tokens.

Each layer: the latents are the queries; the keys/values are the media tokens concatenated
with the latents (each normed on its own); then a feed-forward, both residual. Every media
item is resampled on its own, after a learned time (media-slot) embedding is added to its
tokens; video frames also get a learned frame embedding before their tokens are flattened
into one sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention
from .feedforward import FeedForward
from .norms import make_norm

__all__ = ["PerceiverResampler"]


class PerceiverLayer(nn.Module):
    """latents ``(B, L, d)`` attend to ``concat(media, latents)``, then a feed-forward."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: float, norm: str) -> None:
        super().__init__()
        self.norm_media = make_norm(norm, dim)
        self.norm_latents = make_norm(norm, dim)
        self.attn = CrossAttention(dim, heads=heads, dim_head=dim_head, norm_context=False)
        self.norm_ff = make_norm(norm, dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation="gelu")

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media ``(B, n, d)``, latents ``(B, L, d)`` -> latents ``(B, L, d)``."""
        q = self.norm_latents(latents)
        kv = torch.cat((self.norm_media(media), q), dim=1)
        latents = latents + self.attn(q, kv)
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """media tokens -> ``(b, t, L, d)`` latents.

    forward input: ``(b, n, e)`` (one media item per row), ``(b, t, n, e)``, or with
    ``num_frame_embeds`` set, videos ``(b, t, f, n, e)``. ``media_dim`` (``e``) defaults to
    ``dim``; when it differs, a linear layer maps the media tokens to ``dim`` first.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        num_time_embeds: int = 4,
        ff_mult: float = 4.0,
        *,
        media_dim: int | None = None,
        num_frame_embeds: int | None = None,
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("num_latents", num_latents), ("num_time_embeds", num_time_embeds)):
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        if num_frame_embeds is not None and num_frame_embeds < 1:
            raise ValueError(f"num_frame_embeds: expected a positive integer or None, got {num_frame_embeds}")
        self.dim = dim
        self.media_dim = dim if media_dim is None else media_dim
        self.num_time_embeds, self.num_frame_embeds = num_time_embeds, num_frame_embeds
        self.proj_media = nn.Linear(self.media_dim, dim, bias=False) if self.media_dim != dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.time_emb = nn.Parameter(torch.randn(num_time_embeds, dim) * 0.02)
        self.frame_emb = nn.Parameter(torch.randn(num_frame_embeds, dim) * 0.02) if num_frame_embeds else None
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, norm=norm) for _ in range(depth)
        )
        self.norm = make_norm(norm, dim)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def _check(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"media: expected a float tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        dims = (3, 4, 5) if self.frame_emb is not None else (3, 4)
        if x.ndim not in dims:
            shapes = "(b, n, d) or (b, t, n, d)" + (" or videos (b, t, frames, n, d)" if self.frame_emb is not None else "")
            hint = "" if self.frame_emb is not None else " (videos need num_frame_embeds)"
            raise ValueError(f"media: expected shape {shapes}{hint}, got {tuple(x.shape)}")
        if x.shape[-1] != self.media_dim:
            raise ValueError(f"media: expected last dimension {self.media_dim} (media_dim), got {tuple(x.shape)}")
        if x.ndim >= 4 and x.shape[1] > self.num_time_embeds:
            raise ValueError(
                f"media: got {x.shape[1]} media per row (dim 1 of {tuple(x.shape)}) but only "
                f"num_time_embeds={self.num_time_embeds} time embeddings; build the resampler with more"
            )
        if x.ndim == 5 and x.shape[2] > self.num_frame_embeds:
            raise ValueError(
                f"media: got {x.shape[2]} frames per video (dim 2 of {tuple(x.shape)}) but only "
                f"num_frame_embeds={self.num_frame_embeds} frame embeddings"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, n, e)`` | ``(b, t, n, e)`` | ``(b, t, f, n, e)`` -> ``(b, t, L, d)``."""
        self._check(x)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = self.proj_media(x)
        if x.ndim == 5:  # videos: frame embeddings, then one token sequence per video
            x = x + self.frame_emb[: x.shape[2], None, :]
            x = x.flatten(2, 3)
        b, t, n, d = x.shape
        x = (x + self.time_emb[:t, None, :]).reshape(b * t, n, d)
        latents = self.latents.expand(b * t, -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).view(b, t, -1, d)
