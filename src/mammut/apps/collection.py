"""What gets indexed: the images of a folder (recursive), of a CSV/TSV file (image path column,
optional caption column; open_clip's ``filepath``/``title`` as in :mod:`mammut.data.datasets`),
or of local WebDataset shards (``{key}.jpg|png|...`` + optional ``{key}.txt``, as in
:mod:`mammut.data.webdataset`).

:func:`list_items` turns a source into :class:`Item` records in a fixed order (the plan that
indexing splits into chunks); :func:`read_item` returns an item's image bytes: a file is read
whole, a shard member at the byte offset recorded when the shard was listed. Neither ever takes
a path from anyone but the person who built the index.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import tarfile
from pathlib import Path

from PIL import Image

from ..data.datasets import IMAGE_EXTENSIONS, decode_image
from ..data.webdataset import expand_shards

log = logging.getLogger(__name__)

__all__ = ["Item", "list_items", "read_item", "open_item", "source_kind"]

# what a folder scan picks up (the training data's list plus a few common others)
FOLDER_EXTENSIONS: tuple[str, ...] = (*IMAGE_EXTENSIONS, "gif", "tif", "tiff")


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


def _folder_items(root: Path) -> list[Item]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in FOLDER_EXTENSIONS and p.is_file())
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


def _shard_items(pattern: str) -> list[Item]:
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
                    if ext in IMAGE_EXTENSIONS and key not in images:
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
               image_root: str | None = None) -> list[Item]:
    """The images of ``source`` in a fixed order (see the module doc). In a CSV, ``caption_key``
    names the caption column (an error if absent); ``None`` takes ``title`` where there is one."""
    kind = source_kind(source)
    p = Path(source).expanduser()
    if kind == "folder":
        items = _folder_items(p)
    elif kind == "csv":
        items = _csv_items(p, img_key, caption_key, image_root)
    else:
        items = _shard_items(source)
    if not items:
        raise ValueError(f"SOURCE: no images found in {source}")
    unique = list({(it.path, it.member): it for it in reversed(items)}.values())[::-1]  # the first of each
    if len(unique) < len(items):  # two names (links) of one file: indexed once
        log.info("%s: %d names of images already listed under another name", source, len(items) - len(unique))
        items = unique
    log.info("%s (%s): %d images", source, kind, len(items))
    return items


def read_item(path: str, member: str = "", offset: int = -1, size: int = -1) -> bytes:
    """The image bytes of an item (a file, or ``size`` bytes at ``offset`` of a shard)."""
    if not member:
        return Path(path).read_bytes()
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member {member} is cut short ({len(data)} of {size} bytes)")
    return data


def open_item(path: str, member: str = "", offset: int = -1, size: int = -1) -> Image.Image:
    """The RGB image of an item; ``ImageDecodeError``/``OSError`` when it cannot be read."""
    where = f"{path}:{member}" if member else path
    return decode_image(read_item(path, member, offset, size), where=where)
