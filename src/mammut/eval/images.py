"""Image files -> batches for evaluation, with a progress bar; missing or unreadable files are
skipped and counted (:class:`SkipCount`), never fatal.

:func:`image_batches` yields ``(indices, images)``: the positions (in the given list of paths)
of the images that loaded, and their ``preprocess``-ed tensors stacked. Decoding runs in
``workers`` DataLoader processes (0: in this one); the skip count is kept here, from what the
workers return, so it is right whatever the number of workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import _DECODE_ERRORS

log = logging.getLogger(__name__)

__all__ = ["SkipCount", "image_batches", "seeded_subset"]

_EXAMPLES = 10  # skipped files named in metrics.json


@dataclass
class SkipCount:
    """Images left out: ``missing`` (no such file) and ``corrupt`` (not a readable image)."""

    missing: int = 0
    corrupt: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.missing + self.corrupt

    def add(self, kind: str, where: str) -> None:
        if kind == "missing":
            self.missing += 1
        else:
            self.corrupt += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(where)
        log.log(logging.WARNING if self.total <= _EXAMPLES else logging.DEBUG, "skipped image (%s): %s", kind, where)

    def as_dict(self) -> dict[str, Any]:
        return {"missing": self.missing, "corrupt": self.corrupt, "total": self.total, "examples": list(self.examples)}


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        p = Path(self.paths[i])
        if not p.is_file():
            return i, ("missing", str(p))
        try:
            with Image.open(p) as image:
                image.load()  # decoded here, so a truncated file fails here; mode left to preprocess
        except _DECODE_ERRORS as exc:
            return i, ("corrupt", f"{p}: not a readable image ({type(exc).__name__}: {exc})")
        return i, self.preprocess(image)


def _collate(items: list[tuple[int, Any]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, tuple[str, str]]]]:
    good = [(i, x) for i, x in items if torch.is_tensor(x)]
    bad = [(i, x) for i, x in items if not torch.is_tensor(x)]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def image_batches(paths: Sequence[Path], preprocess: Callable[[Any], torch.Tensor], skipped: SkipCount, *,
                  batch_size: int = 64, workers: int = 0, progress: bool = True,
                  desc: str = "images") -> Iterator[tuple[list[int], torch.Tensor]]:
    """Batches ``(indices, images (b, 3, H, W))`` of the readable files among ``paths``, in
    order; each file that is missing or unreadable is counted in ``skipped``."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers: expected an integer >= 0, got {workers!r}")
    loader = DataLoader(_ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=torch.cuda.is_available())
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for indices, images, bad in loader:
            for _, (kind, where) in bad:
                skipped.add(kind, where)
            bar.update(len(indices) + len(bad))
            if images is not None:
                yield indices, images


def embed_image_files(embed: Callable[[torch.Tensor], torch.Tensor], paths: Sequence[Path],
                      preprocess: Callable[[Any], torch.Tensor], *, what: str, **batching: Any
                      ) -> tuple[torch.Tensor, list[int], SkipCount, float]:
    """Embeddings ``(k, l)`` of the readable files among ``paths`` through ``embed``, with their
    indices, the skip count and the seconds it took; no readable file is a ``ValueError``
    naming ``what`` (e.g. the data source). ``batching``: :func:`image_batches`'s options."""
    import time

    skipped = SkipCount()
    embeds, ok = [], []
    t0 = time.perf_counter()
    for idx, images in image_batches(paths, preprocess, skipped, **batching):
        embeds.append(embed(images))
        ok += idx
    seconds = time.perf_counter() - t0
    if not ok:
        raise ValueError(f"--data: expected readable images in {what}, got none ({skipped.total} skipped)")
    return torch.cat(embeds), ok, skipped, seconds


def seeded_subset(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """``range(n)``, or with ``limit`` a seeded random ``limit`` of it (sorted): the same items every run."""
    if limit is None or limit >= n:
        return list(range(n))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--limit: expected an integer >= 1, got {limit!r}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def coverage(limit: int | None, n_total: int, n_selected: int, skipped: int, unit: str = "images") -> dict[str, Any]:
    """What part of the data set a task evaluated: ``{"limit", "n_total", "comparable_to_published"}``
    (``n_total``: the size of the full set in ``unit``; comparable: every item selected, no ``--limit``
    cut, and no image skipped)."""
    return {"limit": limit, "n_total": n_total, "n_total_unit": unit,
            "comparable_to_published": n_selected == n_total and skipped == 0}
