"""Crash-safe file writes: the one writer behind model checkpoints (``mammut.models.pretrained``)
and training checkpoints, metrics and run configs (``mammut.train``).

A file is written under a temporary name in its own folder, fsynced, given the permissions the
old file had (a new one: the usual ``0o666`` less the umask), renamed onto its final name and the
folder fsynced: a failure or a kill at any moment leaves either the old file or the new one,
never a mix, and the temporary file never survives an error (``KeyboardInterrupt`` included).

Standard library only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "fsync_file", "sha256_file"]

_CHUNK = 1 << 22


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` atomically by what ``write(tmp)`` writes to the path it is given (a
    temporary file beside ``path``: e.g. ``safetensors.torch.save_model(model, str(tmp))``)."""
    with _replacing(Path(path)) as (fd, tmp):
        os.close(fd)
        write(tmp)
        fsync_file(tmp)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see the module docstring)."""
    with _replacing(Path(path)) as (fd, _tmp):
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, Path]]:
    """A temporary file beside ``path`` as ``(open descriptor, path)``: the body writes it and
    closes the descriptor; on success it is renamed onto ``path``, on any error removed."""
    mode = path.stat().st_mode & 0o777 if path.is_file() else _new_file_mode()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        yield fd, tmp
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:  # any interruption, KeyboardInterrupt included: never leave the temp file
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Make the renames and new entries of ``directory`` durable (a no-op where folders cannot
    be opened or fsynced, e.g. Windows or file systems that refuse it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some file systems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
