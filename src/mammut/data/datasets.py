"""Real image-text data: CSV/TSV files, WebDataset tar shards, image transforms and collation.

* :class:`CsvImageText` follows open_clip's convention (columns ``filepath`` and ``title``).
* :func:`expand_shards` turns a shard pattern (braces, globs, ``::``) into the shard list and
  fails clearly when it matches no file.
* :func:`webdataset_pipeline` reads ``{key}.jpg|png|...`` + ``{key}.txt`` shards with the
  ``webdataset`` library, split over ranks and DataLoader workers; its shuffling is a pure
  function of ``(seed, epoch, rank, worker)``, so two runs read the same samples in the same order.
* :func:`write_webdataset` writes such shards (used by tests and to export emoji scenes).

Missing or corrupt samples are skipped and counted (and logged with their file and row, or
shard and key), never fatal; errors that are not about the data (a bug in a transform, say)
are raised.  Counters live in the process that reads the data, so with DataLoader workers
each worker keeps its own count.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import logging
import random
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from mammut.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
_LOGGED_SKIPS = 20

# What PIL (and its codecs) raise on a file that is not a readable image.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
)
# What counts as a bad *sample* (skipped and counted) while reading shards; anything else is a bug and raised.
_DATA_ERRORS: tuple[type[BaseException], ...] = (*_DECODE_ERRORS, KeyError, tarfile.TarError)


class ImageDecodeError(ValueError):
    """An image file or blob that PIL cannot decode (the message says where it came from)."""


def decode_image(source: str | Path | bytes, where: str | None = None) -> Image.Image:
    """Decode an image file or its bytes to an RGB PIL image (transparency onto white).

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
    bicubic = T.InterpolationMode.BICUBIC
    steps: list[Callable[..., Any]] = [ToRGB()]
    if train:
        steps.append(T.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic, antialias=True))
    else:
        steps += [T.Resize(image_size, interpolation=bicubic, antialias=True), T.CenterCrop(image_size)]
    steps.append(T.ToTensor())
    if normalize is True:
        steps.append(T.Normalize(CLIP_MEAN, CLIP_STD))
    elif isinstance(normalize, tuple):
        if len(normalize) != 2 or len(normalize[0]) != 3 or len(normalize[1]) != 3:
            raise ValueError(f"normalize must be False, True or (mean[3], std[3]), got {normalize!r}")
        steps.append(T.Normalize(normalize[0], normalize[1]))
    elif normalize is not False:
        raise TypeError(f"normalize must be a bool or a (mean, std) tuple, got {type(normalize).__name__}")
    return T.Compose(steps)


# ----------------------------------------------------------------------------- CSV / TSV


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
    Rows whose image file is missing are dropped at construction (``num_missing``);
    images that fail to decode are skipped at load time (``num_corrupt``) and the next
    good row is returned instead.  ``transform`` defaults to ``image_transform(image_size)``.
    The file must be UTF-8 (a byte-order mark is allowed).

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
        missing_rows: list[int] = []
        for line, rel, caption in rows:
            fp = Path(rel) if Path(rel).is_absolute() else root / rel
            if rel and fp.is_file():
                self.samples.append((fp, caption))
                self.rows.append(line)
            else:
                self.missing.append(fp)
                missing_rows.append(line)
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
    def num_corrupt(self) -> int:
        """Images found so far (in this process) that could not be decoded."""
        return len(self._bad)

    @property
    def num_skipped(self) -> int:
        """Missing plus corrupt."""
        return self.num_missing + self.num_corrupt

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
            try:
                image = self.load_image(i)
            except (ImageDecodeError, FileNotFoundError) as exn:
                self._bad.add(i)
                log.warning("skipping corrupt image: %s; %d corrupt so far", exn, len(self._bad))
                continue
            return self.transform(image), self.samples[i][1]
        raise RuntimeError(f"no readable image in {self.path} ({len(self._bad)} corrupt)")


# ----------------------------------------------------------------------------- WebDataset

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or (bool(_REMOTE.match(url)) and not url.startswith("file://"))


def expand_shards(pattern: str | Sequence[str | Path], key: str = "data.path") -> list[str]:
    """The shard list of a pattern: braces (``data-{000..009}.tar``), globs (``data/*.tar``),
    several patterns joined by ``::``, or an explicit list.

    Local shards that do not exist are dropped with a warning (a partly downloaded set still
    trains); remote URLs (``s3://``, ``https://``, ``pipe:``) are kept unchecked.  Raises
    ``FileNotFoundError`` naming ``key`` (a config key or argument name) when no shard is left.
    """
    if isinstance(pattern, (str, Path)):
        text = str(pattern).strip()
        if not text:
            raise ValueError(f"{key}: expected a shard file or pattern such as 'data-{{000..009}}.tar', got {pattern!r}")
        candidates = wds.shardlists.expand_urls(text)
    elif isinstance(pattern, Sequence) and all(isinstance(u, (str, Path)) for u in pattern):
        text = None
        candidates = [str(u) for u in pattern]
    else:
        raise TypeError(f"{key}: expected a shard pattern (str) or a list of shard paths, got {type(pattern).__name__}")
    found: list[str] = []
    absent: list[str] = []
    folders: list[str] = []
    for url in candidates:
        if _is_remote(url):
            found.append(url)
            continue
        local = url[len("file://"):] if url.startswith("file://") else url
        local = str(Path(local).expanduser())
        if glob.has_magic(local):
            matches = sorted(m for m in glob.glob(local) if Path(m).is_file())
            found += matches
            if not matches:
                absent.append(local)
        elif Path(local).is_file():
            found.append(local)
        else:
            (folders if Path(local).is_dir() else absent).append(local)
    shown = repr(text) if text is not None else f"a list of {len(candidates)} paths"
    if not found:
        if folders:
            hint = f"; {folders[0]} is a folder: give its shards, e.g. '{folders[0].rstrip('/')}/*.tar'"
        elif not candidates:
            hint = ""
        else:
            tried = absent[0] if len(absent) == 1 else f"{absent[0]} ... {absent[-1]}"
            hint = f" ({len(absent)} tried: {tried}"
            hint += f"; relative to {Path.cwd()})" if not Path(absent[0]).is_absolute() else ")"
        raise FileNotFoundError(f"{key}: no shard matches {shown}{hint}")
    if absent or folders:
        log.warning("%s: %d of %d shards of %s do not exist and are left out (first: %s)",
                    key, len(absent) + len(folders), len(candidates), shown, (absent + folders)[0])
    return found


def _seed_of(*parts: object) -> int:
    """A 64-bit seed that is a pure function of ``parts`` (not of the process or Python's hash salt)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _pick(buf: list[Any], rng: random.Random) -> Any:
    i = rng.randrange(len(buf))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


class _SeededShuffle:
    """Buffer shuffle of a sample stream, seeded by ``(seed, epoch, rank, worker)`` when iterated.

    Starts yielding after ``initial`` samples; the buffer then grows to ``bufsize``.
    """

    def __init__(self, bufsize: int, initial: int, seed: int, epoch: int, rank: int | None) -> None:
        self.bufsize, self.initial = bufsize, max(1, min(initial, bufsize))
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rank = self.rank if self.rank is not None else wds.utils.pytorch_worker_info()[0]
        rng = random.Random(_seed_of("samples", self.seed, self.epoch, rank, _worker()[0]))
        buf: list[Any] = []
        target = self.initial
        for sample in src:
            buf.append(sample)
            if len(buf) >= target:
                yield _pick(buf, rng)
                target = min(target + 1, self.bufsize)
        while buf:
            yield _pick(buf, rng)


def _where(sample: Mapping[str, Any]) -> str:
    return f"shard {sample.get('__url__', '?')} key {sample.get('__key__', '?')}"


class SkipCounter:
    """WebDataset exception handler: logs and counts a bad sample (or unreadable shard), then skips it.

    Only data errors (unreadable files and images, missing parts) are skipped; any other
    exception is a bug and is raised.
    """

    def __init__(self, name: str = "webdataset") -> None:
        self.name = name
        self.count = 0
        self.errors: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, _DATA_ERRORS):
            raise exn
        self.count += 1
        msg = f"{type(exn).__name__}: {exn}"
        if len(self.errors) < 100:
            self.errors.append(msg)
        level = logging.WARNING if self.count <= _LOGGED_SKIPS else logging.DEBUG
        log.log(level, "%s: skipped a sample (%s); %d skipped so far", self.name, msg, self.count)
        return True

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, count={self.count})"


class CaptionFilter:
    """Pipeline stage dropping raw samples whose caption ``check(caption)`` rejects.

    ``check`` returns ``None`` to keep the sample or a reason to drop it; each drop is
    counted and logged as ``shard URL key KEY: reason``.  Samples without a readable caption
    pass through (the decoding stage counts those).
    """

    def __init__(self, check: Callable[[str], str | None], name: str = "webdataset") -> None:
        self.check, self.name = check, name
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            raw = sample.get("txt")
            if raw is not None:
                caption = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
                reason = self.check(caption.strip())
                if reason is not None:
                    self.count += 1
                    where = _where(sample)
                    if len(self.examples) < 100:
                        self.examples.append(where)
                    level = logging.WARNING if self.count <= _LOGGED_SKIPS else logging.DEBUG
                    log.log(level, "%s: skipped %s: %s; %d skipped so far", self.name, where, reason, self.count)
                    continue
            yield sample

    def __repr__(self) -> str:
        return f"CaptionFilter(name={self.name!r}, count={self.count})"


def image_of(sample: Mapping[str, Any]) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a raw webdataset sample's image; ``KeyError`` naming shard and key if none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise KeyError(f"{_where(sample)} has no image ({'/'.join(IMAGE_EXTENSIONS)}); "
                       f"parts: {sorted(k for k in sample if not k.startswith('__'))}")
    return ext, sample[ext]


def caption_of(sample: Mapping[str, Any]) -> str:
    """The stripped ``txt`` caption of a raw webdataset sample; ``KeyError``/``ValueError`` naming shard and key."""
    if "txt" not in sample:
        raise KeyError(f"{_where(sample)} has no txt caption; parts: {sorted(k for k in sample if not k.startswith('__'))}")
    caption = sample["txt"]
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise ValueError(f"{_where(sample)}: the txt caption is not UTF-8 (byte offset {exn.start})") from None
    return str(caption).strip()


def _decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, str]:
    """Raw webdataset sample -> (RGB PIL image, caption); raises naming shard and key on missing/corrupt parts."""
    ext, data = image_of(sample)
    caption = caption_of(sample)
    return decode_image(data, where=f"{_where(sample)} ({ext})"), caption


def _split_explicit(rank: int, world_size: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def split(src: Iterable[Any]) -> Iterator[Any]:
        yield from itertools.islice(src, rank, None, world_size)

    return split


def webdataset_pipeline(
    urls: str | Sequence[str],
    transform: Callable[[Image.Image], Any] | None = None,
    shuffle: int = 0,
    resampled: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    handler: SkipCounter | None = None,
    *,
    epoch: int = 0,
    caption_check: Callable[[str], str | None] | None = None,
) -> wds.DataPipeline:
    """A WebDataset pipeline yielding ``(image, caption)`` from ``{key}.jpg|png`` + ``{key}.txt``.

    Args:
        urls: shard paths/URLs, a list or a pattern (see :func:`expand_shards`; a pattern that
            matches no file raises ``FileNotFoundError``).
        transform: applied to the RGB PIL image (default ``image_transform(224)``).
        shuffle: sample shuffle buffer size (0 = off); shards are shuffled too when > 0.
        resampled: draw shards with replacement forever (for step-based training).
        seed, epoch: the shard order is a pure function of ``(seed, epoch)`` (the same on every
            rank), the sample shuffle of ``(seed, epoch, rank, worker)``: the same arguments give
            the same stream in every run. Make a new pipeline per epoch with ``epoch`` counting up.
        rank, world_size: explicit node split; default uses ``wds.split_by_node``
            (torch.distributed or the RANK/WORLD_SIZE variables).
        handler: the :class:`SkipCounter` that counts skipped samples (created if None);
            also available as ``pipeline.skipped``.
        caption_check: ``caption -> None`` (keep) or a reason to drop the sample (e.g. too many
            tokens); drops are logged with shard and key and counted in ``pipeline.filtered``.
    """
    if isinstance(urls, str):
        url_list = expand_shards(urls, key="urls")
    elif isinstance(urls, Sequence) and all(isinstance(u, (str, Path)) for u in urls):
        url_list = [str(u) for u in urls]
    else:
        raise TypeError(f"urls must be a str or a list of str, got {type(urls).__name__}")
    if not url_list:
        raise ValueError("urls is empty")
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
        raise ValueError(f"shuffle must be an int buffer size >= 0, got {shuffle!r}")
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if world_size is not None and rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    counter = handler if handler is not None else SkipCounter()
    if not isinstance(counter, SkipCounter):
        raise TypeError(f"handler must be a SkipCounter or None, got {type(handler).__name__}")
    tf = transform if transform is not None else image_transform(224)

    stages: list[Any] = []
    if resampled:
        def worker_seed() -> int:  # distinct per rank and worker, the same in every run
            r = rank if rank is not None else wds.utils.pytorch_worker_info()[0]
            return _seed_of("worker", r, _worker()[0]) & 0x7FFFFFFF

        stages.append(wds.ResampledShards(url_list, seed=_seed_of("resampled", seed, epoch) & 0x7FFFFFFF,
                                          worker_seed=worker_seed, deterministic=True))
    else:
        if shuffle > 0:
            url_list = list(url_list)
            random.Random(_seed_of("shards", seed, epoch)).shuffle(url_list)
        stages.append(wds.SimpleShardList(url_list))
        stages.append(_split_explicit(rank, world_size) if world_size is not None else wds.split_by_node)  # type: ignore[arg-type]
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=counter))
    filtered = CaptionFilter(caption_check) if caption_check is not None else None
    if filtered is not None:
        stages.append(filtered)
    if shuffle > 0:
        stages.append(_SeededShuffle(shuffle, min(shuffle, 100), seed, epoch, rank))
    stages.append(wds.map(_decode_sample, handler=counter))
    stages.append(wds.map_tuple(tf, None))  # a failing transform is a bug, not a bad sample
    pipeline = wds.DataPipeline(*stages)
    pipeline.skipped = counter
    pipeline.filtered = filtered
    return pipeline


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"image tensor must be (C, H, W) with C in 1/3/4, got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    raise TypeError(f"image must be a PIL image, tensor or numpy array, got {type(image).__name__}")


def write_webdataset(
    samples: Iterable[Any],
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    image_format: str = "png",
) -> list[Path]:
    """Write ``(image, caption)`` pairs (or objects with ``.image``/``.caption``) as tar shards.

    Images may be PIL images, (C, H, W) tensors (float in [0, 1] or uint8) or HWC arrays.
    Returns the shard paths ``out_dir/{prefix}-000000.tar, ...``.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    fmt = image_format.lower()
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0,
                         post=lambda fname: written.append(Path(fname))) as sink:
        for i, sample in enumerate(samples):
            if hasattr(sample, "image") and hasattr(sample, "caption"):
                image, caption = sample.image, sample.caption
            elif isinstance(sample, (tuple, list)) and len(sample) == 2:
                image, caption = sample
            else:
                raise TypeError(f"samples[{i}] must be (image, caption) or have .image/.caption, "
                                f"got {type(sample).__name__}")
            if not isinstance(caption, str):
                raise TypeError(f"samples[{i}] caption must be a str, got {type(caption).__name__}")
            buf = io.BytesIO()
            pil = _to_pil(image)
            if fmt == "png":
                pil.save(buf, format="PNG")
            else:
                ToRGB()(pil).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:09d}", "jpg" if fmt == "jpeg" else fmt: buf.getvalue(), "txt": caption})
    log.info("wrote %d shards to %s", len(written), out)
    return written


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
