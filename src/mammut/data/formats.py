"""Readers for the standard on-disk evaluation formats; they list image files and labels, they
never open an image (``mammut.eval.images`` loads them and counts the missing or corrupt ones).

- :func:`read_image_folder`: an ImageFolder (one sub-folder per class, sorted by name, as
  torchvision's ``ImageFolder``) -> :class:`LabeledImages`.
- :func:`read_captioned_images`: several captions per image -> :class:`CaptionedImages`, from
  a Karpathy-split JSON (COCO / Flickr30k: ``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}]}]}``), a COCO-captions annotation file (``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``) or a CSV/TSV with one row per
  caption (open_clip's ``filepath`` / ``title`` columns; rows naming the same file are one image).
  In every layout one image file (compared resolved) is one image: JSON entries listing a file
  again are merged into its first entry, their captions pooled (counted as
  ``duplicate_images``); blank captions (empty or whitespace) are left out and counted
  (``empty_captions``), and an image left with no caption is left out (``images_without_captions``).
- :func:`read_vqa`: VQAv2 questions + annotations JSON -> :class:`VqaSet`.
- :func:`read_lines`: a text file of one entry per line (class names, prompt templates).

Every error is a ``ValueError`` (or ``FileNotFoundError``) naming the argument (``arg=``, the
command-line option by default), what was expected and what was found.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "LabeledImages",
    "CaptionedImages",
    "VqaQuestion",
    "VqaSet",
    "read_image_folder",
    "read_captioned_images",
    "read_vqa",
    "read_lines",
    "read_json",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass
class LabeledImages:
    """Image files with a class index each; ``classes[k]`` is the folder name of class ``k``."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    root: Path


@dataclass
class CaptionedImages:
    """Image files with their reference captions (``captions[i]``: those of ``paths[i]``)."""

    paths: list[Path]
    captions: list[list[str]]
    ids: list[Any]
    source: Path
    layout: str  # "karpathy", "coco" or "csv"
    split: str | None = None
    images_without_captions: int = 0  # images with no caption, or only blank ones (left out)
    captions_unknown_image: int = 0  # COCO layout: captions naming an image id not in "images" (left out)
    empty_captions: int = 0  # blank (empty or whitespace) captions (left out; an image with only those counts above)
    duplicate_images: int = 0  # JSON layouts: entries naming a file listed before (merged into its first entry)

    def left_out(self) -> dict[str, int]:
        """What reading the annotation file left out, by reason (merged duplicates are in
        ``duplicate_images``: their captions are kept)."""
        return {"images_without_captions": self.images_without_captions,
                "captions_unknown_image": self.captions_unknown_image, "empty_captions": self.empty_captions}


@dataclass
class VqaQuestion:
    question_id: Any
    image_id: Any
    question: str
    answers: list[str]
    answer_type: str = "unknown"
    question_type: str = "unknown"


@dataclass
class VqaSet:
    """Questions with their annotators' answers; ``image_paths[image_id]`` is the image file."""

    questions: list[VqaQuestion]
    image_paths: dict[Any, Path]
    unannotated: int = 0  # questions without an annotation (left out)
    subtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _existing_file(path: str | Path, arg: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{arg}: expected a file, got the folder {p}")
    if not p.is_file():
        raise FileNotFoundError(f"{arg}: no such file: {p}")
    return p


def _existing_dir(path: str | Path, arg: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{arg}: no such folder: {p}" if not p.exists() else f"{arg}: expected a folder, got the file {p}")
    return p


def _text(p: Path, arg: str) -> str:
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{arg}: expected UTF-8 text, got {p} (undecodable byte at offset {exc.start})") from None


def read_json(path: str | Path, arg: str) -> Any:
    """A JSON file; a file that is not JSON is a ``ValueError`` naming ``arg`` and the line."""
    p = _existing_file(path, arg)
    try:
        return json.loads(_text(p, arg))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{arg}: expected a JSON file, got {p} ({exc.msg} at line {exc.lineno})") from None


def read_lines(path: str | Path, arg: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (lines starting with ``#`` are comments)."""
    return [line for _, line in numbered_lines(path, arg)]


def numbered_lines(path: str | Path, arg: str) -> list[tuple[int, str]]:
    """``read_lines`` with each line's number in the file (from 1), for errors that point at lines."""
    p = _existing_file(path, arg)
    lines = [(i + 1, line.strip()) for i, line in enumerate(_text(p, arg).splitlines())]
    out = [(i, line) for i, line in lines if line and not line.startswith("#")]
    if not out:
        raise ValueError(f"{arg}: expected one entry per line, got an empty file {p}")
    return out


# ----------------------------------------------------------------------------- ImageFolder


def read_image_folder(root: str | Path, *, arg: str = "--data") -> LabeledImages:
    """An ImageFolder: ``root/<class>/<image>``; classes are the sub-folders sorted by name
    (class ``k`` is the ``k``-th), images the files with an image suffix (sorted, any depth)."""
    r = _existing_dir(root, arg)
    classes = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = sum(1 for f in r.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        raise ValueError(f"{arg}: expected an ImageFolder (one sub-folder of images per class), got {r} with no "
                         f"sub-folders" + (f" ({loose} images directly in it)" if loose else ""))
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for k, name in enumerate(classes):
        files = sorted(f for f in (r / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
        if not files:
            empty.append(name)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise ValueError(f"{arg}: expected image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders of "
                         f"{r}, got none in {len(classes)} folders")
    if empty:
        log.warning("%s: %d class folders hold no image (e.g. %s)", r, len(empty), empty[0])
    return LabeledImages(paths, labels, classes, r)


# ----------------------------------------------------------------------------- captions


def _caption_text(value: Any, where: str, arg: str) -> str:
    if isinstance(value, dict):
        if isinstance(value.get("raw"), str):
            return value["raw"]
        if isinstance(value.get("tokens"), list):
            return " ".join(str(t) for t in value["tokens"])
    if isinstance(value, str):
        return value
    raise ValueError(f"{arg}: expected {where} to be a caption (a string or {{\"raw\": ...}}), got {str(value)[:80]}")


def _file_key(path: Path) -> Path:
    """The file ``path`` names, for telling whether two entries list the same image file."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop, say: compare the spelling made absolute
        return path.absolute()


def _non_blank(texts: list[str]) -> list[str]:
    return [t for t in texts if t.strip()]


def _log_merged(src: Path, duplicates: list[str]) -> None:
    if duplicates:
        log.warning("%s: %d image entries name a file listed before (e.g. %s); merged into its first entry, captions "
                    "pooled", src, len(duplicates), duplicates[0])


def _log_blank(src: Path, blank: int, without: int) -> None:
    if blank:
        log.warning("%s: %d blank (empty or whitespace) captions; left out (%d images with no caption left)", src,
                    blank, without)


def _none_left(arg: str, src: Path, blank: int) -> ValueError:
    return ValueError(f"{arg}: expected images with a non-blank caption in {src}, got none ({blank} blank captions)")


def _karpathy(data: dict[str, Any], src: Path, images: Path, split: str | None, arg: str) -> CaptionedImages:
    want = split if split not in (None, "all") else None
    paths, caps, ids, splits = [], [], [], set()
    first: dict[Path, int] = {}  # image file -> its position in paths
    duplicates: list[str] = []
    blank = 0
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise ValueError(f"{arg}: expected images[{i}] to hold \"filename\" (Karpathy layout), got {str(entry)[:80]}")
        splits.add(entry.get("split"))
        if want is not None and entry.get("split") != want:
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{arg}: expected images[{i}][\"sentences\"] to be a non-empty list, got {str(sentences)[:80]}")
        texts = [_caption_text(s, f"images[{i}].sentences", arg) for s in sentences]
        kept = _non_blank(texts)
        blank += len(texts) - len(kept)
        sub = entry.get("filepath")
        fp = images / sub / entry["filename"] if isinstance(sub, str) and sub else images / entry["filename"]
        if not fp.is_file() and (images / entry["filename"]).is_file():
            fp = images / entry["filename"]
        key = _file_key(fp)
        if key in first:
            duplicates.append(f"images[{i}] {fp}")
            caps[first[key]] += kept
            continue
        first[key] = len(paths)
        paths.append(fp)
        caps.append(kept)
        ids.append(entry.get("cocoid", entry.get("imgid", entry.get("id", i))))
    if not paths:
        have = sorted(str(s) for s in splits)
        raise ValueError(f"--split: expected one of the splits in {src} ({', '.join(have)}, or all), got {split!r}")
    keep = [j for j, c in enumerate(caps) if c]
    _log_merged(src, duplicates)
    _log_blank(src, blank, len(paths) - len(keep))
    if not keep:
        raise _none_left(arg, src, blank)
    return CaptionedImages([paths[j] for j in keep], [caps[j] for j in keep], [ids[j] for j in keep], src, "karpathy",
                           want, images_without_captions=len(paths) - len(keep), empty_captions=blank,
                           duplicate_images=len(duplicates))


def _coco(data: dict[str, Any], src: Path, images: Path, arg: str) -> CaptionedImages:
    by_id: dict[Any, Path] = {}
    first: dict[Path, Any] = {}  # image file -> the id of its first entry
    same_as: dict[Any, Any] = {}  # id of an entry listing a file again -> the first entry's id
    duplicates: list[str] = []
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{arg}: expected images[{i}] to hold \"id\" and \"file_name\" (COCO layout), "
                             f"got {str(entry)[:80]}")
        fp = images / entry["file_name"]
        key = _file_key(fp)
        if key in first:
            duplicates.append(f"images[{i}] (id {entry['id']!r}) {fp}")
            if entry["id"] != first[key]:
                same_as[entry["id"]] = first[key]
            continue
        first[key] = entry["id"]
        by_id[entry["id"]] = fp
    caps: dict[Any, list[str]] = {}
    unknown = blank = 0
    for j, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{arg}: expected annotations[{j}] to hold \"image_id\" and \"caption\" (COCO captions "
                             f"layout), got {str(ann)[:80]}")
        image_id = same_as.get(ann["image_id"], ann["image_id"])
        if image_id not in by_id:
            unknown += 1
            continue
        text = _caption_text(ann["caption"], f"annotations[{j}].caption", arg)
        if not text.strip():
            blank += 1
            continue
        caps.setdefault(image_id, []).append(text)
    if unknown:
        log.warning("%s: %d captions name an image id that is not in \"images\"; left out", src, unknown)
    ids = [k for k in by_id if k in caps]
    _log_merged(src, duplicates)
    _log_blank(src, blank, len(by_id) - len(ids))
    if len(ids) < len(by_id):
        log.warning("%s: %d images have no caption; left out", src, len(by_id) - len(ids))
    if not ids:
        if blank:
            raise _none_left(arg, src, blank)
        raise ValueError(f"{arg}: expected captions for the images of {src}, got none that match an image id")
    return CaptionedImages([by_id[k] for k in ids], [caps[k] for k in ids], ids, src, "coco", None,
                           images_without_captions=len(by_id) - len(ids), captions_unknown_image=unknown,
                           empty_captions=blank, duplicate_images=len(duplicates))


def _csv(src: Path, images: Path, img_key: str, caption_key: str, arg: str) -> CaptionedImages:
    sep = "\t" if src.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(_text(src, arg), newline=""), delimiter=sep)
    columns = reader.fieldnames or []
    for key, opt in ((img_key, "--img-key"), (caption_key, "--caption-key")):
        if key not in columns:
            raise ValueError(f"{opt}: expected a column of {src} ({', '.join(columns) or 'no header'}), got {key!r}")
    order: dict[Path, tuple[Path, list[str]]] = {}  # image file -> (its first spelling, its captions)
    empty = 0
    try:
        for row in reader:
            rel, text = row.get(img_key) or "", row.get(caption_key) or ""
            if not rel.strip():
                raise ValueError(f"{arg}: expected an image path in column {img_key!r} of {src} row {reader.line_num}, "
                                 f"got an empty cell")
            fp = Path(rel) if Path(rel).is_absolute() else images / rel
            captions = order.setdefault(_file_key(fp), (fp, []))[1]
            if text.strip():
                captions.append(text)
            else:
                empty += 1
    except csv.Error as exc:
        raise ValueError(f"{arg}: expected valid {'TSV' if sep == chr(9) else 'CSV'}, got {src} row "
                         f"{reader.line_num} ({exc})") from None
    kept = [(p, caps) for p, caps in order.values() if caps]
    if empty:
        log.warning("%s: %d rows have an empty %r cell; left out (%d images with no caption left)", src, empty,
                    caption_key, len(order) - len(kept))
    if not kept:
        raise ValueError(f"{arg}: expected rows of image-caption pairs with a non-empty {caption_key!r}, got none "
                         f"in {src} ({empty} empty caption cells)")
    return CaptionedImages([p for p, _ in kept], [caps for _, caps in kept], [str(p) for p, _ in kept], src, "csv",
                           None, images_without_captions=len(order) - len(kept), empty_captions=empty)


def read_captioned_images(path: str | Path, images: str | Path | None = None, *, split: str | None = "test",
                          img_key: str = "filepath", caption_key: str = "title",
                          arg: str = "--data") -> CaptionedImages:
    """Images with several reference captions each, from a Karpathy JSON, a COCO-captions JSON
    or a CSV/TSV (chosen by the suffix, then by the JSON's keys). ``images``: the folder the
    file names are relative to (default: the annotation file's folder); ``split``: Karpathy
    only (``"all"`` or ``None``: every image)."""
    src = _existing_file(path, arg)
    root = _existing_dir(images, "--images") if images is not None else src.parent
    if src.suffix.lower() in (".csv", ".tsv"):
        return _csv(src, root, img_key, caption_key, arg)
    data = read_json(src, arg)
    layouts = ("expected a Karpathy-split JSON ({\"images\": [{\"filename\", \"split\", \"sentences\"}]}), a COCO "
               "captions JSON ({\"images\": [...], \"annotations\": [{\"image_id\", \"caption\"}]}) or a .csv/.tsv")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        got = f"keys {sorted(data)[:6]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{arg}: {layouts}, got {src} with {got}")
    if isinstance(data.get("annotations"), list):
        return _coco(data, src, root, arg)
    if isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        return _karpathy(data, src, root, split, arg)
    raise ValueError(f"{arg}: {layouts}, got {src} whose images[0] has keys {sorted(data['images'][0])[:6]} "
                     f"and no \"annotations\"")


# ----------------------------------------------------------------------------- VQAv2


def _image_candidates(image_id: Any, subtype: str | None, template: str | None) -> list[str]:
    if template is not None:
        try:
            return [template.format(image_id=image_id, subtype=subtype or "")]
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--image-template: expected a format string with {{image_id}} and {{subtype}} fields, "
                             f"got {template!r} ({type(exc).__name__}: {exc} for image_id {image_id!r})") from None
    names = []
    if subtype and isinstance(image_id, int):
        names.append(f"COCO_{subtype}_{image_id:012d}.jpg")
    if isinstance(image_id, int):
        names.append(f"{image_id:012d}.jpg")
    names += [f"{image_id}.jpg", f"{image_id}.png"]
    return names


def read_vqa(questions: str | Path, annotations: str | Path, images: str | Path, *,
             image_template: str | None = None) -> VqaSet:
    """VQAv2 questions (``{"questions": [{"question_id", "image_id", "question"}], "data_subtype"?}``)
    with their annotations (``{"annotations": [{"question_id", "answers": [{"answer"}],
    "answer_type"?, "question_type"?}]}``). Image files: ``image_template`` (``str.format`` with
    ``image_id`` and ``subtype``, e.g. ``"COCO_{subtype}_{image_id:012d}.jpg"``) or the first of
    ``COCO_<subtype>_<id:012d>.jpg``, ``<id:012d>.jpg``, ``<id>.jpg``, ``<id>.png`` that exists."""
    qdata = read_json(questions, "--questions")
    adata = read_json(annotations, "--annotations")
    root = _existing_dir(images, "--images")
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        got = f"keys {sorted(qdata)[:6]}" if isinstance(qdata, dict) else f"a JSON {type(qdata).__name__}"
        raise ValueError(f"--questions: expected a VQAv2 questions file ({{\"questions\": [...]}}), got {got}")
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        got = f"keys {sorted(adata)[:6]}" if isinstance(adata, dict) else f"a JSON {type(adata).__name__}"
        raise ValueError(f"--annotations: expected a VQAv2 annotations file ({{\"annotations\": [...]}}), got {got}")
    anns: dict[Any, dict[str, Any]] = {}
    for j, a in enumerate(adata["annotations"]):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list) or not a["answers"]:
            raise ValueError(f"--annotations: expected annotations[{j}] to hold \"question_id\" and a non-empty "
                             f"\"answers\" list, got {str(a)[:80]}")
        anns[a["question_id"]] = a
    subtype = qdata.get("data_subtype") if isinstance(qdata.get("data_subtype"), str) else None
    out: list[VqaQuestion] = []
    unannotated = 0
    for i, q in enumerate(qdata["questions"]):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q) or not isinstance(q["question"], str):
            raise ValueError(f"--questions: expected questions[{i}] to hold \"question_id\", \"image_id\" and "
                             f"\"question\", got {str(q)[:80]}")
        a = anns.get(q["question_id"])
        if a is None:
            unannotated += 1
            continue
        answers = [x["answer"] if isinstance(x, dict) else x for x in a["answers"]]
        if not all(isinstance(x, str) for x in answers):
            raise ValueError(f"--annotations: expected the answers of question {q['question_id']} to be strings or "
                             f"{{\"answer\": ...}}, got {str(a['answers'])[:80]}")
        out.append(VqaQuestion(q["question_id"], q["image_id"], q["question"], answers,
                               str(a.get("answer_type", "unknown")), str(a.get("question_type", "unknown"))))
    if not out:
        raise ValueError(f"--annotations: expected annotations for the questions of {questions}, got none that match "
                         f"a question_id ({len(qdata['questions'])} questions, {len(anns)} annotations)")
    if unannotated:
        log.warning("%s: %d questions have no annotation; left out", questions, unannotated)
    paths: dict[Any, Path] = {}
    for q in out:
        if q.image_id not in paths:
            names = _image_candidates(q.image_id, subtype, image_template)
            paths[q.image_id] = next((root / n for n in names if (root / n).is_file()), root / names[0])
    return VqaSet(out, paths, unannotated, subtype)
