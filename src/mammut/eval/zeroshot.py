"""Zero-shot classification on an ImageFolder: ``mammut eval zeroshot SOURCE --data DIR``.

Class ``k`` is the ``k``-th class folder (sorted, as torchvision's ``ImageFolder``); its name
is the folder name (``_`` read as a space), or comes from ``--classnames FILE`` in one of two
formats: one name per line, line ``k + 1`` naming class ``k`` (so the file must follow the
sorted folder order), or ``folder<TAB>name`` lines (e.g. ``n01440764<TAB>tench``) in any order,
naming every class folder exactly once (a missing, unknown or repeated folder is an error, as
is a file mixing the two formats). ``--classnames imagenet``: the 1,000 ImageNet names shipped
in ``mammut/data/assets``, in WordNet-id order, for the ImageNet validation set in folders
named by WordNet id. Each class embedding is the
re-normalised mean of its L2-normalised prompt embeddings (``--templates``: a file of one
template per line with ``{}`` for the name, ``imagenet`` for CLIP's 80 ImageNet templates, the
default, or one template given inline). Images are classified by cosine similarity; a tie
with the true class counts against it.

``--scoring generative`` classifies with the captioner instead (MaMMUT and CoCa, which have
one): class ``c`` scores the log-probability the model gives its prompt as the start of the
image's caption, summed over the prompt's tokens (after the start token, no end token: the
caption may go on), averaged over the templates; the highest wins. It costs a decoder pass
per image, class and template (cheap for tens of classes, not for ImageNet's 1,000 x 80), and
it reads what the captioning loss taught, which on small data sets can be much more than the
contrastive embeddings hold.

Metrics: top-1 and top-5 accuracy, mean per-class recall (the mean over classes of the share
of their images classified right: "balanced accuracy"), per-class recall, the most confused
pairs; files: ``confusion.csv`` (counts; row: true class, column: predicted, in class order)
and the figures: the confusion matrix, per-class recall and a grid of images spread over the
set with the predicted (P) and true (T) class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.formats import numbered_lines, read_image_folder, read_lines
from .images import coverage, embed_image_files, seeded_subset
from .metrics import classification_metrics, score_predictions, zero_shot_classifier, zero_shot_predictions
from .model_source import EvalModel
from .plots import plot_confusion, plot_image_grid, plot_per_class
from .report import markdown_table

log = logging.getLogger(__name__)

__all__ = ["evaluate_zeroshot", "load_classnames", "load_templates", "shipped_list", "caption_scores", "SCORINGS"]

SCORINGS = ("contrastive", "generative")

_SHIPPED = {"classnames": "imagenet_classnames.txt", "templates": "clip_imagenet_templates.txt"}


def shipped_list(kind: str) -> list[str]:
    """The ImageNet class names (``"classnames"``) or CLIP's 80 ImageNet templates (``"templates"``)."""
    text = resources.files("mammut.data").joinpath("assets", _SHIPPED[kind]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_templates(spec: str | None) -> list[str]:
    """``None`` / ``"imagenet"``: CLIP's 80 templates; an existing file: its lines; a string
    with ``{}``: that one template."""
    if spec is None or spec == "imagenet":
        templates = shipped_list("templates")
    elif Path(spec).expanduser().is_file():
        templates = read_lines(spec, "--templates")
    elif "{}" in spec:
        templates = [spec]
    else:
        raise FileNotFoundError(f"--templates: expected a file of templates, 'imagenet' or one template with {{}}, "
                                f"got {spec!r} (no such file)")
    for i, t in enumerate(templates):
        if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise ValueError(f"--templates: expected each template to hold one {{}} for the class name (and no other "
                             f"braces), got template {i + 1} {t!r}")
    return templates


def load_classnames(spec: str | None, folders: Sequence[str]) -> list[str]:
    """The class names for ``folders`` (sorted class folder names): from the folder names, the
    shipped ImageNet list (``"imagenet"``), a file of one name per line in folder order, or a
    file of ``folder<TAB>name`` lines in any order (every folder exactly once)."""
    if spec is None:
        return [f.replace("_", " ") for f in folders]
    numbered = [] if spec == "imagenet" else numbered_lines(spec, "--classnames")
    if any("\t" in line for _, line in numbered):
        return _mapped_classnames(numbered, spec, folders)
    names = shipped_list("classnames") if spec == "imagenet" else [line for _, line in numbered]
    if len(names) != len(folders):
        what = "the ImageNet list" if spec == "imagenet" else spec
        raise ValueError(f"--classnames: expected one name per class folder of --data ({len(folders)}), got "
                         f"{len(names)} in {what}")
    return names


def _some(items: Sequence[str], what: str, show: int = 5) -> str:
    """``items`` for an error message: ``what`` (plural for several), the first ``show``, then
    how many more (``"lines 2, 5"``)."""
    text = f"{what}{'s' if len(items) != 1 else ''} " + ", ".join(items[:show])
    return text + (f" and {len(items) - show} more" if len(items) > show else "")


def _mapped_classnames(lines: Sequence[tuple[int, str]], spec: str, folders: Sequence[str]) -> list[str]:
    """The names of a ``folder<TAB>name`` file (its ``numbered_lines``), in folder order; a file
    mixing lines with and without a tab, a line with more than one tab, or a folder missing,
    unknown (not a class folder of ``--data``) or repeated is a ``ValueError`` naming the lines
    or folders."""
    plain = [f"{i}" for i, line in lines if "\t" not in line]
    if plain:
        raise ValueError(f"--classnames: expected every line to be folder<TAB>name or none (one name per line in "
                         f"folder order), got {len(lines) - len(plain)} lines with a tab and {len(plain)} without "
                         f"in {spec}; without a tab: {_some(plain, 'line')}")
    extra = [f"{i}" for i, line in lines if line.count("\t") > 1]
    if extra:
        raise ValueError(f"--classnames: expected folder<TAB>name lines with one tab, got more than one in {spec}: "
                         f"{_some(extra, 'line')}")
    where: dict[str, list[int]] = {}
    mapped: dict[str, str] = {}
    for i, line in lines:
        folder, name = (part.strip() for part in line.split("\t"))
        where.setdefault(folder, []).append(i)
        mapped[folder] = name
    known = set(folders)
    repeated = [f"{f!r} (lines {', '.join(map(str, at))})" for f, at in where.items() if len(at) > 1]
    unknown = [f"{f!r} (line {at[0]})" for f, at in where.items() if f not in known]
    missing = [repr(f) for f in folders if f not in mapped]
    problems = ([f"{len(repeated)} repeated: {_some(repeated, 'folder')}"] if repeated else []) + \
        ([f"{len(unknown)} unknown (not a class folder of --data): {_some(unknown, 'folder')}"] if unknown else []) + \
        ([f"{len(missing)} missing (named on no line): {_some(missing, 'folder')}"] if missing else [])
    if problems:
        raise ValueError(f"--classnames: expected each of the {len(folders)} class folders of --data once, got "
                         f"{'; '.join(problems)} in {spec}")
    return [mapped[f] for f in folders]


def _confused_pairs(confusion: torch.Tensor, names: Sequence[str], top: int = 10) -> list[tuple[str, str, int, float]]:
    off = confusion.clone()
    off.fill_diagonal_(0)
    support = confusion.sum(dim=1).clamp(min=1)
    vals, idx = off.flatten().topk(min(top, off.numel()))
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        if v == 0:
            break
        t, p = divmod(i, confusion.shape[1])
        out.append((names[t], names[p], int(v), v / float(support[t])))
    return out


def evaluate_zeroshot(em: EvalModel, data: str | Path, out_dir: Path, *, classnames: str | None = None,
                      templates: str | None = None, batch_size: int = 64, workers: int = 0,
                      limit: int | None = None, progress: bool = True, grid: int = 16,
                      scoring: str = "contrastive") -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """Zero-shot classification of the ImageFolder ``data``; returns ``(metrics, report
    sections, figures)`` with the figures written to ``out_dir``."""
    from tqdm.auto import tqdm

    if scoring not in SCORINGS:
        raise ValueError(f"--scoring: expected one of {list(SCORINGS)}, got {scoring!r}")
    if scoring == "generative":
        _require_scoring_captioner(em)
    else:
        em.require("embed", "zeroshot")
    folder = read_image_folder(data)
    names = load_classnames(classnames, folder.classes)
    temps = load_templates(templates)
    keep = seeded_subset(len(folder.paths), limit)
    paths = [folder.paths[i] for i in keep]
    labels = [folder.labels[i] for i in keep]

    t0 = time.perf_counter()
    if scoring == "generative":
        prompts = [em.prompt_ids([t.format(n) for t in temps]) for n in names]
        score = lambda images: caption_scores(em, images, prompts)  # noqa: E731
    else:
        with tqdm(total=len(names) * len(temps), desc="class prompts", unit="text", disable=not progress,
                  leave=False) as bar:
            def encode(texts: list[str]) -> torch.Tensor:
                out = em.embed_texts(texts, batch_size=len(texts))
                bar.update(len(texts))
                return out

            classifier = zero_shot_classifier(names, encode, templates=temps, batch_size=max(batch_size, 256))
        score = em.embed_images
    text_s = time.perf_counter() - t0

    embeds, ok, skipped, image_s = embed_image_files(
        score, paths, em.preprocess, what=str(folder.root), batch_size=batch_size, workers=workers,
        progress=progress, desc="zero-shot")
    y = torch.tensor([labels[i] for i in ok])
    if scoring == "generative":
        ranks, preds = score_predictions(embeds, y)
    else:
        ranks, preds = zero_shot_predictions(embeds, classifier, y)
    k5 = min(5, len(names))
    cls = classification_metrics(ranks, preds, y, len(names), ks=(1, k5))
    confusion = cls.pop("confusion")
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(out_dir / "confusion.csv", confusion.numpy(), fmt="%d", delimiter=",")
    metrics: dict[str, Any] = {
        "top1": cls["top1"], "top5": cls[f"top{k5}"], "mean_per_class_recall": cls["mean_per_class_recall"],
        "n_images": len(ok), "n_classes": len(names), "chance_top1": 1 / len(names),
        "skipped": skipped.as_dict(), **coverage(limit, len(folder.paths), len(keep), skipped.total),
        "scoring": scoring, "n_templates": len(temps),
        "templates": temps if len(temps) <= 10 else f"{len(temps)} templates ({templates or 'imagenet'})",
        "classnames": classnames or "folder names",
        "per_class": {n: {"recall": r, "images": s} for n, r, s in zip(_unique(names), cls["per_class_recall"],
                                                                       cls["support"])},
        "images_per_s": len(ok) / image_s if image_s > 0 else None, "class_prompts_s": text_s,
    }
    if k5 != 5:
        metrics["top5_note"] = f"only {len(names)} classes: top5 is top-{k5}"
    table = markdown_table(["metric", "value"], [
        ("top-1 accuracy", metrics["top1"]), (f"top-{k5} accuracy", metrics["top5"]),
        ("mean per-class recall", metrics["mean_per_class_recall"]), ("chance (top-1)", metrics["chance_top1"]),
        ("images", len(ok)), ("classes", len(names)), ("prompt templates", len(temps)), ("scoring", scoring)])
    sections = [f"## Zero-shot classification of {folder.root}\n\n{table}"]
    pairs = _confused_pairs(confusion, names)
    if pairs:
        sections.append("Most confused (true -> predicted):\n\n" + markdown_table(
            ["true class", "predicted as", "images", "share of the class"], pairs))
    shown = sorted({round(s * (len(ok) - 1) / max(grid - 1, 1)) for s in range(min(grid, len(ok)))})  # spread out
    figures = [
        ("Confusion matrix", plot_confusion(confusion, names, out_dir / "confusion.png")),
        ("Per-class recall", plot_per_class(cls["per_class_recall"], names, out_dir / "per_class.png")),
        ("Images with the predicted (P) and true (T) class", plot_image_grid(
            [paths[ok[j]] for j in shown], [names[int(preds[j])] for j in shown],
            [[names[labels[ok[j]]]] for j in shown], out_dir / "examples.png", n=grid, labels=("P", "T"))),
    ]
    log.info("zero-shot: top-1 %.4f, top-5 %.4f, mean per-class recall %.4f on %d images (%d skipped)",
             metrics["top1"], metrics["top5"], metrics["mean_per_class_recall"], len(ok), skipped.total)
    return metrics, sections, figures


def _require_scoring_captioner(em: EvalModel) -> None:
    from ..models._captioner import ContrastiveCaptioner

    if not isinstance(em.model, ContrastiveCaptioner):
        raise ValueError(f"--scoring generative: expected a model with a captioner that reads image tokens "
                         f"(MaMMUT, CoCa), got {em.name} from {em.source}")


@torch.no_grad()
def caption_scores(em: EvalModel, images: torch.Tensor, prompts: Sequence[Sequence[Sequence[int]]],
                   max_rows: int = 2048) -> torch.Tensor:
    """Generative class scores ``(b, c)`` of ``images`` ``(b, 3, H, W)``: for class ``k``, the
    mean over its prompts ``prompts[k]`` (token ids starting with the start token, no end token)
    of the summed log-probability of each prompt's tokens after the first, given the image.
    The image is encoded once; the decoder reads it for every prompt (``max_rows`` rows a call)."""
    model = em.model
    pad = int(getattr(em.tokenizer, "pad_id", 0))
    flat = [list(p) for ps in prompts for p in ps]
    owner = torch.tensor([k for k, ps in enumerate(prompts) for _ in ps])
    if not flat or min(len(p) for p in flat) < 2:
        raise ValueError("prompts: expected every class prompt to hold a token after the start token")
    text = torch.full((len(flat), max(len(p) for p in flat)), pad, dtype=torch.long)
    for i, p in enumerate(flat):
        text[i, :len(p)] = torch.tensor(p)
    real = text[:, 1:] != pad
    b, n_prompts = len(images), len(flat)
    dev = em.device
    with em.autocast():
        tokens = model.image_tokens(images.to(dev, non_blocking=True))
    per = torch.empty(b, n_prompts)
    rows = max(1, max_rows // max(b, 1))
    for s in range(0, n_prompts, rows):
        t = text[s:s + rows].to(dev)
        k = len(t)
        ids = t.repeat(b, 1)  # (b k, n): image i's rows are i k .. i k + k - 1
        ctx = tokens.repeat_interleave(k, dim=0)
        with em.autocast():
            logits = model(ids, image_tokens=ctx)
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        per[:, s:s + k] = (lp * real[s:s + rows].to(dev).repeat(b, 1)).sum(1).view(b, k).cpu()
    counts = torch.bincount(owner, minlength=len(prompts)).float()
    return torch.zeros(b, len(prompts)).index_add_(1, owner, per) / counts


def _unique(names: Sequence[str]) -> list[str]:
    """Names made unique for use as keys (a repeated name gets `` (2)``, ...: ImageNet has two)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out
