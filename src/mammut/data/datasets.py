"""Real image-text data: CSV/TSV files, WebDataset tar shards, image transforms and collation.

* :class:`CsvImageText` follows open_clip's convention (columns ``filepath`` and ``title``).
* :func:`webdataset_pipeline` reads ``{key}.jpg|png|...`` + ``{key}.txt`` shards with the
  ``webdataset`` library, split over ranks and DataLoader workers.
* :func:`write_webdataset` writes such shards (used by tests and to export emoji scenes).

Missing or corrupt samples are skipped and counted (and logged), never fatal.  Counters
live in the process that reads the data, so with DataLoader workers each worker keeps
its own count.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class CsvImageText(Dataset):
    """Image-caption pairs listed in a CSV/TSV file (open_clip's ``filepath``/``title`` columns).

    Relative image paths are resolved against ``image_root`` (default: the file's folder).
    Rows whose image file is missing are dropped at construction (``num_missing``);
    images that fail to decode are skipped at load time (``num_corrupt``) and the next
    good row is returned instead.  ``transform`` defaults to ``image_transform(image_size)``.
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
    ) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"CSV file not found: {p}")
        if sep is None:
            suffix = p.suffix.lower()
            if suffix == ".tsv":
                sep = "\t"
            elif suffix == ".csv":
                sep = ","
            else:
                raise ValueError(f"cannot infer the separator from suffix {suffix!r} of {p}; pass sep=")
        root = Path(image_root) if image_root is not None else p.parent
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, arg in ((img_key, "img_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(f"{arg}={key!r} is not a column of {p}; columns are {columns}")
            rows = [(row[img_key], row[caption_key]) for row in reader]

        self.path = p
        self.transform = transform if transform is not None else image_transform(image_size)
        self.samples: list[tuple[Path, str]] = []
        self.missing: list[Path] = []
        for rel, caption in rows:
            fp = Path(rel) if Path(rel).is_absolute() else root / rel
            if fp.is_file():
                self.samples.append((fp, caption or ""))
            else:
                self.missing.append(fp)
        if self.missing:
            log.warning("%s: %d of %d images are missing and were skipped (first: %s)",
                        p, len(self.missing), len(rows), self.missing[0])
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

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Any, str]:
        fp, caption = self.samples[i]
        with Image.open(fp) as img:
            img.load()
            return self.transform(img), caption

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
                return self._load(i)
            except Exception as exn:  # noqa: BLE001 - any decode failure is a corrupt sample
                self._bad.add(i)
                log.warning("skipping corrupt image %s (%s: %s); %d corrupt so far",
                            self.samples[i][0], type(exn).__name__, exn, len(self._bad))
        raise RuntimeError(f"no readable image in {self.path} ({len(self._bad)} corrupt)")


# ----------------------------------------------------------------------------- WebDataset


class SkipCounter:
    """WebDataset exception handler: logs and counts the error, then skips the sample."""

    def __init__(self, name: str = "webdataset") -> None:
        self.name = name
        self.count = 0
        self.errors: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        msg = f"{type(exn).__name__}: {exn}"
        if len(self.errors) < 100:
            self.errors.append(msg)
        level = logging.WARNING if self.count <= _LOGGED_SKIPS else logging.DEBUG
        log.log(level, "%s: skipped a sample (%s); %d skipped so far", self.name, msg, self.count)
        return True

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, count={self.count})"


def _decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, str]:
    """Raw webdataset sample -> (RGB PIL image, caption); raises on missing/corrupt parts."""
    key = sample.get("__key__", "?")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_ext is None:
        raise KeyError(f"sample {key!r} has no image ({'/'.join(IMAGE_EXTENSIONS)}); keys: {sorted(sample)}")
    if "txt" not in sample:
        raise KeyError(f"sample {key!r} has no txt caption; keys: {sorted(sample)}")
    with Image.open(io.BytesIO(sample[image_ext])) as img:
        img.load()
        rgb = ToRGB()(img)
    caption = sample["txt"]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return rgb, caption.strip()


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
) -> wds.DataPipeline:
    """A WebDataset pipeline yielding ``(image, caption)`` from ``{key}.jpg|png`` + ``{key}.txt``.

    Args:
        urls: shard paths/URLs, a list or a brace pattern (``"data-{000..009}.tar"``).
        transform: applied to the RGB PIL image (default ``image_transform(224)``).
        shuffle: sample shuffle buffer size (0 = off); shards are shuffled too when > 0.
        resampled: draw shards with replacement forever (for step-based training).
        seed: shuffling / resampling seed (same on every rank).
        rank, world_size: explicit node split; default uses ``wds.split_by_node``
            (torch.distributed or the RANK/WORLD_SIZE variables).
        handler: the :class:`SkipCounter` that counts skipped samples (created if None);
            also available as ``pipeline.skipped``.
    """
    if isinstance(urls, str):
        url_list: list[str] = wds.shardlists.expand_urls(urls)
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
        stages.append(wds.ResampledShards(url_list, seed=seed, deterministic=True))
    else:
        stages.append(wds.SimpleShardList(url_list))
        if shuffle > 0:
            stages.append(wds.detshuffle(bufsize=max(len(url_list), 1), initial=len(url_list), seed=seed))
        stages.append(_split_explicit(rank, world_size) if world_size is not None else wds.split_by_node)  # type: ignore[arg-type]
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=counter))
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle, initial=min(shuffle, 100)))
    stages.append(wds.map(_decode_sample, handler=counter))
    stages.append(wds.map_tuple(tf, None, handler=counter))
    pipeline = wds.DataPipeline(*stages)
    pipeline.skipped = counter
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
