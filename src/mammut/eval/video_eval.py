"""Video benchmarks: ``mammut eval video-retrieval | video-caption | videoqa SOURCE [--data FILE --videos DIR]``.

Data formats: :mod:`mammut.eval.video_data` (MSR-VTT CSV / JSON, LAVIS JSON, MSRVTT-QA / MSVD-QA
JSON); without ``--data``, the held-out moving-emoji clips and questions
(:mod:`mammut.data.moving_emoji`). Clips: :mod:`mammut.eval.video` (frames sampled from each file
by :func:`mammut.data.video_files.read_clip`; the model's frame count; image-only models as
independent frames).

- **Video-text retrieval** (:func:`evaluate_video_retrieval`): every video and caption embedded
  once; video -> text is right at K when any of the video's captions is among the K nearest,
  text -> video when its video is; R@1/5/10 both ways, ties against the model (as for images,
  :mod:`mammut.eval.retrieval`). On MSR-VTT's 1k-A CSV that is the usual 1,000 x 1,000 protocol.
  For the moving-emoji default identical caption strings are one answer (different clips can
  share a caption).
- **Video captioning** (:func:`evaluate_video_captioning`): one caption per video, scored against
  all its references with pycocoevalcap (:mod:`mammut.eval.caption_metrics`; BLEU, METEOR with
  Java, ROUGE-L, CIDEr-D), written as ``captions.json`` (``[{"image_id": video id, "caption"}]``,
  the COCO results format LAVIS uses for MSR-VTT).
- **VideoQA** (:func:`evaluate_videoqa`): open answers generated after the prompt (a run trained
  with ``train.task: vqa`` / ``videoqa`` uses its own, ``BOS question answer:``), scored by exact
  match after VQAv2 answer processing (:func:`mammut.eval.vqa.normalize_answer`); accuracy overall
  and per question type. With ``--answers`` (an answer vocabulary: ``train_ans2label.json`` or a
  list) a reference answer outside it counts as wrong, as in LAVIS / Just-Ask (``oov_answers``).

Reports show clips as frame strips with the generated and reference texts.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .images import SkipCount, coverage, seeded_subset
from .model_source import EvalModel
from .video import VideoInput, clip_batches, embed_clips, generate_clips, plot_clip_strips, video_input
from .video_data import (MOVING_EMOJI, CaptionedVideos, VideoQuestions, moving_emoji_questions, moving_emoji_videos,
                         read_captioned_videos, read_video_questions)

log = logging.getLogger(__name__)

__all__ = ["evaluate_video_retrieval", "evaluate_video_captioning", "evaluate_videoqa", "DEFAULT_EMOJI_CLIPS"]

KS = (1, 5, 10)
DEFAULT_EMOJI_CLIPS = 256
Result = tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]


def _videos(em: EvalModel, vin: VideoInput, data: str | Path | None, videos: str | Path | None, split: str | None,
            template: str | None, emoji_clips: int) -> CaptionedVideos:
    if data is None:
        return moving_emoji_videos(emoji_clips, frames=vin.frames, image_size=vin.image_size)
    return read_captioned_videos(data, videos, split=split, video_template=template)


def _items(ds: CaptionedVideos, keep: list[int]) -> list[Any]:
    return [ds.clips[i] if ds.clips is not None else ds.paths[i] for i in keep]


def _facts(vin: VideoInput, sampling: str, stride: int | None, skipped: SkipCount, n: int, seconds: float,
           limit: int | None, n_total: int, n_selected: int, in_memory: bool = False) -> dict[str, Any]:
    reasons = []
    if n_selected < n_total:
        reasons.append(f"--limit {limit}: a seeded random {n_selected} of the {n_total} videos was evaluated")
    if skipped.total:
        reasons.append(f"{skipped.total} videos skipped (missing or unreadable)")
    return {"n_videos": n, "frames": vin.frames, "image_size": vin.image_size, "video_encoder": vin.video,
            "input": vin.describe(), "sampling": "every frame (clips made in memory)" if in_memory
            else sampling if stride is None else f"{sampling} (stride {stride})",
            "videos_skipped": skipped.as_dict(), "videos_per_s": n / seconds if seconds > 0 else None,
            **coverage(limit, n_total, n_selected, skipped.total, unit="videos"), "not_comparable_because": reasons}


def _head(metrics: dict[str, Any]) -> str:
    sk = metrics["videos_skipped"]
    lines = [f"- input: {metrics['input']}; frames sampled {metrics['sampling']}",
             f"- videos evaluated: {metrics['n_videos']}; skipped: {sk['total']} ({sk['missing']} missing, "
             f"{sk['corrupt']} unreadable)"]
    lines += [f"  - {e}" for e in sk["examples"][:5]]
    return "\n".join(lines) + "\n"


def evaluate_video_retrieval(em: EvalModel, out_dir: Path, *, data: str | Path | None = None,
                             videos: str | Path | None = None, split: str | None = None,
                             video_template: str | None = None, frames: int | None = None, sampling: str = "uniform",
                             stride: int | None = None, emoji_clips: int = DEFAULT_EMOJI_CLIPS, batch_size: int = 16,
                             workers: int = 0, limit: int | None = None, progress: bool = True) -> Result:
    """Video <-> text R@1/5/10 both ways; returns ``(metrics, report sections, figures)``."""
    from .metrics import retrieval_recall
    from .plots import plot_recall_curves
    from .report import markdown_table
    from .retrieval import image_to_text_chance, text_to_image_chance

    em.require("embed", "video-retrieval")
    vin = video_input(em, frames)
    ds = _videos(em, vin, data, videos, split, video_template, emoji_clips)
    keep = seeded_subset(len(ds.ids), limit)
    skipped = SkipCount()
    embeds, ok, shown = [], [], []
    t0 = time.perf_counter()
    for idx, clips in clip_batches(_items(ds, keep), vin, skipped, sampling=sampling, stride=stride,
                                   batch_size=batch_size, workers=workers, progress=progress, desc="video-retrieval"):
        embeds.append(embed_clips(em, vin, clips))
        ok += [keep[i] for i in idx]
        shown += [c for c in clips[: max(0, 8 - len(shown))]]
    seconds = time.perf_counter() - t0
    if not ok:
        raise ValueError(f"--data: expected readable videos in {ds.source}, got none ({skipped.total} skipped)")
    texts, owner = [], []
    for j, i in enumerate(ok):
        texts += ds.captions[i]
        owner += [j] * len(ds.captions[i])
    txt = em.embed_texts(texts)
    vid = torch.cat(embeds)
    curve_ks = tuple(range(1, min(100, max(len(ok), len(texts))) + 1))
    same_text = ds.source == MOVING_EMOJI
    rec = retrieval_recall(vid, txt, ks=tuple(sorted(set(KS) | set(curve_ks))), text_to_image=owner,
                           texts=texts if same_text else None)
    per_video = [len(ds.captions[i]) for i in ok]
    metrics: dict[str, Any] = {
        **{f"v2t_R@{k}": rec[f"i2t_R@{k}"] for k in KS}, **{f"t2v_R@{k}": rec[f"t2i_R@{k}"] for k in KS},
        "mean_recall": sum(rec[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS) / (2 * len(KS)),
        "chance": {**{f"v2t_R@{k}": image_to_text_chance(per_video, k) for k in KS},
                   **{f"t2v_R@{k}": text_to_image_chance(len(ok), k) for k in KS}},
        "n_texts": len(texts), "captions_per_video": len(texts) / len(ok), "layout": ds.layout, "split": ds.split,
        "identical_captions_one_answer": same_text, "data_left_out": ds.left_out(),
        **_facts(vin, sampling, stride, skipped, len(ok), seconds, limit, len(ds.ids), len(keep), ds.clips is not None),
        "curve": {"v2t": [rec[f"i2t_R@{k}"] for k in curve_ks], "t2v": [rec[f"t2i_R@{k}"] for k in curve_ks]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("video -> text", *(metrics[f"v2t_R@{k}"] for k in KS)),
            ("text -> video", *(metrics[f"t2v_R@{k}"] for k in KS)),
            ("chance, video -> text", *(metrics["chance"][f"v2t_R@{k}"] for k in KS)),
            ("chance, text -> video", *(metrics["chance"][f"t2v_R@{k}"] for k in KS))]
    sections = [_head(metrics), f"## Video-text retrieval on {ds.source}: {len(ok)} videos, {len(texts)} captions "
                f"({metrics['captions_per_video']:.2f} per video)\n\n"
                + markdown_table(["direction", *(f"R@{k}" for k in KS)], rows)
                + "\nvideo -> text: a hit if any caption of the video ranks within K; text -> video: a hit if its "
                  "video does; ties count against the model"
                + ("; identical caption strings are one answer." if same_text else ".")
                + (f" Not comparable to published figures: {'; '.join(metrics['not_comparable_because'])}."
                   if metrics["not_comparable_because"] else "") + "\n"]
    nearest = (vid[: len(shown)] @ txt.T).argmax(1).tolist() if shown else []
    figures = [
        ("Recall@K", plot_recall_curves({"video -> text": metrics["curve"]["v2t"],
                                         "text -> video": metrics["curve"]["t2v"]},
                                        out_dir / "recall_at_k.png", title=f"video retrieval, {len(ok)} videos")),
        ("Videos with their nearest caption (N) and references (R)", plot_clip_strips(
            shown, [texts[j] for j in nearest], [ds.captions[i] for i in ok[: len(shown)]],
            out_dir / "clips.png", labels=("N", "R"))),
    ]
    log.info("video retrieval: v2t R@1 %.4f, t2v R@1 %.4f on %d videos (%d skipped)", metrics["v2t_R@1"],
             metrics["t2v_R@1"], len(ok), skipped.total)
    return metrics, sections, figures


def evaluate_video_captioning(em: EvalModel, out_dir: Path, *, data: str | Path | None = None,
                              videos: str | Path | None = None, split: str | None = None,
                              video_template: str | None = None, frames: int | None = None,
                              sampling: str = "uniform", stride: int | None = None,
                              emoji_clips: int = DEFAULT_EMOJI_CLIPS, generation: dict[str, Any] | None = None,
                              spice: bool = False, tokenizer: str = "auto", batch_size: int = 16, workers: int = 0,
                              limit: int | None = None, progress: bool = True) -> Result:
    """Caption every video and score against its references; returns ``(metrics, sections, figures)``."""
    from .caption_metrics import caption_scores
    from .captioning import LABELS, _check_generation, scoring_reasons
    from .report import markdown_table

    em.require("generate", "video-caption")
    options = _check_generation(generation or {})
    vin = video_input(em, frames)
    ds = _videos(em, vin, data, videos, split, video_template, emoji_clips)
    keep = seeded_subset(len(ds.ids), limit)
    skipped = SkipCount()
    generated: list[str] = []
    ok: list[int] = []
    shown: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for idx, clips in clip_batches(_items(ds, keep), vin, skipped, sampling=sampling, stride=stride,
                                   batch_size=batch_size, workers=workers, progress=progress, desc="video-caption"):
        generated += generate_clips(em, vin, clips, **options)
        ok += [keep[i] for i in idx]
        shown += [c for c in clips[: max(0, 8 - len(shown))]]
    seconds = time.perf_counter() - t0
    if not ok:
        raise ValueError(f"--data: expected readable videos in {ds.source}, got none ({skipped.total} skipped)")
    refs = [ds.captions[i] for i in ok]
    scores = caption_scores(generated, refs, spice=spice, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "captions.json").write_text(json.dumps(
        [{"image_id": ds.ids[i], "caption": c} for i, c in zip(ok, generated)], indent=1))
    facts = _facts(vin, sampling, stride, skipped, len(ok), seconds, limit, len(ds.ids), len(keep), ds.clips is not None)
    reasons = facts.pop("not_comparable_because") + scoring_reasons(scores, tokenizer)
    metrics: dict[str, Any] = {
        **{k: scores.get(k) for k in LABELS if k in scores}, "references_per_video": scores["references_per_image"],
        "tokenizer": scores["tokenizer"], "absent": scores["absent"], "generation": options or {"strategy": "greedy"},
        "layout": ds.layout, "split": ds.split, "data_left_out": ds.left_out(), **facts,
        "comparable_to_published": facts["comparable_to_published"] and not reasons,
        "not_comparable_because": reasons,
        "exact_match": sum(g.strip().lower() in {r.strip().lower() for r in rs} for g, rs in zip(generated, refs))
        / len(ok),
        "empty_captions": sum(not c.strip() for c in generated),
    }
    rows = [(LABELS[k], metrics[k]) for k in LABELS if k in metrics] + [("exact match", metrics["exact_match"])]
    how = ", ".join(f"{k}={v}" for k, v in sorted(metrics["generation"].items()))
    sections = [_head(metrics), f"## Captioning {len(ok)} videos of {ds.source}\n\n"
                + markdown_table(["metric", "value"], rows)
                + f"\nGeneration: {how}. {metrics['references_per_video']:.2f} references per video; scored with "
                  f"pycocoevalcap, tokeniser {scores['tokenizer']}."
                + (f" Not comparable to published figures: {'; '.join(reasons)}." if reasons else "") + "\n"]
    figures = [("Videos with the generated (G) and reference (R) captions", plot_clip_strips(
        shown, generated[: len(shown)], refs[: len(shown)], out_dir / "captions.png"))]
    log.info("video captioning: CIDEr-D %s on %d videos (%d skipped)", metrics.get("cider_d"), len(ok), skipped.total)
    return metrics, sections, figures


def _answer_vocab(path: str | Path | None) -> set[str] | None:
    from .vqa import normalize_answer

    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--answers: no such file {str(p)!r}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--answers: {p} is not valid JSON ({exc})") from None
    if not isinstance(doc, (dict, list)) or not doc:
        raise ValueError(f"--answers: expected an answer -> label object (train_ans2label.json) or a list of answers, "
                         f"got {type(doc).__name__}")
    return {normalize_answer(str(a)) for a in doc}


def _qa_prompts(em: EvalModel, questions: list[str], template: str | None) -> list[list[int]]:
    """Prompt ids: a VQA / VideoQA run's own format, else ``template`` (default ``"{question} answer:"``)."""
    from .vqa import DEFAULT_PROMPT

    encoder = em.vqa_encoder
    if encoder is None and template is None:
        encoder = _videoqa_encoder(em)
    if encoder is not None and template is None:
        return [encoder.prompt(q) for q in questions]
    template = template or DEFAULT_PROMPT
    try:
        texts = [template.format(question=q) for q in questions]
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--prompt: expected a template with a {{question}} field, got {template!r} "
                         f"({type(exc).__name__}: {exc})") from None
    return em.prompt_ids(texts)


def _videoqa_encoder(em: EvalModel) -> Any:
    """The VQA prompt encoder of a run folder trained with ``train.task: videoqa`` (else None)."""
    from ..runs import read_run_config

    src = Path(em.source).expanduser()
    if not (src / "config.yaml").is_file():
        return None
    if (read_run_config(src).get("train") or {}).get("task") != "videoqa":
        return None
    from ..data.vqa import VqaEncoder

    return VqaEncoder(em.tokenizer, None)


def evaluate_videoqa(em: EvalModel, out_dir: Path, *, data: str | Path | None = None, videos: str | Path | None = None,
                     video_template: str | None = None, answers: str | Path | None = None, prompt: str | None = None,
                     frames: int | None = None, sampling: str = "uniform", stride: int | None = None,
                     emoji_questions: int = DEFAULT_EMOJI_CLIPS, generation: dict[str, Any] | None = None,
                     batch_size: int = 16, workers: int = 0, limit: int | None = None,
                     progress: bool = True) -> Result:
    """Answer every question about its video; accuracy overall and per question type."""
    from .captioning import _check_generation
    from .plots import plot_bars
    from .report import markdown_table
    from .vqa import normalize_answer

    em.require("generate", "videoqa")
    options = _check_generation({"max_new_tokens": 10, **(generation or {})})
    vocab = _answer_vocab(answers)
    vin = video_input(em, frames)
    qa: VideoQuestions = (moving_emoji_questions(emoji_questions, frames=vin.frames, image_size=vin.image_size)
                          if data is None else read_video_questions(data, videos, video_template=video_template))
    qs = [qa.questions[i] for i in seeded_subset(len(qa.questions), limit)]
    prompts = _qa_prompts(em, [q.question for q in qs], prompt)
    vids = list(dict.fromkeys(q.video_id for q in qs))
    by_video: dict[str, list[int]] = {}
    for j, q in enumerate(qs):
        by_video.setdefault(q.video_id, []).append(j)
    items = [qa.clips[v] if qa.clips is not None else qa.paths[v] for v in vids]
    skipped = SkipCount()
    predicted: dict[int, str] = {}
    shown: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    for idx, clips in clip_batches(items, vin, skipped, sampling=sampling, stride=stride, batch_size=batch_size,
                                   workers=workers, progress=progress, desc="videoqa"):
        rows = [(b, j) for b, i in enumerate(idx) for j in by_video[vids[i]]]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            pick = torch.tensor([b for b, _ in chunk])
            out = generate_clips(em, vin, clips[pick], [prompts[j] for _, j in chunk], **options)
            predicted.update({j: a for (_, j), a in zip(chunk, out)})
            for b, j in chunk:
                if len(shown) < 8:
                    shown[j] = clips[b]
    seconds = time.perf_counter() - t0
    if not predicted:
        raise ValueError(f"--data: expected readable videos for the questions, got none ({skipped.total} skipped)")
    done = sorted(predicted)
    oov = [j for j in done if vocab is not None and normalize_answer(qs[j].answer) not in vocab]
    correct = [float(j not in oov and normalize_answer(predicted[j]) == normalize_answer(qs[j].answer)) for j in done]
    per_type: dict[str, dict[str, float]] = {}
    for t in sorted({qs[j].qtype for j in done}):
        vals = [c for c, j in zip(correct, done) if qs[j].qtype == t]
        per_type[t] = {"accuracy": sum(vals) / len(vals), "n": len(vals)}
    facts = _facts(vin, sampling, stride, skipped, len(vids) - skipped.total, seconds, limit, len(qa.questions),
                   len(qs), qa.clips is not None)
    facts["n_total_unit"] = "questions"
    metrics: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct), "n_questions": len(done), "questions_skipped": len(qs) - len(done),
        "per_question_type": per_type, "oov_answers": len(oov) if vocab is not None else None,
        "answer_vocabulary": len(vocab) if vocab is not None else None, "layout": qa.layout,
        "data_left_out": qa.left_out, "generation": options,
        "prompt": "the run's VQA prompt (BOS question answer:)" if prompt is None and (
            em.vqa_encoder is not None or _videoqa_encoder(em) is not None) else (prompt or "{question} answer:"),
        "scoring": "exact match after VQAv2 answer processing (lower case, articles, punctuation, number words)"
                   + ("; a reference answer outside --answers counts as wrong" if vocab is not None else ""),
        **facts, "questions_per_s": len(done) / seconds if seconds > 0 else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.json").write_text(json.dumps(
        [{"question_id": qs[j].question_id, "video_id": qs[j].video_id, "answer": predicted[j]} for j in done],
        indent=1))
    common = Counter(normalize_answer(predicted[j]) for j in done).most_common(5)
    table = markdown_table(["question type", "questions", "accuracy"],
                           [(t, v["n"], v["accuracy"]) for t, v in per_type.items()]
                           + [("**all**", len(done), metrics["accuracy"])])
    sections = [_head(metrics), f"## VideoQA accuracy on {len(done)} questions of {qa.source}\n\n{table}\n"
                f"Prompt: {metrics['prompt']!r}. Scoring: {metrics['scoring']}."
                + (f" {len(oov)} reference answers are outside the vocabulary." if vocab is not None else "")
                + " Most common answers: " + ", ".join(f"{a!r} ({n})" for a, n in common) + ".\n"]
    js = list(shown)
    figures = [
        ("Accuracy per question type", plot_bars({t: v["accuracy"] for t, v in per_type.items()},
                                                 out_dir / "accuracy_per_type.png",
                                                 title="VideoQA accuracy per question type",
                                                 counts={t: int(v["n"]) for t, v in per_type.items()})),
        ("Questions with the model's answer (A) and the reference (R)", plot_clip_strips(
            [shown[j] for j in js], [f"{qs[j].question} {predicted[j]}" for j in js],
            [[f"{qs[j].question} {qs[j].answer}"] for j in js], out_dir / "examples.png", labels=("A", "R"))),
    ]
    log.info("videoqa: accuracy %.4f on %d questions", metrics["accuracy"], len(done))
    return metrics, sections, figures
