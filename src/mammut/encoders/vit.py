"""Vision Transformer returning patch tokens, with patch dropout and Cropped Positional
Embedding.

Legend: ``b`` batch, ``c`` channels, ``g`` patch-grid side, ``n = g*g`` patch tokens,
``d`` width.

- Patch dropout (arXiv 2212.00794): during training keep a random subset of the patch
  tokens of each image (after positional embeddings are added).
- Cropped Positional Embedding (RO-ViT, arXiv 2305.07011; used by MaMMUT): during training
  the learned ``g x g`` positional grid is bilinearly upsampled (``cpe_upsample`` times),
  a random-resized-crop box is drawn per image (area ``cpe_scale``, aspect ``cpe_ratio``)
  and cropped-and-resized back to ``g x g``. At eval the full grid is used.
- Both act only in train mode and outside ``mammut.layers.no_dropout()`` (which generation
  enters: a model in train mode encodes images there as in eval mode, see ``layers.dropout``).
- OpenAI CLIP style (open_clip's ``VisionTransformer``), all off by default:
  ``class_token`` (a learned token with its own positional embedding, prepended: the
  output is then ``(b, 1 + n, d)``, class token first; patch dropout never drops it),
  ``pre_norm`` (a norm before the blocks, CLIP's ``ln_pre``), ``bias`` (biases in the
  blocks' linears and in every norm), ``patch_bias=False`` (no bias in the patch
  embedding) and ``final_norm=False`` (no norm after the blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TransformerBlock, make_norm, stochastic

__all__ = ["ViTConfig", "ViT"]


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_mult: float = 4.0
    channels: int = 3
    activation: str = "gelu"
    norm: str = "layernorm"
    patch_dropout: float = 0.0
    cropped_pos_emb: bool = False
    cpe_upsample: float = 4.0
    cpe_scale: tuple[float, float] = (0.1, 1.0)
    cpe_ratio: tuple[float, float] = (0.5, 2.0)
    class_token: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    bias: bool = False
    patch_bias: bool = True


class ViT(nn.Module):
    """images ``(b, c, H, W)`` -> patch tokens ``(b, n, d)`` (``n`` fewer with patch dropout;
    ``1 + n`` with ``class_token``)."""

    def __init__(self, config: ViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config if config is not None else ViTConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("ViT: pass either a ViTConfig or keyword arguments, not both")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size: expected a multiple of patch_size={cfg.patch_size}, got {cfg.image_size}")
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout: expected a value in [0, 1), got {cfg.patch_dropout}")
        self.config = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.to_patches = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.dim, self.grid, self.grid) * 0.02)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.randn(cfg.dim) * 0.02)
            self.cls_pos_emb = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.pre_norm = make_norm(cfg.norm, cfg.dim, bias=cfg.bias) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.mlp_mult,
                activation=cfg.activation, norm=cfg.norm, rotary=False, bias=cfg.bias, norm_bias=cfg.bias,
            )
            for _ in range(cfg.depth)
        )
        self.norm = make_norm(cfg.norm, cfg.dim, bias=cfg.bias) if cfg.final_norm else nn.Identity()

    @property
    def dim(self) -> int:
        return self.config.dim

    def check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor, got {type(images).__name__} {getattr(images, 'dtype', '')}")
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images: expected shape (batch, {', '.join(map(str, expected))}), got {tuple(images.shape)}")

    def positional_embedding(self, batch: int) -> torch.Tensor:
        """``(1 | b, n, d)``: the full grid, or per-image cropped grids while training."""
        cfg = self.config
        if not (cfg.cropped_pos_emb and stochastic(self)):
            return self.pos_emb.flatten(2).transpose(1, 2)
        big = max(self.grid, round(self.grid * cfg.cpe_upsample))
        up = F.interpolate(self.pos_emb, size=(big, big), mode="bilinear", align_corners=False)
        theta = self._random_crop_boxes(batch, up.device, up.dtype)
        grid = F.affine_grid(theta, [batch, cfg.dim, self.grid, self.grid], align_corners=False)
        crops = F.grid_sample(up.expand(batch, -1, -1, -1), grid, mode="bilinear", align_corners=False)
        return crops.flatten(2).transpose(1, 2)

    def _random_crop_boxes(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Affine maps ``(b, 2, 3)`` of random-resized-crop boxes in normalised coordinates."""
        cfg = self.config
        lo, hi = cfg.cpe_scale
        area = torch.empty(b).uniform_(lo, hi)
        log_ratio = torch.empty(b).uniform_(math.log(cfg.cpe_ratio[0]), math.log(cfg.cpe_ratio[1]))
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b) * (1 - w) + w / 2) * 2 - 1
        cy = (torch.rand(b) * (1 - h) + h / 2) * 2 - 1
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta.to(device=device, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        x = self.to_patches(images).flatten(2).transpose(1, 2)  # b n d
        x = x + self.positional_embedding(x.shape[0]).to(x.dtype)
        if self.config.patch_dropout > 0 and stochastic(self):
            b, n, d = x.shape
            keep = max(1, int(n * (1 - self.config.patch_dropout)))
            idx = torch.rand(b, n, device=x.device).topk(keep, dim=-1).indices.sort(dim=-1).values
            x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        if self.config.class_token:
            cls = (self.cls_token + self.cls_pos_emb).to(x.dtype)
            x = torch.cat((cls.expand(x.shape[0], 1, -1), x), dim=1)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
