"""VQA accuracy: the VQAv2 answer normalisation and the "3 annotators" rule, per question type.

Written from the published description of the VQA evaluation (visualqa.org/evaluation):

1. whitespace (newlines, tabs) becomes one space; everything is lower-cased;
2. a comma between two digits is dropped (``100,978`` -> ``100978``); every other punctuation
   mark except the apostrophe (possessives: ``girl's``), the colon (times: ``2:50``) and the
   period becomes a space;
3. periods are removed unless they are a decimal point (followed by a digit: ``3.5``);
4. per word: number words become digits (``zero`` .. ``ten``; ``none`` -> ``0`` as in the
   reference script), the articles ``a``, ``an``, ``the`` are dropped, and a contraction missing
   its apostrophe gets it back (``dont`` -> ``don't``).

The same processing is applied to the reference answers (the reference script skips it when
all ten annotators gave the same string; VQAv2's stored answers are already clean, so the
difference only matters for data that is not). Where the reference script deletes a mark
instead of spacing it (when the same mark also sits next to a space, or a digit,digit occurs
anywhere in the answer), this module follows the published description: a space.

Accuracy of one answer against ``n`` reference answers: ``min(#equal references / min(3, n), 1)``
after normalisation, so three agreeing annotators make an answer fully right and a single
reference is an exact match. ``leave_one_out=True`` averages that over the ``n`` subsets of
``n - 1`` references, the official protocol for VQAv2's ten answers per question.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["normalize_answer", "vqa_accuracy", "accuracy_by_type", "vqa_table", "NUMBER_WORDS", "CONTRACTIONS"]

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# contractions written without their apostrophe -> with it; words that are also ordinary
# English words ("its", "well", "were", "shed", "hell", "id", "lets") are left alone
_CONTRACTED = (
    "ain't aren't can't couldn't could've couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_forms(word: str) -> set[str]:
    """Spellings of ``word`` with some of its apostrophes left out (``couldn't've`` ->
    ``couldntve``, ``couldnt've``, ``couldn'tve``)."""
    parts = word.split("'")
    forms = {parts[0]}
    for part in parts[1:]:
        forms = {f + sep + part for f in forms for sep in ("", "'")}
    return {f for f in forms if f != word}


CONTRACTIONS: dict[str, str] = {form: word for word in _CONTRACTED for form in _contraction_forms(word)}

_PUNCT_TO_SPACE = re.compile("[" + re.escape("".join(c for c in string.punctuation if c not in "':.")) + "]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """The VQAv2 normalisation of one answer (see the module docstring), e.g.
    ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat's  toy!"`` -> ``"cat's toy"``, ``"dont"`` -> ``"don't"``."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
    text = " ".join(answer.split()).lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PUNCT_TO_SPACE.sub(" ", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: str | Sequence[str], *, leave_one_out: bool = False) -> float:
    """Accuracy in ``[0, 1]`` of ``prediction`` against reference answers (one string or several,
    e.g. VQAv2's ten): ``min(#references equal to it / min(3, n), 1)`` after
    :func:`normalize_answer`; ``leave_one_out`` averages it over the ``n`` subsets of ``n - 1``
    references (VQAv2's official protocol; needs ``n >= 2``)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references: expected at least one reference answer, got none")
    pred = normalize_answer(prediction)
    equal = [normalize_answer(r) == pred for r in refs]
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
