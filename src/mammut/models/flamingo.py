"""Flamingo (arXiv 2204.14198) on a PaLM-style decoder-only language model.

Legend: ``b`` batch, ``n`` text tokens, ``t`` media (images or videos) per row, ``f`` frames
per video, ``m`` encoder tokens per image, ``L`` perceiver latents, ``d`` model width,
``e`` encoder width, ``v`` vocabulary.

- A frozen image encoder turns each image into tokens ``(m, e)``; a ``PerceiverResampler``
  turns each media item into ``L`` latents: ``media (b, t, L, d)``.
- The language model is a stack of causal ``ParallelBlock`` s (rotary positions). Before
  every ``cross_attn_every``-th block (layers 0, k, 2k, ...) a ``GatedCrossAttentionBlock``
  lets the text read the media: ``x + tanh(a_attn) * xattn(x)``, then
  ``x + tanh(a_ff) * ff(x)``, both gates 0 at init, so the model starts as the plain LM.
- Media masking: the media token (``media_token_id``) marks where media item ``k`` (1-based,
  its order in the row) sits. A text token's *media index* is the number of media tokens at
  or before it; it attends only to the latents of that media item (or, with
  ``only_attend_immediate_media=False``, to every item up to it). Tokens before any media
  attend to nothing: their cross-attention output is exactly zero.
- Training stages as in the paper: ``model(text)`` trains the LM; ``freeze_for_flamingo()``
  (or ``FlamingoConfig(freeze_lm=True)``) then leaves only the perceiver and the gated blocks
  trainable. The image encoder is always frozen (no gradients, kept in eval mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ..encoders import encode_images
from ..layers import CrossAttention, FeedForward, KVCache, Linear, ParallelBlock, make_norm
from ..layers.masks import decoder_mask, positions_from_mask
from ..layers.blocks import TransformerBlock
from ..layers.perceiver import PerceiverLayer, PerceiverResampler
from ..layers.token_step import TokenStep, token_plan
from . import register_model
from ._base import ModelBase
from ._checks import check_finite, check_labels, check_text

__all__ = [
    "FlamingoConfig",
    "FlamingoPaLM",
    "GatedCrossAttentionBlock",
    "PerceiverResampler",
    "media_attention_mask",
]

logger = logging.getLogger(__name__)

# what ``image_context`` returns and ``decode`` reads: (media (b, t, L, d), time_mask (b, t))
FlamingoContext = tuple[torch.Tensor, torch.Tensor]
_MEDIA_COUNT = "flamingo_media_count"  # KVCache.state key: media tokens seen so far, (b,)


@dataclass
class FlamingoConfig:
    """Every FlamingoPaLM option. Field names match the seed README's constructor arguments."""

    num_tokens: int = 20000
    dim: int = 512
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    kv_heads: int | None = None  # grouped-query / multi-query attention in the LM
    ff_mult: float = 4.0
    media_token_id: int = 3
    cross_attn_every: int = 3
    perceiver_num_latents: int = 64
    perceiver_depth: int = 2
    num_time_embeds: int = 4  # most media items per row
    max_video_frames: int | None = None  # frame embeddings for videos=; None: no videos
    only_attend_immediate_media: bool = True
    image_dim: int | None = None  # width of the encoder's tokens; defaults to the encoder's or dim
    freeze_lm: bool = False  # Flamingo stage: only the perceiver and the gated blocks train
    pad_id: int = 0
    bos_id: int | None = None  # start token for generation without a prompt
    eos_id: int | None = None  # end token for generation
    tie_embeddings: bool = True
    norm: str = "layernorm"
    dropout: float = 0.0
    vit: dict[str, Any] | None = field(default=None)  # built-in ViT (ViTConfig fields) when no img_encoder
    # or the image encoder as a spec (mammut.encoders.build_encoder), e.g. {"type": "video_tube", "vit": {...},
    # "frames": 8}: saved in the config, so a checkpoint rebuilds it; not with vit or img_encoder=
    encoder: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "cross_attn_every",
                     "perceiver_num_latents", "perceiver_depth", "num_time_embeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("media_token_id", "pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.num_tokens:
                raise ValueError(f"{name}: expected a token id in [0, {self.num_tokens}) (num_tokens), got {value}")
        if self.media_token_id == self.pad_id:
            raise ValueError(f"media_token_id: must differ from pad_id, both are {self.pad_id}")

    def cross_attention_layers(self) -> tuple[int, ...]:
        """0-indexed LM layers preceded by a gated cross-attention block."""
        return tuple(range(0, self.depth, self.cross_attn_every))


def media_attention_mask(
    media_index: torch.Tensor | None,
    time_mask: torch.Tensor | None,
    num_media: int,
    num_latents: int,
    *,
    only_immediate: bool = True,
) -> torch.Tensor | None:
    """Which media latents each text token may attend to, ``(b, n | 1, t * L)`` (``True`` =
    may attend), or ``None`` for "everything".

    ``media_index`` ``(b, n)``: per token, the 1-based index of the last media item at or
    before it (0 = none yet; an index past ``num_media`` matches no item). ``time_mask``
    ``(b, t)``: ``False`` marks absent media.
    """
    if media_index is None and time_mask is None:
        return None
    if media_index is None:
        allowed = time_mask[:, None, :]
    else:
        ids = torch.arange(1, num_media + 1, device=media_index.device)
        idx = media_index.unsqueeze(-1)
        allowed = idx == ids if only_immediate else ids <= idx
        if time_mask is not None:
            allowed = allowed & time_mask[:, None, :]
    return allowed.repeat_interleave(num_latents, dim=-1)


def _check_time_mask(time_mask: torch.Tensor | None, batch: int, num_media: int) -> None:
    if time_mask is None:
        return
    if not torch.is_tensor(time_mask) or time_mask.dtype != torch.bool:
        raise TypeError(f"time_mask: expected a bool tensor (batch, media), got {type(time_mask).__name__} {getattr(time_mask, 'dtype', '')}")
    if tuple(time_mask.shape) != (batch, num_media):
        raise ValueError(f"time_mask: expected shape ({batch}, {num_media}) (batch, media), got {tuple(time_mask.shape)}")


class GatedCrossAttentionBlock(nn.Module):
    """Tanh-gated cross-attention + feed-forward: text ``(b, n, d)`` reads media ``(b, t, L, d)``.

    ``x = x + tanh(attn_gate) * xattn(norm(x), media)``; ``x = x + tanh(ff_gate) * ff(norm(x))``;
    both gates start at 0, so the block is the identity at init.

    forward: ``media_locations`` ``(b, n)`` bool marks the media tokens (see module docstring
    for the masking rule; media tokens beyond the ``t`` items given count as absent media);
    without it every token attends to every (present) media item. ``time_mask`` ``(b, t)``
    bool excludes absent media. A model passes a prebuilt ``media_mask`` (see
    ``media_attention_mask``) instead, once for all its blocks.
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4.0,
        only_attend_immediate_media: bool = True,
        *,
        kv_heads: int | None = None,
        norm: str = "layernorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.only_attend_immediate_media = only_attend_immediate_media
        self.norm = make_norm(norm, dim)
        # no output bias: a token with no media to attend to gets exactly zero
        self.attn = CrossAttention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, bias=False, dropout=dropout)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = make_norm(norm, dim)
        self.ff = FeedForward(dim, mult=ff_mult, activation="gelu", dropout=dropout)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        text: torch.Tensor,
        media: torch.Tensor,
        media_locations: torch.Tensor | None = None,
        time_mask: torch.Tensor | None = None,
        *,
        media_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """text ``(b, n, d)``, media ``(b, t, L, d)`` -> ``(b, n, d)``."""
        if media.ndim != 4:
            raise ValueError(f"media: expected perceived media of shape (batch, media, latents, dim), got {tuple(media.shape)}")
        b, n = text.shape[:2]
        t, num_latents = media.shape[1:3]
        if media.shape[0] != b:
            raise ValueError(f"text / media: batch sizes differ ({b} vs {media.shape[0]})")
        if media_mask is None:
            media_index = None
            if media_locations is not None:
                if not torch.is_tensor(media_locations) or media_locations.dtype != torch.bool:
                    raise TypeError(f"media_locations: expected a bool tensor (batch, text length), got {getattr(media_locations, 'dtype', type(media_locations).__name__)}")
                if tuple(media_locations.shape) != (b, n):
                    raise ValueError(f"media_locations: expected shape ({b}, {n}) (batch, text length), got {tuple(media_locations.shape)}")
                media_index = media_locations.long().cumsum(dim=-1)
            _check_time_mask(time_mask, b, t)
            media_mask = media_attention_mask(media_index, time_mask, t, num_latents, only_immediate=self.only_attend_immediate_media)
        elif media_locations is not None or time_mask is not None:
            raise ValueError("media_mask: pass either media_mask or media_locations / time_mask, not both")
        x = self.attn(self.norm(text), media.flatten(1, 2), context_mask=media_mask, cache=cache)
        text = text + self.attn_gate.tanh() * x
        return text + self.ff_gate.tanh() * self.ff(self.ff_norm(text))


class FlamingoLayer(nn.Module):
    """One LM block, optionally preceded by a gated cross-attention block."""

    def __init__(self, cfg: FlamingoConfig, *, cross: bool) -> None:
        super().__init__()
        self.xattn = (
            GatedCrossAttentionBlock(
                cfg.dim, cfg.dim_head, cfg.heads, cfg.ff_mult, cfg.only_attend_immediate_media,
                kv_heads=cfg.kv_heads, norm=cfg.norm, dropout=cfg.dropout,
            )
            if cross
            else None
        )
        self.block = ParallelBlock(
            cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, kv_heads=cfg.kv_heads, ff_mult=cfg.ff_mult,
            norm=cfg.norm, rotary=True, dropout=cfg.dropout,
        )


@register_model(
    "flamingo_palm",
    tiny=dict(num_tokens=300, dim=64, depth=2, heads=2, dim_head=32, media_token_id=3, cross_attn_every=1,
              perceiver_num_latents=4, perceiver_depth=1, num_time_embeds=4, pad_id=0, bos_id=1, eos_id=2,
              vit=dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32)),
    block_types=(ParallelBlock, GatedCrossAttentionBlock, PerceiverLayer, TransformerBlock),
    tasks=("vqa", "interleaved"),
    inputs=("media_sequence",),
)
class FlamingoPaLM(ModelBase):
    """Flamingo on a PaLM-style LM. ``FlamingoPaLM(num_tokens=..., dim=..., depth=...,
    img_encoder=vit, media_token_id=3, ...)`` as in the seed README, or
    ``FlamingoPaLM(FlamingoConfig(...), img_encoder=...)``.

    Calls: ``model(text)`` -> LM logits ``(b, n, v)``;
    ``model(text, images, time_mask=...)`` with images ``(b, t, c, h, w)``,
    ``model(text, videos=...)`` with videos ``(b, t, f, c, h, w)`` or
    ``model(text, image_embeds=...)`` with encoder tokens ``(b, t, m, e)`` -> Flamingo logits;
    ``return_loss=True`` -> next-token loss over non-pad, non-media tokens.
    """

    config_class = FlamingoConfig

    def __init__(self, config: FlamingoConfig | None = None, *, img_encoder: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg, image_dim = self._setup(config, img_encoder, kwargs)
        img_encoder = self.img_encoder
        if img_encoder is not None:  # always frozen: no gradients, eval mode (see train())
            img_encoder.requires_grad_(False)
            img_encoder.eval()

        self.perceiver = PerceiverResampler(
            cfg.dim, cfg.perceiver_depth, cfg.dim_head, cfg.heads, cfg.perceiver_num_latents, cfg.num_time_embeds,
            cfg.ff_mult, media_dim=image_dim, num_frame_embeds=cfg.max_video_frames, norm=cfg.norm,
        )
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        xattn = set(cfg.cross_attention_layers())
        self.layers = nn.ModuleList(FlamingoLayer(cfg, cross=i in xattn) for i in range(cfg.depth))
        self.norm = make_norm(cfg.norm, cfg.dim)
        self.to_logits = Linear(cfg.dim, cfg.num_tokens, bias=False)
        if cfg.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        if cfg.freeze_lm:
            self.freeze_for_flamingo()

    # ------------------------------------------------------------------ training stages
    def freeze_for_flamingo(self, freeze: bool = True) -> None:
        """Flamingo stage (``freeze=True``): freeze the LM (embeddings, blocks, final norm,
        logits) so only the perceiver and the gated cross-attention blocks train.
        ``freeze=False`` makes the LM trainable again. The image encoder stays frozen."""
        for module in (self.token_emb, self.norm, self.to_logits, *(layer.block for layer in self.layers)):
            module.requires_grad_(not freeze)
        self.config.freeze_lm = freeze
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("FlamingoPaLM: LM %s; %d trainable parameters", "frozen" if freeze else "trainable", n)

    def train(self, mode: bool = True) -> "FlamingoPaLM":
        """As ``nn.Module.train``, but the frozen image encoder always stays in eval mode."""
        super().train(mode)
        if self.img_encoder is not None:
            self.img_encoder.eval()
        return self

    # ------------------------------------------------------------------ media side
    @property
    def media_token_id(self) -> int:
        """The token that marks a media item in the text (``MediaDecoder`` protocol)."""
        return self.config.media_token_id

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.img_encoder is None:
            raise ValueError("images / videos: this model has no img_encoder; pass image_embeds= or build it with img_encoder= / vit=")
        with torch.no_grad():
            return encode_images(self.img_encoder, pixels)

    def image_context(
        self,
        images: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        *,
        videos: torch.Tensor | None = None,
        time_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> FlamingoContext:
        """Perceived media and its time mask, ``((b, t, L, d), (b, t) bool)``, from exactly one
        of images ``(b, t, c, h, w)``, videos ``(b, t, f, c, h, w)`` or encoder tokens
        ``image_embeds`` ``(b, t, m, e)`` (``image_tokens`` is an alias, for the decoder protocol)."""
        embeds_name = "image_embeds"
        if image_tokens is not None:
            if image_embeds is not None:
                raise ValueError("image_embeds / image_tokens: pass one of them (they are aliases)")
            image_embeds, embeds_name = image_tokens, "image_tokens"
        given = [name for name, x in (("images", images), ("videos", videos), (embeds_name, image_embeds)) if x is not None]
        if len(given) != 1:
            raise ValueError(f"images / videos / image_embeds: expected exactly one of them, got {given or 'none'}")
        for name, x, ndim, shape, what in (
            ("images", images, 5, "(batch, media, channels, height, width)", "pixel values"),
            ("videos", videos, 6, "(batch, media, frames, channels, height, width)", "pixel values"),
            (embeds_name, image_embeds, 4, "(batch, media, tokens, dim)", "values"),
        ):
            if x is None:
                continue
            if not torch.is_tensor(x) or not x.is_floating_point():
                raise TypeError(f"{name}: expected a float tensor {shape}, got {type(x).__name__} {getattr(x, 'dtype', '')}")
            if x.ndim != ndim:
                hint = " (one media item per row: add a media axis with .unsqueeze(1))" if x.ndim == ndim - 1 else ""
                raise ValueError(f"{name}: expected a {ndim}-D tensor {shape}, got shape {tuple(x.shape)}{hint}")
            check_finite(name, x, what)  # NaN / inf media: a clear error here, never NaN logits later
            b, t = x.shape[:2]
        if videos is not None and self.config.max_video_frames is None:
            raise ValueError("videos: this model has no frame embeddings; build it with max_video_frames=")
        if t > self.config.num_time_embeds:
            raise ValueError(f"{given[0]}: got {t} media per row, more than num_time_embeds={self.config.num_time_embeds}")
        _check_time_mask(time_mask, b, t)
        if images is not None:
            tokens = self._encode(images.flatten(0, 1))
            tokens = tokens.view(b, t, *tokens.shape[1:])
        elif videos is not None:
            tokens = self._encode(videos.flatten(0, 2))
            tokens = tokens.view(b, t, videos.shape[2], *tokens.shape[1:])
        else:
            tokens = image_embeds
        if tokens.shape[-1] != self.perceiver.media_dim:
            raise ValueError(
                f"{given[0]}: encoder tokens have width {tokens.shape[-1]}, the perceiver expects "
                f"{self.perceiver.media_dim}; set image_dim= to the encoder's width"
            )
        media = self.perceiver(tokens)
        if time_mask is None:
            time_mask = torch.ones(b, t, dtype=torch.bool, device=media.device)
        return media, time_mask

    # ------------------------------------------------------------------ text side
    def _media_index(self, text: torch.Tensor, keep: torch.Tensor, num_media: int, cache: KVCache | None) -> torch.Tensor:
        """1-based index of the last media item at or before each token, ``(b, n)``, counted
        over the whole sequence so far (the running count lives in ``cache.state``)."""
        n = text.shape[1]
        is_media = (text == self.config.media_token_id) & (keep[:, -n:] if cache is None else cache.new_keep(keep, n))
        index = is_media.long().cumsum(dim=-1)
        first = cache is None or _MEDIA_COUNT not in cache.state
        if not first:
            index = index + cache.state[_MEDIA_COUNT].unsqueeze(-1)
        if cache is not None:
            cache.set_state(_MEDIA_COUNT, index[:, -1])  # in place in a static cache (CUDA graphs)
        if first:  # user-given text (or a prompt): every media token needs its media item
            most = int(index[:, -1].max()) if index.numel() else 0
            if most > num_media:
                rows = (index[:, -1] > num_media).nonzero().flatten().tolist()[:8]
                raise ValueError(
                    f"text: rows {rows} hold up to {most} media tokens (media_token_id="
                    f"{self.config.media_token_id}) but only {num_media} media per row were given"
                )
        # later cached steps: a generated media token past the last item matches no media
        return index

    def decode_hidden(
        self,
        text: torch.Tensor,
        context: Union[FlamingoContext, torch.Tensor, None] = None,
        *,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """text ``(b, n)`` (the new tokens) and ``context`` from ``image_context`` (``None``:
        the plain LM) -> final normed states ``(b, n, d)``.

        ``keep`` ``(b, cached + n)`` marks real tokens over the whole sequence so far (default:
        ``text != pad_id``); ``positions`` ``(b, n)`` default to real-token counts. With a
        ``cache`` the media masking rule holds across steps (running media count per row in
        ``cache.state``, reordered with the cache).
        """
        cfg = self.config
        b, n = text.shape
        if cache is not None:
            cache.begin_call()  # layers share this call's rotary tables and key mask
        if keep is None:
            keep = text != cfg.pad_id
        if positions is None:
            positions = positions_from_mask(keep)[:, -n:]
        mask = decoder_mask(keep, cache=cache)
        media_mask = media = None
        if context is not None:
            media, time_mask = (context, None) if torch.is_tensor(context) else context
            if media.ndim != 4 or media.shape[0] != b:
                raise ValueError(f"context: expected perceived media ({b}, media, latents, dim), got {tuple(media.shape)}")
            t, num_latents = media.shape[1:3]
            media_index = self._media_index(text, keep, t, cache)
            media_mask = media_attention_mask(media_index, time_mask, t, num_latents, only_immediate=cfg.only_attend_immediate_media)
        x = self.token_emb(text)
        plan = token_plan(self, cache, text, lambda: [layer.block.token_step() for layer in self.layers])
        step = None if plan is None else TokenStep(cache, positions, mask)  # type: ignore[arg-type]
        for i, layer in enumerate(self.layers):
            if layer.xattn is not None and media is not None:  # gated, media-masked: the module
                x = layer.xattn(x, media, media_mask=media_mask, cache=cache)
            x = layer.block(x, causal=True, mask=mask, positions=positions, cache=cache) if plan is None else plan[i](x, step)
        return self.norm(x)

    def forward(
        self,
        text: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        videos: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        time_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool = False,
    ) -> torch.Tensor:
        """Logits ``(b, n, v)``, or with ``return_loss`` the next-token loss (scalar). Without
        ``labels`` the loss reads ``text[:, :-1]`` and predicts ``text[:, 1:]``; with ``labels``
        ``(b, n)`` (as ``text``) position i predicts ``labels[:, i]``. Pad, media and ``-100``
        labels are never targets; other labels outside ``[0, num_tokens)`` are a ``ValueError``
        before any compute."""
        cfg = self.config
        check_text(text, cfg.num_tokens, cfg.pad_id, min_len=2 if return_loss and labels is None else 1)
        if return_loss and labels is not None:
            check_labels(labels, cfg.num_tokens, shape=tuple(text.shape))
        context = None
        if images is not None or videos is not None or image_embeds is not None:
            context = self.image_context(images, image_embeds, videos=videos, time_mask=time_mask)
        elif time_mask is not None:
            raise ValueError("time_mask: given without images / videos / image_embeds")
        if not return_loss:
            return self.decode(text, context)
        if labels is None:
            inputs, labels = text[:, :-1], text[:, 1:]
        else:
            inputs = text
        return self._caption_loss_from_states(self.decode_hidden(inputs, context), self.caption_targets(labels))

    def caption_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Media tokens are never targets (they mark where an image sits)."""
        return labels.masked_fill(labels == self.config.media_token_id, self.config.pad_id)
