"""Data sources shared by training, evaluation and the tasks: the emoji scenes of a run's data
config, its CSV files, and held-out image-caption pairs (several captions per image) from a
CSV/TSV file or WebDataset shards. ``cfg`` arguments are a run's ``data:`` section
(``mammut.train.config.DataConfig``)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from .datasets import CsvImageText, ImageDecodeError, decode_image, image_transform
from .webdataset import SkipCounter, caption_of, expand_shards, image_of
from .scenes import RELATIONS, EmojiScenes, make_caption

log = logging.getLogger(__name__)

__all__ = ["DATA_SEED", "emoji_dataset", "emoji_corpus", "is_csv", "csv_dataset", "EvalPairs", "eval_pairs"]

DATA_SEED = 0  # the emoji scenes' own seed; the held-out split is a different stream of it


def emoji_dataset(cfg: Any, split: str = "train") -> EmojiScenes:
    return EmojiScenes(
        cfg.image_size, cfg.num_emoji, cfg.max_objects, split=split, seed=DATA_SEED,
        min_objects=cfg.min_objects, vocab_seed=cfg.vocab_seed,
    )


def emoji_corpus(names: list[str], pairs: int = 4000, seed: int = 0) -> list[str]:
    """Captions to train a BPE on, without rendering: every name alone and in random pairs."""
    rng = np.random.default_rng(seed)
    texts = [make_caption([n], []) for n in names] * 2
    if len(names) > 1:
        for _ in range(pairs):
            a, b = rng.choice(len(names), size=2, replace=False)
            texts.append(make_caption([names[a], names[b]], [RELATIONS[rng.integers(len(RELATIONS))]]))
    return texts


def is_csv(path: str) -> bool:
    return Path(path).suffix.lower() in (".csv", ".tsv")


def csv_dataset(cfg: Any, path: str | None = None, key: str = "data.path") -> CsvImageText:
    return CsvImageText(
        path if path is not None else cfg.path,  # type: ignore[arg-type]
        image_root=cfg.image_root, img_key=cfg.img_key, caption_key=cfg.caption_key,
        transform=image_transform(cfg.image_size, train=False, normalize=cfg.normalize),
        arg_names={"path": key, "img_key": "data.img_key", "caption_key": "data.caption_key"},
    )


# ----------------------------------------------------------------------------- evaluation pairs


@dataclasses.dataclass
class EvalPairs:
    """Held-out image-caption pairs; several captions may share one image.

    ``images`` (n_images, 3, H, W) in the training (eval) transform; ``captions[j]`` describes
    ``images[image_index[j]]``; ``sources[i]`` says where image ``i`` came from (csv: the image
    file; shards: ``shard URL key KEY`` of its first sample); ``skipped`` counts the caption
    rows / samples dropped because the image (or caption) was missing or unreadable.
    """

    images: torch.Tensor
    captions: list[str]
    image_index: list[int]
    sources: list[str]
    skipped: int

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])


class _PairCollector:
    """Groups captions by image identity, keeping at most ``n`` images."""

    def __init__(self, n: int | None, transform: Callable[[Any], torch.Tensor]) -> None:
        self.n, self.transform = n, transform
        self.images: list[torch.Tensor] = []
        self.sources: list[str] = []
        self.captions: list[str] = []
        self.image_index: list[int] = []
        self.index: dict[Any, int] = {}
        self.bad: set[Any] = set()
        self.skipped = 0

    def full(self) -> bool:
        return self.n is not None and len(self.images) >= self.n

    def add(self, ident: Any, caption: str, source: str, load: Callable[[], Any]) -> None:
        if ident in self.bad:
            self.skipped += 1
            return
        i = self.index.get(ident)
        if i is None:
            if self.full():
                return
            try:
                image = load()
            except (ImageDecodeError, FileNotFoundError) as exn:
                self.bad.add(ident)
                self.skipped += 1
                log.warning("eval data: skipped an unreadable image: %s", exn)
                return
            i = self.index[ident] = len(self.images)
            self.images.append(self.transform(image))
            self.sources.append(source)
        self.captions.append(caption)
        self.image_index.append(i)


def eval_pairs(cfg: Any, path: str, n: int | None, *, key: str | None = None) -> EvalPairs:
    """Image-caption pairs of a held-out csv/tsv file (by suffix) or webdataset shards (anything
    else: a ``.tar`` or a pattern), read with the training columns / keys (``data.img_key``,
    ``data.caption_key``, ``data.image_root``) and eval transform (``data.image_size``, ``data.normalize``).

    Captions of the same image share one image: in a csv the same image file (path resolved),
    in shards the same image bytes (a SHA-1 of them), whatever the sample keys. ``n`` keeps the
    first ``n`` images in file order (``None``: all) with all their captions; shards are read in
    order and stop at the first sample of image ``n + 1``. Missing / corrupt images are skipped
    and counted (``skipped``). ``key`` names ``path`` in errors (default: ``data.val_path`` or
    ``data.path`` when ``path`` is one of them, else ``path``).
    """
    if isinstance(n, bool) or (n is not None and (not isinstance(n, int) or n < 1)):
        raise ValueError(f"n: expected None or an int >= 1, got {n!r}")
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"path: expected a csv/tsv file or shard pattern, got {path!r}")
    path = str(path)
    if key is None:
        key = "data.val_path" if path == cfg.val_path else "data.path" if path == cfg.path else "path"
    tf = image_transform(cfg.image_size, train=False, normalize=cfg.normalize)
    pairs = _PairCollector(n, tf)
    if is_csv(path):
        ds = csv_dataset(cfg, path, key)
        pairs.skipped += ds.num_missing + ds.num_empty  # missing images, blank captions
        for i, (fp, caption) in enumerate(ds.samples):
            pairs.add(fp.resolve(), caption, str(fp), lambda i=i: ds.load_image(i))
    else:
        counter = SkipCounter(name=f"{key} {path}")
        raw = wds.DataPipeline(wds.SimpleShardList(expand_shards(path, key)), wds.tarfile_to_samples(handler=counter))
        for sample in raw:
            try:
                ext, data = image_of(sample)
                caption = caption_of(sample)
            except (KeyError, ValueError) as exn:
                pairs.skipped += 1
                log.warning("eval data: skipped a sample: %s", exn)
                continue
            ident = hashlib.sha1(data).digest()
            if pairs.full() and ident not in pairs.index and ident not in pairs.bad:
                break
            where = f"shard {sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
            pairs.add(ident, caption, where, lambda data=data, where=where, ext=ext: decode_image(data, f"{where} ({ext})"))
        pairs.skipped += counter.count
    if not pairs.images:
        raise ValueError(f"{key}: no readable image-caption pairs in {path} ({pairs.skipped} skipped)")
    log.info("eval data %s: %d images, %d captions, %d skipped", path, len(pairs.images), len(pairs.captions),
             pairs.skipped)
    return EvalPairs(torch.stack(pairs.images), pairs.captions, pairs.image_index, pairs.sources, pairs.skipped)
