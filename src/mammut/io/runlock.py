"""One writer per output folder: an advisory lock on ``FOLDER/.lock`` holding the writer's PID.

``mammut train`` takes it on its run folder and ``mammut index`` on its index folder, so a
second process started on the same folder stops at once with :class:`FolderLocked` (naming the
holder's PID) instead of interleaving its config, metrics and checkpoints with the first.

The lock is the kernel's (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows): it is
released when the holder exits for any reason, ``kill -9`` included, so a dead holder's lock is
taken over by the next run without any clean-up; the stale PID in the file is only overwritten.
The standard library does it in a few lines, so no package is added for it (``filelock`` has no
notion of the holder's PID to report).

Only the standard library is imported here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["FolderLock", "FolderLocked", "LOCK_NAME"]

LOCK_NAME = ".lock"


class FolderLocked(OSError):
    """Another live process holds the folder's lock (the message names its PID). An ``OSError``
    (the folder is busy), so the CLI reports it as one line like other errors of the machine."""


def _try_lock(fh: IO[str]) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fh: IO[str]) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_if_only_lock(folder: Path, lock: Path) -> None:
    try:
        if [p.name for p in folder.iterdir()] == [lock.name]:
            lock.unlink()
            folder.rmdir()
    except OSError:  # someone else is writing there now: leave it
        pass


class FolderLock:
    """Exclusive, non-blocking lock on ``folder`` for one writer process.

    ``what`` names the folder's kind in the error (``"run folder"``, ``"index folder"``)::

        with FolderLock(out_dir, what="run folder"):
            ...  # only this process writes under out_dir

    Raises :class:`FolderLocked` on entry when another live process holds it. The folder is
    created if missing. Within one process the lock is re-entrant (counted per folder), so the
    CLI can hold a run folder for a whole command while the ``Trainer`` inside takes it too.
    """

    _held: dict[str, list] = {}  # resolved folder -> [open file, count, created], this process's locks

    def __init__(self, folder: str | Path, *, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> FolderLock:
        if self._key is not None:
            return self
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        if key in FolderLock._held:  # this process holds it already
            FolderLock._held[key][1] += 1
            self._key = key
            return self
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while locked
        if not _try_lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise FolderLocked(f"{self.what} {self.folder} is in use by another process (PID {holder}); "
                               f"wait for it to finish or choose another folder")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        FolderLock._held[key] = [fh, 1, created]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in FolderLock._held:
            return
        entry = FolderLock._held[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del FolderLock._held[key]
        fh, created = entry[0], entry[2]
        try:
            fh.seek(0)
            fh.truncate()  # no stale PID left behind for a reader
            if created:  # a refused or failed command leaves no folder it made (nothing but the lock in it);
                _remove_if_only_lock(self.folder, self.path)  # a writer starting in this instant finds none
            _unlock(fh)
        finally:
            fh.close()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
