"""FAISS indexes over L2-normalised embeddings (inner product = cosine similarity).

- ``flat``: exact search (``IndexIDMap2(IndexFlatIP)``), for collections below
  ``ivf_threshold`` vectors whose float32 copy fits the memory budget.
- ``ivfpq``: ``IndexIVFPQ`` trained on a sample (inverted lists + product-quantised codes of
  ``pq_m`` bytes a vector), past the threshold or when the flat index would not fit the budget.

:func:`plan_index` chooses; :func:`build_index` trains on a sample and adds vectors batch by
batch (never all of them in memory at once); :func:`read_index` can memory-map the file, for
indexes larger than RAM (``IO_FLAG_MMAP_IFC`` maps a flat index's vectors, ``IO_FLAG_MMAP`` an
IVF index's inverted lists).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["IndexPlan", "plan_index", "check_pq_m", "build_index", "read_index", "search_index"]

_PQ_M = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # candidate code sizes, bytes a vector
_MIN_PER_CENTROID = MIN_PER_CENTROID = 39  # faiss's k-means wants at least 39 training points per centroid
MIN_TRAIN = MIN_PER_CENTROID * 16  # the fewest training vectors of the smallest (4-bit) PQ code book
_MIN_IVF = 1_000  # fewer vectors than this are never IVF (too few to train on)


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What :func:`build_index` builds; ``bytes`` estimates the index's memory."""

    kind: str  # "flat" or "ivfpq"
    n: int
    dim: int
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    train_size: int = 0
    bytes: int = 0
    mmap: bool = False  # the index is larger than the memory budget: search memory-maps it

    def describe(self) -> str:
        if self.kind == "flat":
            return f"exact inner-product index over {self.n} vectors of {self.dim} ({self.bytes / 2**20:.1f} MiB)"
        return (f"IVF-PQ index: {self.nlist} lists, {self.pq_m} x {self.pq_bits}-bit codes, trained on "
                f"{self.train_size} of {self.n} vectors ({self.bytes / 2**20:.1f} MiB)")


def _flat_bytes(n: int, d: int) -> int:
    return n * (4 * d + 8)


def _ivfpq_bytes(n: int, d: int, nlist: int, m: int, bits: int) -> int:
    return n * (m * bits // 8 + 8) + nlist * d * 4 + d * (1 << bits) * 4


def plan_index(n: int, dim: int, *, ivf_threshold: int = 100_000, memory_budget: int | None = None,
               nlist: int | None = None, pq_m: int | None = None, train_size: int | None = None) -> IndexPlan:
    """Choose the index for ``n`` vectors of ``dim`` (see the module doc). ``memory_budget`` in
    bytes bounds the index in memory; when even the smallest IVF-PQ code does not fit, the plan
    says ``mmap`` (search then memory-maps the file)."""
    for name, value, low in (("n", n, 0), ("dim", dim, 1), ("ivf_threshold", ivf_threshold, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"--memory-budget: expected a size > 0, got {memory_budget}")
    flat = IndexPlan("flat", n, dim, bytes=_flat_bytes(n, dim))
    fits = memory_budget is None or flat.bytes <= memory_budget
    if n < _MIN_IVF or (n < ivf_threshold and fits):
        if not fits:
            log.warning("%d vectors: too few to train an IVF index; exact index over the memory budget", n)
        return dataclasses.replace(flat, mmap=not fits)
    lists = nlist or int(min(65_536, max(8, 4 * math.sqrt(n))))
    train = min(n, train_size or min(262_144, max(64 * lists, 256 * _MIN_PER_CENTROID)))
    lists = max(1, min(lists, train // _MIN_PER_CENTROID))
    bits = 8 if train >= 256 * _MIN_PER_CENTROID else max(4, int(math.log2(max(train // _MIN_PER_CENTROID, 16))))
    divisors = [m for m in _PQ_M if dim % m == 0]
    if pq_m is not None:
        choices = [check_pq_m(pq_m, dim)]
    else:
        default = max(m for m in divisors if m <= max(1, min(32, dim // 2)))
        choices = [m for m in divisors if m <= default]
    chosen = None
    for m in choices:  # largest code that fits the budget
        if memory_budget is None or _ivfpq_bytes(n, dim, lists, m, bits) <= memory_budget:
            chosen = m
            break
    mmap = chosen is None
    if mmap:
        chosen = choices[-1]
        log.warning("the smallest IVF-PQ index (%d-byte codes) is over the memory budget of %.1f MiB: "
                    "search will memory-map it", chosen, (memory_budget or 0) / 2**20)
    return IndexPlan("ivfpq", n, dim, nlist=lists, pq_m=chosen, pq_bits=bits, train_size=train,
                     bytes=_ivfpq_bytes(n, dim, lists, chosen, bits), mmap=mmap)


def check_pq_m(pq_m: int, dim: int) -> int:
    """``pq_m`` if a PQ code of that many bytes can split ``dim``; ``ValueError`` naming --pq-m otherwise."""
    divisors = [m for m in _PQ_M if dim % m == 0]
    if pq_m not in divisors:
        raise ValueError(f"--pq-m: expected a divisor of the embedding size {dim} among {divisors}, got {pq_m}")
    return pq_m


def _faiss() -> Any:
    import faiss

    return faiss


def build_index(plan: IndexPlan, batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                sample: Callable[[int], np.ndarray] | None = None, *, seed: int = 0) -> Any:
    """Build ``plan``: ``batches()`` yields ``(ids int64 (b,), vectors float (b, dim))``;
    ``sample(k)`` returns ``k`` vectors to train an IVF-PQ index on."""
    faiss = _faiss()
    if plan.kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(plan.dim))
    elif plan.kind == "ivfpq":
        if sample is None:
            raise ValueError("sample: an IVF-PQ index needs training vectors")
        quantizer = faiss.IndexFlatIP(plan.dim)
        index = faiss.IndexIVFPQ(quantizer, plan.dim, plan.nlist, plan.pq_m, plan.pq_bits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        train = np.ascontiguousarray(sample(plan.train_size), dtype=np.float32)
        log.info("training %s", plan.describe())
        index.train(train)
    else:
        raise ValueError(f"plan.kind: expected 'flat' or 'ivfpq', got {plan.kind!r}")
    for ids, vectors in batches():
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def write_index(index: Any, path: str | Path) -> None:
    """Write ``index`` to ``path`` whole (through ``PATH.tmp``, removed on failure). A failed
    write (faiss says why: a full disk) is an ``OSError`` naming ``path``."""
    tmp = Path(f"{path}.tmp")
    try:
        _faiss().write_index(index, str(tmp))
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError):  # faiss's own error
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise OSError(f"--out: could not write the FAISS index {path} ({reason}); free some space if the disk "
                          f"is full and run the same command again") from None
        raise


def read_index(path: str | Path, *, mmap: bool = False, kind: str = "flat") -> Any:
    """Load an index file; ``mmap`` maps it instead of reading it into memory (the flag depends
    on the ``kind`` of index: the two cannot be combined)."""
    faiss = _faiss()
    flags = 0
    if mmap:
        flags = (faiss.IO_FLAG_MMAP_IFC if kind == "flat" else faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
    if not Path(path).is_file():
        raise FileNotFoundError(f"DIR: expected the FAISS index {path}, got no such file; run `mammut index` again "
                                f"to rebuild it")
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:  # faiss's own error: the file is cut short or not an index
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"DIR: expected a FAISS index in {path}, got a file faiss cannot read ({reason}); "
                         f"delete it and run `mammut index` again to rebuild it") from None


def search_index(index: Any, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (q, k), ids (q, k))``; missing results are id -1."""
    faiss = _faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    params = None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    return index.search(q, int(k), params=params)
