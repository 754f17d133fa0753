"""Query an index folder: :class:`SearchIndex` finds the nearest images of query vectors and
hands out an image's bytes by its id (only ids of the metadata store: a client never names a
path). An IVF-PQ index re-ranks ``k * rerank`` candidates exactly with the stored float16
embeddings (memory-mapped), which brings its recall close to the exact index's.

Opening reads every row of ``metadata.sqlite`` once, so a damaged store is a one-line error
then (naming the file), not a failure of every search. :meth:`SearchIndex.image_bytes` hands
out only the file that was indexed: opened without following a symbolic link, with the
identity recorded at index time (size, mtime, inode, device), and decoding as an image, whose
own type (not the name's) is the media type; anything else is an ``ItemChanged``. For a video
(an index built by a video model) it is a PNG strip of frames sampled from the file
(:func:`frame_strip`); :meth:`SearchIndex.item_bytes` gives the file's own bytes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import ann
from .collection import ItemChanged, is_video, read_item_checked
from .folder import IndexFolder
from .store import MetadataStore, Record

log = logging.getLogger(__name__)

__all__ = ["Hit", "SearchIndex", "check_k", "frame_strip", "DEFAULT_MAX_K", "STRIP_FRAMES"]

DEFAULT_MAX_K = 1000
STRIP_FRAMES = 5  # frames in a video's strip
STRIP_HEIGHT = 96  # pixels


def check_k(k: Any, max_k: int = DEFAULT_MAX_K) -> int:
    """``k`` as an int in ``[1, max_k]``; ``ValueError`` naming it otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= max_k:
        raise ValueError(f"k: expected an int in [1, {max_k}], got {k!r}")
    return int(k)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: the image's record and its cosine similarity to the query."""

    score: float
    record: Record

    def public(self) -> dict[str, Any]:
        return {**self.record.public(), "score": round(float(self.score), 6)}


class SearchIndex:
    """An index folder opened for search (thread-safe).

    ``mmap``: memory-map the FAISS index (default: as the build planned, i.e. when it is larger
    than the memory budget it was built for). ``nprobe``/``rerank`` default to the index's own.
    """

    def __init__(self, folder: str | Path, *, mmap: bool | None = None, nprobe: int | None = None,
                 rerank: int | None = None) -> None:
        self.folder = IndexFolder(folder)
        self.info = self.folder.read_info()
        if self.info.get("status") != "ready":
            raise ValueError(f"DIR: the index in {self.folder.root} is not finished; run `mammut index` again to "
                             f"complete it")
        plan = self.info.get("index", {})
        self.kind: str = plan.get("kind", "flat")
        self.mmap = bool(plan.get("mmap", False)) if mmap is None else bool(mmap)
        self.index = ann.read_index(self.folder.faiss_path, mmap=self.mmap, kind=self.kind)
        self.nprobe = int(nprobe if nprobe is not None else self.info.get("nprobe", 32))
        self.rerank = int(rerank if rerank is not None else self.info.get("rerank", 16))
        self.dim = int(self.info["dim"])
        self.store = MetadataStore(self.folder.root, readonly=True)
        counts = self.info.get("count") or {}
        try:
            self.store.check(sum(int(v) for v in counts.values()) if counts else None)
        except BaseException:
            self.store.close()
            raise
        self._lock = threading.Lock()  # one SQLite connection for every thread
        self._chunks: dict[int, np.ndarray] = {}
        log.info("opened %s: %d images, %s index%s", self.folder.root, self.size, self.kind,
                 " (memory-mapped)" if self.mmap else "")

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def model(self) -> str:
        return str(self.info.get("model", ""))

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, max_k: int = DEFAULT_MAX_K) -> list[list[Hit]]:
        """The ``k`` nearest images of each query vector ``(q, dim)`` (fewer if the index is smaller)."""
        k = check_k(k, max_k)
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected vectors of size {self.dim}, got shape {tuple(q.shape)}")
        k_eff = min(k, self.size)
        if k_eff == 0:
            return [[] for _ in q]
        fetch = min(self.size, k_eff * self.rerank) if self.kind != "flat" and self.rerank > 1 else k_eff
        scores, ids = ann.search_index(self.index, q, fetch, nprobe=self.nprobe)
        with self._lock:
            records = self.store.get(sorted({int(i) for i in ids.ravel() if i >= 0}))
            out = []
            for qi in range(len(q)):
                row = [(float(s), records[int(i)]) for s, i in zip(scores[qi], ids[qi]) if int(i) in records]
                if fetch > k_eff:
                    row = self._exact(q[qi], [r for _, r in row])
                out.append([Hit(s, r) for s, r in row[:k_eff]])
        return out

    def _exact(self, query: np.ndarray, records: list[Record]) -> list[tuple[float, Record]]:
        vecs = np.stack([self._chunk(r.chunk)[r.row] for r in records]).astype(np.float32) if records else \
            np.zeros((0, self.dim), np.float32)
        scores = vecs @ query
        order = np.argsort(-scores, kind="stable")
        return [(float(scores[j]), records[j]) for j in order]

    def _chunk(self, chunk: int) -> np.ndarray:
        arr = self._chunks.get(chunk)
        if arr is None:
            arr = self._chunks[chunk] = np.load(self.folder.chunk_npy(chunk), mmap_mode="r")
        return arr

    # ------------------------------------------------------------------ images
    def record(self, image_id: int) -> Record | None:
        """The record of an indexed (readable) image, or None."""
        with self._lock:
            rec = self.store.get([int(image_id)]).get(int(image_id))
        return rec if rec is not None and rec.status == "ok" else None

    def item_bytes(self, image_id: int) -> tuple[bytes, Record]:
        """``(the file's bytes, its record)`` of an indexed item (image or video); errors as
        :meth:`image_bytes`."""
        rec = self.record(image_id)
        if rec is None:
            raise KeyError(f"id: no image {image_id} in this index")
        data, _ = read_item_checked(rec.path, rec.member, rec.offset, rec.size, expect=rec.identity)
        return data, rec

    def image_bytes(self, image_id: int) -> tuple[bytes, str]:
        """``(bytes, media type)`` of an indexed image (of a video: a PNG strip of its frames);
        ``KeyError`` for an id the index does not have; ``ItemChanged`` when its file is not the one
        that was indexed (a link now, replaced, modified) or no longer an image / video; ``OSError``
        when it cannot be read."""
        data, rec = self.item_bytes(image_id)
        if is_video(rec.member or rec.path):
            return frame_strip(data, rec.name), "image/png"
        return data, _media_type(data, rec.name)


def frame_strip(data: bytes, name: str, frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> bytes:
    """PNG bytes: ``frames`` frames sampled uniformly from a video file's bytes, side by side at
    ``height`` pixels (each frame's aspect ratio kept); ``ItemChanged`` if it is no longer a video."""
    from PIL import Image

    from ..data.video_files import VideoDecodeError, read_clip_with_stats
    from ..preprocess import ImagePreprocess

    try:
        _, stats = read_clip_with_stats(data, frames=1, image_size=8, where=name)
        w, h = stats["size"]
        width = max(1, round(height * w / max(h, 1)))
        # "squash" to the frame's own aspect ratio: nothing cropped
        pre = ImagePreprocess(height, resize_mode="squash")
        clip = read_clip_with_stats(data, frames=frames, image_size=height, preprocess=pre, where=name)[0]
    except VideoDecodeError as exc:
        raise ItemChanged(f"{name} is no longer a readable video ({exc})") from None
    gap = 4
    strip = Image.new("RGB", (frames * width + (frames - 1) * gap, height), (40, 40, 40))
    for i, frame in enumerate(clip):
        pixels = (frame.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        strip.paste(Image.fromarray(pixels).resize((width, height), Image.BICUBIC), (i * (width + gap), 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


_MEDIA = {"MPO": "image/jpeg"}  # a camera's multi-picture JPEG: browsers show it as a JPEG


def _media_type(data: bytes, name: str) -> str:
    """The media type of an image by its bytes; ``ItemChanged`` if they are not one PIL reads."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.verify()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise ItemChanged(f"{name} is no longer an image ({type(exc).__name__})") from None
    return _MEDIA.get(fmt) or Image.MIME.get(fmt) or "application/octet-stream"
