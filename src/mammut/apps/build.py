"""Build (or extend, or resume) an index folder: list the collection into chunks, embed each
chunk (batched, DataLoader workers, bf16 optional), save its float16 embeddings and a done
marker, then record the results in the metadata store and build the FAISS index.

Under ``torchrun`` every rank embeds the chunks ``c`` with ``c % world_size == rank`` (rank 0
plans and finishes; the ranks meet at two barriers on gloo). A killed build continues where it
stopped when run again: chunks with a done marker are never embedded again. ``add=True`` lists
the source again and embeds only the images the index does not have yet.

One build at a time per folder: rank 0 holds the folder's lock (``DIR/.lock``,
:class:`mammut.io.runlock.FolderLock`) from planning to the end, so a second build of the same
folder stops at once with ``FolderLocked`` naming the holder's PID; once it holds the lock, a
build removes the temporary files a killed one left. Embeddings that are not finite (a broken
model) stop the build with a ``ValueError`` naming the model and the chunk's first such image,
before the chunk is written. A full disk is a one-line ``DiskFullError`` naming the file; a
damaged ``metadata.sqlite`` a ``ValueError`` naming it. The model's precision (``--precision``)
is recorded in ``index.json`` beside the model, and in each chunk's record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import ImageDecodeError, decode_image
from ..io.runlock import FolderLock
from . import ann
from .collection import display, is_video, list_items, read_item_checked, source_kind
from .encoder import Encoder
from .folder import FULL_ERRNOS, IndexFolder, disk_full, remove_stray_temp_files, write_atomic
from .store import DiskFullError, MetadataStore, Record, database_error

log = logging.getLogger(__name__)

__all__ = ["BuildOptions", "BuildReport", "build"]


@dataclasses.dataclass
class BuildOptions:
    """What ``mammut index`` was asked for (see its ``--help``)."""

    out: str | Path
    source: str | None = None
    add: bool = False
    batch_size: int = 64
    workers: int = 0
    chunk_size: int = 1024
    img_key: str = "filepath"
    caption_key: str | None = None
    image_root: str | None = None
    ivf_threshold: int | None = None  # None: the index's own (index.json "settings"), else 100000
    memory_budget: int | None = None
    nlist: int | None = None
    pq_m: int | None = None
    train_size: int | None = None
    nprobe: int = 32
    rerank: int = 16
    progress: bool = True

    def check(self, dim: int | None = None) -> None:
        """Refuse bad options before any work; ``dim``: the embedding size (to check ``pq_m``)."""
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0),
                                 ("--chunk-size", self.chunk_size, 1), ("--ivf-threshold", self.ivf_threshold, 0),
                                 ("--nprobe", self.nprobe, 1), ("--rerank", self.rerank, 0),
                                 ("--memory-budget", self.memory_budget, 1), ("--nlist", self.nlist, 1),
                                 ("--pq-m", self.pq_m, 1), ("--train-size", self.train_size, ann.MIN_TRAIN)):
            if value is None and name in _SETTING_FLAGS.values():
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.nlist is not None and self.train_size is not None and \
                self.train_size < ann.MIN_PER_CENTROID * self.nlist:
            raise ValueError(f"--train-size: expected at least {ann.MIN_PER_CENTROID} training vectors per IVF list "
                             f"({ann.MIN_PER_CENTROID} x --nlist {self.nlist} = "
                             f"{ann.MIN_PER_CENTROID * self.nlist}), got {self.train_size}")
        if self.pq_m is not None and dim is not None:
            ann.check_pq_m(self.pq_m, dim)


# the index settings kept in index.json, reused by a later build (--add, resume) unless given anew
_SETTING_FLAGS = {"ivf_threshold": "--ivf-threshold", "memory_budget": "--memory-budget", "nlist": "--nlist",
                  "pq_m": "--pq-m", "train_size": "--train-size"}
_SETTING_DEFAULTS: dict[str, int | None] = {"ivf_threshold": 100_000, "memory_budget": None, "nlist": None,
                                            "pq_m": None, "train_size": None}


def _settings(opts: BuildOptions, info: dict[str, Any]) -> dict[str, int | None]:
    """The index settings of this build: those given, else the index's recorded ones, else the defaults."""
    saved = info.get("settings") or {}
    return {k: getattr(opts, k) if getattr(opts, k) is not None else saved.get(k, default)
            for k, default in _SETTING_DEFAULTS.items()}


@dataclasses.dataclass
class BuildReport:
    """What a build did (on rank 0: for the whole index; elsewhere: this rank's share)."""

    out: Path
    embedded: int  # images embedded by this call (this rank)
    corrupt: int  # unreadable images met by this call (this rank)
    chunks_done: int  # chunks embedded by this call (this rank)
    chunks_skipped: int  # chunks already done before this call
    total: int  # images in the index (rank 0)
    total_corrupt: int
    seconds: float
    index: str  # the index's description (rank 0)

    @property
    def images_per_s(self) -> float:
        return (self.embedded + self.corrupt) / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- distributed


def _dist_init() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        # gloo: only barriers cross processes; a long timeout, since ranks wait for the slowest
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _broadcast(objects: list[Any], world: int) -> None:
    """Rank 0's ``objects`` to every rank (in place)."""
    if world > 1:
        torch.distributed.broadcast_object_list(objects, src=0)


# ----------------------------------------------------------------------------- planning


def _plan(folder: IndexFolder, opts: BuildOptions, model_name: str, precision: dict[str, str] | None = None,
          media: str = "image") -> bool:
    """Rank 0: create or extend the plan in the store. Returns False when there is nothing to do.
    ``precision``: the model's (:meth:`mammut.precision.Precision.as_dict`), recorded beside it;
    ``media``: what the model indexes, ``"image"`` or ``"video"`` (a video model: video files)."""
    info = folder.read_info() if folder.exists() else None
    src = None
    if opts.source is not None:  # as recorded in index.json: resolved, but a shard pattern as given
        src = opts.source if source_kind(opts.source) == "shards" else str(Path(opts.source).expanduser().resolve())
    if info is not None and info.get("model") != model_name:  # its vectors would not be comparable
        raise ValueError(f"--model: {folder.root} was built with {info.get('model')}; add to it with that model, "
                         f"got {model_name}")
    sources = [s["source"] for s in (info or {}).get("sources", [])]
    if info is not None and not opts.add:
        if src is not None and src not in sources and src not in {str(Path(s).resolve()) for s in sources}:
            raise ValueError(f"--out: {folder.root} already holds an index of {', '.join(sources)}; "
                             f"pass --add to add {opts.source}, or choose another --out")
        if info.get("status") == "ready":
            log.info("%s is up to date (pass --add to pick up new images)", folder.root)
            return False
        log.info("resuming the build of %s", folder.root)
        if precision:
            folder.write_info({**info, **precision})
        return True
    if src is not None:
        scans = [{"source": src, "img_key": opts.img_key, "caption_key": opts.caption_key,
                  "image_root": opts.image_root}]
    elif info is not None:  # --add without SOURCE: look at every source of the index again
        scans = [s for s in info.get("sources", []) if s.get("kind") in ("folder", "csv", "shards")]
    else:
        raise ValueError("SOURCE: expected a folder, CSV/TSV file or shard pattern to index")
    folder.root.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    for scan in scans:
        items = list_items(scan["source"], img_key=scan.get("img_key") or "filepath",
                           caption_key=scan.get("caption_key"), image_root=scan.get("image_root"), media=media)
        with MetadataStore(folder.root, create=True) as store:
            known = store.known()
            known |= {(str(Path(p).resolve()), m) for p, m in known}  # paths recorded before they were resolved
            new = [it for it in items if (it.path, it.member) not in known]
            chunks = store.add_items(new, opts.chunk_size) if new else []
        log.info("%s: %d images, %d new, in %d chunks of up to %d", scan["source"], len(items), len(new), len(chunks),
                 opts.chunk_size)
        if scan["source"] not in sources:
            info.setdefault("sources", []).append({**scan, "kind": source_kind(scan["source"]),
                                                   "added": time.strftime("%Y-%m-%dT%H:%M:%S")})
    info.update(model=model_name, **(precision or {}), status="building", chunk_size=opts.chunk_size)
    if media != "image":  # an image index's index.json is as it always was
        info["media"] = media
    info.setdefault("nprobe", opts.nprobe)  # search settings are the index's own, chosen when it was made
    info.setdefault("rerank", opts.rerank)
    folder.write_info(info)
    return True


# ----------------------------------------------------------------------------- embedding


class _Images(Dataset):  # type: ignore[type-arg]
    """Records -> (id, pixels or None, (width, height) or None, identity or None, error or None);
    the identity (size:mtime_ns:inode:device) is of the file the pixels were read from.
    ``read_video(bytes, where) -> (clip, (width, height))``: how a video file is read (a video
    model's encoder), for records that name one."""

    def __init__(self, records: Sequence[Record], transform: Any, read_video: Any = None) -> None:
        self.records, self.transform, self.read_video = list(records), transform, read_video

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[int, int] | None, str | None, str | None]:
        r = self.records[i]
        where = display(f"{r.path}:{r.member}" if r.member else r.path)
        if self.read_video is not None and is_video(r.member or r.path):
            try:  # a VideoDecodeError is an OSError
                data, ident = read_item_checked(r.path, r.member, r.offset, r.size)
                clip, size = self.read_video(data, where)
            except OSError as exc:
                return r.id, None, None, None, display(str(exc))
            return r.id, clip, size, ident, None
        try:
            data, ident = read_item_checked(r.path, r.member, r.offset, r.size)
            image = decode_image(data, where=where)
        except (ImageDecodeError, OSError) as exc:
            return r.id, None, None, None, display(str(exc))
        return r.id, self.transform(image), image.size, ident, None


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def _batches(chunks: list[list[Record]], batch_size: int) -> list[list[int]]:
    out, start = [], 0
    for recs in chunks:
        out += [list(range(start + s, start + min(s + batch_size, len(recs)))) for s in range(0, len(recs), batch_size)]
        start += len(recs)
    return out


def _embed_chunks(folder: IndexFolder, encoder: Encoder, todo: list[int], records: dict[int, list[Record]],
                  opts: BuildOptions, rank: int) -> tuple[int, int]:
    """Embed chunks ``todo`` and write each when complete; returns (embedded, corrupt)."""
    from tqdm.auto import tqdm

    flat = [r for c in todo for r in records[c]]
    by_id = {r.id: r for r in flat}
    precision = getattr(getattr(encoder, "precision", None), "name", None)
    read_video = encoder.read_video if getattr(encoder, "media", "image") == "video" else None
    loader = DataLoader(_Images(flat, encoder.preprocess, read_video), batch_sampler=_batches([records[c] for c in todo],
                        opts.batch_size), num_workers=opts.workers, collate_fn=_collate)
    chunk_of = {r.id: r.chunk for r in flat}
    left = {c: len(records[c]) for c in todo}
    acc: dict[int, dict[str, list[Any]]] = {}
    embedded = corrupt = 0
    bar = tqdm(total=len(flat), unit="img", desc=f"indexing (rank {rank})" if rank else "indexing",
               disable=not opts.progress or rank != 0, dynamic_ncols=True)
    with bar:
        for batch in loader:
            chunk = chunk_of[batch[0][0]]
            a = acc.setdefault(chunk, {"ids": [], "sizes": [], "identities": [], "vecs": [], "corrupt": [],
                                       "errors": []})
            good = [(i, px, size, ident) for i, px, size, ident, err in batch if err is None]
            for i, _, _, _, err in batch:
                if err is not None:
                    a["corrupt"].append(i)
                    if len(a["errors"]) < 20:
                        a["errors"].append(err)
                    log.warning("skipped an unreadable image: %s", err)
            if good:
                vecs = np.asarray(encoder.embed_images(torch.stack([px for _, px, _, _ in good])), dtype=np.float16)
                _check_finite(vecs, [by_id[i] for i, _, _, _ in good], encoder, chunk, precision)
                a["vecs"].append(vecs)
                a["ids"] += [i for i, _, _, _ in good]
                a["sizes"] += [list(size) for _, _, size, _ in good]
                a["identities"] += [ident for _, _, _, ident in good]
            left[chunk] -= len(batch)
            bar.update(len(batch))
            if left[chunk] == 0:
                _write_chunk(folder, chunk, acc.pop(chunk), encoder.dim, rank, precision)
                embedded += len(a["ids"])
                corrupt += len(a["corrupt"])
    return embedded, corrupt


def _check_finite(vecs: np.ndarray, records: list[Record], encoder: Encoder, chunk: int,
                  precision: str | None) -> None:
    """Refuse embeddings with NaN or inf (in float16, as stored): every search would miss them."""
    bad = ~np.isfinite(vecs).all(axis=1)
    if not bad.any():
        return
    first = records[int(np.argmax(bad))]
    hint = " or bf16 overflows (try --precision fp32)" if precision == "bf16" else ""
    raise ValueError(f"--model: {encoder.name} gave non-finite embeddings (NaN or inf) for {int(bad.sum())} of "
                     f"{len(records)} images of chunk {chunk}, the first "
                     f"{display(f'{first.path}:{first.member}' if first.member else first.path)}; nothing was "
                     f"indexed from them: the model's weights may hold NaN or inf{hint}")


def _write_chunk(folder: IndexFolder, chunk: int, a: dict[str, list[Any]], dim: int, rank: int,
                 precision: str | None = None) -> None:
    vecs = np.concatenate(a["vecs"]) if a["vecs"] else np.zeros((0, dim), np.float16)
    buf = io.BytesIO()
    np.save(buf, vecs)
    write_atomic(folder.chunk_npy(chunk), buf.getvalue())
    record = {"chunk": chunk, "ids": a["ids"], "sizes": a["sizes"], "identities": a["identities"],
              "corrupt": a["corrupt"], "errors": a["errors"], "dim": int(vecs.shape[1]), "rank": rank,
              "precision": precision}
    write_atomic(folder.chunk_done(chunk), json.dumps(record).encode())  # last: the chunk is done
    log.debug("chunk %d: %d embedded, %d unreadable", chunk, len(a["ids"]), len(a["corrupt"]))


# ----------------------------------------------------------------------------- finishing


def _vectors(folder: IndexFolder, chunks: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for c in chunks:
        done = folder.read_chunk(c)
        if done and done["ids"]:
            yield np.asarray(done["ids"], np.int64), np.load(folder.chunk_npy(c), mmap_mode="r").astype(np.float32)


def _sampler(folder: IndexFolder, chunks: list[int], counts: list[int], seed: int = 0) -> Any:
    def sample(k: int) -> np.ndarray:
        total = sum(counts)
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(k, total), replace=False))
        starts = np.cumsum([0, *counts])
        out = []
        for j, c in enumerate(chunks):
            rows = picks[(picks >= starts[j]) & (picks < starts[j + 1])] - starts[j]
            if len(rows):
                out.append(np.load(folder.chunk_npy(c), mmap_mode="r")[rows].astype(np.float32))
        return np.concatenate(out)

    return sample


def _finish(folder: IndexFolder, opts: BuildOptions, dim: int) -> tuple[dict[str, int], str]:
    """Rank 0: record every done chunk in the store, then build or extend the FAISS index."""
    info = folder.read_info()
    with MetadataStore(folder.root) as store:
        chunks = store.chunks()
        missing = [c for c in chunks if folder.read_chunk(c) is None]
        if missing:
            raise ValueError(f"--out: chunks {missing[:5]} of {folder.root} were not embedded (a rank stopped "
                             f"early); run the same command again to finish")
        pending = {c for (c,) in store.db.execute("SELECT DISTINCT chunk FROM items WHERE status = 'pending'")}
        for c in sorted(pending):
            done = folder.read_chunk(c) or {"ids": [], "sizes": [], "corrupt": []}
            identities = done.get("identities") or [None] * len(done["ids"])  # none in a chunk of an older build
            store.mark_chunk([(i, row, w, h, ident) for row, (i, (w, h), ident)
                              in enumerate(zip(done["ids"], done["sizes"], identities))], done["corrupt"])
        counts = store.counts()
    n = counts["ok"]
    if n == 0:
        raise ValueError(f"SOURCE: none of the {counts['corrupt']} images could be read")
    settings = _settings(opts, info)
    plan = ann.plan_index(n, dim, **settings)  # type: ignore[arg-type]
    old = info.get("index") or {}
    in_index = set(info.get("faiss_chunks", []))
    new_chunks = [c for c in chunks if c not in in_index]
    extend = (folder.faiss_path.is_file() and old.get("kind") == plan.kind and in_index
              and (plan.kind == "flat" or n <= 2 * int(old.get("trained_on", old.get("n", 0)))))
    index = None
    if extend:
        try:
            index = ann.read_index(folder.faiss_path, kind=plan.kind)
        except ValueError as exc:
            log.warning("%s; building the index again", exc)
        if index is not None and int(index.ntotal) != int(old.get("n", -1)):
            # written, then stopped before index.json said so: it may hold the new chunks already
            log.warning("%s holds %d vectors, index.json records %s: building it again", folder.faiss_path,
                        index.ntotal, old.get("n"))
            index = None
    if index is not None:
        for ids, vecs in _vectors(folder, new_chunks):
            index.add_with_ids(vecs, ids)
        plan_info = {**old, "n": n, "bytes": plan.bytes, "mmap": plan.mmap}
        log.info("added %d chunks to the %s index", len(new_chunks), plan.kind)
    else:
        per_chunk = [len((folder.read_chunk(c) or {"ids": []})["ids"]) for c in chunks]
        index = ann.build_index(plan, lambda: _vectors(folder, chunks), _sampler(folder, chunks, per_chunk))
        plan_info = {**dataclasses.asdict(plan), "trained_on": n}
    ann.write_index(index, folder.faiss_path)
    info.update(status="ready", dim=dim, index=plan_info, faiss_chunks=chunks, count=counts, settings=settings)
    folder.write_info(info)
    description = ann.IndexPlan(**{k: plan_info[k] for k in dataclasses.asdict(plan)}).describe()
    return counts, description


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _plain_errors(folder: IndexFolder) -> Iterator[None]:
    """A full disk and a damaged ``metadata.sqlite`` as one-line errors naming the file."""
    try:
        yield
    except DiskFullError:
        raise
    except sqlite3.Error as exc:
        raise database_error(folder.root / MetadataStore.FILE, exc) from None
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise disk_full(exc.filename if exc.filename is not None else folder.root, exc) from None
        raise


def build(opts: BuildOptions, encoder: Encoder) -> BuildReport:
    """Build, resume or extend the index folder ``opts.out`` with ``encoder`` (see the module doc)."""
    opts.check(encoder.dim)
    folder = IndexFolder(opts.out)
    rank, _ = _dist_init()
    # the lock removes the folder it made if nothing but the lock is in it (a failed first build)
    lock = FolderLock(folder.root, what="index folder") if rank == 0 else None
    try:
        with _plain_errors(folder):
            return _build(folder, opts, encoder, lock)
    finally:
        if lock is not None and lock.held:
            lock.release()


def _build(folder: IndexFolder, opts: BuildOptions, encoder: Encoder, lock: FolderLock | None) -> BuildReport:
    started = time.perf_counter()
    rank, world = _dist_init()
    prec = getattr(encoder, "precision", None)
    precision = prec.as_dict() if hasattr(prec, "as_dict") else None
    # rank 0 takes the folder's lock, plans and lists the chunks still to embed; every rank takes
    # every world-th of that one list (a failure to plan is sent too, so no rank waits for a plan
    # that never comes)
    shared: list[Any] = [None]
    if rank == 0:
        try:
            if lock is not None:
                lock.acquire()
                remove_stray_temp_files(folder)
            work = _plan(folder, opts, encoder.name, precision, getattr(encoder, "media", "image"))
            with MetadataStore(folder.root, readonly=True) as store:
                chunks = store.chunks()
            todo = [c for c in chunks if folder.read_chunk(c) is None] if work else []
            shared[0] = {"work": work, "todo": todo, "skipped": len(chunks) - len(todo)}
        except (ValueError, OSError, RuntimeError, sqlite3.Error) as exc:
            shared[0] = {"error": f"{type(exc).__name__}: {display(str(exc))}"}
            _broadcast(shared, world)
            raise
    _broadcast(shared, world)
    plan = shared[0]
    if "error" in plan:
        raise ValueError(f"rank 0 could not plan the index: {plan['error']}")
    work, skipped = bool(plan["work"]), int(plan["skipped"])
    mine = list(plan["todo"][rank::world])
    embedded = corrupt = 0
    if mine:
        with MetadataStore(folder.root, readonly=True) as store:
            records = {c: store.chunk_items(c) for c in mine}
        log.info("rank %d: embedding %d chunks (%d images); %d chunks already done", rank, len(mine),
                 sum(len(r) for r in records.values()), skipped)
        embedded, corrupt = _embed_chunks(folder, encoder, mine, records, opts, rank)
    done_now = len(mine)
    _barrier(world)
    total, total_corrupt, description = 0, 0, ""
    if rank == 0:
        info = folder.read_info()
        if work or info.get("status") != "ready":
            counts, description = _finish(folder, opts, encoder.dim)
        else:
            counts = info.get("count", {})
            description = f"{info.get('index', {}).get('kind', '?')} index, unchanged"
        total, total_corrupt = counts.get("ok", 0), counts.get("corrupt", 0)
    _barrier(world)
    return BuildReport(folder.root, embedded, corrupt, done_now, skipped, total, total_corrupt,
                       time.perf_counter() - started, description)
