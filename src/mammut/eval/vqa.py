"""VQA accuracy: the VQAv2 evaluation rule (answer processing only where annotators differ, and
"3 annotators" leave-one-out accuracy), per question type, and the ``mammut eval vqa`` benchmark
that scores a model with it (:func:`evaluate_vqa`; its options: :mod:`mammut.eval.benchmarks.vqa`).
The ``vqa`` training task (:mod:`mammut.tasks.vqa`) scores its held-out questions with the same rule.

Written to give the number the official VQAv2 evaluation (GT-Vision-Lab/VQA, ``vqaEval.py``,
which the evaluation server runs) gives for the same answers, quirks included:

* Every answer, predicted or reference, has newlines and tabs turned into spaces and is stripped.
* **If the (ten) reference answers are all the same string**, the prediction must equal it
  exactly after that: no lower-casing, no punctuation, number or article processing (``"yes."``,
  ``"Yes"``, ``"two"`` and ``"the dog"`` all score 0 against ten ``"yes"`` / ``"2"`` / ``"dog"``).
  This is a large share of VQAv2 (most yes/no questions), so it matters for any model whose
  answers are not in the annotators' exact form, not only for unclean references.
* **Otherwise** prediction and references go through :func:`normalize_answer`:

  1. punctuation: the marks ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are each deleted if
     that mark stands next to a space anywhere in the answer, or if the answer holds a
     digit-comma-digit anywhere (``100,978`` -> ``100978``; then every listed mark is deleted),
     and otherwise become a space. Other marks (``' : # $ % & * ^ | ~``) are kept;
  2. a period not followed by a digit is removed (``end.`` -> ``end``, ``3.5`` stays; as in the
     official code at most 32 per answer);
  3. lower-case; per word: ``none``, ``zero`` .. ``ten`` become digits, the articles ``a``,
     ``an``, ``the`` are dropped, and a contraction missing one of its apostrophes gets it back
     (``dont`` -> ``don't``, ``couldnt've`` -> ``couldn't've``; not ``couldntve``), with the
     official table's word list (no ``im``, ``shes``, ``its``, ``well``, ...) and its one inverted
     entry (``somebody'd`` -> ``somebodyd``).

Accuracy of one answer against ``n`` reference answers: ``min(#equal references / min(3, n), 1)``,
so three agreeing annotators make an answer fully right. ``leave_one_out=True`` averages that
over the ``n`` subsets of ``n - 1`` references, the official protocol for VQAv2's ten answers per
question. Outside VQAv2's protocol, a single reference (e.g. generated training data) is compared
after :func:`normalize_answer` on both sides.

``mammut eval vqa SOURCE --questions Q.json --annotations A.json --images DIR``
(:func:`evaluate_vqa`): VQAv2's questions and annotations files (see
:func:`mammut.data.formats.read_vqa` for the image file names). Each question is answered by
prompted generation (greedy by default) from the image: a run folder fine-tuned with
``train.task: vqa`` uses the prompt it was trained on (``BOS [<image>] question "answer:"``,
``mammut.data.vqa.VqaEncoder``); any other model gets ``--prompt`` (default
``"{question} answer:"``, the same words) after its start token, and a media model (Flamingo)
its ``<image>`` token right after the start token. Scored by the rule above: overall, per answer
type (``yes/no``, ``number``, ``other``) and per question type. The model's answers are written
unchanged to ``answers.json`` (the official results format, ``[{"question_id", "answer"}]``):
the official evaluation of that file gives the accuracy reported here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..data.formats import VqaQuestion
    from .model_source import EvalModel

log = logging.getLogger(__name__)

__all__ = ["normalize_answer", "vqa_accuracy", "accuracy_by_type", "vqa_table", "NUMBER_WORDS", "CONTRACTIONS",
           "evaluate_vqa", "question_accuracy", "DEFAULT_PROMPT"]

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# contractions written without their apostrophe -> with it: the words of the official table; words
# that are also ordinary English words ("its", "well", "were", "shed", "hell", "id", "lets") and
# "i'm", "i've", "i'd've", "she's" (whose table keys never match a lower-cased word) are not in it
_CONTRACTED = (
    "ain't aren't can't couldn't could've couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_forms(word: str) -> set[str]:
    """Spellings of ``word`` with exactly one of its apostrophes left out (``couldn't've`` ->
    ``couldnt've``, ``couldn'tve``)."""
    cuts = [i for i, c in enumerate(word) if c == "'"]
    return {word[:i] + word[i + 1:] for i in cuts}


CONTRACTIONS: dict[str, str] = {form: word for word in _CONTRACTED for form in _contraction_forms(word)}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table's inverted entry

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the official code passes re.UNICODE (32) where re.sub takes its count


def _clean(answer: str, arg: str) -> str:
    if not isinstance(answer, str):
        raise TypeError(f"{arg}: expected a str, got {type(answer).__name__}")
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The VQAv2 answer processing (see the module docstring; applied where the references
    differ), e.g. ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat's  toy!"`` -> ``"cat's toy"``,
    ``"dont"`` -> ``"don't"``, ``"$5"`` -> ``"$5"``."""
    text = _clean(answer, "answer")
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _NON_DECIMAL_PERIOD.sub("", out, count=_MAX_PERIODS)
    words = []
    for word in out.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, references: str | Sequence[str], *, leave_one_out: bool = False) -> float:
    """Accuracy in ``[0, 1]`` of ``prediction`` against reference answers (one string or several,
    e.g. VQAv2's ten): ``min(#references equal to it / min(3, n), 1)``; ``leave_one_out`` averages
    it over the ``n`` subsets of ``n - 1`` references (VQAv2's official protocol; needs ``n >= 2``).

    Equality as in the official VQAv2 evaluation: answers are compared as given (newlines and tabs
    made spaces, stripped) when the references are all the same string, and after
    :func:`normalize_answer` when they differ; a single reference: after :func:`normalize_answer`."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references: expected at least one reference answer, got none")
    pred = _clean(prediction, "prediction")
    refs = [_clean(r, "references") for r in refs]
    if len(refs) == 1 or len(set(refs)) > 1:
        pred, refs = normalize_answer(pred), [normalize_answer(r) for r in refs]
    equal = [r == pred for r in refs]
    if not leave_one_out:
        return min(sum(equal) / min(3, len(refs)), 1.0)
    if len(refs) < 2:
        raise ValueError(f"references: leave_one_out needs at least 2 reference answers, got {len(refs)}")
    total = sum(equal)
    k = min(3, len(refs) - 1)
    return sum(min((total - e) / k, 1.0) for e in equal) / len(refs)


def accuracy_by_type(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                     types: Sequence[str], *, baseline: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy overall and per question type: ``{"accuracy", "n", "per_type": {type: {"n",
    "accuracy", "majority_answer", "majority_accuracy"[, "baseline_accuracy"]}}[,
    "baseline_accuracy"]}``.

    ``baseline``: a second set of predictions for the same questions (e.g. the text-only model),
    scored alike. ``majority_accuracy``: what always answering the type's most common
    (normalised) reference would score, the best guess that reads neither image nor question."""
    n = len(predictions)
    if len(references) != n or len(types) != n or (baseline is not None and len(baseline) != n):
        raise ValueError(f"references / types / baseline: expected {n} entries each (one per prediction), got "
                         f"{len(references)} / {len(types)} / {None if baseline is None else len(baseline)}")
    if n == 0:
        raise ValueError("predictions: expected at least one answer, got none")
    acc = [vqa_accuracy(p, r) for p, r in zip(predictions, references)]
    base = [vqa_accuracy(p, r) for p, r in zip(baseline, references)] if baseline is not None else None
    per_type: dict[str, dict[str, Any]] = {}
    for t in sorted(set(types)):
        idx = [i for i, ti in enumerate(types) if ti == t]
        firsts = [normalize_answer(references[i] if isinstance(references[i], str) else references[i][0]) for i in idx]
        common, _ = Counter(firsts).most_common(1)[0]
        row: dict[str, Any] = {"n": len(idx), "accuracy": sum(acc[i] for i in idx) / len(idx),
                               "majority_answer": common,
                               "majority_accuracy": sum(vqa_accuracy(common, references[i]) for i in idx) / len(idx)}
        if base is not None:
            row["baseline_accuracy"] = sum(base[i] for i in idx) / len(idx)
        per_type[t] = row
    out: dict[str, Any] = {"accuracy": sum(acc) / n, "n": n, "per_type": per_type}
    if base is not None:
        out["baseline_accuracy"] = sum(base) / n
    return out


def vqa_table(result: Mapping[str, Any], *, baseline: str = "text-only (image blanked)") -> str:
    """Markdown table of :func:`accuracy_by_type`'s result: one row per type and one overall."""
    has_base = "baseline_accuracy" in result
    head = "| question type | n | accuracy |" + (f" {baseline} |" if has_base else "") + " most common answer |"
    lines = [head, "|---|---|---|" + ("---|" if has_base else "") + "---|"]

    def row(name: str, r: Mapping[str, Any], majority: str) -> str:
        base = f" {r['baseline_accuracy']:.3f} |" if has_base else ""
        return f"| {name} | {r['n']} | {r['accuracy']:.3f} |{base} {majority} |"

    for t, r in result["per_type"].items():
        lines.append(row(t, r, f"{r['majority_accuracy']:.3f} ({r['majority_answer']!r})"))
    lines.append(row("**all**", result, ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the benchmark

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
    import torch

    from ..data.formats import read_vqa
    from ..generation import GenerationConfig
    from .images import SkipCount, coverage, image_batches, seeded_subset
    from .plots import plot_bars, plot_image_grid
    from .report import markdown_table

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
