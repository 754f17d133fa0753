"""VQA accuracy: ``mammut eval vqa SOURCE --questions Q.json --annotations A.json --images DIR``.

Data: VQAv2's questions and annotations files (see :func:`mammut.data.formats.read_vqa` for
the image file names). Each question is answered by prompted generation (greedy by default)
from the image: a run folder fine-tuned with ``train.task: vqa`` uses the prompt it was trained
on (``BOS [<image>] question "answer:"``, ``mammut.tasks.vqa.VqaEncoder``); any other model gets
``--prompt`` (default ``"{question} answer:"``, the same words) after its start token, and a
media model (Flamingo) its ``<image>`` token right after the start token.

Scoring: the official VQAv2 evaluation's rule (:mod:`mammut.eval.vqa`): answers compared as
given where the annotators' answers are all the same string, after VQAv2's answer processing
where they differ; accuracy ``min(#equal annotator answers / 3, 1)`` averaged over the
leave-one-out subsets of the (ten) answers, overall, per answer type (``yes/no``, ``number``,
``other``) and per question type. The model's answers are written unchanged as ``answers.json``
in the official results format (``[{"question_id", "answer"}]``); the official evaluation of that
file gives the accuracy reported here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..data.formats import VqaQuestion, read_vqa
from .images import SkipCount, coverage, image_batches, seeded_subset
from .model_source import EvalModel
from .plots import plot_bars, plot_image_grid
from .report import markdown_table
from .vqa import normalize_answer, vqa_accuracy

log = logging.getLogger(__name__)

__all__ = ["evaluate_vqa", "question_accuracy", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "{question} answer:"


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one answer (the official rule, :func:`mammut.eval.vqa.vqa_accuracy`):
    leave-one-out over the annotators' answers (a single answer: match after normalisation)."""
    return vqa_accuracy(prediction, answers, leave_one_out=len(answers) >= 2)


def _prompts(em: EvalModel, questions: list[VqaQuestion], template: str | None) -> list[list[int]]:
    if em.vqa_encoder is not None and template is None:
        return [em.vqa_encoder.prompt(q.question) for q in questions]
    template = template or DEFAULT_PROMPT
    try:
        texts = [template.format(question=q.question) for q in questions]
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--prompt: expected a template with a {{question}} field, got {template!r} "
                         f"({type(exc).__name__}: {exc})") from None
    ids = em.prompt_ids(texts)
    if em.media:
        media = em.model.config.media_token_id  # type: ignore[union-attr]
        ids = [row[:1] + [media] + row[1:] for row in ids]
    return ids


def _breakdown(acc: list[float], keys: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for k in sorted(set(keys)):
        vals = [a for a, kk in zip(acc, keys) if kk == k]
        out[k] = {"accuracy": sum(vals) / len(vals), "n": len(vals)}
    return out


def evaluate_vqa(em: EvalModel, questions: str | Path, annotations: str | Path, images: str | Path, out_dir: Path, *,
                 prompt: str | None = None, image_template: str | None = None,
                 generation: dict[str, Any] | None = None, batch_size: int = 32, workers: int = 0,
                 limit: int | None = None, progress: bool = True,
                 grid: int = 16) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """Answer and score the questions; returns ``(metrics, report sections, figures)``."""
    from ..generation import GenerationConfig

    em.require("generate", "vqa")
    options = {"max_new_tokens": 10, **(generation or {})}
    GenerationConfig(**options)  # a bad option fails before any image is read
    vqa = read_vqa(questions, annotations, images, image_template=image_template)
    qs = [vqa.questions[i] for i in seeded_subset(len(vqa.questions), limit)]
    prompts = _prompts(em, qs, prompt)
    image_ids = list(dict.fromkeys(q.image_id for q in qs))
    by_image: dict[Any, list[int]] = {}
    for j, q in enumerate(qs):
        by_image.setdefault(q.image_id, []).append(j)
    paths = [vqa.image_paths[i] for i in image_ids]

    skipped = SkipCount()
    answers: dict[int, str] = {}
    t0 = time.perf_counter()
    for idx, batch in image_batches(paths, em.preprocess, skipped, batch_size=batch_size, workers=workers,
                                    progress=progress, desc="vqa images"):
        rows = [(b, j) for b, i in enumerate(idx) for j in by_image[image_ids[i]]]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            pick = torch.tensor([b for b, _ in chunk])
            out = em.generate(batch[pick], [prompts[j] for _, j in chunk], **options)
            answers.update({j: a for (_, j), a in zip(chunk, out)})
    gen_s = time.perf_counter() - t0
    if not answers:
        raise ValueError(f"--images: expected readable images for the questions, got none ({skipped.total} skipped)")
    done = sorted(answers)
    acc = [question_accuracy(answers[j], qs[j].answers) for j in done]
    metrics: dict[str, Any] = {
        "accuracy": sum(acc) / len(acc), "n_questions": len(done), "n_images": len(image_ids) - skipped.total,
        "questions_skipped": len(qs) - len(done), "unannotated_questions": vqa.unannotated,
        "per_answer_type": _breakdown(acc, [qs[j].answer_type for j in done]),
        "per_question_type": _breakdown(acc, [qs[j].question_type for j in done]),
        "answers_per_question": sum(len(qs[j].answers) for j in done) / len(done),
        "prompt": "the run's VQA prompt (BOS [<image>] question answer:)" if em.vqa_encoder is not None
        and prompt is None else (prompt or DEFAULT_PROMPT),
        "generation": options, "skipped": skipped.as_dict(),
        **coverage(limit, len(vqa.questions), len(qs), skipped.total, unit="questions"),
        "questions_per_s": len(done) / gen_s if gen_s > 0 else None,
        "scoring": "official VQAv2 rule: answers compared as given where the annotators' answers are all the same, "
                   "after VQAv2 answer processing (mammut.eval.vqa) where they differ; min(#equal answers / 3, 1) "
                   "averaged over the leave-one-out subsets of the annotators' answers; answers.json holds the "
                   "answers unchanged",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.json").write_text(json.dumps(
        [{"question_id": qs[j].question_id, "answer": answers[j]} for j in done], indent=1))
    common = Counter(normalize_answer(answers[j]) for j in done).most_common(5)
    per_type = metrics["per_answer_type"]
    table = markdown_table(["answer type", "questions", "accuracy"],
                           [(t, v["n"], v["accuracy"]) for t, v in per_type.items()]
                           + [("**all**", len(done), metrics["accuracy"])])
    qtypes = sorted(metrics["per_question_type"].items(), key=lambda kv: -kv[1]["n"])[:15]
    sections = [f"## VQA accuracy on {len(done)} questions ({metrics['n_images']} images)\n\n{table}\n"
                f"Prompt: {metrics['prompt']!r}. Scoring: {metrics['scoring']}. Most common answers: "
                + ", ".join(f"{a!r} ({n})" for a, n in common) + ".\n"]
    if len(metrics["per_question_type"]) > 1:
        sections.append("Most frequent question types:\n\n" + markdown_table(
            ["question type", "questions", "accuracy"], [(t, v["n"], v["accuracy"]) for t, v in qtypes]))
    shown = done[:grid]
    first_of = {j: image_ids.index(qs[j].image_id) for j in shown}
    figures = [
        ("Accuracy per answer type", plot_bars({t: v["accuracy"] for t, v in per_type.items()},
                                               out_dir / "accuracy_per_type.png", title="VQA accuracy per answer type",
                                               counts={t: int(v["n"]) for t, v in per_type.items()})),
        ("Questions with the model's answer (A) and the most common reference answers (R)", plot_image_grid(
            [paths[first_of[j]] for j in shown], [f"{qs[j].question} {answers[j]}" for j in shown],
            [[f"{qs[j].question} " + ", ".join(a for a, _ in Counter(qs[j].answers).most_common(3))] for j in shown],
            out_dir / "examples.png", n=grid, labels=("A", "R"))),
    ]
    log.info("vqa: accuracy %.4f on %d questions (%d skipped with their images)", metrics["accuracy"], len(done),
             metrics["questions_skipped"])
    return metrics, sections, figures
