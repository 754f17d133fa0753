"""What gets indexed: the images of a folder (recursive), of a CSV/TSV file (image path column,
optional caption column; open_clip's ``filepath``/``title`` as in :mod:`mammut.data.datasets`),
or of local WebDataset shards (``{key}.jpg|png|...`` + optional ``{key}.txt``, as in
:mod:`mammut.data.webdataset`). With ``media="video"`` (an index built with a video model) the
same sources give their video files instead (``.mp4``, ``.webm``, ...: :data:`VIDEO_EXTENSIONS`).

:func:`list_items` turns a source into :class:`Item` records in a fixed order (the plan that
indexing splits into chunks); :func:`read_item` returns an item's image bytes: a file is read
whole, a shard member at the byte offset recorded when the shard was listed. Neither ever takes
a path from anyone but the person who built the index.

File names are kept as the operating system gives them: a name that is not valid UTF-8 is a
``str`` with surrogate escapes (``os.fsdecode``), read back to the same bytes; :func:`display`
turns one into printable text (``name\\xffbad.png``) for people and JSON.

An item is read without following a symbolic link (``O_NOFOLLOW``) and its identity (size,
modification time, inode, device: :func:`identity`) is taken from the open file, so the server
can refuse a file that is not the one that was indexed (:class:`ItemChanged`).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import logging
import os
import stat
import tarfile
from pathlib import Path

from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS, decode_image
from ..data.video_files import VIDEO_EXTENSIONS
from ..data.webdataset import expand_shards

log = logging.getLogger(__name__)

__all__ = ["Item", "ItemChanged", "is_video", "list_items", "read_item", "read_item_checked", "open_item", "source_kind",
           "display", "identity"]

# what a folder scan picks up (the training data's list plus a few common others)
FOLDER_EXTENSIONS: tuple[str, ...] = (*IMAGE_EXTENSIONS, "gif", "tif", "tiff")
MEDIA: tuple[str, ...] = ("image", "video")


def is_video(name: str) -> bool:
    """Whether an item's name (file or shard member) is a video file, by its suffix."""
    return Path(name).suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a collection: a file (``member == ""``) or a member of a tar shard."""

    path: str  # the file's or shard's resolved path (absolute, no links, no ".."): one path per file
    member: str = ""  # tar member name ("" for a file)
    offset: int = -1  # byte offset of the member's data in the shard
    size: int = -1  # the member's size in bytes
    caption: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


def display(text: str) -> str:
    """``text`` as printable text: bytes of a file name that are not UTF-8 (surrogate escapes)
    shown as ``\\xNN``; any other text unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no byte stands for (a Windows name)
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class ItemChanged(OSError):
    """The file of an item is not the one that was indexed (a link now, replaced, not a regular file)."""


def source_kind(source: str) -> str:
    """``"folder"``, ``"csv"`` or ``"shards"``; ``FileNotFoundError`` naming SOURCE if it is none of them."""
    p = Path(source).expanduser()
    if p.is_dir():
        return "folder"
    if p.suffix.lower() in (".csv", ".tsv"):
        if not p.is_file():
            raise FileNotFoundError(f"SOURCE: no such CSV/TSV file: {p}")
        return "csv"
    if not str(source).strip():
        raise ValueError("SOURCE: expected a folder, a CSV/TSV file or a shard pattern, got ''")
    return "shards"


def _sidecar_caption(image: Path) -> str | None:
    txt = image.with_suffix(".txt")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8").strip() or None
        except (UnicodeDecodeError, OSError) as exc:
            log.warning("%s: caption file not read (%s)", txt, exc)
    return None


def _folder_items(root: Path, media: str = "image") -> list[Item]:
    exts = VIDEO_EXTENSIONS if media == "video" else FOLDER_EXTENSIONS
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in exts and p.is_file())
    return [Item(str(p.resolve()), caption=_sidecar_caption(p)) for p in files]


def _csv_items(path: Path, img_key: str, caption_key: str | None, image_root: str | None) -> list[Item]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"SOURCE: {path} is not UTF-8 text (byte offset {exc.start}); save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    columns = reader.fieldnames or []
    if img_key not in columns:
        raise ValueError(f"--img-key: {img_key!r} is not a column of {path}; columns are {columns}")
    if caption_key is None:  # not asked for: open_clip's "title" when the file has it
        caption_key = "title" if "title" in columns else None
    elif caption_key not in columns:
        raise ValueError(f"--caption-key: {caption_key!r} is not a column of {path}; columns are {columns}")
    root = Path(image_root).expanduser() if image_root else path.parent
    seen: dict[str, int] = {}
    items: list[Item] = []
    missing = 0
    try:
        for row in reader:
            rel = (row.get(img_key) or "").strip()
            fp = Path(rel).expanduser()
            fp = fp if fp.is_absolute() else root / fp
            if not rel or not fp.is_file():
                missing += 1
                continue
            key = str(fp.resolve())
            caption = (row.get(caption_key) or "").strip() or None if caption_key else None
            if key in seen:  # several captions of one image: one item, the first caption
                continue
            seen[key] = len(items)
            items.append(Item(key, caption=caption))
    except csv.Error as exc:
        raise ValueError(f"SOURCE: {path} row {reader.line_num} is not valid CSV ({exc})") from None
    if missing:
        log.warning("%s: %d rows name a missing image file and were skipped", path, missing)
    return items


def _shard_items(pattern: str, media: str = "image") -> list[Item]:
    exts = VIDEO_EXTENSIONS if media == "video" else IMAGE_EXTENSIONS
    items: list[Item] = []
    for shard in expand_shards(pattern, key="SOURCE"):
        if "://" in shard or shard.startswith("pipe:"):
            raise ValueError(f"SOURCE: expected local shard files, got {shard}")
        path = str(Path(shard).resolve())
        images: dict[str, tarfile.TarInfo] = {}
        texts: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, "r:") as tar:  # uncompressed: members are read in place by offset
                for info in tar:
                    if not info.isfile() or "/." in f"/{info.name}":
                        continue
                    key, _, ext = info.name.partition(".")
                    ext = ext.lower()
                    if ext in exts and key not in images:
                        images[key] = info
                    elif ext == "txt":
                        texts[key] = info
                captions = {k: tar.extractfile(t).read().decode("utf-8", "replace").strip()  # type: ignore[union-attr]
                            for k, t in texts.items() if k in images}
        except (tarfile.TarError, OSError) as exc:
            log.warning("SOURCE: shard %s skipped, not a readable uncompressed tar (%s)", path, exc)
            continue
        for key, info in images.items():
            items.append(Item(path, member=info.name, offset=info.offset_data, size=info.size,
                              caption=captions.get(key) or None))
    return items


def list_items(source: str, *, img_key: str = "filepath", caption_key: str | None = None,
               image_root: str | None = None, media: str = "image") -> list[Item]:
    """The images (``media="video"``: the videos) of ``source`` in a fixed order (see the module
    doc). In a CSV, ``caption_key`` names the caption column (an error if absent); ``None`` takes
    ``title`` where there is one."""
    if media not in MEDIA:
        raise ValueError(f"media: expected one of {MEDIA}, got {media!r}")
    kind = source_kind(source)
    p = Path(source).expanduser()
    if kind == "folder":
        items = _folder_items(p, media)
    elif kind == "csv":
        items = _csv_items(p, img_key, caption_key, image_root)
    else:
        items = _shard_items(source, media)
    if not items:
        raise ValueError(f"SOURCE: no {media}s found in {source}"
                         + (f" ({', '.join(VIDEO_EXTENSIONS)})" if media == "video" else ""))
    unique = list({(it.path, it.member): it for it in reversed(items)}.values())[::-1]  # the first of each
    if len(unique) < len(items):  # two names (links) of one file: indexed once
        log.info("%s: %d names of images already listed under another name", source, len(items) - len(unique))
        items = unique
    log.info("%s (%s): %d %ss", source, kind, len(items), media)
    return items


def identity(st: os.stat_result) -> str:
    """What tells one file from another with the same name: ``size:mtime_ns:inode:device``."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}"


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def read_item_checked(path: str, member: str = "", offset: int = -1, size: int = -1, *,
                      expect: str | None = None) -> tuple[bytes, str]:
    """``(bytes, identity)`` of an item (a file, or ``size`` bytes at ``offset`` of a shard),
    read from the file opened without following a symbolic link. ``expect``: the identity
    recorded when it was indexed; another one is an :class:`ItemChanged` (nothing is read).
    ``ItemChanged`` too for a link or anything but a regular file; ``OSError`` when missing."""
    where = display(f"{path}:{member}" if member else path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symbolic link
            raise ItemChanged(f"{display(path)} is a symbolic link now, not the file that was indexed") from None
        raise
    with open(fd, "rb", closefd=True) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ItemChanged(f"{display(path)} is not a regular file now")
        ident = identity(st)
        if expect is not None and ident != expect:
            raise ItemChanged(f"{where} was replaced or modified since it was indexed "
                              f"(size:mtime:inode:device {ident}, indexed {expect})")
        if not member:
            return fh.read(), ident
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{where}: member is cut short ({len(data)} of {size} bytes)")
    return data, ident


def read_item(path: str, member: str = "", offset: int = -1, size: int = -1) -> bytes:
    """The image bytes of an item (a file, or ``size`` bytes at ``offset`` of a shard); see
    :func:`read_item_checked`."""
    return read_item_checked(path, member, offset, size)[0]


def open_item(path: str, member: str = "", offset: int = -1, size: int = -1) -> Image.Image:
    """The RGB image of an item; ``ImageDecodeError``/``OSError`` when it cannot be read."""
    where = display(f"{path}:{member}" if member else path)
    return decode_image(read_item(path, member, offset, size), where=where)
