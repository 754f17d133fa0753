"""The metadata store of an index folder: one SQLite file, ``metadata.sqlite``.

Table ``items``: one row per image (``id`` is the FAISS id), where it is (file path, or shard
path + member + byte offset + size), its caption if the collection had one, its size in pixels
once read, the chunk that embeds it and its row in that chunk's embedding shard, and its
status (``pending``, ``ok``, ``corrupt``). Only the process that plans or finishes an index
writes; workers read.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .collection import Item

__all__ = ["Record", "MetadataStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    member TEXT NOT NULL DEFAULT '',
    offset INTEGER NOT NULL DEFAULT -1,
    size INTEGER NOT NULL DEFAULT -1,
    caption TEXT,
    chunk INTEGER NOT NULL,
    row INTEGER,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',
    UNIQUE (path, member)
);
CREATE INDEX IF NOT EXISTS items_chunk ON items (chunk);
"""


@dataclasses.dataclass(frozen=True)
class Record:
    """A row of ``items``."""

    id: int
    path: str
    member: str
    offset: int
    size: int
    caption: str | None
    chunk: int
    row: int | None
    width: int | None
    height: int | None
    status: str

    @property
    def name(self) -> str:
        """What a person calls this image: the file name, or the shard member."""
        return self.member or Path(self.path).name

    def public(self) -> dict[str, Any]:
        """The fields a client may see (no file-system path)."""
        return {"id": self.id, "name": self.name, "caption": self.caption, "width": self.width, "height": self.height}


_COLUMNS = "id, path, member, offset, size, caption, chunk, row, width, height, status"


class MetadataStore:
    """``metadata.sqlite`` of an index folder (created on first use when ``create``)."""

    FILE = "metadata.sqlite"

    def __init__(self, folder: str | Path, *, create: bool = False, readonly: bool = False) -> None:
        path = Path(folder) / self.FILE
        if not create and not path.is_file():
            raise FileNotFoundError(f"index: no {self.FILE} in {folder}")
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, timeout=60, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ planning
    def known(self) -> set[tuple[str, str]]:
        return {(p, m) for p, m in self.db.execute("SELECT path, member FROM items")}

    def next_id(self) -> int:
        (top,) = self.db.execute("SELECT COALESCE(MAX(id), -1) FROM items").fetchone()
        return int(top) + 1

    def next_chunk(self) -> int:
        (top,) = self.db.execute("SELECT COALESCE(MAX(chunk), -1) FROM items").fetchone()
        return int(top) + 1

    def add_items(self, items: Sequence[Item], chunk_size: int) -> list[int]:
        """Append ``items`` (not yet known) in new chunks of ``chunk_size``; returns the new chunk numbers."""
        first_id, first_chunk = self.next_id(), self.next_chunk()
        rows = [(first_id + i, it.path, it.member, it.offset, it.size, it.caption, first_chunk + i // chunk_size)
                for i, it in enumerate(items)]
        with self.db:
            self.db.executemany("INSERT INTO items (id, path, member, offset, size, caption, chunk) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return sorted({r[-1] for r in rows})

    def chunks(self) -> list[int]:
        return [c for (c,) in self.db.execute("SELECT DISTINCT chunk FROM items ORDER BY chunk")]

    def chunk_items(self, chunk: int) -> list[Record]:
        return self._records("WHERE chunk = ? ORDER BY id", (chunk,))

    # ------------------------------------------------------------------ results
    def mark_chunk(self, ok: Iterable[tuple[int, int, int, int]], corrupt: Iterable[int]) -> None:
        """``ok``: ``(id, row, width, height)``; ``corrupt``: ids that could not be read."""
        with self.db:
            self.db.executemany("UPDATE items SET status = 'ok', row = ?, width = ?, height = ? WHERE id = ?",
                                [(r, w, h, i) for i, r, w, h in ok])
            self.db.executemany("UPDATE items SET status = 'corrupt', row = NULL WHERE id = ?", [(i,) for i in corrupt])

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "corrupt": 0, "pending": 0}
        out.update({s: int(n) for s, n in self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status")})
        return out

    # ------------------------------------------------------------------ look-ups
    def _records(self, where: str, params: Sequence[Any] = ()) -> list[Record]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM items {where}", params).fetchall()
        return [Record(*row) for row in rows]

    def get(self, ids: Sequence[int]) -> dict[int, Record]:
        """Records by id (unknown ids are absent from the result)."""
        out: dict[int, Record] = {}
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            marks = ",".join("?" * len(part))
            out.update((r.id, r) for r in self._records(f"WHERE id IN ({marks})", part))
        return out

    def ok_records(self, chunk: int) -> list[Record]:
        return self._records("WHERE chunk = ? AND status = 'ok' ORDER BY row", (chunk,))
