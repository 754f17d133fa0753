"""Training data for the loop: the tokenizer, a deterministic stream of micro-batches and the
held-out pairs for evaluation.

Global sample ``i`` of the run is a pure function of ``i`` (emoji scenes: the scene with that
index; csv: a per-epoch seeded permutation), so the data position of a checkpoint is just the
step, and a resumed run reads exactly what an uninterrupted one would have read. WebDataset
shards are streamed; their shard order and sample shuffle are pure functions of
``(train.seed, epoch, rank, worker)``, and a resumed run skips the samples already seen.

Step ``s`` uses global samples ``[s*B, (s+1)*B)`` with ``B`` the global batch. Rank ``r`` of
``W`` takes the ``r``-th contiguous slice of ``B/W`` samples and splits it into ``grad_accum``
micro-batches, so ``W`` ranks together see the same batch, in the same row order, as one
process with the whole batch.

Captions longer than ``data.max_len`` tokens: with ``data.truncate: true`` they are cut (EOS
kept); with ``false`` the sample is skipped and counted, never fatal: csv rows are dropped
when the source is built (so batches stay deterministic), webdataset samples in the stream
(logged as ``shard URL key KEY``), and an emoji scene is replaced by one from a spare index range.

Data kinds (``data.kind``) are registered by what reads them (:func:`register_data_kind`): the
image-text readers here register ``emoji``, ``csv`` and ``webdataset``; a task lists the kinds
it reads in ``Task.data_kinds`` and the config checker refuses any other (no fixed list).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.augment import Augment, generator_for
from ..data.augment import describe as describe_augment
from ..data.datasets import CLIP_MEAN, CLIP_STD, CsvImageText, ImageTextCollate, image_transform
from ..data.webdataset import expand_shards, webdataset_pipeline
from ..data.sources import csv_dataset, emoji_corpus, emoji_dataset, is_csv
from ..data.tokenizer import Tokenizer, train_bpe
from .checkpointing import latest_checkpoint
from .config import DataConfig

log = logging.getLogger(__name__)

__all__ = ["check_data", "build_tokenizer", "MicroBatches", "indexed_batches", "train_batches", "expand_shards",
           "DataKind", "register_data_kind", "get_data_kind", "list_data_kinds"]

_EMOJI_SPARE = 1 << 48  # emoji: replacement scenes for over-long captions come from index _EMOJI_SPARE + 64*i + t
_EMOJI_TRIES = 64
_SHOWN = 5  # over-long rows named in the warning


# --------------------------------------------------------------------------- data kinds


@dataclasses.dataclass(frozen=True)
class DataKind:
    """A registered ``data.kind``: its reader and what the run needs of it.

    ``reader(cfg, tokenizer, *, batch_size, grad_accum, seed, rank, world_size, start_step,
    steps)``: the iterator over steps ``start_step .. steps-1``, each this rank's
    ``grad_accum`` micro-batches (for the image-text kinds ``(images, text)`` pairs, see
    :func:`train_batches`). ``corpus(cfg)``: texts to train the run's BPE on when
    ``data.tokenizer`` is null (None: the kind needs a ``data.tokenizer``). ``needs_path``:
    ``data.path`` must be given. ``check(cfg)``: fail fast before the model is built (e.g. the
    files exist), raising an error naming the key. ``size(cfg)``: the samples of one pass over
    the data (what ``train.epochs`` and ``optim.warmup_epochs`` count in; None: the kind cannot
    say, and those keys are refused). ``augments``: the reader applies ``data.augment``
    (otherwise a run that sets it is refused)."""

    name: str
    reader: Callable[..., Iterator[list[Any]]]
    corpus: Callable[[Any], list[str]] | None = None
    needs_path: bool = False
    check: Callable[[Any], None] | None = None
    size: Callable[[Any], int] | None = None  # samples in one pass (train.epochs needs it); None: unknown
    augments: bool = False  # the reader applies data.augment


_DATA_KINDS: dict[str, DataKind] = {}


def register_data_kind(name: str, reader: Callable[..., Iterator[list[Any]]], *,
                       corpus: Callable[[Any], list[str]] | None = None, needs_path: bool = False,
                       check: Callable[[Any], None] | None = None, size: Callable[[Any], int] | None = None,
                       augments: bool = False) -> DataKind:
    """Register ``data.kind: name`` read by ``reader`` (see :class:`DataKind`); returns the entry.
    A task that reads it lists ``name`` in its ``data_kinds``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if name in _DATA_KINDS and _DATA_KINDS[name].reader is not reader:
        raise ValueError(f"data kind {name!r} is already registered")
    kind = DataKind(name, reader, corpus, needs_path, check, size, augments)
    _DATA_KINDS[name] = kind
    return kind


def list_data_kinds() -> list[str]:
    return sorted(_DATA_KINDS)


def get_data_kind(name: str) -> DataKind:
    if name not in _DATA_KINDS:
        raise ValueError(f"data.kind: expected one of {list_data_kinds()}, got {name!r}")
    return _DATA_KINDS[name]


def _check_source(path: str, key: str, csv: bool) -> None:
    if csv:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{key}: {'is a folder, expected a .csv or .tsv file' if p.is_dir() else 'no such file'}: {p}")
    else:
        expand_shards(path, key)


def check_data(cfg: DataConfig) -> None:
    """Fail fast, before a model is built: ``data.path`` (csv file or shards: the data kind's
    ``check``) and ``data.val_path`` exist. Raises ``FileNotFoundError`` naming the key."""
    kind = get_data_kind(cfg.kind)
    if kind.needs_path and not cfg.path:
        raise ValueError(f"data.path: expected a file or shard pattern for data.kind={cfg.kind!r}, got null")
    if kind.check is not None:
        kind.check(cfg)
    aug = cfg.augment
    if (aug.active or aug.caption != "rows") and not kind.augments:
        changed = ", ".join(f"data.augment.{k}" for k in describe_augment(aug))
        raise ValueError(f"data.augment: data.kind={cfg.kind!r} is read without augmentation, got {changed} "
                         f"(kinds that augment: {[k.name for k in _DATA_KINDS.values() if k.augments]})")
    if cfg.val_path:
        _check_source(cfg.val_path, "data.val_path", is_csv(cfg.val_path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b) or a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _run_copy_of_tokenizer(src: Path, saved: Path) -> Tokenizer:
    """``data.tokenizer`` copied into the run folder (``<run>/tokenizer.json``) and loaded from there."""
    if saved.is_file():
        if not src.is_file():
            log.info("data.tokenizer: %s is gone; using the run's copy %s", src, saved)
            return Tokenizer.from_file(saved)
        if _same_file(src, saved):
            return Tokenizer.from_file(saved)
        if latest_checkpoint(saved.parent) is not None:
            log.warning("data.tokenizer: %s differs from the run's copy %s; resuming with the run's copy "
                        "(the checkpoints were trained with it)", src, saved)
            return Tokenizer.from_file(saved)
        log.warning("data.tokenizer: replacing %s (no checkpoint yet) with %s", saved, src)
    if not src.is_file():
        raise FileNotFoundError(f"data.tokenizer: no such file {src}")
    try:
        Tokenizer.from_file(src)  # a bad file fails here, naming the original
    except ValueError as exn:
        raise ValueError(f"data.tokenizer: {exn}") from None
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, saved)
    log.info("data.tokenizer: copied %s -> %s", src, saved)
    return Tokenizer.from_file(saved)


def build_tokenizer(cfg: DataConfig, run_dir: Path, extra_texts: list[str] | None = None,
                    special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The run's tokenizer, always loaded from ``<run>/tokenizer.json`` so the run folder is self-contained.

    ``data.tokenizer`` given: copied there (a resume keeps the run's copy, even when the original
    was moved or changed); else the copy from an earlier start (resume); else a byte-level BPE
    trained on the training captions (plus ``extra_texts``, e.g. a task's questions) with the
    task's ``special_tokens`` (e.g. ``<image>``) and saved there. A given tokenizer without one of
    the ``special_tokens`` is an error naming ``data.tokenizer``. Checks the data paths first
    (:func:`check_data`), so a wrong ``data.path`` fails before the model is built.
    """
    check_data(cfg)
    saved = Path(run_dir) / "tokenizer.json"
    if cfg.tokenizer:
        tok = _run_copy_of_tokenizer(Path(cfg.tokenizer).expanduser(), saved)
    elif saved.is_file():
        tok = Tokenizer.from_file(saved)
    else:
        corpus = get_data_kind(cfg.kind).corpus
        if corpus is None:
            raise ValueError(f"data.tokenizer: expected a tokenizer.json for data.kind={cfg.kind!r}, got null")
        texts = list(corpus(cfg)) + list(extra_texts or [])
        tok = train_bpe(texts, vocab_size=cfg.vocab_size, path=saved, min_frequency=1, extra_special=tuple(special_tokens))
        log.info("trained a %d-token BPE on %d captions -> %s", tok.vocab_size, len(texts), saved)
    missing = [t for t in special_tokens if tok.special_id(t) is None]
    if missing:
        raise ValueError(f"data.tokenizer: expected a tokenizer with the special token(s) {missing} that the task needs, "
                         f"got {cfg.tokenizer or saved} without them; leave data.tokenizer null to train one with them")
    return tok


def _too_long(tokenizer: Tokenizer, max_len: int) -> Callable[[str], str | None]:
    def check(caption: str) -> str | None:
        n = tokenizer.num_tokens([caption])[0]
        return None if n <= max_len else f"caption has {n} tokens > data.max_len={max_len} (data.truncate: false)"

    return check


class _IndexedSource:
    """Global sample index -> item with ``.image``/``.caption`` or ``(image, caption)``.

    With ``tokenizer`` given (``data.truncate: false``), captions longer than ``data.max_len``
    never come out: csv rows are dropped here, once; emoji scenes are replaced. ``scenes``: emoji
    scenes (True) or csv rows (False), as the registered reader says (default: ``data.kind``
    is ``emoji``).
    """

    def __init__(self, cfg: DataConfig, seed: int, tokenizer: Tokenizer | None = None, *,
                 scenes: bool | None = None) -> None:
        self.scenes = cfg.kind == "emoji" if scenes is None else scenes
        self.seed = seed
        self.max_len = cfg.max_len
        self.tokenizer = tokenizer
        self.skipped_long = 0  # csv: rows dropped; emoji: scenes replaced (in this process)
        self.ds: Any = emoji_dataset(cfg) if self.scenes else csv_dataset(cfg)
        if not self.scenes:
            if tokenizer is not None:
                self._drop_long_rows(tokenizer)
            if len(self.ds) == 0:
                raise ValueError(f"data.path: {cfg.path} has no readable image-caption rows")
        self._perm: tuple[int, torch.Tensor] | None = None
        self.augment: Augment | None = None
        self.groups: list[list[int]] | None = None  # data.augment.caption random: the rows of each image
        if not self.scenes:
            self._setup_augment(cfg)

    def _setup_augment(self, cfg: DataConfig) -> None:
        aug = cfg.augment
        if aug.caption == "random":
            by_image: dict[Any, list[int]] = {}
            for j, (fp, _) in enumerate(self.ds.samples):
                by_image.setdefault(fp, []).append(j)
            self.groups = list(by_image.values())
            log.info("data.augment.caption random: %d images with %d captions", len(self.groups), len(self.ds))
        if aug.active:
            from torchvision.transforms import Normalize

            frame = image_transform(cfg.image_size, train=False, normalize=False)
            norm = Normalize(CLIP_MEAN, CLIP_STD) if cfg.normalize else None
            self.augment = Augment(aug, cfg.image_size, frame, norm, fits=self._fits)
            log.info("data.augment: %s", describe_augment(aug))

    def _fits(self, caption: str) -> bool:
        """A changed caption (a flip's) is used only if it fits ``data.max_len`` where the run
        refuses longer ones (``data.truncate: false``)."""
        return self.tokenizer is None or self.tokenizer.num_tokens([caption])[0] <= self.max_len

    def size(self) -> int:
        """Samples in one pass: csv rows, or images with ``data.augment.caption: random``."""
        return len(self.groups) if self.groups is not None else len(self.ds)

    def _drop_long_rows(self, tokenizer: Tokenizer) -> None:
        ds: CsvImageText = self.ds
        lengths = tokenizer.num_tokens([caption for _, caption in ds.samples])
        long = [j for j, n in enumerate(lengths) if n > self.max_len]
        if not long:
            return
        shown = "; ".join(f"{ds.where(j)} ({lengths[j]} tokens)" for j in long[:_SHOWN])
        more = f"; and {len(long) - _SHOWN} more" if len(long) > _SHOWN else ""
        if len(long) == len(ds):
            raise ValueError(f"data.max_len: all {len(ds)} captions of {ds.path} are longer than {self.max_len} tokens "
                             f"(e.g. {shown}); raise data.max_len or set data.truncate: true")
        log.warning("%s: skipped %d of %d rows whose caption is longer than data.max_len=%d tokens "
                    "(data.truncate: false): %s%s", ds.path, len(long), len(ds), self.max_len, shown, more)
        drop = set(long)
        ds.select([j for j in range(len(ds)) if j not in drop])
        self.skipped_long = len(long)

    def _emoji(self, i: int) -> Any:
        scene = self.ds.scene(i)
        if self.tokenizer is None or self.tokenizer.num_tokens([scene.caption])[0] <= self.max_len:
            return scene
        for t in range(_EMOJI_TRIES):
            alt = self.ds.scene(_EMOJI_SPARE + _EMOJI_TRIES * i + t)
            if self.tokenizer.num_tokens([alt.caption])[0] <= self.max_len:
                self.skipped_long += 1
                level = logging.WARNING if self.skipped_long <= 20 else logging.DEBUG
                log.log(level, "emoji scene %d: caption longer than data.max_len=%d tokens (data.truncate: false), "
                        "replaced by scene %d; %d replaced so far", i, self.max_len, alt.index, self.skipped_long)
                return alt
        raise ValueError(f"data.max_len: {_EMOJI_TRIES + 1} emoji captions in a row are longer than {self.max_len} "
                         f"tokens (e.g. {scene.caption!r}); raise data.max_len or set data.truncate: true")

    def __call__(self, i: int) -> Any:
        if self.scenes:
            return self._emoji(i)
        n = self.size()
        epoch, j = divmod(i, n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        unit = int(self._perm[1][j])
        if self.groups is None and self.augment is None:
            return self.ds[unit]
        g = generator_for(self.seed, i)  # sample i's own draws: the same in any process, on resume
        row = unit if self.groups is None else self.groups[unit][int(torch.randint(len(self.groups[unit]), (), generator=g))]
        if self.augment is None:
            return self.ds[row]
        augment = self.augment
        return self.ds.item(row, lambda image, caption: augment(image, caption, g),
                            keep_alpha=augment.cfg.background == "random")


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


def _webdataset_stream(cfg: DataConfig, urls: list[str], seed: int, rank: int, world: int,
                       caption_check: Callable[[str], str | None] | None) -> Iterator[Any]:
    tf = image_transform(cfg.image_size, train=False, normalize=cfg.normalize)
    for epoch in itertools.count():
        n = 0
        pipe = webdataset_pipeline(urls, transform=tf, shuffle=cfg.shuffle_buffer, seed=seed, epoch=epoch,
                                   rank=rank, world_size=world, caption_check=caption_check)
        for sample in pipe:
            n += 1
            yield sample
        if n == 0:
            too_long = pipe.filtered.count if pipe.filtered is not None else 0
            raise ValueError(
                f"data.path: rank {rank} of {world} read no usable sample from the {len(urls)} shard(s) of {cfg.path} "
                f"({pipe.skipped.count} unreadable, {too_long} over data.max_len; ranks need a shard each)"
            )


def _webdataset_batches(stream: Iterator[Any], collate: ImageTextCollate, micro: int, grad_accum: int,
                        start_step: int, steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    # streamed: the data position is restored by skipping the samples already seen
    stream = itertools.islice(stream, start_step * micro * grad_accum, None)
    for _ in range(start_step, steps):
        yield [collate(list(itertools.islice(stream, micro))) for _ in range(grad_accum)]


def indexed_batches(ds: MicroBatches, num_workers: int, start_step: int,
                     steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    ks = range(start_step * ds.grad_accum, steps * ds.grad_accum)
    if num_workers > 0:
        loader: Any = DataLoader(ds, batch_size=None, sampler=ks, num_workers=num_workers,
                                 prefetch_factor=4, persistent_workers=False)
    else:
        loader = (ds[k] for k in ks)
    it = iter(loader)
    for _ in range(start_step, steps):
        yield [next(it) for _ in range(ds.grad_accum)]


def train_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, grad_accum: int, seed: int,
                  rank: int, world_size: int, start_step: int, steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """An iterator over steps ``start_step .. steps-1``, each the list of ``grad_accum``
    micro-batches ``(images (m, 3, H, W), text (m, max_len))`` of this rank, from the reader
    registered for ``data.kind``.

    The data source is opened (and checked) here, before the first step is asked for.
    """
    return get_data_kind(cfg.kind).reader(cfg, tokenizer, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                                          rank=rank, world_size=world_size, start_step=start_step, steps=steps)


def _indexed_reader(cfg: DataConfig, tokenizer: Tokenizer, *, scenes: bool, batch_size: int, grad_accum: int,
                    seed: int, rank: int, world_size: int, start_step: int,
                    steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """emoji scenes (``scenes``) or csv rows: global sample ``i`` is a pure function of ``i``."""
    collate = ImageTextCollate(tokenizer, cfg.max_len, truncate=cfg.truncate)
    source = _IndexedSource(cfg, seed, tokenizer=None if cfg.truncate else tokenizer, scenes=scenes)
    ds = MicroBatches(source, collate, batch_size, grad_accum, rank, world_size)
    return indexed_batches(ds, cfg.num_workers, start_step, steps)


def _webdataset_reader(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, grad_accum: int, seed: int,
                       rank: int, world_size: int, start_step: int,
                       steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """WebDataset shards, streamed (a resumed run skips the samples already seen)."""
    collate = ImageTextCollate(tokenizer, cfg.max_len, truncate=cfg.truncate)
    if batch_size % (world_size * grad_accum):
        raise ValueError(f"train.batch_size: expected a multiple of world_size * grad_accum = "
                         f"{world_size * grad_accum}, got {batch_size}")
    urls = expand_shards(cfg.path, "data.path")  # type: ignore[arg-type]
    check = None if cfg.truncate else _too_long(tokenizer, cfg.max_len)
    micro = batch_size // (world_size * grad_accum)
    stream = _webdataset_stream(cfg, urls, seed, rank, world_size, check)
    return _webdataset_batches(stream, collate, micro, grad_accum, start_step, steps)


def _emoji_reader(cfg: DataConfig, tokenizer: Tokenizer, **steps: Any) -> Iterator[list[Any]]:
    """``data.kind: emoji``: rendered emoji scenes (``mammut.data.scenes``)."""
    return _indexed_reader(cfg, tokenizer, scenes=True, **steps)


def _csv_reader(cfg: DataConfig, tokenizer: Tokenizer, **steps: Any) -> Iterator[list[Any]]:
    """``data.kind: csv``: the rows of a csv/tsv file, in a per-epoch seeded order."""
    return _indexed_reader(cfg, tokenizer, scenes=False, **steps)


register_data_kind("emoji", _emoji_reader, corpus=lambda cfg: emoji_corpus(emoji_dataset(cfg).class_names()))
register_data_kind("csv", _csv_reader, corpus=lambda cfg: [caption for _, caption in csv_dataset(cfg).samples],
                   needs_path=True, check=lambda cfg: _check_source(cfg.path, "data.path", csv=True),
                   size=lambda cfg: _IndexedSource(cfg, 0, scenes=False).size(), augments=True)
register_data_kind("webdataset", _webdataset_reader, needs_path=True,
                   check=lambda cfg: _check_source(cfg.path, "data.path", csv=False))
