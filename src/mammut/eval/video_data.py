"""Video-text benchmark data: MSR-VTT-style captioned videos and MSRVTT-QA / MSVD-QA questions,
read from their usual files, or the held-out moving-emoji clips when no file is given.

Captioned videos (video-text retrieval, video captioning), :func:`read_captioned_videos`:

- ``.csv`` / ``.tsv`` with ``video_id,sentence`` (CLIP4Clip's ``MSRVTT_JSFUSION_test.csv``, the
  1k-A test set: one caption per video) or ``filepath,title`` (one row per caption; rows naming
  the same file are one video);
- ``MSRVTT_data.json`` (``{"videos": [{"video_id", "split"}], "sentences": [{"video_id",
  "caption"}]}``; ``--split`` picks the videos of that split, e.g. ``validate`` / ``test``; all
  their captions are references);
- LAVIS's ``retrieval_*.json`` / ``cap_*.json``: a list of ``{"video": file, "caption": str or
  [str, ...]}`` (entries of one video pooled);
- COCO-style ground truth (``{"images": [{"id"}], "annotations": [{"image_id", "caption"}]}``)
  with each id a video (LAVIS writes its caption ground truth this way).

Questions (VideoQA), :func:`read_video_questions`: the original ``{train,val,test}_qa.json`` of
MSRVTT-QA / MSVD-QA, a list of ``{"question", "answer", "video_id", "id"}`` (LAVIS's ``qa_*.json``
with ``"video"`` instead of ``"video_id"`` too). The question type is the entry's ``type`` /
``question_type`` / ``answer_type`` when given, else the question's first word (``what``, ``who``,
``how``, ``when``, ``where``: the breakdown MSRVTT-QA papers report).

Video files are found under ``videos`` (default: the data file's folder): an id that names a
file (``video7010.mp4``) is that file; otherwise ``{id}.mp4`` / ``.webm`` / ... and, for a
number, ``video{id}.mp4`` (MSR-VTT's names) are tried, or ``video_template`` (e.g.
``"vid{video_id}.avi"``) gives the name.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.video_files import VIDEO_EXTENSIONS

__all__ = ["CaptionedVideos", "VideoQuestions", "read_captioned_videos", "read_video_questions", "find_video",
           "moving_emoji_videos", "moving_emoji_questions", "question_type"]

MOVING_EMOJI = "moving-emoji (held-out clips)"


@dataclass
class CaptionedVideos:
    """Videos with their reference captions: ``ids[i]``, ``paths[i]`` (a file, or None when
    ``clips`` holds the decoded clip), ``captions[i]`` (one or more), where they came from."""

    ids: list[str]
    paths: list[Path | None]
    captions: list[list[str]]
    source: str
    layout: str
    split: str | None = None
    clips: list[torch.Tensor] | None = None
    blank_captions: int = 0

    def left_out(self) -> dict[str, int]:
        return {"blank_captions": self.blank_captions}


@dataclass
class VideoQuestion:
    question_id: Any
    video_id: str
    question: str
    answer: str
    qtype: str


@dataclass
class VideoQuestions:
    """Questions and the video each asks about (``paths[video_id]``, or ``clips[video_id]`` in memory)."""

    questions: list[VideoQuestion]
    paths: dict[str, Path | None]
    source: str
    layout: str
    clips: dict[str, torch.Tensor] | None = None
    left_out: dict[str, int] = field(default_factory=dict)


def question_type(question: str) -> str:
    """The question's first word, lower-case (``"what"`` for "What is the man doing?")."""
    words = re.findall(r"[a-z]+", question.lower())
    return words[0] if words else "other"


def find_video(videos: Path, video_id: str, template: str | None = None) -> Path:
    """The file of ``video_id`` under ``videos`` (see the module docstring); a path that may not
    exist (the evaluation counts it as missing)."""
    if template is not None:
        try:
            return videos / template.format(video_id=video_id)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--video-template: expected a file name with a {{video_id}} field, got {template!r} "
                             f"({type(exc).__name__}: {exc})") from None
    direct = videos / video_id
    if direct.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS:
        return direct
    names = [video_id] + ([f"video{video_id}"] if video_id.isdigit() else [])
    for name in names:
        for ext in VIDEO_EXTENSIONS:
            p = videos / f"{name}.{ext}"
            if p.is_file():
                return p
    return videos / f"{names[-1]}.mp4"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--data: {path} is not valid JSON ({exc})") from None


def _check_file(data: str | Path) -> Path:
    p = Path(data).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--data: no such file {str(p)!r}")
    return p


def _group(pairs: list[tuple[str, str]]) -> tuple[list[str], list[list[str]], int]:
    """(video, caption) pairs -> ids in first-seen order, their captions, blank captions dropped."""
    caps: dict[str, list[str]] = {}
    blank = 0
    for vid, cap in pairs:
        cap = str(cap).strip()
        caps.setdefault(vid, [])
        if cap:
            caps[vid].append(cap)
        else:
            blank += 1
    ids = [v for v in caps if caps[v]]
    return ids, [caps[v] for v in ids], blank


def read_captioned_videos(data: str | Path, videos: str | Path | None = None, *, split: str | None = None,
                          video_template: str | None = None) -> CaptionedVideos:
    """Captioned videos from ``data`` (formats in the module docstring)."""
    p = _check_file(data)
    root = Path(videos).expanduser() if videos is not None else p.parent
    if videos is not None and not root.is_dir():
        raise FileNotFoundError(f"--videos: no such folder {str(root)!r}")
    pairs: list[tuple[str, str]] = []
    used_split: str | None = None
    files_are_paths = False
    if p.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(p.read_text(encoding="utf-8-sig"), newline=""),
                                delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        cols = reader.fieldnames or []
        if {"video_id", "sentence"} <= set(cols):
            layout, key, cap = "msrvtt-csv (video_id,sentence)", "video_id", "sentence"
        elif {"filepath", "title"} <= set(cols):
            layout, key, cap, files_are_paths = "csv (filepath,title)", "filepath", "title", True
        else:
            raise ValueError(f"--data: {p} needs columns video_id,sentence (MSR-VTT) or filepath,title; got {cols}")
        pairs = [((row.get(key) or "").strip(), row.get(cap) or "") for row in reader]
        pairs = [(v, c) for v, c in pairs if v]
    elif p.suffix.lower() == ".json":
        doc = _read_json(p)
        if isinstance(doc, dict) and "sentences" in doc:
            layout = "MSRVTT_data.json"
            keep = None
            if split is not None:
                keep = {str(v["video_id"]) for v in doc.get("videos", []) if v.get("split") == split}
                if not keep:
                    splits = sorted({str(v.get("split")) for v in doc.get("videos", [])})
                    raise ValueError(f"--split: expected one of {splits} in {p}, got {split!r}")
                used_split = split
            pairs = [(str(s["video_id"]), s.get("caption", "")) for s in doc["sentences"]
                     if keep is None or str(s["video_id"]) in keep]
        elif isinstance(doc, dict) and "annotations" in doc:
            layout = "coco-style (images = videos)"
            pairs = [(str(a["image_id"]), a.get("caption", "")) for a in doc["annotations"]]
        elif isinstance(doc, list) and doc and isinstance(doc[0], dict) and "video" in doc[0]:
            layout = "lavis (video, caption)"
            for i, e in enumerate(doc):
                if not isinstance(e, dict) or "video" not in e:
                    raise ValueError(f"--data: {p} entry {i}: expected {{'video': ..., 'caption': ...}}, got {e!r:.80}")
                caps = e.get("caption", "")
                for c in caps if isinstance(caps, list) else [caps]:
                    pairs.append((str(e["video"]), c))
        else:
            raise ValueError(f"--data: {p}: expected MSRVTT_data.json (sentences), a LAVIS list of "
                             f"{{video, caption}} or COCO-style annotations, got {type(doc).__name__}")
    else:
        raise ValueError(f"--data: expected a .csv/.tsv or .json file, got {p}")
    ids, captions, blank = _group(pairs)
    if not ids:
        raise ValueError(f"--data: no captioned video in {p}")
    paths: list[Path | None] = [(Path(v) if Path(v).is_absolute() else root / v) if files_are_paths
                                else find_video(root, v, video_template) for v in ids]
    return CaptionedVideos(ids, paths, captions, str(p), layout, used_split, blank_captions=blank)


def read_video_questions(data: str | Path, videos: str | Path | None = None, *,
                         video_template: str | None = None) -> VideoQuestions:
    """MSRVTT-QA / MSVD-QA questions from ``data`` (see the module docstring)."""
    p = _check_file(data)
    root = Path(videos).expanduser() if videos is not None else p.parent
    if videos is not None and not root.is_dir():
        raise FileNotFoundError(f"--videos: no such folder {str(root)!r}")
    doc = _read_json(p)
    if isinstance(doc, dict) and isinstance(doc.get("questions"), list):
        doc = doc["questions"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"--data: {p}: expected a non-empty list of {{question, answer, video_id}}, got "
                         f"{type(doc).__name__}")
    out, blank = [], 0
    for i, e in enumerate(doc):
        vid = e.get("video_id", e.get("video")) if isinstance(e, dict) else None
        if vid is None or "question" not in e or "answer" not in e:
            raise ValueError(f"--data: {p} entry {i}: expected question, answer and video_id, got {e!r:.100}")
        answer = e["answer"][0] if isinstance(e["answer"], list) and e["answer"] else e["answer"]
        if not str(e["question"]).strip() or not str(answer).strip():
            blank += 1
            continue
        qtype = next((str(e[k]) for k in ("type", "question_type", "answer_type") if e.get(k) is not None), None)
        out.append(VideoQuestion(e.get("id", e.get("question_id", i)), str(vid), str(e["question"]).strip(),
                                 str(answer).strip(), qtype or question_type(str(e["question"]))))
    paths: dict[str, Path | None] = {q.video_id: None for q in out}
    for vid in paths:
        paths[vid] = find_video(root, vid, video_template)
    return VideoQuestions(out, paths, str(p), "msrvtt-qa (question, answer, video_id)",
                          left_out={"blank_questions_or_answers": blank})


def moving_emoji_videos(n: int, *, frames: int, image_size: int) -> CaptionedVideos:
    """The first ``n`` held-out moving-emoji clips (:mod:`mammut.data.moving_emoji`), decoded in memory."""
    from ..data.moving_emoji import heldout_clips

    clips = heldout_clips(n, frames=frames, image_size=image_size)
    return CaptionedVideos([c.video_id for c in clips], [None] * len(clips), [[c.caption] for c in clips],
                           MOVING_EMOJI, "moving-emoji", "held-out", clips=[c.frames for c in clips])


def moving_emoji_questions(n: int, *, frames: int, image_size: int) -> VideoQuestions:
    """The first ``n`` held-out moving-emoji questions, their clips in memory."""
    from ..data.video_questions import heldout_questions

    qs = heldout_questions(n, frames=frames, image_size=image_size)
    questions = [VideoQuestion(q.index, q.clip.video_id, q.question, q.answer, q.qtype) for q in qs]
    clips = {q.clip.video_id: q.clip.frames for q in qs}
    return VideoQuestions(questions, {v: None for v in clips}, MOVING_EMOJI, "moving-emoji", clips=clips)
