"""The layout of an index folder, and its ``index.json``.

    DIR/index.json          what was indexed, with which model, how (see :class:`IndexInfo`)
    DIR/metadata.sqlite     one row per image (:mod:`mammut.apps.store`)
    DIR/chunks/NNNNNN.npy   float16 embeddings of chunk N, one row per readable image
    DIR/chunks/NNNNNN.json  chunk N's ids, image sizes and unreadable images; written last, it
                            marks the chunk done (a resumed build never redoes a chunk that has it)
    DIR/index.faiss         the FAISS index (ids = metadata ids)
    DIR/.lock               held by the one ``mammut index`` writing the folder (:mod:`mammut.io.runlock`)

Files are written whole or not at all (:func:`write_atomic`: a temporary ``.NAME.PID.tmp``
beside the file, then a rename); a temporary file left by a killed build is removed by the
next one, which holds the folder's lock (:func:`remove_stray_temp_files`). A full disk is a
:class:`~mammut.apps.store.DiskFullError` naming the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .store import DiskFullError

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "IndexFolder", "write_atomic", "remove_stray_temp_files", "disk_full", "FULL_ERRNOS"]

FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_STRAY = re.compile(r"\..+\.[0-9]+\.tmp|index\.faiss\.tmp")  # write_atomic's and ann.write_index's

FORMAT = 1


class IndexFolder:
    """Paths and small files of an index folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    @property
    def info_path(self) -> Path:
        return self.root / "index.json"

    @property
    def chunk_dir(self) -> Path:
        return self.root / "chunks"

    @property
    def faiss_path(self) -> Path:
        return self.root / "index.faiss"

    def chunk_npy(self, chunk: int) -> Path:
        return self.chunk_dir / f"{chunk:06d}.npy"

    def chunk_done(self, chunk: int) -> Path:
        return self.chunk_dir / f"{chunk:06d}.json"

    def exists(self) -> bool:
        return self.info_path.is_file()

    def read_info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            what = "no such folder" if not self.root.exists() else "no index.json (not built by `mammut index`)"
            raise FileNotFoundError(f"DIR: expected an index folder, got {self.root}: {what}")
        try:
            info = json.loads(self.info_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"DIR: {self.info_path} is not valid JSON ({exc})") from None
        if info.get("format") != FORMAT:
            raise ValueError(f"DIR: {self.info_path} has format {info.get('format')!r}, expected {FORMAT}")
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        write_atomic(self.info_path, json.dumps({"format": FORMAT, **info}, indent=2).encode())

    def read_chunk(self, chunk: int) -> dict[str, Any] | None:
        """A done chunk's record, or None if the chunk is not done."""
        path = self.chunk_done(chunk)
        if not path.is_file():
            return None
        return json.loads(path.read_text())  # type: ignore[no-any-return]


def disk_full(path: str | Path, exc: OSError) -> DiskFullError:
    """A full disk (or quota) met writing ``path``, as a one-line error naming it."""
    reason = (exc.strerror or str(exc)).strip()
    return DiskFullError(f"--out: no space left on device writing {path} ({reason}); free some space and run "
                         f"the same command again to resume")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a kill) sees the old file or the new, never
    half. On failure the temporary file is removed; a full disk is a ``DiskFullError`` naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in FULL_ERRNOS:
            raise disk_full(path, exc) from None
        raise


def remove_stray_temp_files(folder: IndexFolder) -> list[Path]:
    """Remove the temporary files a killed or failed build left in ``folder`` (``.NAME.PID.tmp``,
    ``index.faiss.tmp``). Call it only while holding the folder's lock: then no other process
    is writing any of them. Returns what was removed."""
    removed = []
    for where in (folder.root, folder.chunk_dir):
        try:
            names = os.listdir(where)
        except FileNotFoundError:
            continue
        for name in names:
            path = where / name
            if _STRAY.fullmatch(name) and path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
    if removed:
        log.info("%s: removed %d temporary files left by an earlier build", folder.root, len(removed))
    return removed
