"""One image preprocessing definition for inference: :class:`ImagePreprocess`.

``ImagePreprocess(image_size, mean, std, interpolation, resize_mode, fill_color, background)``
is a callable PIL image -> float tensor ``(3, image_size, image_size)``, its settings plain
attributes, written to and read from a JSON-able dict (``to_dict`` / ``from_dict``, the
``preprocess.json`` of a checkpoint). :func:`mammut.load` returns one; ``mammut.inference.
load_image_files`` uses one; ``mammut.data.datasets.image_transform(train=False)`` computes
the same pixels (resize the short side, bicubic, antialiased; centre crop; ``[0, 1]``; optional
normalisation).

Steps, in order (those of open_clip's eval transform, so an open_clip model sees its own pixels):

1. ``background`` set (an RGB triple, our training data's choice: white): the image is made
   RGB first, transparency composited onto that colour. ``None`` (open_clip's choice): the
   image is made RGB after resizing, with PIL's ``convert("RGB")`` (alpha dropped).
2. ``resize_mode``: ``"shortest"`` (short side to ``image_size``, then centre crop), ``"squash"``
   (both sides to ``image_size``, aspect ratio not kept) or ``"longest"`` (long side to
   ``image_size``, then centre padding with ``fill_color``, 0-255). ``interpolation``:
   ``"bicubic"`` or ``"bilinear"`` (PIL's, antialiased).
3. To float in ``[0, 1]``; then ``(x - mean) / std`` per channel when ``mean``/``std`` are set
   (``None``: no normalisation, the default of our runs; :data:`CLIP_MEAN`/:data:`CLIP_STD`:
   OpenAI CLIP's, open_clip's default).

PIL and torchvision are imported when an image is processed, never by ``import mammut``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["ImagePreprocess", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_FORMAT = "mammut.preprocess"
_INTERPOLATIONS = ("bicubic", "bilinear")
_RESIZE_MODES = ("shortest", "squash", "longest")


def _triple(value: Any, arg: str, positive: bool = False) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{arg}: expected None or 3 numbers (one per RGB channel), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{arg}: expected 3 finite numbers{' > 0' if positive else ''}, got {value!r}")
        out.append(float(v))
    return (out[0], out[1], out[2])


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> float tensor ``(3, image_size, image_size)`` (see the module docstring).

    ``ImagePreprocess.open_clip(224)``: open_clip's eval transform for CLIP-family models
    (OpenAI mean/std, bicubic, shortest side + centre crop). ``ImagePreprocess(64)``: our runs'
    default (no normalisation, transparency on white).
    """

    image_size: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    background: tuple[int, int, int] | None = (255, 255, 255)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {size!r}")
        mean, std = _triple(self.mean, "mean"), _triple(self.std, "std", positive=True)
        if (mean is None) != (std is None):
            raise ValueError(f"mean / std: expected both or neither, got mean={self.mean!r}, std={self.std!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode: expected one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        fill = self.fill_color
        if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
            raise ValueError(f"fill_color: expected an int in [0, 255], got {fill!r}")
        bg = self.background
        if bg is not None:
            ok = not isinstance(bg, (str, bytes)) and isinstance(bg, Sequence) and len(bg) == 3 and all(
                not isinstance(c, bool) and isinstance(c, int) and 0 <= c <= 255 for c in bg)
            if not ok:
                raise ValueError(f"background: expected None or 3 ints in [0, 255], got {bg!r}")
            bg = (int(bg[0]), int(bg[1]), int(bg[2]))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "background", bg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def open_clip(cls, image_size: int, preprocess_cfg: Mapping[str, Any] | None = None) -> "ImagePreprocess":
        """open_clip's eval transform at ``image_size``; ``preprocess_cfg`` (the
        ``open_clip_config.json`` section of that name: ``mean``, ``std``, ``interpolation``,
        ``resize_mode``, ``fill_color``; ``size`` is the model's and is ignored) overrides the
        defaults (OpenAI CLIP mean/std, bicubic, shortest side + centre crop)."""
        cfg = dict(preprocess_cfg or {})
        if cfg.get("size") not in (None, image_size, [image_size, image_size], (image_size, image_size)):
            raise ValueError(f"preprocess_cfg.size: expected the model's image size {image_size}, got {cfg['size']!r}")
        mode = cfg.get("mode", "RGB")
        if mode != "RGB":
            raise ValueError(f"preprocess_cfg.mode: expected 'RGB', got {mode!r}")

        def pick(key: str, default: Any) -> Any:
            return default if cfg.get(key) is None else cfg[key]

        mean, std = pick("mean", CLIP_MEAN), pick("std", CLIP_STD)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean  # open_clip accepts a scalar
        std = (std,) * 3 if isinstance(std, (int, float)) else std
        interpolation = pick("interpolation", "bicubic")
        interpolation = "bicubic" if interpolation == "random" else interpolation  # open_clip: random -> bicubic at eval
        return cls(image_size, mean=mean, std=std, interpolation=interpolation,
                   resize_mode=pick("resize_mode", "shortest"), fill_color=pick("fill_color", 0), background=None)

    def with_image_size(self, image_size: int) -> "ImagePreprocess":
        """The same preprocessing at another size (after ``model.set_image_size(image_size)``)."""
        return dataclasses.replace(self, image_size=image_size)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (``from_dict`` reads them back)."""
        out: dict[str, Any] = {"format": _FORMAT, "format_version": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "preprocess") -> "ImagePreprocess":
        """Settings written by ``to_dict``; an unknown key or a bad value is a ``ValueError``
        naming it (``where`` prefixes the message, e.g. the file)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object of preprocessing settings, got {type(data).__name__}")
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"{where}: format: expected {_FORMAT!r}, got {fmt!r}")
        version = data.get("format_version", 1)
        if version != 1:
            raise ValueError(f"{where}: format_version: expected 1, got {version!r} (written by a newer mammut?)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format", "format_version"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")
        if "image_size" not in data:
            raise ValueError(f"{where}: image_size: expected an int >= 1, got nothing")
        kwargs = {k: data[k] for k in names if k in data}
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` (atomic); returns the path."""
        from .io.atomic import atomic_write_text

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "ImagePreprocess":
        """Read a file written by ``save``."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"path: no preprocessing file at {str(p)!r}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: not valid JSON ({err})") from None
        return cls.from_dict(data, where=str(p))

    # ------------------------------------------------------------------ the transform
    def __call__(self, image: Any) -> torch.Tensor:
        """PIL image -> float32 tensor ``(3, image_size, image_size)``."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL image, got {type(image).__name__}")
        if self.background is not None:
            image = _composite(image, self.background)
        size = self.image_size
        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        if self.resize_mode == "shortest":
            image = _resize_shortest_crop(image, size, self.interpolation)
        elif self.resize_mode == "squash":
            image = TF.resize(image, [size, size], interpolation=mode)
        else:
            image = _fit_longest(image, size, mode, self.fill_color)
        if image.mode != "RGB":
            image = image.convert("RGB")
        x = TF.to_tensor(image)
        if self.mean is not None and self.std is not None:
            x = TF.normalize(x, self.mean, self.std)
        return x

    def batch(self, images: Sequence[Any]) -> torch.Tensor:
        """Several PIL images -> ``(n, 3, image_size, image_size)``."""
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
            raise TypeError(f"images: expected a non-empty list of PIL images, got {type(images).__name__}")
        return torch.stack([self(im) for im in images])


def _composite(image: Any, background: tuple[int, int, int]) -> Any:
    """RGB, transparency composited onto ``background``."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def _resize_shortest_crop(image: Any, size: int, interpolation: str) -> Any:
    """Short side to ``size``, then the centre ``size x size`` square (torchvision's ``resize`` +
    ``center_crop``, open_clip's eval transform).

    Resizing the whole image first allocates ``size x (size * aspect ratio)`` pixels: a 2 KB PNG
    of 1 x 1,000,000 pixels asked for 32 x 32,000,000 (GBs). Past an aspect ratio of
    :data:`_FULL_RESIZE_ASPECT` only the source box that maps onto the square is resampled
    (``Image.resize(box=...)``, the same sampling positions and filter support), so work and
    memory are bounded by the output whatever the shape. Wide images then match the full resize
    within one level of 255; tall ones (transposed around it, PIL resamples the width first) in
    all but ~2% of pixels, by up to ~15 levels where bicubic overshoot is clipped between the two
    passes in another order (measured on smooth 37 x 1000 images). Up to that ratio the whole
    image is resized: open_clip's pixels exactly.
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    w, h = image.size
    if max(w, h) <= _FULL_RESIZE_ASPECT * min(w, h):
        mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
        return TF.center_crop(TF.resize(image, size, interpolation=mode), [size, size])
    tall = h > w
    if tall:
        image, (w, h) = image.transpose(Image.Transpose.TRANSPOSE), (h, w)
    new_w = int(size * w / h)  # torchvision's rule: the long side is truncated, not rounded
    left = int(round((new_w - size) / 2.0))
    sx = w / new_w
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    out = image.resize((size, size), resample=resample, box=(left * sx, 0, (left + size) * sx, h))
    return out.transpose(Image.Transpose.TRANSPOSE) if tall else out


_FULL_RESIZE_ASPECT = 4  # aspect ratios up to this resize the whole image (exact open_clip pixels)


def _fit_longest(image: Any, size: int, mode: Any, fill: int) -> Any:
    """Long side to ``size`` (aspect ratio kept, sides rounded), then padded (centred, ``fill``)
    to ``size x size``."""
    from torchvision.transforms import functional as TF

    w, h = image.size
    scale = max(w, h) / size
    new_h, new_w = max(1, round(h / scale)), max(1, round(w / scale))
    image = TF.resize(image, [new_h, new_w], interpolation=mode)
    pad_w, pad_h = size - new_w, size - new_h
    if pad_w > 0 or pad_h > 0:
        left, top = max(pad_w, 0) // 2, max(pad_h, 0) // 2
        image = TF.pad(image, [left, top, max(pad_w, 0) - left, max(pad_h, 0) - top], fill=fill)
    if image.size != (size, size):
        image = TF.center_crop(image, [size, size])
    return image
