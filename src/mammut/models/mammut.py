"""MaMMUT (arXiv 2303.16839): one image encoder, one text decoder, two passes.

Legend: ``b`` batch, ``n`` text tokens, ``m`` image tokens, ``d`` decoder width,
``v`` vocabulary, ``l`` latent (embedding) width.

Both passes share every decoder weight:
- contrastive pass: no cross-attention, bidirectional self-attention (paper) or causal
  (seed repo), text features average-pooled over non-pad tokens (paper) or read from a CLS
  token appended after the text (seed repo);
- captioning pass: causal self-attention with cross-attention to the image in the chosen
  layers, next-token logits.
During training the order of the two passes is drawn at random, as in the paper.

Which defaults follow whom. The paper's rules are the defaults for the passes, the pooling and
the loss (``contrastive_pass="bidirectional"``, ``text_pool="mean"``, ``image_pool="mean"``,
``contrastive_loss="focal"``); the seed repo (MaMMUT-pytorch) is one option away:
``contrastive_pass="causal", text_pool="cls", image_pool="attention", contrastive_loss="softmax"``.
The seed's defaults are kept where the seed README's calls rely on them: PaLM-style parallel
SwiGLU blocks with rotary positions and tied embeddings, and ``cross_attend_every=1``, which
cross-attends in EVERY decoder layer; the paper cross-attends in about half of them
(``cross_attend_every=2``), openMaMMUT in 1-indexed layers 1, 3, 5, ... (``cross_attend_layers``).
The focal loss averages its two directions (``contrastive_directions="mean"``); RO-ViT's formula
sums them (``"sum"``: the same gradients, twice the scale).

openMaMMUT (LAION's open_clip fork, ``MaMMUT.from_open_clip``) is these options:
``block="sequential", activation="gelu", bias=True, positions="learned", max_text_len=77,
cross_attend_layers=(1, 3, ...), text_pool="mean_all", image_pool="norm_mean",
context_proj="linear", tie_embeddings=False, text_proj=False, contrastive_loss="softmax"``
(and ``cross_self_ff=False`` for its configs with ``has_mlp: false``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AttentionPooler, CrossAttentionBlock, KVCache, Linear, ParallelBlock, make_norm, masked_mean
from ..layers.blocks import TransformerBlock
from ..layers.dropout import stochastic
from ..layers.masks import decoder_mask, padding_mask, positions_from_mask
from ..layers.token_step import TokenStep, run_token_plan, token_plan
from ..losses import ContrastiveLoss
from . import register_model
from ._captioner import ContrastiveCaptioner, LossOutput
from ._checks import check_choice, check_text

__all__ = ["MaMMUTConfig", "MaMMUT", "LossOutput"]  # LossOutput: from ._captioner


@dataclass
class MaMMUTConfig:
    """Every MaMMUT option. Field names match the seed README's constructor arguments."""

    dim: int = 512
    num_tokens: int = 20000
    depth: int = 6
    cross_attend_every: int = 1
    cross_attend_layers: tuple[int, ...] | None = None  # 1-indexed; overrides cross_attend_every
    dim_head: int = 64
    heads: int = 8
    kv_heads: int | None = None  # grouped-query / multi-query attention (1 = MQA)
    ff_mult: float = 4.0
    image_dim: int | None = None  # width of the encoder's tokens; defaults to the ViT's or dim
    dim_latents: int | None = None  # contrastive embedding width; defaults to dim
    caption_loss_weight: float = 1.0
    contrastive_loss_weight: float = 1.0
    pad_id: int = 0
    bos_id: int | None = None  # start token for generation without a prompt
    eos_id: int | None = None  # end token for generation
    contrastive_pass: str = "bidirectional"  # "bidirectional" (paper) | "causal" (seed)
    # "mean" (paper): over real tokens | "cls" (seed) | "mean_all" (openMaMMUT): every position,
    # pads included, is attended to and averaged (the embedding depends on the padded length)
    text_pool: str = "mean"
    # "mean" (paper): mean of the projected tokens | "attention" (seed): attention pooler |
    # "norm_mean" (openMaMMUT): norm(mean of all encoder tokens, CLS included), then projection
    image_pool: str = "mean"
    num_img_queries: int = 256  # with image_pool="attention": decoder context queries (+1 contrastive)
    # encoder tokens -> cross-attention context: "auto" a bias-free linear when the widths
    # differ, else none | "linear" always a bias-free linear (openMaMMUT's map_viz2txt_kv)
    context_proj: str = "auto"
    contrastive_loss: str = "focal"  # "focal" (paper) | "softmax" (seed, openMaMMUT)
    contrastive_directions: str = "mean"  # focal: "mean" of the two directions | "sum" (RO-ViT's formula)
    focal_alpha: float = 0.5
    focal_gamma: float = 1.0
    shuffle_passes: bool = True
    tie_embeddings: bool = True
    text_proj: bool = True  # a projection to dim_latents after text pooling (openMaMMUT: none)
    block: str = "parallel"  # "parallel" (PaLM, seed) | "sequential" (pre-norm CLIP style, openMaMMUT)
    activation: str = "swiglu"  # "swiglu" | "gelu" | "quickgelu"
    bias: bool = False  # biases in the decoder's linears and norms (openMaMMUT)
    positions: str = "rotary"  # "rotary" | "learned" (absolute, max_text_len rows; openMaMMUT)
    max_text_len: int = 77  # with learned positions: the longest text the decoder embeds
    cross_self_ff: bool = True  # sequential blocks: layers with cross-attention keep the self block's ff
    norm: str = "layernorm"
    dropout: float = 0.0
    vit: dict[str, Any] | None = field(default=None)  # built-in ViT (ViTConfig fields) when no img_encoder
    # or the image encoder as a spec (mammut.encoders.build_encoder), e.g. {"type": "video_tube", "vit": {...},
    # "frames": 8}: saved in the config, so a checkpoint rebuilds it; not with vit or img_encoder=
    encoder: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        check_choice("contrastive_pass", self.contrastive_pass, ("bidirectional", "causal"))
        check_choice("text_pool", self.text_pool, ("mean", "cls", "mean_all"))
        check_choice("image_pool", self.image_pool, ("mean", "attention", "norm_mean"))
        check_choice("context_proj", self.context_proj, ("auto", "linear"))
        check_choice("contrastive_loss", self.contrastive_loss, ("focal", "softmax"))
        check_choice("contrastive_directions", self.contrastive_directions, ("mean", "sum"))
        check_choice("block", self.block, ("parallel", "sequential"))
        check_choice("activation", self.activation, ("swiglu", "gelu", "quickgelu"))
        check_choice("positions", self.positions, ("rotary", "learned"))
        for name in ("dim", "num_tokens", "depth", "heads", "dim_head", "cross_attend_every", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.text_pool == "mean_all" and self.contrastive_pass != "bidirectional":
            raise ValueError(f"text_pool: 'mean_all' attends to every position, expected contrastive_pass='bidirectional', "
                             f"got {self.contrastive_pass!r}")
        if self.contrastive_directions == "sum" and self.contrastive_loss != "focal":
            raise ValueError("contrastive_directions: 'sum' is RO-ViT's focal formula, expected contrastive_loss='focal', "
                             f"got {self.contrastive_loss!r} (the softmax loss averages its two directions)")
        if not self.cross_self_ff and self.block != "sequential":
            raise ValueError(f"cross_self_ff: False needs block='sequential', got block={self.block!r}")
        if not self.text_proj and self.dim_latents not in (None, self.dim):
            raise ValueError(f"dim_latents: without text_proj the text embedding has the decoder width {self.dim}, "
                             f"got dim_latents={self.dim_latents}")
        if self.cross_attend_layers is not None:
            layers = tuple(int(i) for i in self.cross_attend_layers)
            bad = [i for i in layers if not 1 <= i <= self.depth]
            if bad:
                raise ValueError(f"cross_attend_layers: expected layer numbers in 1..{self.depth} (depth), got {bad}")
            self.cross_attend_layers = layers
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id: expected a value in [0, {self.num_tokens}), got {self.pad_id}")

    def cross_attention_layers(self) -> tuple[int, ...]:
        """1-indexed decoder layers that cross-attend in the captioning pass."""
        if self.cross_attend_layers is not None:
            return self.cross_attend_layers
        return tuple(i for i in range(1, self.depth + 1) if i % self.cross_attend_every == 0)


class DecoderLayer(nn.Module):
    """A shared self-attention block and, in chosen layers, a cross-attention block after it
    (normed context; with parallel blocks a parallel feed-forward, with sequential blocks its
    own feed-forward after the attention, as openMaMMUT)."""

    def __init__(self, cfg: MaMMUTConfig, *, cross: bool) -> None:
        super().__init__()
        kw = dict(heads=cfg.heads, dim_head=cfg.dim_head, kv_heads=cfg.kv_heads, ff_mult=cfg.ff_mult, norm=cfg.norm,
                  dropout=cfg.dropout, activation=cfg.activation, bias=cfg.bias, norm_bias=cfg.bias)
        rotary = cfg.positions == "rotary"
        if cfg.block == "parallel":
            self.block = ParallelBlock(cfg.dim, rotary=rotary, **kw)
        else:
            self.block = TransformerBlock(cfg.dim, rotary=rotary, feedforward=cfg.cross_self_ff or not cross, **kw)
        parallel = cfg.block == "parallel"
        self.cross = CrossAttentionBlock(cfg.dim, parallel_ff=parallel, sequential_ff=not parallel, **kw) if cross else None


@register_model(
    "mammut",
    tiny=dict(dim=64, num_tokens=300, depth=2, heads=2, dim_head=32, bos_id=1, eos_id=2, pad_id=0,
              vit=dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32)),
    block_types=(ParallelBlock, CrossAttentionBlock, TransformerBlock),
    tasks=("pretrain", "vqa", "video", "videoqa"),
    inputs=("image",),
)
class MaMMUT(ContrastiveCaptioner):
    """MaMMUT. ``MaMMUT(dim=..., img_encoder=vit, image_dim=..., num_tokens=..., depth=...)``
    as in the seed README, or ``MaMMUT(MaMMUTConfig(...))``.

    Calls: ``model(text, images, return_loss=True)`` -> scalar loss;
    ``model(text, images)`` -> caption logits ``(b, n, v)``;
    ``model(text, images, return_embeddings=True)`` -> L2-normalised ``(text (b, l), image (b, l))``.
    """

    config_class = MaMMUTConfig

    def __init__(self, config: MaMMUTConfig | None = None, *, img_encoder: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg, image_dim = self._setup(config, img_encoder, kwargs)
        self.image_dim = image_dim
        dim_latents = cfg.dim_latents or cfg.dim

        # image side: tokens -> (contrastive embedding, decoder context)
        self.img_pool = self.img_proj = self.img_norm = None
        if cfg.image_pool == "attention":
            self.img_pool = AttentionPooler(
                cfg.dim, num_queries=cfg.num_img_queries + 1, context_dim=image_dim, heads=cfg.heads, dim_head=cfg.dim_head, norm=cfg.norm
            )
        elif cfg.context_proj == "linear" or image_dim != cfg.dim:
            self.img_proj = nn.Linear(image_dim, cfg.dim, bias=False)
        else:
            self.img_proj = nn.Identity()
        if cfg.image_pool == "norm_mean":
            self.img_norm = make_norm(cfg.norm, image_dim, bias=cfg.bias)
        pooled_dim = image_dim if cfg.image_pool == "norm_mean" else cfg.dim
        self.img_to_latents = nn.Linear(pooled_dim, dim_latents, bias=False)

        # text decoder, shared by both passes
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        learned = cfg.positions == "learned"
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_text_len, cfg.dim) * 0.01) if learned else None
        self.text_cls = nn.Parameter(torch.randn(cfg.dim) * 0.02) if cfg.text_pool == "cls" else None
        xattn = set(cfg.cross_attention_layers())
        self.layers = nn.ModuleList(DecoderLayer(cfg, cross=(i + 1) in xattn) for i in range(cfg.depth))
        self.norm = make_norm(cfg.norm, cfg.dim, bias=cfg.bias)
        self.to_logits = Linear(cfg.dim, cfg.num_tokens, bias=False)
        if cfg.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        self.text_to_latents = nn.Linear(cfg.dim, dim_latents, bias=False) if cfg.text_proj else nn.Identity()

        self.contrastive = ContrastiveLoss(cfg.contrastive_loss, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                           directions=cfg.contrastive_directions)

    # ------------------------------------------------------------------ image side
    def image_embed_and_context(self, tokens: torch.Tensor, *, normalize: bool = True,
                                context: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens ``(b, m, image_dim)`` -> (embedding ``(b, l)``, L2-normalised unless
        ``normalize=False``; context ``(b, m', d)``, or None with ``context=False`` where the
        embedding does not need it: ``image_pool="norm_mean"``)."""
        if self.img_pool is not None:
            pooled = self.img_pool(tokens)
            embed, ctx = pooled[:, 0], pooled[:, 1:]
        elif self.img_norm is not None:
            embed, ctx = self.img_norm(tokens.mean(dim=1)), self.img_proj(tokens) if context else None
        else:
            ctx = self.img_proj(tokens)
            embed = ctx.mean(dim=1)
        embed = self.img_to_latents(embed)
        return (F.normalize(embed, dim=-1) if normalize else embed), ctx

    def image_context(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """What the captioning pass cross-attends to, ``(b, m', d)`` (used by generation)."""
        return self.image_embed_and_context(self.image_tokens(images, image_tokens))[1]

    def embed_image(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                    *, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(b, l)``, L2-normalised unless ``normalize=False``."""
        return self.image_embed_and_context(self.image_tokens(images, image_tokens), normalize=normalize, context=False)[0]

    # ------------------------------------------------------------------ text side
    def _learned_positions(self, positions: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Learned position embeddings ``(b, n, d)``; ``check=False``: the caller checked the
        positions against the table (no host read)."""
        if check:
            top = int(positions.max()) if positions.numel() else 0
            if top >= self.pos_emb.shape[0]:
                raise ValueError(f"text: expected at most {self.config.max_text_len} tokens (max_text_len, learned "
                                 f"positions), got a token at position {top}")
        return self.pos_emb[positions]

    def _embed_tokens(self, text: torch.Tensor, positions: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        x = self.token_emb(text)
        return x if self.pos_emb is None else x + self._learned_positions(positions, check=check)

    def decode_positions(self) -> int | None:
        """How many positions the decoder can embed: the learned table's rows, ``None`` with
        rotary positions (``generate`` checks decoding against it)."""
        return None if self.pos_emb is None else self.pos_emb.shape[0]

    def _contrastive_inputs(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token states ``(b, n[+1], d)``, keep ``(b, n[+1])``, positions and mask of the
        contrastive pass (with the CLS after the text, when ``text_pool="cls"``; with
        ``text_pool="mean_all"`` every position is kept, pads included, at its index)."""
        b, n = text.shape
        if self.config.text_pool == "mean_all":
            keep = torch.ones_like(text, dtype=torch.bool)
            positions = torch.arange(n, device=text.device).expand(b, n)
        else:
            keep = text != self.config.pad_id
            positions = positions_from_mask(keep)
        x = self._embed_tokens(text, positions)
        if self.text_cls is not None:
            # CLS after the text, at the position right after the last real token
            cls_pos = keep.sum(dim=1, keepdim=True)
            cls = self.text_cls.expand(b, 1, -1).to(x.dtype)
            if self.pos_emb is not None:
                cls = cls + self._learned_positions(cls_pos)
            x = torch.cat((x, cls), dim=1)
            positions = torch.cat((positions, cls_pos), dim=1)
            keep = F.pad(keep, (0, 1), value=True)
        mask = None if bool(keep.all()) else padding_mask(keep)
        return x, keep, positions, mask

    def _text_embedding(self, x: torch.Tensor, keep: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.norm(x)
        pooled = x[:, -1] if self.text_cls is not None else masked_mean(x, keep)
        embed = self.text_to_latents(pooled)
        return F.normalize(embed, dim=-1) if normalize else embed

    def embed_text(self, text: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Contrastive pass: text embeddings ``(b, l)``, L2-normalised unless
        ``normalize=False``; never sees images."""
        cfg = self.config
        check_text(text, cfg.num_tokens, cfg.pad_id)
        x, keep, positions, mask = self._contrastive_inputs(text)
        causal = cfg.contrastive_pass == "causal"
        for layer in self.layers:
            x = layer.block(x, causal=causal, mask=mask, positions=positions, only_last=self._only_last(layer))
        return self._text_embedding(x, keep, normalize)

    def _only_last(self, layer: nn.Module) -> int | None:
        """With a CLS embedding only the CLS row of the last layer is ever read."""
        return 1 if self.text_cls is not None and layer is self.layers[-1] else None

    def decode_hidden(
        self,
        text: torch.Tensor,
        context: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Captioning pass: text ``(b, n)`` and image context ``(b, m', d)`` -> final normed
        states ``(b, n, d)`` (``decode`` gives their logits ``(b, n, v)``).

        ``keep`` ``(b, cached + n)`` marks real tokens over the whole sequence so far (default:
        ``text != pad_id``); ``positions`` ``(b, n)`` default to real-token counts.

        ``states`` ``(b, n, d)``: the output of layer ``start``'s self-attention block
        (0-indexed), computed elsewhere; decoding resumes from there (see ``_causal_passes``).
        """
        first = cache is None or len(cache) == 0  # later cached steps: positions checked by generate
        if cache is not None:
            cache.begin_call()  # layers share this call's rotary tables and key mask
        if keep is None:
            keep = text != self.config.pad_id
        if positions is None:
            positions = positions_from_mask(keep)[:, -text.shape[1]:]
        x = self._embed_tokens(text, positions, check=first) if states is None else states
        mask = decoder_mask(keep, cache=cache)
        plan = token_plan(self, cache, text, self._token_steps) if states is None else None
        if plan is not None:  # a cached one-token step: the layers' plain step functions
            return self.norm(run_token_plan(plan, x, context, TokenStep(cache, positions, mask)))  # type: ignore[arg-type]
        for i, layer in enumerate(self.layers[start:], start):
            if states is None or i > start:
                x = layer.block(x, causal=True, mask=mask, positions=positions, cache=cache)
            if layer.cross is not None:
                x = layer.cross(x, context, cache=cache)
        return self.norm(x)

    def _token_steps(self) -> list[tuple[Any, Any]]:
        return [(layer.block.token_step(), None if layer.cross is None else layer.cross.token_step())
                for layer in self.layers]

    def _causal_passes(self, text: torch.Tensor, inputs: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both passes when the contrastive pass is causal: (text embeddings ``(b, l)``,
        captioning states ``(b, n_in, d)``).

        ``inputs`` is a prefix of ``text``. Under causal attention a text token's state in the
        contrastive pass equals its state in the captioning pass until the first
        cross-attention (the CLS comes last, so no text token sees it), so the layers up to
        that point run once for both passes. Exact: same values and gradients as two
        separate passes (up to float rounding), and that much less compute.
        """
        x, keep, positions, mask = self._contrastive_inputs(text)
        first = next((i for i, layer in enumerate(self.layers) if layer.cross is not None), len(self.layers) - 1)
        for layer in self.layers[: first + 1]:
            x = layer.block(x, causal=True, mask=mask, positions=positions, only_last=None)
        n = inputs.shape[1]
        hidden = self.decode_hidden(
            inputs, context, keep=keep[:, :n], positions=positions[:, :n], start=first, states=x[:, :n]
        )
        for layer in self.layers[first + 1:]:
            x = layer.block(x, causal=True, mask=mask, positions=positions, only_last=self._only_last(layer))
        return self._text_embedding(x, keep), hidden

    # ------------------------------------------------------------------ losses
    def text_and_caption_loss(self, text: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                              context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two passes over shared weights: with a causal contrastive pass (and no dropout
        drawn) the layers before the first cross-attention run once for both; otherwise two
        passes in an order drawn at random during training (``shuffle_passes``), as the paper."""
        cfg = self.config
        if cfg.contrastive_pass == "causal" and (cfg.dropout == 0.0 or not stochastic(self)):
            text_embeds, hidden = self._causal_passes(text, inputs, context)
            return text_embeds, self._caption_loss_from_states(hidden, labels)
        if self.training and cfg.shuffle_passes and bool(torch.randint(2, ()).item()):
            cap = self._caption_loss_from_states(self.decode_hidden(inputs, context), labels)
            return self.embed_text(text), cap
        text_embeds = self.embed_text(text)
        return text_embeds, self._caption_loss_from_states(self.decode_hidden(inputs, context), labels)
