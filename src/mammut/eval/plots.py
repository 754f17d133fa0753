"""Figures of the evaluation tasks (matplotlib, Agg backend): recall@K curves, per-class
recall, the confusion matrix, accuracy per answer type, and a grid of images with generated
and reference texts. Each function writes one PNG and returns its path (None: nothing to draw)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_recall_curves", "plot_per_class", "plot_confusion", "plot_bars", "plot_image_grid", "caption_grid", "caption_title"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curves(curves: Mapping[str, Sequence[float]], path: Path, *, title: str = "retrieval",
                       chance: Mapping[str, Sequence[float]] | None = None) -> Path | None:
    """Recall@K against K (``curves[label][k - 1]`` is R@k) for each direction; ``chance``
    curves dashed."""
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    for label, values in (chance or {}).items():
        ax.plot(range(1, len(values) + 1), values, "--", color="tab:gray", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(recall: Sequence[float | None], names: Sequence[str], path: Path, *, top: int = 30) -> Path | None:
    """Per-class recall: every class as a bar (up to ``2 * top`` classes), else the sorted
    curve with the ``top`` best and worst classes named."""
    pairs = [(r, n) for r, n in zip(recall, names) if r is not None]
    if not pairs:
        return None
    pairs.sort(key=lambda p: p[0], reverse=True)
    plt = _plt()
    if len(pairs) <= 2 * top:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(pairs) + 1)))
        ax.barh(range(len(pairs)), [p[0] for p in pairs], color="tab:blue")
        ax.set_yticks(range(len(pairs)), [p[1] for p in pairs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("recall (share of the class's images classified right)")
    else:
        fig, (ax, ax_names) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
        ax.plot(range(1, len(pairs) + 1), [p[0] for p in pairs])
        ax.set_xlabel("class (sorted by recall)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax_names.axis("off")
        worst = "\n".join(f"{r:.2f} {n[:28]}" for r, n in pairs[-10:])
        best = "\n".join(f"{r:.2f} {n[:28]}" for r, n in pairs[:10])
        ax_names.text(0, 1, f"best\n{best}\n\nworst\n{worst}", va="top", family="monospace", fontsize=7)
    ax.set_title("per-class recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion: torch.Tensor, names: Sequence[str], path: Path, *, label_limit: int = 40) -> Path | None:
    """The confusion matrix, each row normalised by its class's image count; class names on
    the axes up to ``label_limit`` classes."""
    c = confusion.float()
    if c.numel() == 0 or c.sum() == 0:
        return None
    rows = c / c.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(names)
    plt = _plt()
    size = min(12.0, max(4.0, 0.22 * n + 2)) if n <= label_limit else 8.0
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= label_limit:
        ax.set_xticks(range(n), [s[:20] for s in names], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [s[:20] for s in names], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(values: Mapping[str, float], path: Path, *, title: str, xlabel: str = "accuracy",
              counts: Mapping[str, int] | None = None) -> Path | None:
    """One horizontal bar per entry (e.g. VQA accuracy per answer type)."""
    if not values:
        return None
    plt = _plt()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.35 * len(labels) + 1)))
    ax.barh(range(len(labels)), [values[k] for k in labels], color="tab:green")
    ax.set_yticks(range(len(labels)), [f"{k} (n={counts[k]})" if counts else k for k in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_image_grid(paths: Sequence[Path], generated: Sequence[str], references: Sequence[Sequence[str]],
                    path: Path, *, n: int = 16, title: str = "", labels: tuple[str, str] = ("G", "R")) -> Path | None:
    """Images with their generated text (``G``) and up to two references (``R``); an image
    whose generated text equals a reference (case-insensitive) is titled in green."""
    from PIL import Image

    def picture(i: int) -> Any:
        with Image.open(paths[i]) as img:
            img = img.convert("RGB")
            img.thumbnail((256, 256))
            return img

    n = min(n, len(paths))
    return caption_grid(picture, n, generated, references, path, title=title, labels=labels)


def caption_title(generated: str, references: Sequence[str], labels: Sequence[str], width: int) -> tuple[str, str]:
    """A panel's title: the generated text and up to two references, wrapped at ``width``, and
    its colour (dark green when the generation equals a reference, case and spaces aside)."""
    refs = list(references)
    ok = generated.strip().lower() in {r.strip().lower() for r in refs}
    text = [textwrap.fill(f"{labels[0]}: {generated}", width)]
    text += [textwrap.fill(f"{labels[1]}: {r}", width) for r in refs[:2]]
    return "\n".join(text), "darkgreen" if ok else "black"


def caption_grid(picture: Any, n: int, generated: Sequence[str], references: Sequence[Sequence[str]], path: Path, *,
                 title: str = "", labels: tuple[str, str] = ("G", "R"), nearest: bool = False) -> Path | None:
    """A grid of ``n`` pictures (``picture(i)``: anything ``imshow`` takes) titled with the
    generated text and up to two references, in green where the text equals a reference
    (case-insensitive); ``nearest``: no smoothing (small synthetic scenes)."""
    n = min(n, len(generated), len(references))
    if n == 0:
        return None
    plt = _plt()
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(picture(i), interpolation="nearest" if nearest else "antialiased")
        text, colour = caption_title(generated[i], references[i], labels, 36)
        ax.set_title(text, fontsize=7, color=colour, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
