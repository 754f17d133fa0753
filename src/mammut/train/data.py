"""Training data for the loop: the tokenizer and a deterministic stream of micro-batches.

Global sample ``i`` of the run is a pure function of ``i`` (emoji scenes: the scene with that
index; csv: a per-epoch seeded permutation), so the data position of a checkpoint is just the
step, and a resumed run reads exactly what an uninterrupted one would have read.

Step ``s`` uses global samples ``[s*B, (s+1)*B)`` with ``B`` the global batch. Rank ``r`` of
``W`` takes the ``r``-th contiguous slice of ``B/W`` samples and splits it into ``grad_accum``
micro-batches, so ``W`` ranks together see the same batch, in the same row order, as one
process with the whole batch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import CsvImageText, ImageTextCollate, image_transform, webdataset_pipeline
from ..data.scenes import RELATIONS, EmojiScenes, make_caption
from ..data.tokenizer import Tokenizer, train_bpe
from .config import DataConfig

log = logging.getLogger(__name__)

__all__ = ["emoji_dataset", "emoji_corpus", "build_tokenizer", "MicroBatches", "train_batches"]

DATA_SEED = 0  # the emoji scenes' own seed; the held-out split is a different stream of it


def emoji_dataset(cfg: DataConfig, split: str = "train") -> EmojiScenes:
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


def _csv_dataset(cfg: DataConfig) -> CsvImageText:
    return CsvImageText(
        cfg.path, image_root=cfg.image_root, img_key=cfg.img_key, caption_key=cfg.caption_key,
        transform=image_transform(cfg.image_size, train=False, normalize=cfg.normalize),
    )


def build_tokenizer(cfg: DataConfig, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: ``data.tokenizer`` if given, else ``<run>/tokenizer.json`` if it
    exists (resume), else a byte-level BPE trained on the training captions and saved there."""
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    saved = run_dir / "tokenizer.json"
    if saved.is_file():
        return Tokenizer.from_file(saved)
    if cfg.kind == "emoji":
        texts = emoji_corpus(emoji_dataset(cfg).class_names())
    elif cfg.kind == "csv":
        texts = [caption for _, caption in _csv_dataset(cfg).samples]
    else:
        raise ValueError("data.tokenizer: expected a tokenizer.json for data.kind='webdataset', got null")
    tok = train_bpe(texts, vocab_size=cfg.vocab_size, path=saved, min_frequency=1)
    log.info("trained a %d-token BPE on %d captions -> %s", tok.vocab_size, len(texts), saved)
    return tok


class _IndexedSource:
    """Global sample index -> item with ``.image``/``.caption`` or ``(image, caption)``."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.kind = cfg.kind
        self.seed = seed
        self.ds: Any = emoji_dataset(cfg) if cfg.kind == "emoji" else _csv_dataset(cfg)
        if cfg.kind == "csv" and len(self.ds) == 0:
            raise ValueError(f"data.path: {cfg.path} has no readable image-caption rows")
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, i: int) -> Any:
        if self.kind == "emoji":
            return self.ds.scene(i)
        n = len(self.ds)
        epoch, j = divmod(i, n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return self.ds[int(self._perm[1][j])]


class MicroBatches(Dataset):
    """Map-style: item ``k`` is micro-batch ``k % grad_accum`` of step ``k // grad_accum`` for
    this rank, collated to ``(images, text)``. Usable with DataLoader workers."""

    def __init__(self, source: Callable[[int], Any], collate: ImageTextCollate, batch_size: int,
                 grad_accum: int, rank: int, world_size: int) -> None:
        if batch_size % (world_size * grad_accum):
            raise ValueError(
                f"train.batch_size: expected a multiple of world_size * grad_accum = {world_size * grad_accum}, got {batch_size}"
            )
        self.source, self.collate = source, collate
        self.batch_size, self.grad_accum, self.rank, self.world = batch_size, grad_accum, rank, world_size
        self.micro = batch_size // (world_size * grad_accum)

    def indices(self, k: int) -> range:
        step, m = divmod(k, self.grad_accum)
        start = step * self.batch_size + self.rank * (self.batch_size // self.world) + m * self.micro
        return range(start, start + self.micro)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate([self.source(i) for i in self.indices(k)])


def _webdataset_stream(cfg: DataConfig, seed: int, rank: int, world: int) -> Iterator[Any]:
    tf = image_transform(cfg.image_size, train=False, normalize=cfg.normalize)
    for epoch in itertools.count():
        n = 0
        pipe = webdataset_pipeline(cfg.path, transform=tf, shuffle=cfg.shuffle_buffer, seed=seed + epoch,
                                   rank=rank, world_size=world)
        for sample in pipe:
            n += 1
            yield sample
        if n == 0:
            raise RuntimeError(f"data.path: no readable samples in {cfg.path} for rank {rank} (skipped {pipe.skipped.count})")


def train_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, grad_accum: int, seed: int,
                  rank: int, world_size: int, start_step: int, steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield, for steps ``start_step .. steps-1``, the list of ``grad_accum`` micro-batches
    ``(images (m, 3, H, W), text (m, max_len))`` of this rank."""
    collate = ImageTextCollate(tokenizer, cfg.max_len, truncate=cfg.truncate)
    if cfg.kind == "webdataset":
        # streamed: the data position is restored by skipping the samples already seen
        micro = batch_size // (world_size * grad_accum)
        stream = _webdataset_stream(cfg, seed, rank, world_size)
        stream = itertools.islice(stream, start_step * micro * grad_accum, None)
        for _ in range(start_step, steps):
            yield [collate(list(itertools.islice(stream, micro))) for _ in range(grad_accum)]
        return
    ds = MicroBatches(_IndexedSource(cfg, seed), collate, batch_size, grad_accum, rank, world_size)
    ks = range(start_step * grad_accum, steps * grad_accum)
    if cfg.num_workers > 0:
        loader: Any = DataLoader(ds, batch_size=None, sampler=ks, num_workers=cfg.num_workers,
                                 prefetch_factor=4, persistent_workers=False)
    else:
        loader = (ds[k] for k in ks)
    it = iter(loader)
    for _ in range(start_step, steps):
        yield [next(it) for _ in range(grad_accum)]
