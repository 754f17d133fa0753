"""The metadata store of an index folder: one SQLite file, ``metadata.sqlite``.

Table ``items``: one row per image (``id`` is the FAISS id), where it is (file path, or shard
path + member + byte offset + size), its caption if the collection had one, its size in pixels
once read, the chunk that embeds it and its row in that chunk's embedding shard, and its
status (``pending``, ``ok``, ``corrupt``), and the identity of the file it was read from
(``size:mtime_ns:inode:device``, see :func:`mammut.apps.collection.identity`), which the
server checks before it hands the file out. Only the process that plans or finishes an index
writes; workers read.

A path or member name that is not valid UTF-8 (a ``str`` with surrogate escapes) is stored as
its bytes (``os.fsencode``, a BLOB) and read back to the same ``str``; every other name is TEXT.

:meth:`MetadataStore.check` reads every row once: a damaged or cut-short file is a one-line
``ValueError`` naming it (:func:`database_error` turns SQLite's errors into such errors).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .collection import Item, display

__all__ = ["Record", "MetadataStore", "DiskFullError", "database_error"]

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
    identity TEXT,
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
    identity: str | None = None  # size:mtime_ns:inode:device of the file it was read from

    @property
    def name(self) -> str:
        """What a person calls this image: the file name, or the shard member (printable: bytes
        that are not UTF-8 as ``\\xNN``)."""
        return display(self.member or Path(self.path).name)

    def public(self) -> dict[str, Any]:
        """The fields a client may see (no file-system path)."""
        return {"id": self.id, "name": self.name, "caption": self.caption, "width": self.width, "height": self.height}


_COLUMNS = "id, path, member, offset, size, caption, chunk, row, width, height, status"


def _to_db(name: str) -> str | bytes:
    """A file name as stored: TEXT, or its bytes when it is not valid UTF-8 (lossless)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def _from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


class DiskFullError(OSError):
    """No space left while writing an index folder (the message names the file)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def database_error(path: Path, exc: sqlite3.Error) -> Exception:
    """SQLite's error on ``path`` as a one-line error naming it: a full disk (``DiskFullError``),
    else a damaged file (``ValueError``)."""
    text = str(exc).strip() or type(exc).__name__
    if "disk is full" in text or getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return DiskFullError(f"--out: the disk is full writing {path} (SQLite: {text}); free some space and run "
                             f"the same command again to resume")
    if isinstance(exc, sqlite3.DatabaseError) and any(
            m in text for m in ("malformed", "not a database", "no such table", "no such column", "encrypted")):
        return ValueError(f"DIR: {path} is damaged or cut short (SQLite: {text}); rebuild the index: move its "
                          f"folder {path.parent} away and run `mammut index` again")
    return OSError(f"DIR: could not use {path} (SQLite: {text})")  # locked, no permission, an I/O error


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
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, timeout=60, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(_SCHEMA)
                self.db.commit()
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(items)")}
            if columns and "identity" not in columns:  # an index made before identities were kept
                if not readonly:
                    self.db.execute("ALTER TABLE items ADD COLUMN identity TEXT")
                    self.db.commit()
                    columns.add("identity")
        except sqlite3.Error as exc:
            raise database_error(path, exc) from None
        self._identity = "identity" if "identity" in columns else "NULL"

    def check(self, expected: int | None = None) -> dict[str, int]:
        """Read every row once (a damaged or cut-short file fails here, not at the first search);
        ``expected``: how many rows ``index.json`` records. Returns the counts by status."""
        try:
            counts = self.counts()
        except sqlite3.Error as exc:
            raise database_error(self.path, exc) from None
        if expected is not None and sum(counts.values()) != expected:
            raise ValueError(f"DIR: {self.path} holds {sum(counts.values())} images, index.json records {expected}; "
                             f"it is damaged or from another index: move its folder {self.path.parent} away and "
                             f"run `mammut index` again")
        return counts

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ planning
    def known(self) -> set[tuple[str, str]]:
        return {(_from_db(p), _from_db(m)) for p, m in self.db.execute("SELECT path, member FROM items")}

    def next_id(self) -> int:
        (top,) = self.db.execute("SELECT COALESCE(MAX(id), -1) FROM items").fetchone()
        return int(top) + 1

    def next_chunk(self) -> int:
        (top,) = self.db.execute("SELECT COALESCE(MAX(chunk), -1) FROM items").fetchone()
        return int(top) + 1

    def add_items(self, items: Sequence[Item], chunk_size: int) -> list[int]:
        """Append ``items`` (not yet known) in new chunks of ``chunk_size``; returns the new chunk numbers."""
        first_id, first_chunk = self.next_id(), self.next_chunk()
        rows = [(first_id + i, _to_db(it.path), _to_db(it.member), it.offset, it.size, it.caption,
                 first_chunk + i // chunk_size) for i, it in enumerate(items)]
        with self.db:
            self.db.executemany("INSERT INTO items (id, path, member, offset, size, caption, chunk) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return sorted({r[-1] for r in rows})

    def chunks(self) -> list[int]:
        return [c for (c,) in self.db.execute("SELECT DISTINCT chunk FROM items ORDER BY chunk")]

    def chunk_items(self, chunk: int) -> list[Record]:
        return self._records("WHERE chunk = ? ORDER BY id", (chunk,))

    # ------------------------------------------------------------------ results
    def mark_chunk(self, ok: Iterable[tuple[Any, ...]], corrupt: Iterable[int]) -> None:
        """``ok``: ``(id, row, width, height[, identity])``; ``corrupt``: ids that could not be read."""
        rows = [(t[1], t[2], t[3], t[4] if len(t) > 4 else None, t[0]) for t in ok]
        with self.db:
            self.db.executemany("UPDATE items SET status = 'ok', row = ?, width = ?, height = ?, identity = ? "
                                "WHERE id = ?", rows)
            self.db.executemany("UPDATE items SET status = 'corrupt', row = NULL WHERE id = ?", [(i,) for i in corrupt])

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "corrupt": 0, "pending": 0}
        out.update({s: int(n) for s, n in self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status")})
        return out

    # ------------------------------------------------------------------ look-ups
    def _records(self, where: str, params: Sequence[Any] = ()) -> list[Record]:
        rows = self.db.execute(f"SELECT {_COLUMNS}, {self._identity} FROM items {where}", params).fetchall()
        return [Record(row[0], _from_db(row[1]), _from_db(row[2]), *row[3:]) for row in rows]

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
