"""Training augmentations of image-caption pairs (``data.augment``), all off by default.

Each option is named for what it does, and none changes what a caption says about its image:

- ``crop_scale`` / ``crop_ratio``: a random resized crop (area fraction, aspect range) instead
  of the evaluation's resize + centre crop; ``(1.0, 1.0)`` (default) keeps the evaluation's
  framing. Crops can cut an object out of its caption: keep the lower bound high (0.6+) for
  captions that name small things.
- ``hflip``: the probability of a horizontal flip; a flipped image's caption has its spatial
  words swapped (:func:`swap_left_right`: left <-> right, leftmost <-> rightmost, with case
  kept), so "a cat left of a dog" stays true. Text drawn in an image reads mirrored: leave it
  off for data sets of signs or documents.
- ``color_jitter``: brightness, contrast and saturation each scaled by a random factor in
  ``[1 - s, 1 + s]``. Hue is never shifted: captions name colours.
- ``background``: where a transparent image (RGBA, LA, palette with transparency) is
  composited. ``white`` (default) is what evaluation and inference do
  (:class:`mammut.preprocess.ImagePreprocess`, ``mammut.data.datasets.ToRGB``); ``random``
  draws a random uniform colour per sample, so the model does not learn the background of
  icons and clip art. (``Image.convert("RGB")`` alone would expose whatever colour the fully
  transparent pixels happen to store, often black: never done here.)
- ``word_dropout``: the probability that each word of a caption is left out (at least one word
  always stays). For captions that are lists of keywords (file names, tags: "device icon: drive
  harddisk usb"), where any subset is still true of the image and short texts such as a
  zero-shot prompt ("device icon") become ones the model has seen. It changes the meaning of
  sentences ("a cat left of a dog" -> "cat of dog"): leave it off (0, the default) for them.
- ``caption``: ``rows`` (default) trains on every csv row as a sample; ``random`` makes each
  distinct image one sample with a caption drawn at random among its rows each time it is
  seen (COCO-style files list an image once per caption).

Determinism: sample ``i`` of a run is augmented with a generator seeded by ``(train.seed, i)``,
so a resumed run, any number of DataLoader workers and any number of ranks see the same pixels
and words as one uninterrupted process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

__all__ = ["AugmentConfig", "Augment", "swap_left_right", "composite", "drop_words"]

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost",
         "lefthand": "righthand", "righthand": "lefthand"}
_WORDS = re.compile(r"\b(" + "|".join(sorted(_SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)


@dataclass
class AugmentConfig:
    """``data.augment``: see the module docstring. Defaults: no augmentation."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    color_jitter: float = 0.0
    background: str = "white"  # white | random
    caption: str = "rows"  # rows | random
    word_dropout: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.augment.crop_scale: expected 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.augment.crop_ratio: expected 0 < low <= high, got {list(self.crop_ratio)}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"data.augment.hflip: expected a probability in [0, 1], got {self.hflip}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"data.augment.color_jitter: expected a value in [0, 1), got {self.color_jitter}")
        if self.background not in ("white", "random"):
            raise ValueError(f"data.augment.background: expected one of ['white', 'random'], got {self.background!r}")
        if self.caption not in ("rows", "random"):
            raise ValueError(f"data.augment.caption: expected one of ['rows', 'random'], got {self.caption!r}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"data.augment.word_dropout: expected a probability in [0, 1), got {self.word_dropout}")

    @property
    def crops(self) -> bool:
        return self.crop_scale != (1.0, 1.0)

    @property
    def active(self) -> bool:
        """Whether any pixel or word of a sample can change (``caption`` aside)."""
        return (self.crops or self.hflip > 0 or self.color_jitter > 0 or self.background != "white"
                or self.word_dropout > 0)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: left <-> right (and leftmost, lefthand), whole words
    only, case kept ("Left" -> "Right", "LEFT" -> "RIGHT"); "bright" and "copyright" untouched."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        new = _SWAP[word.lower()]
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _WORDS.sub(swap, caption)


def drop_words(caption: str, p: float, g: torch.Generator) -> str:
    """``caption`` with each whitespace-separated word left out with probability ``p``; at least
    one word (drawn at random) always stays, in its place."""
    words = caption.split()
    if p <= 0 or len(words) <= 1:
        return caption
    keep = (torch.rand(len(words), generator=g) >= p).tolist()
    if not any(keep):
        keep[int(torch.randint(0, len(words), (), generator=g))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def composite(image: Image.Image, background: Sequence[int] = (255, 255, 255)) -> Image.Image:
    """An RGB image: transparency composited onto ``background`` (an RGB triple); images
    without transparency are converted as they are."""
    if image.mode == "RGB":
        return image
    if has_alpha(image):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*(int(v) for v in background), 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def sample_seed(seed: int, index: int) -> int:
    """The augmentation seed of global sample ``index`` of a run seeded ``seed``."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 0x5EED) % (2**63 - 1)


class Augment:
    """``(PIL image, caption, generator) -> (tensor (3, S, S), caption)``: the options of
    :class:`AugmentConfig` on one sample, then ``finish`` (the tensor steps: to a ``[0, 1]``
    tensor and the run's normalisation). Without a crop the image goes through ``frame``
    (the evaluation's resize + centre crop to ``S``)."""

    def __init__(self, cfg: AugmentConfig, image_size: int, frame: Callable[[Image.Image], torch.Tensor],
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 fits: Callable[[str], bool] | None = None) -> None:
        self.cfg, self.size, self.frame, self.normalize = cfg, image_size, frame, normalize
        self.fits = fits  # a flipped caption is used only where it fits (else the image is not flipped)

    def __call__(self, image: Image.Image, caption: str, g: torch.Generator) -> tuple[torch.Tensor, str]:
        cfg = self.cfg
        if cfg.background == "random" and has_alpha(image):
            colour = torch.randint(0, 256, (3,), generator=g).tolist()
            image = composite(image, colour)
        else:
            image = composite(image)
        if cfg.crops:
            x = self._crop(image, g)
        else:
            x = self.frame(image)
        if cfg.hflip > 0 and float(torch.rand((), generator=g)) < cfg.hflip:
            swapped = swap_left_right(caption)
            if swapped == caption or self.fits is None or self.fits(swapped):
                x, caption = x.flip(-1), swapped
        if cfg.color_jitter > 0:
            x = self._jitter(x, g)
        if cfg.word_dropout > 0:
            caption = drop_words(caption, cfg.word_dropout, g)
        if self.normalize is not None:
            x = self.normalize(x)
        return x, caption

    def _crop(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        """A random resized crop (torchvision's sampling rule, drawn from ``g``), resized to ``S``."""
        from torchvision.transforms import functional as TF

        w, h = image.size
        lo, hi = self.cfg.crop_scale
        log_r = (math.log(self.cfg.crop_ratio[0]), math.log(self.cfg.crop_ratio[1]))
        for _ in range(10):
            area = w * h * (lo + (hi - lo) * float(torch.rand((), generator=g)))
            ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(torch.rand((), generator=g)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                break
        else:  # a centre crop at the nearest allowed aspect (very long or tall images)
            ratio = min(max(w / h, self.cfg.crop_ratio[0]), self.cfg.crop_ratio[1])
            cw, ch = (w, max(1, round(w / ratio))) if w / h < ratio else (max(1, round(h * ratio)), h)
            cw, ch = min(cw, w), min(ch, h)
            top, left = (h - ch) // 2, (w - cw) // 2
        crop = image.crop((left, top, left + cw, top + ch))
        crop = crop.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return TF.to_tensor(crop)

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation (in a random order), each by a factor in ``[1 - s, 1 + s]``."""
        from torchvision.transforms import functional as TF

        s = self.cfg.color_jitter
        factors = (1 - s + 2 * s * torch.rand(3, generator=g)).tolist()
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        for k in torch.randperm(3, generator=g).tolist():
            x = ops[k](x, factors[k])
        return x.clamp(0.0, 1.0)


def generator_for(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index))


def describe(cfg: AugmentConfig) -> dict[str, Any]:
    """The options in effect, for the run's log."""
    return {k: v for k, v in vars(cfg).items() if v != getattr(AugmentConfig(), k)}
