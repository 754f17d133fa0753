"""Image-text retrieval: ``mammut eval retrieval SOURCE --data karpathy.json --images DIR``.

Data: a Karpathy-split JSON (COCO / Flickr30k; ``--split test`` by default), a COCO-captions
JSON, or a CSV/TSV with one row per caption (rows naming the same image file are one image);
see :mod:`mammut.data.formats`.

The standard protocol (as in the CLIP / CoCa papers' COCO and Flickr30k figures): every image
and every caption is embedded once (captions longer than the model's context are cut);
image -> text: an image is retrieved right at K when any of its own captions is among the K
captions most similar to it; text -> image: a caption when its one image is among the K most
similar images. Identical captions of different images count as different answers (reported
as ``texts_shared_by_images``); ties count against the model. So where two images share a
caption string, image -> text counts that caption as a miss at R@1 for both images (the other
image's copy has the same embedding, hence ties with it), while common evaluation code (e.g. a
``topk`` over the similarities) breaks such ties arbitrarily, usually by index, and may count a
hit: with shared texts our image -> text recall can be slightly below a published figure.
Images that are missing or unreadable are left out with their captions, and counted. An image
file listed twice is one gallery item with the captions of both entries (``duplicate_images``
counts the merged entries); blank captions are left out and counted (``data_left_out``).
metrics.json records ``limit``, ``n_total`` and ``comparable_to_published`` (no ``--limit`` cut,
no image skipped), with ``not_comparable_because`` listing why not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.formats import read_captioned_images
from .images import coverage, embed_image_files, seeded_subset
from .metrics import retrieval_recall
from .model_source import EvalModel
from .plots import plot_recall_curves
from .report import markdown_table

log = logging.getLogger(__name__)

__all__ = ["evaluate_retrieval", "text_to_image_chance", "image_to_text_chance", "coverage_reasons"]

KS: tuple[int, ...] = (1, 5, 10)
_CURVE_MAX = 100


def image_to_text_chance(captions_per_image: Sequence[int], k: int) -> float:
    """Expected image -> text R@k of a random ranking: the chance that one of an image's ``c``
    captions is among ``k`` drawn without replacement from all ``T``, averaged over images."""
    total = sum(captions_per_image)
    out = 0.0
    for c in captions_per_image:
        miss = 1.0
        for j in range(c):
            miss *= max(total - k - j, 0) / (total - j)
        out += 1.0 - miss
    return out / len(captions_per_image)


def text_to_image_chance(n_images: int, k: int) -> float:
    return min(k / n_images, 1.0)


def coverage_reasons(limit: int | None, n_total: int, n_selected: int, skipped: int, unit: str = "images") -> list[str]:
    """Why :func:`mammut.eval.images.coverage` says not comparable to published figures: one
    line per reason (none when it says comparable)."""
    reasons = []
    if n_selected < n_total:
        reasons.append(f"--limit {limit}: a seeded random {n_selected} of the {n_total} {unit} was evaluated")
    if skipped:
        reasons.append(f"{skipped} {unit} skipped (missing or unreadable)")
    return reasons


def evaluate_retrieval(em: EvalModel, data: str | Path, out_dir: Path, *, images: str | Path | None = None,
                       split: str | None = "test", img_key: str = "filepath", caption_key: str = "title",
                       batch_size: int = 64, workers: int = 0, limit: int | None = None,
                       progress: bool = True) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """Recall@1/5/10 both ways on ``data``; returns ``(metrics, report sections, figures)``."""
    em.require("embed", "retrieval")
    ds = read_captioned_images(data, images, split=split, img_key=img_key, caption_key=caption_key)
    keep = seeded_subset(len(ds.paths), limit)
    paths = [ds.paths[i] for i in keep]
    captions = [ds.captions[i] for i in keep]

    embeds, ok, skipped, image_s = embed_image_files(
        em.embed_images, paths, em.preprocess, what=str(ds.source), batch_size=batch_size, workers=workers,
        progress=progress, desc="retrieval images")
    texts, owner = [], []
    for j, i in enumerate(ok):
        texts += captions[i]
        owner += [j] * len(captions[i])
    t1 = time.perf_counter()
    from tqdm.auto import tqdm

    text_emb = []
    for s in tqdm(range(0, len(texts), 256), desc="retrieval captions", unit="batch", disable=not progress, leave=False):
        text_emb.append(em.embed_texts(texts[s:s + 256], batch_size=256))
    text_s = time.perf_counter() - t1
    img, txt = embeds, torch.cat(text_emb)
    curve_ks = tuple(range(1, min(_CURVE_MAX, max(len(ok), len(texts))) + 1))
    rec = retrieval_recall(img, txt, ks=tuple(sorted(set(KS) | set(curve_ks))), text_to_image=owner)
    per_image = [len(captions[i]) for i in ok]
    owners: dict[str, set[int]] = {}
    for t, j in zip(texts, owner):
        owners.setdefault(t, set()).add(j)
    metrics: dict[str, Any] = {
        **{f"i2t_R@{k}": rec[f"i2t_R@{k}"] for k in KS}, **{f"t2i_R@{k}": rec[f"t2i_R@{k}"] for k in KS},
        "mean_recall": sum(rec[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS) / (2 * len(KS)),
        "chance": {**{f"i2t_R@{k}": image_to_text_chance(per_image, k) for k in KS},
                   **{f"t2i_R@{k}": text_to_image_chance(len(ok), k) for k in KS}},
        "n_images": len(ok), "n_texts": len(texts), "captions_per_image": len(texts) / len(ok),
        "texts_shared_by_images": sum(len(v) > 1 for v in owners.values()),
        "layout": ds.layout, "split": ds.split, "skipped": skipped.as_dict(),
        **coverage(limit, len(ds.paths), len(keep), skipped.total),
        "not_comparable_because": coverage_reasons(limit, len(ds.paths), len(keep), skipped.total),
        "data_left_out": ds.left_out(), "duplicate_images": ds.duplicate_images,
        "images_per_s": len(ok) / image_s if image_s > 0 else None, "texts_per_s": len(texts) / text_s if text_s else None,
        "curve": {"i2t": [rec[f"i2t_R@{k}"] for k in curve_ks], "t2i": [rec[f"t2i_R@{k}"] for k in curve_ks]},
        "protocol": "image->text: a hit if any caption of the image ranks within K; text->image: a hit if its image "
                    "ranks within K; ties count against the model (a caption string shared by several images is "
                    "a miss at R@1 for image->text, where common code breaks the tie arbitrarily)",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("image -> text", *(metrics[f"i2t_R@{k}"] for k in KS)),
            ("text -> image", *(metrics[f"t2i_R@{k}"] for k in KS)),
            ("chance, image -> text", *(metrics["chance"][f"i2t_R@{k}"] for k in KS)),
            ("chance, text -> image", *(metrics["chance"][f"t2i_R@{k}"] for k in KS))]
    where = f"{ds.source}" + (f", split {ds.split}" if ds.split else "")
    sections = [f"## Retrieval on {where}: {len(ok)} images, {len(texts)} captions "
                f"({metrics['captions_per_image']:.2f} per image)\n\n"
                + markdown_table(["direction", *(f"R@{k}" for k in KS)], rows)
                + f"\nMean of the six recalls: {metrics['mean_recall']:.4f}. Protocol: {metrics['protocol']}; "
                  f"caption texts shared by several images: {metrics['texts_shared_by_images']}."
                + (f" {ds.duplicate_images} duplicate image entries (a file listed again) were merged into the "
                   f"file's first entry, their captions pooled." if ds.duplicate_images else "")
                + (f" Not comparable to published figures: {'; '.join(metrics['not_comparable_because'])}."
                   if metrics["not_comparable_because"] else "") + "\n"]
    chance = {"chance, text -> image": [text_to_image_chance(len(ok), k) for k in curve_ks]}
    figures = [("Recall@K", plot_recall_curves({"image -> text": metrics["curve"]["i2t"],
                                                 "text -> image": metrics["curve"]["t2i"]},
                                                out_dir / "recall_at_k.png", title=f"retrieval, {len(ok)} images",
                                                chance=chance))]
    log.info("retrieval: i2t R@1 %.4f, t2i R@1 %.4f on %d images / %d captions (%d images skipped)",
             metrics["i2t_R@1"], metrics["t2i_R@1"], len(ok), len(texts), skipped.total)
    return metrics, sections, figures
