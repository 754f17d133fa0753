"""Caption metrics through pycocoevalcap (the coco-caption scorers): BLEU-1..4, METEOR,
ROUGE-L, CIDEr-D and, on request, SPICE.

:func:`caption_scores` scores candidates (one per image) against each image's references.

Tokenisation: coco-caption's protocol lower-cases and tokenises every caption with the Stanford
PTB tokenizer (``stanford-corenlp-3.4.1.jar``, shipped in pycocoevalcap, needs ``java``) and
drops punctuation tokens. With ``java`` on PATH this module runs that jar (through stdin, so it
writes no temporary file into the installed package and keeps the jar's log line off the
console) and drops pycocoevalcap's own punctuation list. Without Java it uses
:func:`simple_ptb_tokenize`, a regular-expression stand-in (lower case; ``n't``, ``'s``, ``'re``,
``'ve``, ``'ll``, ``'d``, ``'m`` split off and brackets written ``-lrb-`` ... as PTB does;
pycocoevalcap's punctuation tokens dropped): identical on plain captions, possibly different on
unusual punctuation (abbreviations such as ``a.m.``). ``metrics["tokenizer"]`` says which ran.

METEOR runs the METEOR 1.5 jar (Java, about 2 GB of heap): without ``java`` it is reported as
absent (``None``, with the reason in ``metrics["absent"]``). SPICE is off by default: it needs
Java 8 and downloads Stanford CoreNLP on first use.

CIDEr here is pycocoevalcap's ``Cider`` scorer, which computes CIDEr-D (clipped n-gram counts,
Gaussian length penalty with sigma 6, times 10), with document frequencies over the references
of the scored set, so a set of one image scores 0.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["caption_scores", "java_available", "ptb_tokenize", "simple_ptb_tokenize", "check_captions", "METRICS",
           "NO_JAVA"]

METRICS: tuple[str, ...] = ("bleu", "meteor", "rouge_l", "cider_d")
NO_JAVA = "java is not on PATH"  # the reason in ``absent`` of a metric not computed for want of Java

_CLITIC = r"n't|'(?:s|re|ve|ll|d|m)\b"
_SIMPLE = re.compile(rf"\w+?(?={_CLITIC})|{_CLITIC}|\w+(?:[-./']\w+)*|\.\.\.|--|[^\w\s]")
_DROP = frozenset({".", "?", "!", ",", ":", ";", "-", "--", "...", "'", '"', "`"})
# PTB writes brackets as -LRB- ... (lower-cased by -lowerCase, so pycocoevalcap's list, in upper case, keeps them)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def check_captions(candidates: object, references: object) -> tuple[list[str], list[list[str]]]:
    """``candidates`` (one string per item) and ``references`` (a non-empty list of strings per item)."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a list of str, got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"references must be a list of lists of str, got {type(references).__name__}")
    if len(candidates) != len(references):
        raise ValueError(f"candidates and references must have equal length, got {len(candidates)} and {len(references)}")
    if len(candidates) == 0:
        raise ValueError("candidates must not be empty")
    for i, c in enumerate(candidates):
        if not isinstance(c, str):
            raise TypeError(f"candidates[{i}] must be a str, got {type(c).__name__}")
    refs: list[list[str]] = []
    for i, r in enumerate(references):
        if isinstance(r, str) or not isinstance(r, Sequence) or len(r) == 0 or not all(isinstance(s, str) for s in r):
            raise TypeError(f"references[{i}] must be a non-empty list of str, got {r!r:.80}")
        refs.append(list(r))
    return list(candidates), refs


def simple_ptb_tokenize(text: str) -> str:
    """The Java-free stand-in for coco-caption's PTB tokenisation of one caption (see the
    module docstring): lower-cased tokens joined by single spaces, punctuation dropped."""
    return " ".join(_BRACKETS.get(t, t) for t in _SIMPLE.findall(text.lower()) if t not in _DROP)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """coco-caption's tokenisation of each text: the Stanford PTB tokenizer jar that
    pycocoevalcap ships (lower-cased, one line per text), then pycocoevalcap's punctuation
    tokens dropped. Needs ``java``."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = "\n".join(" ".join(t.split()) for t in texts) + "\n"
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
           "-encoding", "UTF-8"]
    done = subprocess.run(cmd, input=lines.encode("utf-8"), capture_output=True, check=False)
    out = done.stdout.decode("utf-8").split("\n")
    if done.returncode != 0 or len(out) < len(texts):
        raise RuntimeError(f"PTB tokenizer ({jar.name}) failed with exit code {done.returncode}: "
                           f"{done.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    drop = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in drop) for line in out[:len(texts)]]


def _tokenize(texts: list[str], tokenizer: str) -> tuple[list[str], str, str | None]:
    """Tokenised texts, which tokenizer ran, and why the stand-in ran under ``auto`` when Java
    is there but the PTB jar failed (the evaluation goes on, marked not comparable)."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer: expected 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        if not java_available():
            raise ValueError("tokenizer: 'ptb' needs java on PATH, got none (use 'simple' or 'auto')")
        try:
            return ptb_tokenize(texts), "ptb", None
        except RuntimeError as exc:
            if tokenizer == "ptb":
                raise
            log.warning("%s; scoring with the regular-expression stand-in instead", exc)
            return [simple_ptb_tokenize(t) for t in texts], "simple", str(exc)
    return [simple_ptb_tokenize(t) for t in texts], "simple", None


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, list[float], str | None]:
    if not java_available():
        return None, [], NO_JAVA
    from pycocoevalcap.meteor.meteor import Meteor

    clean = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    try:
        scorer = Meteor()
        try:
            score, scores = scorer.compute_score(clean, res)
        finally:
            del scorer
    except (OSError, ValueError) as exc:  # the jar did not start or answered nothing (e.g. too little memory)
        return None, [], f"the METEOR jar failed: {type(exc).__name__}: {exc}"
    return float(score), [float(s) for s in scores], None


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, str | None]:
    if not java_available():
        return None, NO_JAVA
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        return None, f"SPICE failed: {type(exc).__name__}: {exc}"
    return float(score), None


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                   metrics: Sequence[str] = METRICS, spice: bool = False, tokenizer: str = "auto",
                   per_item: bool = False) -> dict[str, Any]:
    """Corpus scores of ``candidates[i]`` against ``references[i]`` (any number each), all in
    coco-caption's scale (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr-D in [0, 10]).

    ``metrics``: any of ``"bleu"`` (gives ``bleu1`` .. ``bleu4``), ``"meteor"``, ``"rouge_l"``,
    ``"cider_d"``; ``spice`` adds ``"spice"``. ``tokenizer``: ``"auto"`` (PTB with Java, else the
    stand-in), ``"ptb"`` or ``"simple"``. Returns the scores, ``"n"``, ``"tokenizer"``,
    ``"absent"`` (metric -> why it is ``None``) and with ``per_item`` the per-caption
    ``bleu4``, ``meteor`` and ``cider_d`` under ``"per_item"``."""
    cands, refs = check_captions(candidates, references)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or isinstance(metrics, str):
        raise ValueError(f"metrics: expected some of {METRICS}, got {metrics!r}")
    sizes = [len(r) for r in refs]
    flat, how, failed = _tokenize(cands + [r for rs in refs for r in rs], tokenizer)
    res = {i: [flat[i]] for i in range(len(cands))}
    gts: dict[int, list[str]] = {}
    pos = len(cands)
    for i, k in enumerate(sizes):
        gts[i] = flat[pos:pos + k]
        pos += k
    out: dict[str, Any] = {"n": len(cands), "references_per_image": sum(sizes) / len(sizes), "tokenizer": how}
    if failed:
        out["tokenizer_failed"] = failed
    absent: dict[str, str] = {}
    items: dict[str, list[float]] = {}
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"bleu{n + 1}": float(s) for n, s in enumerate(score)})
        items["bleu4"] = [float(s) for s in scores[3]]
    if "meteor" in metrics:
        out["meteor"], scores, why = _meteor(gts, res)
        if why:
            absent["meteor"] = why
        else:
            items["meteor"] = scores
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider_d" in metrics:
        from pycocoevalcap.cider.cider import Cider

        score, scores = Cider().compute_score(gts, res)
        out["cider_d"] = float(score)
        items["cider_d"] = [float(s) for s in scores]
    if spice:
        out["spice"], why = _spice(gts, res)
        if why:
            absent["spice"] = why
    for name, why in absent.items():
        log.warning("%s not computed: %s", name, why)
    out["absent"] = absent
    if per_item:
        out["per_item"] = items
    return out
