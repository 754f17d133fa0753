"""CoCa (arXiv 2205.01917): Contrastive Captioners.

Legend: ``b`` batch, ``n`` text tokens, ``m`` image-encoder tokens, ``q`` pooled image tokens
(the decoder's context), ``d`` decoder width, ``v`` vocabulary, ``l`` latent (embedding) width.

The text runs once through ``unimodal_depth`` causal layers with a CLS token appended after
it; the CLS output (normed, projected, L2-normalised) is the text embedding. The token outputs
(without the CLS) go on through ``multimodal_depth`` causal layers that also cross-attend to
the pooled image tokens and give next-token logits. Image tokens are pooled by attention:
``image_pool="separate"`` (default, paper): one pooler with 1 query for the contrastive
embedding and one with ``num_img_queries`` queries for the decoder's context;
``image_pool="shared"`` (seed repo, open_clip): one pooler with ``num_img_queries + 1``
queries, query 0 contrastive, the rest the context.

The CLS token sees only the non-pad tokens (and itself) and sits at position = number of real
tokens, so right-padding changes neither the embedding nor the loss. Defaults follow the
paper and the seed repo (CoCa-pytorch: PaLM-style parallel blocks, SwiGLU, rotary positions,
tied embeddings), except the loss weights, which keep the seed's defaults (caption 1,
contrastive 1; the paper uses caption 2, contrastive 1) and the temperature, initialised at
0.07 as in the paper. The contrastive pass reads the whole text (the seed reads
``text[:, :-1]``). Other options express open_clip's CoCa exactly (see
``CoCa.from_open_clip``): ``block="sequential"``, ``activation="gelu"``, ``positions="learned"``,
``bias=True``, ``cls_position="end"``, ``cls_mask="open_clip_legacy"``, ``context_norm=True``,
``pool_norm_queries=True``, ``tie_embeddings=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AttentionPooler, CrossAttentionBlock, KVCache, Linear, ParallelBlock, TransformerBlock, make_norm
from ..layers.masks import decoder_mask, padding_mask, positions_from_mask
from ..layers.token_step import TokenStep, run_token_plan, token_plan
from ..losses import ContrastiveLoss
from . import register_model
from ._captioner import ContrastiveCaptioner
from ._checks import check_choice, check_text

__all__ = ["CoCaConfig", "CoCa"]


@dataclass
class CoCaConfig:
    """Every CoCa option. Field names match the seed README's constructor arguments."""

    dim: int = 512
    num_tokens: int = 20000
    unimodal_depth: int = 6
    multimodal_depth: int = 6
    dim_head: int = 64
    heads: int = 8
    kv_heads: int | None = None  # grouped-query / multi-query self-attention (seed: 1)
    ff_mult: float = 4.0
    image_dim: int | None = None  # width of the encoder's tokens; defaults to the encoder's or dim
    dim_latents: int | None = None  # contrastive embedding width; defaults to dim
    caption_loss_weight: float = 1.0  # seed default; the paper uses 2.0
    contrastive_loss_weight: float = 1.0
    logit_scale_init: float = 1 / 0.07  # learnable temperature, paper init 0.07
    pad_id: int = 0
    bos_id: int | None = None  # start token for generation without a prompt
    eos_id: int | None = None  # end token for generation
    image_pool: str = "separate"  # "separate" (paper: 1 + num_img_queries) | "shared" (seed, open_clip)
    num_img_queries: int = 256  # decoder context tokens
    pool_heads: int | None = None  # attention pooler heads; defaults to heads
    pool_dim_head: int | None = None  # attention pooler head size; defaults to dim_head
    pool_norm_queries: bool = False  # norm the pooler's queries too (open_clip)
    block: str = "parallel"  # "parallel" (PaLM, seed) | "sequential" (CLIP, open_clip)
    activation: str = "swiglu"  # "swiglu" | "gelu" | "quickgelu"
    positions: str = "rotary"  # "rotary" | "learned" (absolute, max_text_len + 1 entries)
    max_text_len: int = 76  # longest text with learned positions (the CLS takes one more)
    cls_position: str = "after_text"  # "after_text": number of real tokens | "end": after the padded text
    cls_mask: str = "text"  # "text": keys are the real tokens (+ CLS) | "open_clip_legacy"
    context_norm: bool = False  # norm the image context in every cross-attention (open_clip)
    bias: bool = False  # biases in every linear and norm of the text side (open_clip)
    tie_embeddings: bool = True  # logits share the token embedding (seed); open_clip unties
    norm: str = "layernorm"
    dropout: float = 0.0
    vit: dict[str, Any] | None = field(default=None)  # built-in ViT (ViTConfig fields) when no img_encoder
    # or the image encoder as a spec (mammut.encoders.build_encoder), e.g. {"type": "video_tube", "vit": {...},
    # "frames": 8}: saved in the config, so a checkpoint rebuilds it; not with vit or img_encoder=
    encoder: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        check_choice("image_pool", self.image_pool, ("separate", "shared"))
        check_choice("block", self.block, ("parallel", "sequential"))
        check_choice("activation", self.activation, ("swiglu", "gelu", "quickgelu"))
        check_choice("positions", self.positions, ("rotary", "learned"))
        check_choice("cls_position", self.cls_position, ("after_text", "end"))
        check_choice("cls_mask", self.cls_mask, ("text", "open_clip_legacy"))
        for name in ("dim", "num_tokens", "heads", "dim_head", "num_img_queries", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("unimodal_depth", "multimodal_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)}")
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id: expected a value in [0, {self.num_tokens}), got {self.pad_id}")


def _self_block(cfg: CoCaConfig) -> nn.Module:
    """A causal self-attention block of the unimodal or multimodal stack."""
    block = ParallelBlock if cfg.block == "parallel" else TransformerBlock
    return block(
        cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, kv_heads=cfg.kv_heads, ff_mult=cfg.ff_mult,
        activation=cfg.activation, norm=cfg.norm, rotary=cfg.positions == "rotary", bias=cfg.bias,
        norm_bias=cfg.bias, dropout=cfg.dropout,
    )


class MultimodalLayer(nn.Module):
    """A causal self-attention block, then a cross-attention block (parallel feed-forward in
    the PaLM style, its own sequential feed-forward in the CLIP style)."""

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.block = _self_block(cfg)
        parallel = cfg.block == "parallel"
        self.cross = CrossAttentionBlock(
            cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, kv_heads=cfg.kv_heads, ff_mult=cfg.ff_mult,
            parallel_ff=parallel, sequential_ff=not parallel, activation=cfg.activation, norm=cfg.norm,
            norm_context=cfg.context_norm, bias=cfg.bias, norm_bias=cfg.bias, dropout=cfg.dropout,
        )


@register_model(
    "coca",
    tiny=dict(dim=64, num_tokens=300, unimodal_depth=1, multimodal_depth=1, heads=2, dim_head=32, bos_id=1, eos_id=2,
              pad_id=0, num_img_queries=8, vit=dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32)),
    block_types=(ParallelBlock, TransformerBlock, CrossAttentionBlock),
    tasks=("pretrain", "vqa"),
    inputs=("image",),
)
class CoCa(ContrastiveCaptioner):
    """CoCa. ``CoCa(dim=..., img_encoder=vit, image_dim=..., num_tokens=..., unimodal_depth=...,
    multimodal_depth=..., dim_head=..., heads=..., caption_loss_weight=..., contrastive_loss_weight=...)``
    as in the seed README, or ``CoCa(CoCaConfig(...))``.

    Calls (``text`` ``(b, n)`` ids, ``images`` ``(b, c, H, W)`` or ``image_tokens`` ``(b, m, image_dim)``):
    ``model(text, images, return_loss=True)`` -> scalar loss;
    ``model(text, images)`` -> caption logits ``(b, n, v)`` (position i predicts token i + 1);
    ``model(text, images, return_embeddings=True)`` -> L2-normalised ``(text (b, l), image (b, l))``.
    """

    config_class = CoCaConfig

    def __init__(self, config: CoCaConfig | None = None, *, img_encoder: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg, self.image_dim = self._setup(config, img_encoder, kwargs)
        dim_latents = cfg.dim_latents or cfg.dim

        # image side: encoder tokens -> (contrastive embedding, decoder context)
        pool = dict(
            context_dim=self.image_dim, heads=cfg.pool_heads or cfg.heads, dim_head=cfg.pool_dim_head or cfg.dim_head,
            norm=cfg.norm, norm_queries=cfg.pool_norm_queries, bias=cfg.bias, norm_bias=cfg.bias,
        )
        shared = cfg.image_pool == "shared"
        num_queries = cfg.num_img_queries + 1 if shared else cfg.num_img_queries
        self.img_pool = AttentionPooler(cfg.dim, num_queries=num_queries, **pool)
        self.img_pool_contrastive = None if shared else AttentionPooler(cfg.dim, num_queries=1, **pool)
        self.img_to_latents = nn.Linear(cfg.dim, dim_latents, bias=False)

        # text side: unimodal tower with a CLS token, then the multimodal decoder
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        learned = cfg.positions == "learned"
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_text_len + 1, cfg.dim) * 0.01) if learned else None
        self.text_cls = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.unimodal_layers = nn.ModuleList(_self_block(cfg) for _ in range(cfg.unimodal_depth))
        self.text_cls_norm = make_norm(cfg.norm, cfg.dim, bias=cfg.bias)
        self.text_to_latents = nn.Linear(cfg.dim, dim_latents, bias=False)
        self.multimodal_layers = nn.ModuleList(MultimodalLayer(cfg) for _ in range(cfg.multimodal_depth))
        self.norm = make_norm(cfg.norm, cfg.dim, bias=cfg.bias)
        self.to_logits = Linear(cfg.dim, cfg.num_tokens, bias=False)
        if cfg.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight

        self.contrastive = ContrastiveLoss("softmax", init_scale=cfg.logit_scale_init)

    # ------------------------------------------------------------------ image side
    def image_embed_and_context(self, tokens: torch.Tensor, *, context: bool = True,
                                normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens ``(b, m, image_dim)`` -> (embedding ``(b, l)``, L2-normalised unless
        ``normalize=False``; context ``(b, q, d)`` or None when ``context=False``)."""
        if self.img_pool_contrastive is None:
            pooled = self.img_pool(tokens)
            embed, ctx = pooled[:, 0], pooled[:, 1:]
        else:
            embed = self.img_pool_contrastive(tokens)[:, 0]
            ctx = self.img_pool(tokens) if context else None
        embed = self.img_to_latents(embed)
        return (F.normalize(embed, dim=-1) if normalize else embed), ctx

    def image_context(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """What the decoder cross-attends to, ``(b, q, d)`` (decoder protocol)."""
        return self.image_embed_and_context(self.image_tokens(images, image_tokens))[1]

    def embed_image(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                    *, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(b, l)``, L2-normalised unless ``normalize=False``."""
        return self.image_embed_and_context(self.image_tokens(images, image_tokens), context=False, normalize=normalize)[0]

    # ------------------------------------------------------------------ text side
    def _learned_positions(self, positions: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Learned position embeddings ``(b, n, d)`` (with a clear error past the table;
        ``check=False``: the caller has checked, no host read)."""
        top = int(positions.max()) if check else 0
        if top >= self.pos_emb.shape[0]:
            raise ValueError(
                f"text: expected at most {self.config.max_text_len} tokens (max_text_len, learned positions; "
                f"the CLS takes one more), got a token at position {top}"
            )
        return self.pos_emb[positions]

    def _embed_tokens(self, text: torch.Tensor, positions: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        x = self.token_emb(text)
        return x if self.pos_emb is None else x + self._learned_positions(positions, check=check)

    def decode_positions(self) -> int | None:
        """How many positions the decoder can embed (learned positions: the table's rows),
        ``None`` without a limit (rotary). ``generate`` checks decoding against it (up front,
        and before each step only when prompt + new tokens could pass it): the cached steps
        after the prompt do not read positions back from the device themselves."""
        return None if self.pos_emb is None else self.pos_emb.shape[0]

    def _unimodal(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unimodal pass with the CLS: text ``(b, n)`` -> (token features ``(b, n, d)``,
        normed CLS output ``(b, d)``, token positions ``(b, n)``)."""
        cfg = self.config
        b, n = text.shape
        keep = text != cfg.pad_id
        if cfg.cls_position == "end":
            positions = torch.arange(n, device=text.device).expand(b, n)
            cls_pos = torch.full((b, 1), n, device=text.device)
        else:
            positions = positions_from_mask(keep)
            cls_pos = keep.sum(dim=1, keepdim=True)
        all_pos = torch.cat((positions, cls_pos), dim=1)
        x = self.token_emb(text)
        x = torch.cat((x, self.text_cls.expand(b, 1, -1).to(x.dtype)), dim=1)
        if self.pos_emb is not None:
            x = x + self._learned_positions(all_pos)
        ones = keep.new_ones(b, 1)
        if cfg.cls_mask == "open_clip_legacy":
            # open_clip's original CoCa mask (correct_cls_mask=False): key j is kept when j == 0
            # or token j - 1 is not pad; the published weights were trained with it
            keys = torch.cat((ones, keep), dim=1)
        else:
            keys = torch.cat((keep, ones), dim=1)
        mask = None if bool(keys.all()) else padding_mask(keys)
        for layer in self.unimodal_layers:
            x = layer(x, causal=True, mask=mask, positions=all_pos)
        return x[:, :-1], self.text_cls_norm(x[:, -1]), positions

    def _text_latents(self, cls_out: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        embed = self.text_to_latents(cls_out)
        return F.normalize(embed, dim=-1) if normalize else embed

    def embed_text(self, text: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(b, l)`` from the CLS token, L2-normalised unless
        ``normalize=False``; never sees images."""
        check_text(text, self.config.num_tokens, self.config.pad_id)
        return self._text_latents(self._unimodal(text)[1], normalize)

    def _multimodal(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        for layer in self.multimodal_layers:
            x = layer.block(x, causal=True, mask=mask, positions=positions, cache=cache)
            x = layer.cross(x, context, cache=cache)
        return self.norm(x)  # final states; logits are self.to_logits of them

    def decode_hidden(
        self,
        text: torch.Tensor,
        context: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """New tokens ``(b, n)`` and context ``(b, q, d)`` -> final normed states ``(b, n, d)``
        through the unimodal then the multimodal layers (no CLS: nothing sees it causally);
        ``decode`` gives their logits ``(b, n, v)``.

        ``keep`` ``(b, cached + n)`` marks real tokens over the whole sequence so far (default:
        ``text != pad_id``); ``positions`` ``(b, n)`` default to real-token counts.
        """
        first = cache is None or len(cache) == 0  # later cached steps: positions checked by the caller
        if cache is not None:
            cache.begin_call()  # layers share this call's rotary tables and key mask
        if keep is None:
            keep = text != self.config.pad_id
        if positions is None:
            positions = positions_from_mask(keep)[:, -text.shape[1]:]
        mask = decoder_mask(keep, cache=cache)
        x = self._embed_tokens(text, positions, check=first)
        plan = token_plan(self, cache, text, self._token_steps)
        if plan is not None:  # a cached one-token step: the layers' plain step functions
            return self.norm(run_token_plan(plan, x, context, TokenStep(cache, positions, mask)))  # type: ignore[arg-type]
        for layer in self.unimodal_layers:
            x = layer(x, causal=True, mask=mask, positions=positions, cache=cache)
        return self._multimodal(x, context, mask=mask, positions=positions, cache=cache)

    def _token_steps(self) -> list[tuple[Any, Any]]:
        return [(layer.token_step(), None) for layer in self.unimodal_layers] + [
            (layer.block.token_step(), layer.cross.token_step()) for layer in self.multimodal_layers]

    # ------------------------------------------------------------------ losses
    def text_and_caption_loss(self, text: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                              context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One unimodal pass over ``text`` (the CLS after it gives the text embedding), then the
        multimodal layers over the states of ``inputs`` (``text`` or ``text[:, :-1]``)."""
        feats, cls_out, positions = self._unimodal(text)
        keep = text != self.config.pad_id
        n = inputs.shape[1]
        feats, positions, keep = feats[:, :n], positions[:, :n], keep[:, :n]
        hidden = self._multimodal(feats, context, mask=decoder_mask(keep), positions=positions)
        return self._text_latents(cls_out), self._caption_loss_from_states(hidden, labels)

    def forward_logits(self, text: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The logits of the training pass: the unimodal layers read the text with its CLS (as
        open_clip's CoCa does, which the converted weights are checked against). No text token
        sees the CLS, so at real positions these equal ``decode``'s (up to the rounding of another
        attention kernel under autograd) for right-padded or unpadded text, as tokenizers give
        it. For left- or mid-padded text the open_clip layout options differ from ``decode`` by
        design: ``cls_mask="open_clip_legacy"`` shifts the key mask by one and
        ``cls_position="end"`` counts pads in the positions (open_clip's rules), while ``decode``
        and generation count real tokens only."""
        feats, _, positions = self._unimodal(text)
        mask = decoder_mask(text != self.config.pad_id)
        return self.to_logits(self._multimodal(feats, context, mask=mask, positions=positions))
