"""WebDataset tar shards of ``{key}.jpg|png|...`` + ``{key}.txt`` pairs.

* :func:`expand_shards` turns a shard pattern (braces, globs, ``::``) into the shard list and
  fails clearly when it matches no file.
* :func:`webdataset_pipeline` reads shards with the ``webdataset`` library, split over ranks
  and DataLoader workers; its shuffling is a pure function of ``(seed, epoch, rank, worker)``,
  so two runs read the same samples in the same order.
* :func:`write_webdataset` writes such shards (used by tests and to export emoji scenes).

Missing or corrupt samples, and samples with a blank caption, are skipped and counted (and
logged with their shard and key), never fatal; errors that are not about the data are raised.
Counters live in the process that reads the data, so with DataLoader workers each worker keeps
its own count.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from .datasets import _DECODE_ERRORS, IMAGE_EXTENSIONS, ToRGB, decode_image, image_transform

log = logging.getLogger(__name__)

_LOGGED_SKIPS = 20
# What counts as a bad *sample* (skipped and counted) while reading shards; anything else is a bug and raised.
_DATA_ERRORS: tuple[type[BaseException], ...] = (*_DECODE_ERRORS, KeyError, tarfile.TarError)


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
    """The stripped ``txt`` caption of a raw webdataset sample; ``KeyError``/``ValueError`` naming shard and key
    (a blank caption, empty or whitespace, is a ``ValueError``: the sample is skipped and counted)."""
    if "txt" not in sample:
        raise KeyError(f"{_where(sample)} has no txt caption; parts: {sorted(k for k in sample if not k.startswith('__'))}")
    caption = sample["txt"]
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise ValueError(f"{_where(sample)}: the txt caption is not UTF-8 (byte offset {exn.start})") from None
    caption = str(caption).strip()
    if not caption:
        raise ValueError(f"{_where(sample)}: blank caption (empty or whitespace)")
    return caption


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


