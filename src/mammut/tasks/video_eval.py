"""Held-out evaluation of the video tasks on moving-emoji clips (and, with ``--data``, a video CSV).

Clips are ``(n, t, 3, H, W)``. The **single-frame baseline** gives the same model only the
middle frame (``t // 2``), repeated to ``t`` frames (the encoder takes exactly ``t`` frames, and a
still clip is what a single image looks like to it: every tube sees no change), so anything it
gets right is readable from one frame.

**Motion retrieval**: for each held-out clip with exactly one direction in its caption
(``mammut.data.moving_emoji.motion_variants``), the caption and its three variants with another
direction ("a cat moves left" / right / up / down, the rest unchanged) are ranked by the
contrastive similarity to the clip; accuracy is the share ranked first (chance 0.25).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["embed_clips", "embed_captions", "caption_clips", "middle_frame", "motion_retrieval", "frame_strips",
           "evaluate_video_run", "quick_video_eval"]

log = logging.getLogger(__name__)

_QUICK_N = 64


def middle_frame(clips: torch.Tensor) -> torch.Tensor:
    """``(n, t, 3, H, W)`` -> the middle frame repeated ``t`` times (same shape)."""
    t = clips.shape[1]
    return clips[:, t // 2: t // 2 + 1].expand_as(clips).contiguous()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_clips(model: nn.Module, clips: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised clip embeddings ``(n, l)`` (float32, CPU)."""
    was = model.training
    model.eval()
    dev = _device(model)
    out = [model.embed_image(clips[s:s + batch_size].to(dev)).float().cpu() for s in range(0, len(clips), batch_size)]
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def embed_captions(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_len: int,
                   batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings ``(n, l)`` (float32, CPU); captions cut to ``max_len``."""
    was = model.training
    model.eval()
    dev = _device(model)
    out = []
    for s in range(0, len(texts), batch_size):
        ids = tokenizer.encode(list(texts[s:s + batch_size]), max_len, truncate=True)
        out.append(model.embed_text(ids.to(dev)).float().cpu())
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def caption_clips(model: nn.Module, tokenizer: Any, clips: torch.Tensor, *, max_new_tokens: int = 24,
                  batch_size: int = 64) -> list[str]:
    """Greedy captions of clips, decoded."""
    was = model.training
    model.eval()
    dev = _device(model)
    out: list[str] = []
    for s in range(0, len(clips), batch_size):
        ids = model.generate(clips[s:s + batch_size].to(dev), max_new_tokens=max_new_tokens, strategy="greedy")
        out += tokenizer.decode(ids.cpu())
    model.train(was)
    return out


def motion_retrieval(model: nn.Module, tokenizer: Any, clips: Sequence[Any], *, max_len: int, batch_size: int = 64,
                     single_frame: bool = False) -> dict[str, float]:
    """Accuracy of ranking a clip's caption first among its motion variants (see the module
    docstring); ``single_frame``: the model sees only the middle frame."""
    from ..data.moving_emoji import DIRECTIONS, motion_variants

    picked = [(c, v) for c in clips if (v := motion_variants(c)) is not None]
    if not picked:
        raise ValueError("clips: expected held-out clips with one direction in their caption, got none")
    frames = torch.stack([c.frames for c, _ in picked])
    if single_frame:
        frames = middle_frame(frames)
    img = embed_clips(model, frames, batch_size)
    txt = embed_captions(model, tokenizer, [t for _, v in picked for t in v], max_len).view(len(picked), len(DIRECTIONS), -1)
    scores = torch.einsum("nd,nkd->nk", img, txt)
    truth = torch.tensor([v.index(c.caption) for c, v in picked])
    return {"accuracy": float((scores.argmax(1) == truth).float().mean()), "n": len(picked),
            "chance": 1 / len(DIRECTIONS)}


def frame_strips(clips: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """``(n, t, 3, H, W)`` -> ``(n, 3, H, frames * W)``: ``frames`` evenly spaced frames side by side."""
    t = clips.shape[1]
    idx = torch.linspace(0, t - 1, min(frames, t)).round().long()
    return torch.cat(list(clips[:, idx].unbind(1)), dim=-1)


def _retrieval(model: nn.Module, tokenizer: Any, clips: torch.Tensor, captions: Sequence[str], max_len: int,
               batch_size: int) -> dict[str, Any]:
    from ..eval.metrics import retrieval_recall

    rec = retrieval_recall(embed_clips(model, clips, batch_size), embed_captions(model, tokenizer, captions, max_len),
                           ks=(1, 5, 10), texts=list(captions))
    rec["R@1"] = (rec["i2t_R@1"] + rec["t2i_R@1"]) / 2
    rec.update({"gallery_size": len(clips), "n_texts": len(captions), "chance": {f"R@{k}": min(k / len(clips), 1.0) for k in (1, 5, 10)}})
    return rec


def evaluate_video_run(task: Any, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                       n: int | None = None) -> tuple[dict[str, Any], Any]:
    """The ``video`` task's held-out evaluation and report parts."""
    from ..eval.caption_metrics import caption_scores
    from ..eval.report import RunReport, markdown_table, scenes_figure

    cfg = task.cfg
    ev = cfg.eval
    n = ev.n if n is None else n
    if data is not None:  # a video CSV
        from ..data.video_files import VideoCsv

        ds = VideoCsv(data, frames=task.frames, image_size=cfg.data.image_size)
        items = [it for it in (ds[i] for i in range(min(n, len(ds)))) if it is not None]
        if not items:
            raise ValueError(f"--data: no readable clip in {data} ({ds.skipped} unreadable)")
        clips, captions, held = torch.stack([c for c, _ in items]), [t for _, t in items], False
        source = f"{len(items)} clips of {data} ({ds.skipped} unreadable, skipped)"
        heldout_clips: list[Any] = []
    else:
        from .video import moving_emoji_dataset
        from ..data.moving_emoji import HELDOUT_SEED

        ds = moving_emoji_dataset(cfg.data, task.frames, "heldout", HELDOUT_SEED)
        heldout_clips = [ds.clip(i) for i in range(n)]
        clips = torch.stack([c.frames for c in heldout_clips])
        captions, held = [c.caption for c in heldout_clips], True
        source = f"{n} held-out moving-emoji clips (emoji pairs and motion combinations never trained on)"
    retrieval = _retrieval(model, tokenizer, clips, captions, cfg.data.max_len, ev.batch_size)
    generated = caption_clips(model, tokenizer, clips, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    # BLEU and CIDEr-D with the plain tokenizer: synthetic lower-case captions need no PTB (Java) pass
    scores = caption_scores(generated, [[c] for c in captions], metrics=("bleu", "cider_d"), tokenizer="simple")
    caption = {k: scores.get(k) for k in ("bleu4", "cider_d")}
    caption.update({"n": len(generated), "tokenizer": scores.get("tokenizer"), "exact": sum(
        g.strip() == c for g, c in zip(generated, captions)) / len(captions)})
    metrics: dict[str, Any] = {"eval_split": {"name": "heldout" if held else "data", "held_out": held, "source": source},
                               "retrieval": retrieval, "caption": caption}
    sections = [f"## Video-text retrieval and captions on {source}\n\n" + markdown_table(
        ["", "R@1", "R@5", "R@10"],
        [["clip -> text", *(f"{retrieval[f'i2t_R@{k}']:.3f}" for k in (1, 5, 10))],
         ["text -> clip", *(f"{retrieval[f't2i_R@{k}']:.3f}" for k in (1, 5, 10))]])
        + f"\nGallery {len(captions)} (chance R@1 {1 / len(captions):.4f}). Greedy captions: BLEU-4 "
          f"{_f(caption['bleu4'])}, CIDEr-D {_f(caption['cider_d'])}, exact {caption['exact']:.3f}."]
    if held:
        video = motion_retrieval(model, tokenizer, heldout_clips, max_len=cfg.data.max_len, batch_size=ev.batch_size)
        single = motion_retrieval(model, tokenizer, heldout_clips, max_len=cfg.data.max_len, batch_size=ev.batch_size,
                                  single_frame=True)
        metrics["motion_retrieval"] = {"video": video, "middle_frame": single}
        sections.append("## Motion retrieval (captions that differ only in the direction)\n\n" + markdown_table(
            ["input", "n", "accuracy", "chance"],
            [["the clip", video["n"], f"{video['accuracy']:.3f}", f"{video['chance']:.2f}"],
             ["its middle frame only (repeated)", single["n"], f"{single['accuracy']:.3f}", f"{single['chance']:.2f}"]]))
    log.info("video: held-out R@1 %.3f; motion retrieval %s", retrieval["R@1"],
             f"{metrics['motion_retrieval']['video']['accuracy']:.3f} (middle frame "
             f"{metrics['motion_retrieval']['middle_frame']['accuracy']:.3f})" if held else "n/a")
    strips = frame_strips(clips)
    figures = scenes_figure(strips, generated, captions, grid=ev.grid, held_out=held)
    for f in figures:
        f.caption = f.caption.replace("images", "clips (4 frames each)")
    return metrics, RunReport(sections=sections, figures=figures)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def quick_video_eval(task: Any, model: nn.Module, tokenizer: Any) -> dict[str, float]:
    """``R@1`` (mean both ways) and ``motion_acc`` on the first 64 held-out clips."""
    from .video import moving_emoji_dataset
    from ..data.moving_emoji import HELDOUT_SEED

    cfg = task.cfg
    if cfg.data.kind != "moving_emoji":
        return {}
    if task._quick is None:
        ds = moving_emoji_dataset(cfg.data, task.frames, "heldout", HELDOUT_SEED)
        task._quick = [ds.clip(i) for i in range(min(_QUICK_N, cfg.eval.n))]
    clips = task._quick
    rec = _retrieval(model, tokenizer, torch.stack([c.frames for c in clips]), [c.caption for c in clips],
                     cfg.data.max_len, cfg.eval.batch_size)
    motion = motion_retrieval(model, tokenizer, clips, max_len=cfg.data.max_len, batch_size=cfg.eval.batch_size)
    return {"R@1": rec["R@1"], "i2t_R@1": rec["i2t_R@1"], "t2i_R@1": rec["t2i_R@1"], "motion_acc": motion["accuracy"]}
