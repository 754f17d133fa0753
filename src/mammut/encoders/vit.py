"""Vision Transformer returning patch tokens, with patch dropout and Cropped Positional
Embedding.

Legend: ``b`` batch, ``c`` channels, ``H, W`` image height and width, ``p`` patch size,
``g = image_size // p`` side of the stored (trained) positional grid, ``h, w = H // p, W // p``
the patch grid of the input, ``n = h*w`` patch tokens (``g*g`` at the trained size), ``d`` width.

- Patch dropout (arXiv 2212.00794): during training keep a random subset of the patch
  tokens of each image (after positional embeddings are added).
- Stochastic depth (``drop_path``, arXiv 1603.09382): during training block ``i`` of ``L``
  is skipped for an image with probability ``drop_path * i / (L - 1)`` (the first never),
  its update scaled by ``1 / (1 - rate)`` where kept, so eval needs no rescaling.
- Cropped Positional Embedding (RO-ViT, arXiv 2305.07011; used by MaMMUT): during training
  the learned ``g x g`` positional grid is bilinearly upsampled (``cpe_upsample`` times),
  a random-resized-crop box is drawn per image (area ``cpe_scale``, aspect ``cpe_ratio``)
  and cropped-and-resized back to ``g x g``. At eval the full grid is used.
- All three act only in train mode and outside ``mammut.layers.no_dropout()`` (which generation
  enters: a model in train mode encodes images there as in eval mode, see ``layers.dropout``).
- OpenAI CLIP style (open_clip's ``VisionTransformer``), all off by default:
  ``class_token`` (a learned token with its own positional embedding, prepended: the
  output is then ``(b, 1 + n, d)``, class token first; patch dropout never drops it),
  ``pre_norm`` (a norm before the blocks, CLIP's ``ln_pre``), ``bias`` (biases in the
  blocks' linears and in every norm), ``patch_bias=False`` (no bias in the patch
  embedding) and ``final_norm=False`` (no norm after the blocks).

Resolution (an encoder trained at one size run at another: openMaMMUT's 512 px fine-tune
of a 224 px model, open-vocabulary detection at larger sizes):

- ``ViT.set_image_size(s)`` resamples the stored ``g x g`` positional grid once to
  ``s // p`` per side (bicubic, ``align_corners=False``, antialiased when shrinking; the
  class token's position is kept as is) and makes ``s`` the size ``forward`` expects. At the
  current size it changes nothing. Call it before building an optimizer (the grid becomes a
  new ``nn.Parameter``) and load checkpoints saved after it into a ViT of the new size.
- ``ViTConfig.dynamic_image_size=True``: ``forward`` takes any ``H x W`` (square or not) whose
  sides are multiples of ``p`` and resamples the grid the same way on every call, inside the
  autograd graph (gradients reach ``pos_emb``; nothing is cached). At the trained size the
  stored grid is used untouched: the outputs are those of the strict mode, bit for bit.
  Cropped Positional Embedding crops the stored grid straight to the input's ``h x w``.
- Otherwise (the default) images must be exactly ``image_size`` square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TransformerBlock, make_norm, stochastic

__all__ = ["ViTConfig", "ViT", "resample_pos_grid"]


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
    drop_path: float = 0.0  # stochastic depth: block i's residual dropped per image at rate drop_path * i / (depth - 1)
    cropped_pos_emb: bool = False
    cpe_upsample: float = 4.0
    cpe_scale: tuple[float, float] = (0.1, 1.0)
    cpe_ratio: tuple[float, float] = (0.5, 2.0)
    class_token: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    bias: bool = False
    patch_bias: bool = True
    dynamic_image_size: bool = False


def resample_pos_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A positional grid ``(1, d, g_h, g_w)`` resampled to ``(1, d, *size)``: bicubic,
    ``align_corners=False``, antialiased when either side shrinks, computed in float32 and
    returned in ``grid``'s dtype. Differentiable. The same size returns ``grid`` itself."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    shrink = size[0] < grid.shape[-2] or size[1] < grid.shape[-1]
    out = F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.to(grid.dtype)


class ViT(nn.Module):
    """images ``(b, c, H, W)`` -> patch tokens ``(b, n, d)`` (``n = (H/p)*(W/p)``, fewer with
    patch dropout; ``1 + n`` with ``class_token``). ``H = W = image_size`` unless
    ``dynamic_image_size`` (see the module docstring, and ``set_image_size``)."""

    def __init__(self, config: ViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config if config is not None else ViTConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("ViT: pass either a ViTConfig or keyword arguments, not both")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size: expected a multiple of patch_size={cfg.patch_size}, got {cfg.image_size}")
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout: expected a value in [0, 1), got {cfg.patch_dropout}")
        if not 0.0 <= cfg.drop_path < 1.0:
            raise ValueError(f"drop_path: expected a value in [0, 1), got {cfg.drop_path}")
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
        """Clear errors before compute: a float ``(b, c, image_size, image_size)`` tensor, or with
        ``dynamic_image_size`` a float ``(b, c, H, W)`` with ``H, W`` positive multiples of ``p``."""
        cfg = self.config
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor, got {type(images).__name__} {getattr(images, 'dtype', '')}")
        if cfg.dynamic_image_size:
            p = cfg.patch_size
            if images.ndim != 4 or images.shape[1] != cfg.channels:
                raise ValueError(f"images: expected shape (batch, {cfg.channels}, height, width), got {tuple(images.shape)}")
            h, w = images.shape[-2:]
            if h < p or w < p or h % p or w % p:
                raise ValueError(
                    f"images: expected height and width positive multiples of patch_size={p} "
                    f"(dynamic_image_size), got {h} x {w}"
                )
            return
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected shape (batch, {', '.join(map(str, expected))}), got {tuple(images.shape)}; "
                "to run at another size call ViT.set_image_size(size) or build with dynamic_image_size=True"
            )

    def set_image_size(self, image_size: int) -> None:
        """Make ``image_size`` (a positive multiple of ``patch_size``) the size ``forward``
        expects: the positional grid ``(1, d, g, g)`` is resampled to ``(1, d, g', g')``,
        ``g' = image_size // patch_size`` (``resample_pos_grid``: bicubic, antialiased when
        shrinking), as a new ``nn.Parameter`` of the old one's dtype, device and
        ``requires_grad``; the class token's position is unchanged. At the current size
        nothing changes. An optimizer built before holds the old grid: build it after."""
        p = self.config.patch_size
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < p or image_size % p:
            raise ValueError(f"image_size: expected a positive multiple of patch_size={p}, got {image_size!r}")
        grid = image_size // p
        if grid != self.grid:
            old = self.pos_emb
            with torch.no_grad():
                new = resample_pos_grid(old.detach(), (grid, grid))
            self.pos_emb = nn.Parameter(new, requires_grad=old.requires_grad)
        self.config = replace(self.config, image_size=image_size)  # not in place: the caller's config may be shared
        self.grid = grid

    def positional_embedding(self, batch: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(1 | b, h*w, d)`` for a ``grid = (h, w)`` of patches (default ``(g, g)``): the stored
        grid (resampled when ``(h, w) != (g, g)``), or per-image cropped grids while training."""
        cfg = self.config
        h, w = grid if grid is not None else (self.grid, self.grid)
        if not (cfg.cropped_pos_emb and stochastic(self)):
            return resample_pos_grid(self.pos_emb, (h, w)).flatten(2).transpose(1, 2)
        big = max(self.grid, round(self.grid * cfg.cpe_upsample))
        up = F.interpolate(self.pos_emb, size=(big, big), mode="bilinear", align_corners=False)
        theta = self._random_crop_boxes(batch, up.device, up.dtype)
        sample_at = F.affine_grid(theta, [batch, cfg.dim, h, w], align_corners=False)
        crops = F.grid_sample(up.expand(batch, -1, -1, -1), sample_at, mode="bilinear", align_corners=False)
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
        x = self.to_patches(images)  # b d h w
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # b n d
        x = x + self.positional_embedding(x.shape[0], grid).to(x.dtype)
        if self.config.patch_dropout > 0 and stochastic(self):
            b, n, d = x.shape
            keep = max(1, int(n * (1 - self.config.patch_dropout)))
            idx = torch.rand(b, n, device=x.device).topk(keep, dim=-1).indices.sort(dim=-1).values
            x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        if self.config.class_token:
            cls = (self.cls_token + self.cls_pos_emb).to(x.dtype)
            x = torch.cat((cls.expand(x.shape[0], 1, -1), x), dim=1)
        x = self.pre_norm(x)
        drop = self.config.drop_path if stochastic(self) else 0.0
        for i, block in enumerate(self.blocks):
            rate = drop * i / max(1, len(self.blocks) - 1)
            if rate > 0:  # stochastic depth: keep this block's update for each image with probability 1 - rate
                keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= rate).to(x.dtype) / (1 - rate)
                x = x + (block(x) - x) * keep
            else:
                x = block(x)
        return self.norm(x)
