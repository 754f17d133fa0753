"""Captioning: ``mammut eval caption SOURCE --data captions.json --images DIR``.

Data: a COCO-captions annotation file, a Karpathy-split JSON (``--split test`` by default) or
a CSV/TSV (see :mod:`mammut.data.formats`). Every image gets one caption from the model
(greedy by default; beam search with ``--beams N``; lengths and penalties are
``GenerationConfig`` fields), scored against all of its references with pycocoevalcap
(:mod:`mammut.eval.caption_metrics`: BLEU-1..4, METEOR when Java is present, ROUGE-L, CIDEr-D,
SPICE on request). The captions are also written as ``captions.json`` in the COCO results
format (``[{"image_id", "caption"}]``) for the official evaluation server.

``comparable_to_published`` in metrics.json is false, with the reasons in
``not_comparable_because``, when a ``--limit`` subset was evaluated, images were skipped, the
captions were not tokenised with the PTB tokenizer (no Java, or ``--tokenizer simple``) or a
metric could not be computed (METEOR without Java).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..data.formats import read_captioned_images
from .caption_metrics import NO_JAVA, caption_scores
from .images import SkipCount, coverage, image_batches, seeded_subset
from .model_source import EvalModel
from .plots import plot_image_grid
from .report import markdown_table
from .retrieval import coverage_reasons

log = logging.getLogger(__name__)

__all__ = ["evaluate_captioning", "scoring_reasons", "LABELS"]

LABELS: dict[str, str] = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
                          "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "spice": "SPICE"}


def _check_generation(options: dict[str, Any]) -> dict[str, Any]:
    """The generation options checked now (a ``GenerationConfig`` is built from them), so a bad
    value fails before any image is read."""
    from ..generation import GenerationConfig

    GenerationConfig(**options)
    return dict(options)


def scoring_reasons(scores: dict[str, Any], tokenizer: str) -> list[str]:
    """Why caption scores from :func:`caption_scores` are not coco-caption's: a tokenizer other
    than PTB, metrics that could not be computed (one line per cause)."""
    absent = dict(scores["absent"])
    reasons = []
    if scores["tokenizer"] != "ptb":
        stand_in = "captions tokenised with the regular-expression stand-in for the PTB tokenizer"
        if tokenizer == "simple":
            reasons.append(f"--tokenizer simple: {stand_in}")
        elif scores.get("tokenizer_failed"):
            reasons.append(f"{scores['tokenizer_failed']}: {stand_in}")
        else:
            no_java = [LABELS[k] for k, why in absent.items() if why == NO_JAVA]
            absent = {k: why for k, why in absent.items() if why != NO_JAVA}
            reasons.append(f"java not found: {stand_in}" + (f", and {' and '.join(no_java)} not computed"
                                                            if no_java else ""))
    reasons += [f"{LABELS.get(k, k)} not computed: {why}" for k, why in absent.items()]
    return reasons


def evaluate_captioning(em: EvalModel, data: str | Path, out_dir: Path, *, images: str | Path | None = None,
                        split: str | None = "test", img_key: str = "filepath", caption_key: str = "title",
                        generation: dict[str, Any] | None = None, spice: bool = False, tokenizer: str = "auto",
                        batch_size: int = 32, workers: int = 0, limit: int | None = None, progress: bool = True,
                        grid: int = 16) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """Caption every image of ``data`` and score the captions; returns ``(metrics, report
    sections, figures)``."""
    em.require("generate", "caption")
    options = _check_generation(generation or {})
    ds = read_captioned_images(data, images, split=split, img_key=img_key, caption_key=caption_key)
    keep = seeded_subset(len(ds.paths), limit)
    paths = [ds.paths[i] for i in keep]
    refs = [ds.captions[i] for i in keep]
    ids = [ds.ids[i] for i in keep]

    skipped = SkipCount()
    generated: list[str] = []
    ok: list[int] = []
    t0 = time.perf_counter()
    for idx, batch in image_batches(paths, em.preprocess, skipped, batch_size=batch_size, workers=workers,
                                    progress=progress, desc="captioning"):
        generated += em.generate(batch, **options)
        ok += idx
    gen_s = time.perf_counter() - t0
    if not ok:
        raise ValueError(f"--data: expected readable images for {ds.source}, got none ({skipped.total} skipped)")
    scores = caption_scores(generated, [refs[i] for i in ok], spice=spice, tokenizer=tokenizer, per_item=True)
    per_item = scores.pop("per_item")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [{"image_id": ids[i], "file": str(paths[i]), "caption": c} for i, c in zip(ok, generated)]
    (out_dir / "captions.json").write_text(json.dumps(results, indent=1))
    cov = coverage(limit, len(ds.paths), len(keep), skipped.total)
    reasons = coverage_reasons(limit, len(ds.paths), len(keep), skipped.total) + scoring_reasons(scores, tokenizer)
    metrics: dict[str, Any] = {
        **{k: scores.get(k) for k in LABELS if k in scores}, "n_images": len(ok),
        "references_per_image": scores["references_per_image"], "tokenizer": scores["tokenizer"],
        "absent": scores["absent"], "generation": options or {"strategy": "greedy"}, "layout": ds.layout,
        "split": ds.split, "skipped": skipped.as_dict(),
        **cov, "comparable_to_published": cov["comparable_to_published"] and not reasons,
        "not_comparable_because": reasons, "data_left_out": ds.left_out(), "duplicate_images": ds.duplicate_images,
        "images_per_s": len(ok) / gen_s if gen_s > 0 else None,
        "mean_caption_words": sum(len(c.split()) for c in generated) / len(generated),
        "empty_captions": sum(not c.strip() for c in generated),
    }
    rows = [(LABELS[k], metrics[k]) for k in LABELS if k in metrics]
    notes = [f"{LABELS[k]} not computed: {why}." for k, why in scores["absent"].items()]
    token_note = ("captions tokenised with the Stanford PTB tokenizer (coco-caption's protocol)"
                  if scores["tokenizer"] == "ptb" else
                  "java not found: captions tokenised with the regular-expression stand-in for the PTB tokenizer "
                  "(figures can differ slightly from coco-caption's)")
    how = ", ".join(f"{k}={v}" for k, v in sorted(metrics["generation"].items()))
    where = f"{ds.source}" + (f", split {ds.split}" if ds.split else "")
    sections = [f"## Captioning {len(ok)} images of {where}\n\n" + markdown_table(["metric", "value"], rows)
                + f"\nGeneration: {how}. {metrics['references_per_image']:.2f} references per image; {token_note}. "
                  f"CIDEr-D is pycocoevalcap's CIDEr scorer. " + " ".join(notes)
                + (f" {ds.duplicate_images} duplicate image entries (a file listed again) were merged into the "
                   f"file's first entry, their references pooled." if ds.duplicate_images else "")
                + (f" Not comparable to published figures: {'; '.join(reasons)}." if reasons else "") + "\n"]
    order = sorted(range(len(ok)), key=lambda j: per_item["cider_d"][j]) if "cider_d" in per_item else []
    if order:
        def row(j: int) -> tuple[Any, ...]:
            return (paths[ok[j]].name, per_item["cider_d"][j], generated[j], refs[ok[j]][0])

        sections.append("Lowest and highest CIDEr-D:\n\n" + markdown_table(
            ["image", "CIDEr-D", "generated", "a reference"], [row(j) for j in dict.fromkeys(order[:3] + order[-3:])]))
    shown = list(range(min(grid, len(ok))))
    figures = [("Images with the generated (G) and reference (R) captions", plot_image_grid(
        [paths[ok[j]] for j in shown], [generated[j] for j in shown], [refs[ok[j]] for j in shown],
        out_dir / "captions.png", n=grid))]
    log.info("captioning: BLEU-4 %.4f, CIDEr-D %.4f on %d images (%d skipped)", metrics.get("bleu4") or 0,
             metrics.get("cider_d") or 0, len(ok), skipped.total)
    return metrics, sections, figures
