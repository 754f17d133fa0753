"""The layout of an index folder, and its ``index.json``.

    DIR/index.json          what was indexed, with which model, how (see :class:`IndexInfo`)
    DIR/metadata.sqlite     one row per image (:mod:`mammut.apps.store`)
    DIR/chunks/NNNNNN.npy   float16 embeddings of chunk N, one row per readable image
    DIR/chunks/NNNNNN.json  chunk N's ids, image sizes and unreadable images; written last, it
                            marks the chunk done (a resumed build never redoes a chunk that has it)
    DIR/index.faiss         the FAISS index (ids = metadata ids)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "IndexFolder"]

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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a kill) sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
