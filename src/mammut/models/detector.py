"""MaMMUT detector: open-vocabulary detection heads (OWL-ViT style) on a MaMMUT's image tokens.

Legend: ``b`` batch, ``m`` image tokens (``h * w`` patches of the ViT grid), ``d`` image token
width, ``l`` latent (contrastive embedding) width, ``q`` queries, ``n`` query tokens.

The MaMMUT paper extends its model to open-vocabulary detection by fine-tuning the same image
encoder at a higher resolution with detection heads (RO-ViT, arXiv 2305.07011; the heads here
follow OWL-ViT, arXiv 2205.06230). The detector IS a MaMMUT (a subclass: every MaMMUT call,
captioning and both embeddings included, works as before) with, per image token:

- a **box**: a 3-layer GELU MLP on the layer-normed token gives 4 values, to which a fixed
  bias is added before the sigmoid: ``logit`` of the token's own grid position for ``cx, cy``
  (``box_anchor="center"``: the patch centre ``(j + 0.5) / w``; ``"corner"``: OWL-ViT's patch
  corner ``(j + 1) / w``) and ``logit(1 / w), logit(1 / h)`` for ``w, h``, with OWL-ViT's
  ``logit(x) = log(x + 1e-4) - log1p(-x + 1e-4)``. Output: normalised ``cx, cy, w, h`` in [0, 1].
- a **class embedding** in the model's own contrastive latent space: the tokens through the
  same projection the model pools into its image embedding (``image_pool="mean"``:
  ``img_to_latents(img_proj(token))``, whose mean over the tokens IS the image embedding;
  ``"norm_mean"``: ``img_to_latents(img_norm(token))``; ``"attention"``: a new linear), so a
  pretrained MaMMUT's tokens start out comparable with its text embeddings; with
  ``class_pool="box"`` (default) averaged over the tokens inside the token's predicted box
  (region pooling, as RO-ViT pools box features: the same mean pooling the model was
  pretrained with, over the object's region; zero-shot on the demo run's held-out scenes it
  names twice as many emoji as the lone token), ``"token"``: the token's own (OWL-ViT).
- a learned **shift** (linear -> 1) and **scale** (linear -> 1, ``elu + 1``): the logit of query
  ``k`` at token ``i`` is ``(cos(class_i, query_k) + shift_i) * scale_i`` (OWL-ViT).

Queries are free text embedded by the model's own text side (``embed_text``: its contrastive
pass), or any embeddings ``(q, l)`` in the same space (image exemplars:
:meth:`MaMMUTDetector.exemplar_embeds`). ``num_classes > 0`` builds the closed-vocabulary
baseline instead: learned query embeddings for a fixed class list, never text.

With ``region_size > 0`` the detector also keeps a **frozen copy of the pretrained image tower**
(``self.region``: the ViT at its pretraining size ``region_size`` and the projections of its image
embedding, filled from the pretraining run by the detection task) that embeds an image crop as
pretraining embedded whole images: :meth:`MaMMUTDetector.region_embeds`. Detection fine-tuning
moves the detector's own tokens; the copy keeps what pretraining learned about naming things,
which :func:`mammut.eval.detection.predict` uses to re-score each proposal (ViLD's cropped-region
embedding, F-VLM's ensemble of detector and VLM scores).

Training (bipartite matching, focal / L1 / gIoU losses) is the ``detection`` task's
(:mod:`mammut.tasks.detection`); this file imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model
from .mammut import MaMMUT, MaMMUTConfig
from ..layers import CrossAttentionBlock, ParallelBlock
from ..layers.blocks import TransformerBlock

__all__ = ["DetectorConfig", "MaMMUTDetector", "DetectionHead", "RegionTower", "box_bias", "HEAD_FIELDS", "REGION_KEYS"]

_EPS = 1e-4  # OWL-ViT's logit epsilon


@dataclass
class DetectorConfig(MaMMUTConfig):
    """A MaMMUT's options plus the detection head's (``HEAD_FIELDS``)."""

    box_anchor: str = "center"  # "center" | "corner" (OWL-ViT's code): where a token's box starts
    box_hidden: int | None = None  # width of the box MLP (default: the image token width)
    shift_init: float = -1.0  # initial logit shift: (cos - 1) * scale <= 0, every probability starts <= 0.5
    scale_init: float = 10.0  # initial logit scale (elu + 1 of a linear whose bias gives this)
    num_classes: int = 0  # > 0: closed-vocabulary baseline, learned query embeddings for this many classes
    # "box": a token's class embedding is the mean of the token latents whose patch centres lie in its
    # predicted box (region pooling, as RO-ViT's detector pools its box features; the token itself always
    # counts) | "token": the token's own latent (OWL-ViT)
    class_pool: str = "box"
    # > 0: keep a frozen copy of the pretrained image tower at this image size (its pretraining size) that
    # embeds proposal crops for re-scoring (ViLD / F-VLM); 0: none
    region_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.box_anchor not in ("center", "corner"):
            raise ValueError(f"box_anchor: expected 'center' or 'corner', got {self.box_anchor!r}")
        if self.scale_init <= 0:
            raise ValueError(f"scale_init: expected a positive number, got {self.scale_init}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: expected >= 0 (0: open vocabulary), got {self.num_classes}")
        if self.class_pool not in ("box", "token"):
            raise ValueError(f"class_pool: expected 'box' or 'token', got {self.class_pool!r}")
        if self.region_size < 0:
            raise ValueError(f"region_size: expected 0 (none) or a positive image size, got {self.region_size}")
        if self.region_size and self.image_pool not in ("mean", "norm_mean"):
            raise ValueError(f"region_size: expected image_pool 'mean' or 'norm_mean' for the region tower, got "
                             f"{self.image_pool!r}")
        if self.box_hidden is not None and self.box_hidden < 1:
            raise ValueError(f"box_hidden: expected a positive integer or null, got {self.box_hidden}")


HEAD_FIELDS: tuple[str, ...] = ("box_anchor", "box_hidden", "shift_init", "scale_init", "num_classes", "class_pool",
                                "region_size")
"""The fields :class:`DetectorConfig` adds to :class:`~mammut.models.mammut.MaMMUTConfig`."""


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x + _EPS) - torch.log1p(-x + _EPS)


def box_bias(h: int, w: int, anchor: str = "center") -> torch.Tensor:
    """The box bias ``(h * w, 4)`` of an ``h x w`` token grid (row-major, as the ViT's tokens):
    ``logit`` of each token's x, y (``anchor``: the patch centre or OWL-ViT's corner) and of
    ``1 / w``, ``1 / h``."""
    off = 0.5 if anchor == "center" else 1.0
    ys, xs = torch.meshgrid((torch.arange(h) + off) / h, (torch.arange(w) + off) / w, indexing="ij")
    xy = torch.stack([xs.flatten(), ys.flatten()], dim=-1).clamp(0.0, 1.0)
    wh = torch.tensor([1.0 / w, 1.0 / h]).expand(h * w, 2)
    return _logit(torch.cat([xy, wh], dim=-1))


class DetectionHead(nn.Module):
    """Per-token box MLP, logit shift and scale (and, for ``image_pool="attention"``, the class
    projection; with ``num_classes``, the closed-vocabulary query table)."""

    def __init__(self, dim: int, latent: int, *, hidden: int | None, shift_init: float, scale_init: float,
                 class_proj: bool, num_classes: int) -> None:
        super().__init__()
        hidden = hidden or dim
        self.norm = nn.LayerNorm(dim)
        self.box_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                     nn.Linear(hidden, 4))
        nn.init.zeros_(self.box_mlp[-1].weight)  # start at the anchors
        nn.init.zeros_(self.box_mlp[-1].bias)
        self.shift = nn.Linear(dim, 1)
        self.scale = nn.Linear(dim, 1)
        for lin, bias in ((self.shift, shift_init), (self.scale, scale_init - 1.0 if scale_init >= 1 else math.log(scale_init))):
            nn.init.zeros_(lin.weight)
            nn.init.constant_(lin.bias, bias)
        self.class_proj = nn.Linear(dim, latent, bias=False) if class_proj else None
        self.class_queries = nn.Parameter(torch.randn(num_classes, latent) * 0.02) if num_classes else None


class RegionTower(nn.Module):
    """A frozen copy of a MaMMUT's image tower (ViT at ``cfg.region_size`` and the projections
    of its mean-pooled image embedding): crops ``(k, 3, S, S)`` -> embeddings ``(k, l)``,
    L2-normalised, the pretrained ``embed_image`` of each crop as a whole image. Its weights
    are the pretraining run's (the detection task copies them in); never trained."""

    def __init__(self, cfg: DetectorConfig, image_dim: int) -> None:
        from ..encoders import ViT, ViTConfig
        from ..layers import make_norm

        super().__init__()
        if not isinstance(cfg.vit, dict):
            raise ValueError(f"region_size: the region tower copies the built-in ViT (vit), got vit={cfg.vit!r}")
        vit = {**cfg.vit, "image_size": cfg.region_size, "cropped_pos_emb": False, "patch_dropout": 0.0}
        self.encoder = ViT(ViTConfig(**vit))
        self.proj: nn.Module = nn.Linear(image_dim, cfg.dim, bias=False) if (
            cfg.context_proj == "linear" or image_dim != cfg.dim) else nn.Identity()
        self.norm = make_norm(cfg.norm, image_dim, bias=cfg.bias) if cfg.image_pool == "norm_mean" else None
        self.to_latents = nn.Linear(image_dim if self.norm is not None else cfg.dim, cfg.dim_latents or cfg.dim, bias=False)
        self.requires_grad_(False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(crops)
        pooled = self.norm(tokens.mean(dim=1)) if self.norm is not None else self.proj(tokens).mean(dim=1)
        return F.normalize(self.to_latents(pooled), dim=-1)

    def train(self, mode: bool = True) -> "RegionTower":
        return super().train(False)  # always in eval mode: a frozen copy


REGION_KEYS: dict[str, str] = {"img_encoder.": "region.encoder.", "img_proj.": "region.proj.", "img_norm.": "region.norm.",
                               "img_to_latents.": "region.to_latents."}
"""Where a pretrained MaMMUT's image-tower tensors go in a detector's :class:`RegionTower`."""


@register_model(
    "mammut_detector",
    tiny=dict(dim=64, num_tokens=300, depth=2, heads=2, dim_head=32, bos_id=1, eos_id=2, pad_id=0,
              vit=dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32)),
    block_types=(ParallelBlock, CrossAttentionBlock, TransformerBlock),
    tasks=("detection",),
    inputs=("image",),
)
class MaMMUTDetector(MaMMUT):
    """A MaMMUT with open-vocabulary detection heads (see the module docstring).

    ``model.detect(images, queries)`` -> ``{"boxes": (b, m, 4) cxcywh in [0, 1], "logits":
    (b, m, q), "class_embeds": (b, m, l) L2-normalised}``; ``queries``: token ids ``(q, n)``
    (embedded by ``embed_text``) or embeddings ``(q, l)`` / ``(b, q, l)``; none with
    ``num_classes``: the learned class queries.
    """

    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None, *, img_encoder: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(config, img_encoder=img_encoder, **kwargs)
        cfg: DetectorConfig = self.config
        self.head = DetectionHead(self.image_dim, cfg.dim_latents or cfg.dim, hidden=cfg.box_hidden,
                                  shift_init=cfg.shift_init, scale_init=cfg.scale_init,
                                  class_proj=cfg.image_pool == "attention", num_classes=cfg.num_classes)
        self.region = RegionTower(cfg, self.image_dim) if cfg.region_size else None

    # ------------------------------------------------------------------ tokens
    def _grid(self, m: int) -> tuple[int, int]:
        enc = getattr(self.img_encoder, "config", None)
        size, patch = getattr(enc, "image_size", None), getattr(enc, "patch_size", None)
        if size and patch and (size // patch) ** 2 == m:
            return size // patch, size // patch
        side = math.isqrt(m)
        if side * side != m:
            raise ValueError(f"images: the detector needs a square token grid, got {m} image tokens")
        return side, side

    def grid_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's patch tokens ``(b, m, d)`` in row-major grid order (a class
        token, where the ViT has one, is left out)."""
        tokens = self.image_tokens(images)
        enc = getattr(self.img_encoder, "config", None)
        if getattr(enc, "class_token", False):
            tokens = tokens[:, 1:]
        return tokens

    def token_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token in the contrastive latent space ``(b, m, l)``, not normalised (see the
        module docstring: the projection the model pools into its image embedding)."""
        if self.head.class_proj is not None:
            return self.head.class_proj(tokens)
        if self.img_norm is not None:
            return self.img_to_latents(self.img_norm(tokens))
        return self.img_to_latents(self.img_proj(tokens))

    def token_class_embeds(self, tokens: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token class embeddings ``(b, m, l)``, L2-normalised: with ``class_pool="box"`` the
        mean latent of the tokens whose patch centres lie in the token's box (``boxes`` ``(b, m, 4)``
        cxcywh, default: the predicted ones, not differentiated through), else the token's own."""
        z = self.token_latents(tokens)
        if self.config.class_pool == "box":
            if boxes is None:
                boxes = self.predict_boxes(tokens)
            z = torch.bmm(self.pool_weights(boxes.detach()).to(z.dtype), z)
        return F.normalize(z, dim=-1, eps=1e-6)

    def pool_weights(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(b, m, m)`` row-normalised weights: row ``i`` averages the tokens whose patch centres
        lie in box ``i`` (``(b, m, 4)`` cxcywh), token ``i`` itself always included."""
        h, w = self._grid(boxes.shape[1])
        ys, xs = torch.meshgrid((torch.arange(h, device=boxes.device) + 0.5) / h,
                                (torch.arange(w, device=boxes.device) + 0.5) / w, indexing="ij")
        xs, ys = xs.flatten(), ys.flatten()
        half = boxes[..., 2:] / 2
        lo, hi = (boxes[..., :2] - half).unsqueeze(-1), (boxes[..., :2] + half).unsqueeze(-1)  # (b, m, 2, 1)
        inside = ((xs >= lo[:, :, 0]) & (xs <= hi[:, :, 0]) & (ys >= lo[:, :, 1]) & (ys <= hi[:, :, 1])).float()
        inside = torch.maximum(inside, torch.eye(inside.shape[1], device=inside.device))
        return inside / inside.sum(-1, keepdim=True)

    def predict_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boxes ``(b, m, 4)``: normalised ``cx, cy, w, h`` in [0, 1], one per token."""
        h, w = self._grid(tokens.shape[1])
        bias = box_bias(h, w, self.config.box_anchor).to(device=tokens.device, dtype=torch.float32)
        raw = self.head.box_mlp(self.head.norm(tokens)).float()
        return torch.sigmoid(raw + bias)

    # ------------------------------------------------------------------ queries
    def query_embeds(self, queries: torch.Tensor | None) -> torch.Tensor:
        """Normalised query embeddings ``(q, l)`` or ``(b, q, l)``: token ids ``(q, n)`` through
        ``embed_text``, embeddings passed through (normalised), or the learned class queries."""
        if queries is None:
            if self.head.class_queries is None:
                raise ValueError("queries: expected token ids (q, n) or embeddings (q, l); this detector has no "
                                 "learned class queries (num_classes=0)")
            return F.normalize(self.head.class_queries, dim=-1, eps=1e-6)
        if not queries.is_floating_point():
            if queries.ndim != 2:
                raise ValueError(f"queries: expected token ids (q, n), got shape {tuple(queries.shape)}")
            return self.embed_text(queries)
        latent = self.config.dim_latents or self.config.dim
        if queries.ndim not in (2, 3) or queries.shape[-1] != latent:
            raise ValueError(f"queries: expected embeddings (q, {latent}) or (b, q, {latent}), got {tuple(queries.shape)}")
        return F.normalize(queries, dim=-1, eps=1e-6)

    def score(self, tokens: torch.Tensor, class_embeds: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, m, q)``: ``(cos + shift) * scale`` per token (OWL-ViT)."""
        q = queries.to(class_embeds.dtype)
        sim = torch.einsum("bml,ql->bmq", class_embeds, q) if q.ndim == 2 else torch.einsum("bml,bql->bmq", class_embeds, q)
        normed = self.head.norm(tokens)
        shift = self.head.shift(normed)
        scale = F.elu(self.head.scale(normed)) + 1.0
        return ((sim + shift) * scale).float()

    def detect(self, images: torch.Tensor, queries: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Boxes and per-query logits for every image token (see the class docstring)."""
        tokens = self.grid_tokens(images)
        boxes = self.predict_boxes(tokens)
        embeds = self.token_class_embeds(tokens, boxes)
        q = self.query_embeds(queries)
        if q.ndim == 3 and q.shape[0] != tokens.shape[0]:
            raise ValueError(f"queries: expected per-image embeddings for {tokens.shape[0]} images, got {q.shape[0]}")
        return {"boxes": boxes, "logits": self.score(tokens, embeds, q), "class_embeds": embeds}

    @torch.no_grad()
    def region_embeds(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(k, l)`` of image crops ``(k, 3, region_size, region_size)`` by the frozen
        pretrained image tower (see the module docstring); a ValueError without one."""
        if self.region is None:
            raise ValueError("region_embeds: this detector keeps no pretrained image tower (model.region_size: 0)")
        size = self.config.region_size
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, size, size):
            raise ValueError(f"crops: expected (k, 3, {size}, {size}), got {tuple(crops.shape)}")
        return self.region(crops)

    @torch.no_grad()
    def exemplar_embeds(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Image-exemplar queries ``(b, l)``: for each image ``(b, 3, H, W)`` and box ``(b, 4)``
        (normalised ``x0, y0, x1, y1``), the class embedding of the token whose predicted box
        overlaps it most (OWL-ViT's one-shot query, simplified: the best-IoU token)."""
        if boxes.ndim != 2 or boxes.shape != (images.shape[0], 4):
            raise ValueError(f"boxes: expected ({images.shape[0]}, 4) normalised x0, y0, x1, y1, got {tuple(boxes.shape)}")
        tokens = self.grid_tokens(images)
        pred = self.predict_boxes(tokens)
        xyxy = torch.cat([pred[..., :2] - pred[..., 2:] / 2, pred[..., :2] + pred[..., 2:] / 2], dim=-1)
        ref = boxes.to(xyxy.dtype).unsqueeze(1)
        lt, rb = torch.maximum(xyxy[..., :2], ref[..., :2]), torch.minimum(xyxy[..., 2:], ref[..., 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = (xyxy[..., 2:] - xyxy[..., :2]).prod(-1) + (ref[..., 2:] - ref[..., :2]).prod(-1) - inter
        best = (inter / union.clamp(min=1e-9)).argmax(dim=1)
        embeds = self.token_class_embeds(tokens, pred)
        return embeds[torch.arange(len(best), device=best.device), best]
