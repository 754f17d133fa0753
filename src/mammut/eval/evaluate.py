"""Evaluation plumbing: embed, retrieve, classify zero-shot and caption with a trained model,
scored by :mod:`mammut.eval.metrics`.

- :func:`embed_images` / :func:`embed_texts`: batched, eval mode, no grad.
- :func:`generate_captions`: greedy captions through ``model.generate``.
- :func:`evaluate_pairs`: image<->text retrieval R@1/5/10 (with gallery size and chance) and
  caption BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr-D (pycocoevalcap) on any
  image-caption pairs.
- :func:`evaluate_emoji`: the above on held-out emoji scenes, plus zero-shot classification of
  single-emoji scenes from class names and prompt templates, and the share of greedy captions
  that name the right emoji (one-emoji and two-emoji scenes separately).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.scenes import HeldoutSet
from ..data.tokenizer import Tokenizer
from ..inference import embed_images, embed_texts, generate_captions
from ..models.contract import Captioner
from .caption_metrics import caption_scores
from .metrics import emoji_name_accuracy, retrieval_recall, zero_shot_accuracy, zero_shot_classifier

log = logging.getLogger(__name__)

__all__ = [
    "embed_images",
    "embed_texts",
    "generate_captions",
    "evaluate_pairs",
    "evaluate_emoji",
    "evaluate_image_text",
    "evaluate_run",
    "EmojiEval",
]


def _chance(ks: Sequence[int], gallery: int) -> dict[str, float]:
    return {f"R@{k}": min(k / gallery, 1.0) for k in ks}


def evaluate_pairs(model: nn.Module, tokenizer: Tokenizer, images: torch.Tensor, captions: Sequence[str], *,
                   max_len: int, batch_size: int = 128, max_new_tokens: int = 24, with_captions: bool = True,
                   truncate: bool = False, ks: Sequence[int] = (1, 5, 10),
                   image_index: Sequence[int] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Retrieval both ways and caption metrics; returns ``(metrics, generated)``, one generated
    caption per image.

    Pairs are 1:1 unless ``image_index[j]`` names the image of caption ``j`` (several captions
    per image): then an image->text hit is any of the image's captions, captions are scored
    against all of the image's references, and identical caption texts count as one answer
    (see :func:`retrieval_recall`)."""
    if image_index is None and len(images) != len(captions):
        raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
    index = list(range(len(images))) if image_index is None else [int(i) for i in image_index]
    if len(index) != len(captions):
        raise ValueError(f"captions: expected one per entry of image_index ({len(index)}), got {len(captions)}")
    t0 = time.perf_counter()
    img = embed_images(model, images, batch_size)
    txt = embed_texts(model, tokenizer, captions, max_len, batch_size, truncate=truncate)
    rec = retrieval_recall(img, txt, ks=ks, text_to_image=index, texts=list(captions))
    shared = _texts_shared_by_images(captions, index)
    metrics: dict[str, Any] = {
        "retrieval": {**rec, "gallery_size": len(images), "n_texts": len(captions), "chance": _chance(ks, len(images)),
                      "captions_per_image": len(captions) / max(len(images), 1),
                      "texts_shared_by_images": shared,
                      "protocol": "image->text: a hit if any caption of the image (or a caption with the same text) "
                                  "ranks within k; text->image: a hit if its image (or any image with an identical "
                                  "caption) ranks within k; ties count against the model"},
    }
    generated: list[str] = []
    if with_captions and isinstance(model, Captioner):
        generated = generate_captions(model, tokenizer, images, max_new_tokens=max_new_tokens, batch_size=batch_size)
        refs: list[list[str]] = [[] for _ in range(len(images))]
        for j, i in enumerate(index):
            refs[i].append(captions[j])
        scores = caption_scores(generated, refs)
        metrics["caption"] = {k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d")}
        metrics["caption"].update({"n": len(generated), "references_per_image": len(captions) / max(len(images), 1),
                                   "tokenizer": scores["tokenizer"], "absent": scores["absent"],
                                   "scorer": "pycocoevalcap",
                                   **({"tokenizer_failed": scores["tokenizer_failed"]} if "tokenizer_failed" in scores else {})})
    metrics["eval_time_s"] = time.perf_counter() - t0
    return metrics, generated


def _texts_shared_by_images(captions: Sequence[str], index: Sequence[int]) -> int:
    """How many distinct caption texts belong to more than one image."""
    owners: dict[str, set[int]] = {}
    for text, i in zip(captions, index):
        owners.setdefault(text, set()).add(i)
    return sum(len(v) > 1 for v in owners.values())


class EmojiEval:
    """Held-out emoji scenes for a run's data settings, built once and reused.

    The gallery is the first ``n`` held-out scenes *with distinct captions*: two scenes with
    the same caption (e.g. two single-emoji scenes of one emoji) have identical text
    embeddings, so neither could be retrieved at rank 1 under pessimistic ties; skipping
    repeats gives every query exactly one right answer. ``skipped_duplicates`` says how many.
    """

    def __init__(self, data_cfg: Any, n: int = 512) -> None:
        from ..data.scenes import EmojiScenes
        from ..data.sources import DATA_SEED, emoji_dataset

        self.data_cfg = data_cfg
        self.class_names = emoji_dataset(data_cfg).class_names()
        ds = EmojiScenes(data_cfg.image_size, data_cfg.num_emoji, data_cfg.max_objects, split="heldout",
                         seed=DATA_SEED, min_objects=data_cfg.min_objects, vocab_seed=data_cfg.vocab_seed)
        scenes, seen, i = [], set(), 0
        while len(scenes) < n:
            scene = ds.scene(i)
            i += 1
            if scene.caption not in seen:
                seen.add(scene.caption)
                scenes.append(scene)
            if i > 20 * n + 1000:
                raise ValueError(f"eval.n: only {len(scenes)} distinct held-out captions found, asked for {n}")
        self.skipped_duplicates = i - n
        self.held = HeldoutSet(torch.stack([s.image for s in scenes]), [s.caption for s in scenes],
                               [s.emoji_ids for s in scenes], [s.n_objects for s in scenes])

    def __call__(self, model: nn.Module, tokenizer: Tokenizer, eval_cfg: Any, *,
                 with_captions: bool = True, quick: bool = False) -> tuple[dict[str, Any], list[str]]:
        """All metrics (``quick``: retrieval only) and the generated captions."""
        held, cfg = self.held, self.data_cfg
        metrics, generated = evaluate_pairs(
            model, tokenizer, held.images, held.captions, max_len=cfg.max_len, batch_size=eval_cfg.batch_size,
            max_new_tokens=eval_cfg.max_new_tokens, with_captions=with_captions and not quick, truncate=cfg.truncate,
        )
        metrics["num_emoji"] = len(self.class_names)
        metrics["retrieval"].update({"distinct_captions": True, "skipped_duplicates": self.skipped_duplicates,
                                     "n_single": sum(k == 1 for k in held.n_objects),
                                     "n_multi": sum(k > 1 for k in held.n_objects)})
        if quick:
            return metrics, generated
        # zero-shot: single-emoji held-out scenes, classes = every emoji in play
        single = [i for i, k in enumerate(held.n_objects) if k == 1]
        if single:
            classifier = zero_shot_classifier(
                self.class_names, lambda texts: embed_texts(model, tokenizer, texts, cfg.max_len, truncate=True),
                templates=list(eval_cfg.templates),
            )
            img = embed_images(model, held.images[single], eval_cfg.batch_size)
            labels = [held.emoji_ids[i][0] for i in single]
            metrics["zero_shot"] = {
                "top1": zero_shot_accuracy(img, classifier, labels, k=1),
                "top5": zero_shot_accuracy(img, classifier, labels, k=min(5, len(self.class_names))),
                "n_images": len(single), "n_classes": len(self.class_names),
                "chance_top1": 1.0 / len(self.class_names), "templates": list(eval_cfg.templates),
            }
        if generated:
            names = [[self.class_names[j] for j in ids] for ids in held.emoji_ids]
            acc = emoji_name_accuracy(generated, names, vocabulary=self.class_names)
            metrics["caption"].update({
                "emoji_acc_single": acc.get("acc_1"), "n_single": int(acc.get("n_1", 0)),
                "emoji_acc_pair": acc.get("acc_2"), "n_pair": int(acc.get("n_2", 0)),
                "emoji_acc_all": acc["acc"],
            })
        return metrics, generated


def evaluate_emoji(model: nn.Module, tokenizer: Tokenizer, data_cfg: Any, eval_cfg: Any,
                   *, with_captions: bool = True) -> tuple[dict[str, Any], EmojiEval, list[str]]:
    """Evaluate on ``eval_cfg.n`` held-out emoji scenes; returns ``(metrics, the set, captions)``."""
    ev = EmojiEval(data_cfg, eval_cfg.n)
    metrics, generated = ev(model, tokenizer, eval_cfg, with_captions=with_captions)
    return metrics, ev, generated


def evaluate_image_text(model: nn.Module, tokenizer: Tokenizer, cfg: Any, *, data: str | None = None,
                        n: int | None = None) -> tuple[dict[str, Any], Any]:
    """The ``pretrain`` task's evaluation: ``(metrics, report)``, ``report`` the run report's
    parts (:func:`mammut.eval.report.image_text_report`: retrieval, caption and zero-shot tables,
    ``retrieval.md`` and the grid of ``eval.grid`` images with generated and true captions).

    The data: ``data`` (a csv/tsv file or shard pattern) if given, else ``data.val_path``, else
    the emoji scenes' built-in held-out split. A csv/webdataset run with neither is scored on
    the first rows of its *training* data, and ``metrics["eval_split"]`` says so plainly: those
    rows are never called held-out."""
    eval_cfg = cfg.eval if n is None else dataclasses.replace(cfg.eval, n=n)
    source = data or cfg.data.val_path
    if source is None and cfg.data.kind == "emoji":
        metrics, ev, generated = evaluate_emoji(model, tokenizer, cfg.data, eval_cfg)
        images, truth = ev.held.images, ev.held.captions
        split = {"name": "heldout", "source": "emoji scenes, held-out split (emoji pairs never seen in training)",
                 "held_out": True}
    else:
        from ..data.sources import eval_pairs

        heldout = source is not None
        path = source if heldout else cfg.data.path
        pairs = eval_pairs(cfg.data, path, eval_cfg.n)
        if not heldout:
            log.warning("no validation data (data.val_path or --data): scoring the first %d images of the TRAINING "
                        "data %s; these figures are not held-out", len(pairs.images), path)
        metrics, generated = evaluate_pairs(model, tokenizer, pairs.images, pairs.captions,
                                            max_len=cfg.data.max_len, batch_size=eval_cfg.batch_size,
                                            max_new_tokens=eval_cfg.max_new_tokens, truncate=True,
                                            image_index=pairs.image_index)
        images = pairs.images
        truth = _first_caption_per_image(pairs.captions, pairs.image_index, len(pairs.images))
        split = {"name": "heldout" if heldout else "train", "source": str(path), "held_out": heldout,
                 "n_images": len(pairs.images), "n_captions": len(pairs.captions), "skipped": pairs.skipped}
        if not heldout:
            split["note"] = ("TRAINING rows, not held-out: set data.val_path or pass `mammut eval RUN --data FILE` "
                             "for a held-out evaluation")
    from .report import image_text_report

    metrics = {"eval_split": split, **metrics}
    return metrics, image_text_report(metrics, images, generated, truth, grid=cfg.eval.grid)


def evaluate_run(run_dir: Any, *, checkpoint: Any = None, n: int | None = None, out_dir: Any = None,
                 extra: dict[str, Any] | None = None, data: str | None = None) -> tuple[dict[str, Any], Any]:
    """Evaluate a run folder's latest (or given) checkpoint with its task's evaluation (the task
    found by name in the registry, :mod:`mammut.train.task`) and write its report folder (default
    ``<run>/report``) with the sections and figures the task returned. ``extra`` (timings) is
    merged into ``metrics.json``; ``data``
    replaces the run's held-out data."""
    from pathlib import Path

    from ..inference import load_run, read_metrics
    from ..train.task import get_task
    from .report import RunReport, write_report

    run = load_run(run_dir, checkpoint)
    cfg = run.config
    task = get_task(cfg.train.task)(cfg)
    metrics, report = task.evaluate(run.model, run.tokenizer, data=data, n=n)
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train_recs = [r for r in records if r.get("kind", "train") == "train"]
    last = train_recs[-1] if train_recs else {}
    started = [r for r in records if r.get("kind") == "run"]  # the Trainer's record: precision and why
    summary = {
        "run_dir": str(run_dir), "checkpoint": str(run.checkpoint), "steps": run.step, "task": cfg.train.task,
        "batch_size": cfg.train.batch_size, "precision": cfg.train.precision,
        **{k: started[-1][k] for k in ("precision_requested", "precision_reason", "cpu_capability")
           if started and k in started[-1]},
        "train_time_s": last.get("train_time_s"),
        "samples_per_s": (run.step * cfg.train.batch_size / last["train_time_s"]) if last.get("train_time_s") else None,
        "final_loss": last.get("loss"),
    }
    metrics = {**summary, **(extra or {}), **metrics, "model": cfg.model}
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    if not isinstance(report, RunReport):
        raise TypeError(f"train.task={cfg.train.task!r}: its evaluate() must return (metrics, RunReport), got a "
                        f"{type(report).__name__} report")
    path = write_report(out, metrics, records, report)
    return metrics, path


def _first_caption_per_image(captions: Sequence[str], index: Sequence[int], n_images: int) -> list[str]:
    first: list[str | None] = [None] * n_images
    for text, i in zip(captions, index):
        if first[i] is None:
            first[i] = text
    return [t or "" for t in first]
