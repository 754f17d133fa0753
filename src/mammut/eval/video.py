"""Videos through an evaluated model: what clip a model takes, clip batches from files (bad
files skipped and counted), embedding and generation of clips, and frame-strip figures.

Legend: ``b`` clips, ``t`` frames, ``3`` RGB, ``H = W`` the model's image size, ``l`` the
embedding width.

A model whose image encoder is a video encoder (:class:`mammut.encoders.VideoTubeViT`) takes
clips ``(b, t, 3, H, W)`` with its own ``t`` (``config.frames``). An image-only model is evaluated
on videos the simple way the MaMMUT paper names as the common baseline ("accumulate features from
individual frames"): for retrieval the mean of its ``t`` frame embeddings (each frame an
independent image, CLIP4Clip's mean pooling), for generation (captioning, VideoQA) the middle
frame. :class:`VideoInput` records which, and reports say it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .images import SkipCount
from .plots import caption_title
from .model_source import EvalModel

log = logging.getLogger(__name__)

__all__ = ["VideoInput", "video_input", "embed_clips", "generate_clips", "clip_batches", "plot_clip_strips",
           "DEFAULT_IMAGE_FRAMES"]

DEFAULT_IMAGE_FRAMES = 8  # frames per clip for an image-only model without --frames


@dataclass(frozen=True)
class VideoInput:
    """How clips are fed to the model: ``frames`` per clip at ``image_size``; ``video``: the
    model takes ``(b, t, 3, H, W)`` (else its frames are independent images); ``preprocess``: its
    image preprocessing (an :class:`mammut.ImagePreprocess`, or None for runs' default)."""

    frames: int
    image_size: int
    video: bool
    preprocess: Any = None

    def describe(self) -> str:
        if self.video:
            return f"video encoder: {self.frames} frames of {self.image_size} px per clip"
        return (f"image-only model: {self.frames} frames of {self.image_size} px per clip, encoded as independent "
                f"images (retrieval: the mean of the frame embeddings; generation: the middle frame)")


def video_input(em: EvalModel, frames: int | None = None) -> VideoInput:
    """The :class:`VideoInput` of ``em``'s model; ``frames`` (``--frames``) must match a video
    encoder's (``ValueError`` naming both) and sets an image-only model's (default 8)."""
    from ..data.video_files import model_clip_shape
    from ..preprocess import ImagePreprocess

    pre = em.preprocess if isinstance(em.preprocess, ImagePreprocess) else None
    shape = model_clip_shape(em.model)
    if shape is not None:
        want, size = shape
        if frames is not None and frames != want:
            raise ValueError(f"--frames: this model's video encoder takes {want} frames per clip, got {frames}")
        return VideoInput(want, size, True, pre)
    size = pre.image_size if pre is not None else getattr(getattr(em.model, "img_encoder", None), "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"SOURCE: cannot tell the image size of {em.name} from {em.source} (no ImagePreprocess)")
    return VideoInput(frames or DEFAULT_IMAGE_FRAMES, size, False, pre)


def embed_clips(em: EvalModel, vin: VideoInput, clips: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings ``(b, l)`` of clips ``(b, t, 3, H, W)``."""
    if vin.video:
        return em.embed_images(clips)
    b, t = clips.shape[:2]
    frames = em.embed_images(clips.flatten(0, 1)).view(b, t, -1).mean(1)
    return torch.nn.functional.normalize(frames, dim=-1)


def generate_clips(em: EvalModel, vin: VideoInput, clips: torch.Tensor, prompts: list[list[int]] | None = None,
                   **options: Any) -> list[str]:
    """Generated texts for clips ``(b, t, 3, H, W)`` (an image-only model sees the middle frame)."""
    return em.generate(clips if vin.video else clips[:, clips.shape[1] // 2], prompts, **options)


class _ClipFiles(Dataset):
    def __init__(self, items: Sequence[Path | torch.Tensor | None], vin: VideoInput, sampling: str,
                 stride: int | None) -> None:
        self.items, self.vin, self.sampling, self.stride = list(items), vin, sampling, stride

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        from ..data.video_files import VideoDecodeError, read_clip

        item = self.items[i]
        if torch.is_tensor(item):
            return i, item
        p = Path(str(item))
        if not p.is_file():
            return i, ("missing", str(p))
        try:
            return i, read_clip(p, frames=self.vin.frames, image_size=self.vin.image_size, sampling=self.sampling,
                                stride=self.stride, preprocess=self.vin.preprocess)
        except VideoDecodeError as exc:
            return i, ("corrupt", str(exc))


def _collate(items: list[tuple[int, Any]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, Any]]]:
    good = [(i, x) for i, x in items if torch.is_tensor(x)]
    bad = [(i, x) for i, x in items if not torch.is_tensor(x)]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, bad


def clip_batches(items: Sequence[Path | torch.Tensor | None], vin: VideoInput, skipped: SkipCount, *,
                 sampling: str = "uniform", stride: int | None = None, batch_size: int = 16, workers: int = 0,
                 progress: bool = True, desc: str = "videos") -> Iterator[tuple[list[int], torch.Tensor]]:
    """Batches ``(indices, clips (b, t, 3, H, W))`` of the readable videos among ``items`` (files,
    decoded with :func:`mammut.data.video_files.read_clip`, or clips already in memory, used as
    given), in order; each missing or unreadable file is counted (and named) in ``skipped``."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers: expected an integer >= 0, got {workers!r}")
    if any(not torch.is_tensor(x) for x in items):
        from ..data.video_files import import_av

        import_av()  # the install hint now, not from a worker
    else:
        workers = 0  # clips already in memory: nothing to decode
    loader = DataLoader(_ClipFiles(items, vin, sampling, stride), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    with tqdm(total=len(items), desc=desc, unit="clip", disable=not progress, leave=False) as bar:
        for indices, clips, bad in loader:
            for _, (kind, where) in bad:
                skipped.add(kind, where)
            bar.update(len(indices) + len(bad))
            if clips is not None:
                yield indices, clips


def plot_clip_strips(clips: Sequence[torch.Tensor], generated: Sequence[str], references: Sequence[Sequence[str]],
                     path: Path, *, n: int = 8, labels: tuple[str, str] = ("G", "R"), max_frames: int = 8,
                     title: str = "") -> Path | None:
    """One row per clip: a strip of up to ``max_frames`` of its frames (evenly picked), under the
    generated text (``labels[0]``) and up to two references (``labels[1]``); green where the text
    equals a reference (case-insensitive). Clips are ``(t, 3, H, W)`` in [0, 1] (normalised
    pixels are rescaled per clip)."""
    n = min(n, len(clips), len(generated), len(references))
    if n == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n, 1, figsize=(min(2.0 * max_frames, 16), 2.4 * n), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        clip = clips[i].float()
        t = clip.shape[0]
        pick = sorted({round(j * (t - 1) / max(max_frames - 1, 1)) for j in range(min(t, max_frames))})
        lo, hi = float(clip.min()), float(clip.max())
        if lo < 0 or hi > 1:
            clip = (clip - lo) / max(hi - lo, 1e-6)
        gap = torch.full((3, clip.shape[-2], max(1, clip.shape[-1] // 16)), 0.35)
        strip = torch.cat([part for j in pick for part in (clip[j], gap)][:-1], dim=-1)  # 3 H (k W + gaps)
        ax.imshow(strip.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.axis("off")
        text, colour = caption_title(generated[i], references[i], labels, 110)
        ax.set_title(text, fontsize=8, color=colour, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

