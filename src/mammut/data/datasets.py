"""Real image-text data: image decoding and transforms, CSV/TSV files, and collation.
WebDataset shards live in :mod:`mammut.data.webdataset`.

* :func:`decode_image` / :func:`image_transform`: bytes or a file -> RGB PIL image -> tensor.
* :class:`CsvImageText` follows open_clip's convention (columns ``filepath`` and ``title``).
* :class:`ImageTextCollate`: ``(image, caption)`` items -> ``(images, token ids)``.

Missing or corrupt samples, and samples with a blank caption, are skipped and counted (and
logged with their file and row, or shard and key), never fatal; errors that are not about the
data (a bug in a transform, say) are raised.  Counters live in the process that reads the
data, so with DataLoader workers each worker keeps its own count.
"""

from __future__ import annotations

import csv
import io
import logging
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from mammut.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

# What PIL (and its codecs) raise on a file that is not a readable image.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)


class ImageDecodeError(ValueError):
    """An image file or blob that PIL cannot decode (the message says where it came from)."""


def decode_image(source: str | Path | bytes, where: str | None = None, *, keep_alpha: bool = False) -> Image.Image:
    """Decode an image file or its bytes to an RGB PIL image (transparency onto white; with
    ``keep_alpha`` an image with transparency comes back as RGBA, for ``data.augment.background``).

    Raises :class:`ImageDecodeError` naming ``where`` (default: the path) if it is not a
    readable image; a missing file raises ``FileNotFoundError``.
    """
    label = where if where is not None else (str(source) if not isinstance(source, bytes) else "image bytes")
    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    if isinstance(fp, Path) and not fp.is_file():
        raise FileNotFoundError(f"{label}: no such image file {fp}")
    try:
        with Image.open(fp) as img:
            img.load()
            if keep_alpha and img.mode != "RGB" and (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
                return img.convert("RGBA")
            return ToRGB()(img)
    except _DECODE_ERRORS as exn:
        raise ImageDecodeError(f"{label}: not a readable image ({type(exn).__name__}: {exn})") from exn


# ----------------------------------------------------------------------------- transforms


class ToRGB:
    """Convert any PIL image to RGB, compositing transparency onto a white background."""

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        if img.mode == "RGB":
            return img
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def image_transform(
    image_size: int = 224,
    train: bool = False,
    normalize: bool | tuple[Sequence[float], Sequence[float]] = False,
    scale: tuple[float, float] = (0.8, 1.0),
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor (3, image_size, image_size).

    Eval: resize the short side (bicubic) + center crop.  Train: random resized crop
    with area ``scale``.  ``normalize``: False (values in [0, 1]), True (CLIP mean/std)
    or an explicit ``(mean, std)``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    if normalize is True:
        mean_std: tuple[Sequence[float], Sequence[float]] | None = (CLIP_MEAN, CLIP_STD)
    elif isinstance(normalize, tuple):
        if len(normalize) != 2 or len(normalize[0]) != 3 or len(normalize[1]) != 3:
            raise ValueError(f"normalize must be False, True or (mean[3], std[3]), got {normalize!r}")
        mean_std = normalize
    elif normalize is False:
        mean_std = None
    else:
        raise TypeError(f"normalize must be a bool or a (mean, std) tuple, got {type(normalize).__name__}")
    if not train:  # the one eval preprocessing (mammut.load returns it too; saved with checkpoints)
        from ..preprocess import ImagePreprocess

        mean, std = mean_std if mean_std is not None else (None, None)
        return ImagePreprocess(image_size, mean=mean, std=std)
    bicubic = T.InterpolationMode.BICUBIC
    steps: list[Callable[..., Any]] = [ToRGB(), T.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic, antialias=True),
                                       T.ToTensor()]
    if mean_std is not None:
        steps.append(T.Normalize(*mean_std))
    return T.Compose(steps)


# ----------------------------------------------------------------------------- CSV / TSV
_SHOWN_ROWS = 5  # row numbers named in a warning about skipped rows


def _read_utf8(p: Path, name: str) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (Excel) is dropped
    except UnicodeDecodeError as exn:
        line = data.count(b"\n", 0, exn.start) + 1
        raise ValueError(f"{name}: {p} is not UTF-8 text (byte 0x{data[exn.start]:02x} at offset {exn.start}, "
                         f"line {line}); save it as UTF-8") from None


class CsvImageText(Dataset):
    """Image-caption pairs listed in a CSV/TSV file (open_clip's ``filepath``/``title`` columns).

    Relative image paths are resolved against ``image_root`` (default: the file's folder).
    Rows whose caption is blank (empty or whitespace) are dropped at construction
    (``num_empty``, their lines in ``empty_rows``), then rows whose image file is missing
    (``num_missing``); images that fail to decode are skipped at load time (``num_corrupt``)
    and the next good row is returned instead. Each kind is logged with the file and rows.
    ``transform`` defaults to ``image_transform(image_size)``. The file must be UTF-8 (a
    byte-order mark is allowed).

    ``arg_names`` renames the arguments ``path``, ``img_key`` and ``caption_key`` in error
    messages (the training code passes the config keys, e.g. ``{"path": "data.path"}``).
    Sample ``i`` came from line ``rows[i]`` of the file (the header is line 1); :meth:`where`
    formats that as ``FILE row N`` for messages.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        image_size: int = 224,
        arg_names: Mapping[str, str] | None = None,
    ) -> None:
        names = {"path": "path", "img_key": "img_key", "caption_key": "caption_key", **(arg_names or {})}
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder, expected a .csv or .tsv file" if p.is_dir() else "no such file"
            raise FileNotFoundError(f"{names['path']}: {what}: {p}")
        if sep is None:
            suffix = p.suffix.lower()
            if suffix == ".tsv":
                sep = "\t"
            elif suffix == ".csv":
                sep = ","
            else:
                raise ValueError(f"{names['path']}: expected a .csv or .tsv file (the suffix gives the separator), "
                                 f"got {p}")
        root = Path(image_root).expanduser() if image_root is not None else p.parent
        reader = csv.DictReader(io.StringIO(_read_utf8(p, names["path"]), newline=""), delimiter=sep)
        columns = reader.fieldnames or []
        for key, arg in ((img_key, "img_key"), (caption_key, "caption_key")):
            if key not in columns:
                raise ValueError(f"{names[arg]}={key!r} is not a column of {p}; columns are {columns}")
        try:
            rows = [(reader.line_num, row[img_key] or "", row[caption_key] or "") for row in reader]
        except csv.Error as exn:
            raise ValueError(f"{names['path']}: {p} row {reader.line_num} is not valid {'TSV' if sep == chr(9) else 'CSV'} "
                             f"({exn})") from None

        self.path = p
        self.transform = transform if transform is not None else image_transform(image_size)
        self.samples: list[tuple[Path, str]] = []
        self.rows: list[int] = []
        self.missing: list[Path] = []
        self.empty_rows: list[int] = []
        missing_rows: list[int] = []
        for line, rel, caption in rows:
            if not caption.strip():
                self.empty_rows.append(line)
                continue
            fp = Path(rel) if Path(rel).is_absolute() else root / rel
            if rel and fp.is_file():
                self.samples.append((fp, caption))
                self.rows.append(line)
            else:
                self.missing.append(fp)
                missing_rows.append(line)
        if self.empty_rows:
            shown = ", ".join(str(line) for line in self.empty_rows[:_SHOWN_ROWS])
            more = f" and {len(self.empty_rows) - _SHOWN_ROWS} more" if len(self.empty_rows) > _SHOWN_ROWS else ""
            log.warning("%s: %d of %d rows have a blank caption (empty or whitespace) and were skipped (rows %s%s)",
                        p, len(self.empty_rows), len(rows), shown, more)
        if self.missing:
            log.warning("%s: %d of %d images are missing and were skipped (first: %s row %d: %s)",
                        p, len(self.missing), len(rows), p, missing_rows[0], self.missing[0])
        self._bad: set[int] = set()
        log.info("%s: %d image-text pairs", p, len(self.samples))

    @property
    def num_missing(self) -> int:
        """Rows dropped because the image file does not exist."""
        return len(self.missing)

    @property
    def num_empty(self) -> int:
        """Rows dropped because the caption is blank (empty or whitespace)."""
        return len(self.empty_rows)

    @property
    def num_corrupt(self) -> int:
        """Images found so far (in this process) that could not be decoded."""
        return len(self._bad)

    @property
    def num_skipped(self) -> int:
        """Blank captions plus missing plus corrupt."""
        return self.num_empty + self.num_missing + self.num_corrupt

    def where(self, i: int) -> str:
        """``"FILE row N"``: where sample ``i`` is listed."""
        return f"{self.path} row {self.rows[i]}"

    def select(self, indices: Sequence[int]) -> None:
        """Keep only samples ``indices`` (in that order), e.g. to drop over-long captions up front."""
        if self._bad:
            raise RuntimeError("select() must come before any sample is loaded")
        n = len(self.samples)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices must be in [0, {n}), got {bad[0]}")
        self.samples = [self.samples[i] for i in indices]
        self.rows = [self.rows[i] for i in indices]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of sample ``i``; :class:`ImageDecodeError` (naming file and row) if unreadable."""
        fp = self.samples[i][0]
        return decode_image(fp, where=f"{self.where(i)} ({fp})")

    def __getitem__(self, index: int) -> tuple[Any, str]:
        return self.item(index, lambda image, caption: (self.transform(image), caption))

    def item(self, index: int, apply: Callable[[Image.Image, str], Any], *, keep_alpha: bool = False) -> Any:
        """``apply(image, caption)`` of sample ``index``, or of the next readable one when its image
        cannot be decoded (counted in ``num_corrupt``). ``keep_alpha``: images with transparency
        come as RGBA (see :func:`decode_image`)."""
        n = len(self.samples)
        if n == 0:
            raise IndexError("CsvImageText is empty (all images missing)")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            fp = self.samples[i][0]
            try:
                image = decode_image(fp, where=f"{self.where(i)} ({fp})", keep_alpha=keep_alpha)
            except (ImageDecodeError, FileNotFoundError) as exn:
                self._bad.add(i)
                log.warning("skipping corrupt image: %s; %d corrupt so far", exn, len(self._bad))
                continue
            return apply(image, self.samples[i][1])
        raise RuntimeError(f"no readable image in {self.path} ({len(self._bad)} corrupt)")


# ----------------------------------------------------------------------------- collation


class ImageTextCollate:
    """Collate ``(image, caption)`` pairs (or scenes) into ``(images (b, 3, H, W), ids (b, max_len))``."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, truncate: bool = False) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a mammut Tokenizer, got {type(tokenizer).__name__}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.truncate = truncate

    def __call__(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(batch) == 0:
            raise ValueError("batch is empty")
        images, captions = [], []
        for i, item in enumerate(batch):
            if hasattr(item, "image") and hasattr(item, "caption"):
                image, caption = item.image, item.caption
            elif isinstance(item, (tuple, list)) and len(item) >= 2:
                image, caption = item[0], item[1]
            else:
                raise TypeError(f"batch[{i}] must be (image, caption) or have .image/.caption, got {type(item).__name__}")
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"batch[{i}] image must be a tensor (apply a transform), got {type(image).__name__}")
            images.append(image)
            captions.append(caption)
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"images in a batch must share one shape, got {sorted(shapes)}")
        ids = self.tokenizer.encode(captions, self.max_len, truncate=self.truncate)
        return torch.stack(images).float(), ids
