"""Captioning: ``mammut eval caption SOURCE --data captions.json --images DIR``.

Data: a COCO-captions annotation file, a Karpathy-split JSON (``--split test`` by default) or
a CSV/TSV (see :mod:`mammut.data.formats`). Every image gets one caption from the model
(greedy by default; beam search with ``--beams N``; lengths and penalties are
``GenerationConfig`` fields), scored against all of its references with pycocoevalcap
(:mod:`mammut.eval.caption_metrics`: BLEU-1..4, METEOR when Java is present, ROUGE-L, CIDEr-D,
SPICE on request). The captions are also written as ``captions.json`` in the COCO results
format (``[{"image_id", "caption"}]``) for the official evaluation server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..data.formats import read_captioned_images
from .caption_metrics import caption_scores
from .images import SkipCount, coverage, image_batches, seeded_subset
from .model_source import EvalModel
from .plots import plot_image_grid
from .report import markdown_table

log = logging.getLogger(__name__)

__all__ = ["evaluate_captioning", "LABELS"]

LABELS: dict[str, str] = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
                          "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "spice": "SPICE"}


def _check_generation(options: dict[str, Any]) -> dict[str, Any]:
    """The generation options checked now (a ``GenerationConfig`` is built from them), so a bad
    value fails before any image is read."""
    from ..generation import GenerationConfig

    GenerationConfig(**options)
    return dict(options)


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
    metrics: dict[str, Any] = {
        **{k: scores.get(k) for k in LABELS if k in scores}, "n_images": len(ok),
        "references_per_image": scores["references_per_image"], "tokenizer": scores["tokenizer"],
        "absent": scores["absent"], "generation": options or {"strategy": "greedy"}, "layout": ds.layout,
        "split": ds.split, "skipped": skipped.as_dict(), **coverage(limit, len(ds.paths), len(keep), skipped.total),
        "data_left_out": ds.left_out(), "images_per_s": len(ok) / gen_s if gen_s > 0 else None,
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
                  f"CIDEr-D is pycocoevalcap's CIDEr scorer. " + " ".join(notes) + "\n"]
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
