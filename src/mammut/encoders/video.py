"""Video encoder for MaMMUT's video tasks: TubeViT-style sparse tubes through the image ViT.

Legend: ``b`` batch, ``t`` frames, ``c`` channels, ``H, W`` frame size, ``d`` ViT width.

Videos are ``(b, t, c, H, W)`` here as everywhere in the library: frames first, each frame an
image ``(c, H, W)`` like every image the library takes. It is what video decoders (PyAV,
torchcodec) give frame by frame once stacked, and the order FlamingoPaLM's videos already use
(``(b, t, f, c, h, w)``: ``f`` frames of images); ``nn.Conv3d``'s channels-first
``(b, c, t, H, W)`` is an internal transpose of the tube projections, never an input layout.

MaMMUT (arXiv 2303.16839, section "MaMMUT for video tasks") extends the image model without a
new backbone:
- the ViT's own 2D patches, taken from every ``frame_stride``-th frame, with its learned
  positional embedding;
- tube tokens: a few 3D convolutions with long, thin or wide kernels at sparse strides
  (TubeViT, arXiv 2212.03229), each token at the centre of its tube;
- fixed 3D sin-cos positional embeddings (time, y, x of each token's centre): the tubes' only
  position signal, and added to the 2D patch tokens through a learned weight
  (``fixed_gate``, starting at 0 so the image model is unchanged at initialisation);
- every token concatenated and passed through the shared ViT blocks.
The exact gate form is not published (see ``shared/reference.md``); this is our reading: one
scalar weight on the fixed embedding of the 2D patch tokens. The video path uses the ViT's full
positional grid (no cropping) and drops no patches; a ViT class token comes first, as for images.

The paper's ablations (its "Video Model Ablations": the gate, the fixed embeddings, the tubes,
in increasing order of importance) are options of :class:`VideoTubeConfig`:
- ``gate=False`` (no gate): the fixed embeddings are added to the 2D patch tokens at weight 1,
  with no learned weight (the image model's tokens change from the start);
- ``fixed_embeddings=False`` (no fixed 3D embeddings): no sin-cos anywhere; the 2D patches keep
  only the ViT's learned positions and each tube token gets a learned position (``tube_pos``,
  starting at zero);
- ``use_tubes=False`` (no tubes, frames only): only the ViT's 2D patches of every
  ``frame_stride``-th frame (with the gated fixed embeddings for their time).

``VideoTubeViT(vit, VideoTubeConfig(...))`` is an image encoder for the models:
``MaMMUT(img_encoder=VideoTubeViT(vit), ...)`` then takes ``images=`` videos ``(b, t, c, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .vit import ViT

__all__ = ["VideoTubeConfig", "VideoTubeViT", "sincos_3d"]

Triple = tuple[int, int, int]


@dataclass
class VideoTubeConfig:
    """``tubes``: ``(kernel, stride, offset)`` per tube projection, each ``(t, y, x)``.
    Defaults: TubeViT's three 3D tubes (its fourth, a 1x16x16 2D patch, is replaced by the
    ViT's own patches every ``frame_stride`` frames, as in MaMMUT), for 32 frames of 224 px."""

    frames: int = 32
    frame_stride: int = 8
    tubes: tuple[tuple[Triple, Triple, Triple], ...] = (
        ((8, 8, 8), (16, 32, 32), (0, 0, 0)),
        ((16, 4, 4), (6, 32, 32), (4, 8, 8)),
        ((4, 12, 12), (16, 32, 32), (0, 16, 16)),
    )
    theta: float = 10000.0  # base of the fixed sin-cos embedding
    gate: bool = True  # False: fixed embeddings added to the 2D patch tokens at weight 1 (ablation "no gate")
    gate_init: float = 0.0  # the learned gate's starting value (0: the image model's tokens unchanged at the start)
    fixed_embeddings: bool = True  # False: no sin-cos; learned tube positions (ablation "no fixed embeddings")
    use_tubes: bool = True  # False: 2D patches of the sparse frames only (ablation "no tubes")

    def __post_init__(self) -> None:
        if self.frames < 1 or self.frame_stride < 1:
            raise ValueError(f"frames / frame_stride: expected positive integers, got {self.frames} / {self.frame_stride}")
        self.tubes = tuple(tuple(tuple(int(v) for v in part) for part in tube) for tube in self.tubes)  # type: ignore[assignment]
        for i, tube in enumerate(self.tubes):
            if len(tube) != 3 or any(len(part) != 3 for part in tube):
                raise ValueError(f"tubes[{i}]: expected ((kt, ky, kx), (st, sy, sx), (ot, oy, ox)), got {tube}")
            kernel, stride, offset = tube
            if min(kernel) < 1 or min(stride) < 1 or min(offset) < 0:
                raise ValueError(f"tubes[{i}]: expected kernel, stride >= 1 and offset >= 0, got {tube}")


def sincos_3d(centers: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Fixed embeddings ``(n, dim)`` of 3D points ``centers`` ``(n, 3)``: each axis gets
    ``2 * (dim // 6)`` channels of sin/cos at geometric frequencies; the rest are zero."""
    per_axis = dim // 6
    if per_axis < 1:
        raise ValueError(f"dim: expected at least 6 for a 3D sin-cos embedding, got {dim}")
    freqs = theta ** (-torch.arange(per_axis, dtype=torch.float32, device=centers.device) / per_axis)
    angles = centers.float().unsqueeze(-1) * freqs  # n 3 f
    emb = torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(1)  # n 6f
    return nn.functional.pad(emb, (0, dim - emb.shape[1]))


def _grid_centers(size: Triple, kernel: Triple, stride: Triple, offset: Triple) -> torch.Tensor:
    """Centres ``(T' * H' * W', 3)`` of a strided 3D window grid, in frames / pixels."""
    axes = []
    for n, k, s, o in zip(size, kernel, stride, offset):
        count = (n - o - k) // s + 1
        axes.append(o + torch.arange(count, dtype=torch.float32) * s + (k - 1) / 2)
    return torch.cartesian_prod(*axes).reshape(-1, 3)


class VideoTubeViT(nn.Module):
    """videos ``(b, t, c, H, W)`` (``t = config.frames`` frames, each an image ``(c, H, W)`` of
    the ViT's channels and size) -> tokens ``(b, n, d)``: sparse-frame 2D patches then tube
    tokens, through ``vit``'s blocks (shared with the image path). Channels-first videos
    ``(b, c, t, H, W)`` are a ``ValueError`` (``videos.transpose(1, 2)`` gives this order)."""

    def __init__(self, vit: ViT, config: VideoTubeConfig | None = None) -> None:
        super().__init__()
        if not isinstance(vit, ViT):
            raise TypeError(f"vit: expected a mammut ViT (its patches and blocks are shared), got {type(vit).__name__}")
        cfg = config if config is not None else VideoTubeConfig()
        vc = vit.config
        size = (cfg.frames, vc.image_size, vc.image_size)
        for i, (kernel, _, offset) in enumerate(cfg.tubes):
            if any(o + k > n for n, k, o in zip(size, kernel, offset)):
                raise ValueError(f"tubes[{i}]: offset {offset} + kernel {kernel} does not fit a video of (t, H, W) = {size}")
        self.config, self.vit = cfg, vit
        self.built_image_size = vc.image_size  # the fixed position tables below are for this size
        tubes = cfg.tubes if cfg.use_tubes else ()
        self.tubes = nn.ModuleList(
            nn.Conv3d(vc.channels, vc.dim, kernel, stride=stride, bias=vc.patch_bias) for kernel, stride, _ in tubes
        )
        if cfg.gate and cfg.fixed_embeddings:
            self.fixed_gate = nn.Parameter(torch.full((), float(cfg.gate_init)))
        else:  # ablations: the fixed embeddings at weight 1 (no gate), or none at all (no fixed embeddings)
            self.register_buffer("fixed_gate", torch.tensor(1.0 if cfg.fixed_embeddings else 0.0), persistent=False)
        p = vc.patch_size
        frames = torch.arange(0, cfg.frames, cfg.frame_stride)
        patch = _grid_centers((1, vc.image_size, vc.image_size), (1, p, p), (1, p, p), (0, 0, 0))  # g*g 3
        patch_centers = patch.repeat(len(frames), 1)
        patch_centers[:, 0] = frames.float().repeat_interleave(patch.shape[0])
        self.register_buffer("patch_fixed", sincos_3d(patch_centers, vc.dim, cfg.theta), persistent=False)
        if not cfg.fixed_embeddings:
            self.patch_fixed.zero_()
        tube_centers = torch.cat([_grid_centers(size, k, s, o) for k, s, o in tubes] or [torch.zeros(0, 3)])
        self.register_buffer("tube_fixed", sincos_3d(tube_centers, vc.dim, cfg.theta), persistent=False)
        if not cfg.fixed_embeddings:  # ablation: a learned position per tube token instead
            self.tube_fixed.zero_()
            self.tube_pos = nn.Parameter(torch.zeros(tube_centers.shape[0], vc.dim))

    @property
    def dim(self) -> int:
        return self.vit.dim

    def num_tokens(self) -> int:
        """Tokens per video: 2D patches of the sparse frames, every tube's tokens (and the
        ViT's class token, if it has one)."""
        return self.patch_fixed.shape[0] + self.tube_fixed.shape[0] + int(self.vit.config.class_token)

    def check_images(self, videos: torch.Tensor) -> None:
        vc, cfg = self.vit.config, self.config
        if vc.image_size != self.built_image_size:
            raise ValueError(
                f"vit: its image size changed to {vc.image_size} after this VideoTubeViT was built for "
                f"{self.built_image_size}; call vit.set_image_size(...) before wrapping it"
            )
        expected = (cfg.frames, vc.channels, vc.image_size, vc.image_size)
        shape = tuple(videos.shape)
        if videos.ndim != 5 or shape[1:] != expected:
            hint = ""
            if videos.ndim == 5 and shape[2] != vc.channels and shape[1] == vc.channels:
                hint = (f"; dim 2 should be the ViT's {vc.channels} channels, dim 1 holds them: channels-first "
                        f"(b, c, t, H, W)? videos.transpose(1, 2) gives (b, t, c, H, W)")
            elif videos.ndim == 4:
                hint = "; a 4-D tensor is a batch of images, a video encoder takes (b, t, c, H, W)"
            raise ValueError(f"images (videos): expected (batch, frames, channels, height, width) = "
                             f"(batch, {', '.join(map(str, expected))}), got {shape}{hint}")

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        self.check_images(videos)
        vit, cfg = self.vit, self.config
        b = videos.shape[0]
        frames = videos[:, :: cfg.frame_stride].flatten(0, 1)  # (b t') c H W
        patches = vit.to_patches(frames).flatten(2).transpose(1, 2)  # (b t') n d
        patches = patches + vit.pos_emb.flatten(2).transpose(1, 2).to(patches.dtype)
        patches = patches.reshape(b, -1, patches.shape[-1]) + self.fixed_gate * self.patch_fixed.to(patches.dtype)
        tubes = [patches]
        for conv, (_, _, (ot, oy, ox)) in zip(self.tubes, cfg.tubes):
            clip = videos[:, ot:, :, oy:, ox:].transpose(1, 2)  # b c t H W: Conv3d's layout, internal only
            tubes.append(conv(clip).flatten(2).transpose(1, 2))  # b n_i d
        x = torch.cat(tubes, dim=1)
        if len(tubes) > 1:
            n = patches.shape[1]
            pos = self.tube_fixed if cfg.fixed_embeddings else self.tube_pos
            x = torch.cat((x[:, :n], x[:, n:] + pos.to(x.dtype)), dim=1)
        if vit.config.class_token:
            cls = (vit.cls_token + vit.cls_pos_emb).to(x.dtype)
            x = torch.cat((cls.expand(b, 1, -1), x), dim=1)
        x = vit.pre_norm(x)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)

    def extra_repr(self) -> str:
        cfg = self.config
        ablations = [name for name, on in (("no gate", cfg.gate), ("no fixed embeddings", cfg.fixed_embeddings),
                                           ("no tubes", cfg.use_tubes)) if not on]
        return (f"frames={cfg.frames}, frame_stride={cfg.frame_stride}, tokens={self.num_tokens()}"
                + (f", ablations: {', '.join(ablations)}" if ablations else ""))

