"""Reports: a folder with ``metrics.json``, ``report.md`` and figures.

- :func:`write_report`: a run's report (``mammut eval RUN``, end of training): the summary,
  ``loss_curves.png``, then only what the run's task (``train.task``) returned from its
  evaluation as a :class:`RunReport`: markdown sections, :class:`Figure` s (anything a task
  draws: caption grids, boxes, ...) and extra files. :func:`image_text_report` is the image-text
  tasks' part (``pretrain``): ``retrieval.md``, the retrieval, caption and zero-shot tables and
  ``scenes.png`` (held-out scenes with generated and true captions).
- :func:`write_benchmark_report`: a benchmark's report (``mammut eval BENCHMARK``,
  :mod:`mammut.eval.benchmarks`): the benchmark's markdown sections and figures (written by
  it, see ``mammut.eval.plots``), the model, data and skipped images.

matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["write_report", "write_benchmark_report", "RunReport", "Figure", "image_text_report",
           "scenes_figure", "retrieval_sections", "caption_sections", "zero_shot_sections", "plot_loss_curves",
           "plot_scenes", "retrieval_table", "markdown_table"]


@dataclasses.dataclass
class Figure:
    """A figure of a run report: ``draw(path)`` writes the PNG ``file`` into the report folder
    (returning the path, or None when there is nothing to draw); ``report.md`` shows it under
    ``caption`` (none: no caption line) with the alternative text ``alt``."""

    file: str
    draw: Callable[[Path], Path | None]
    caption: str = ""
    alt: str = ""


@dataclasses.dataclass
class RunReport:
    """What a training task's evaluation puts in its run report (``Task.evaluate``):
    ``sections`` (markdown blocks after the summary, each followed by a blank line),
    ``figures`` (after the loss curves) and ``files`` (extra text files, name -> text)."""

    sections: list[str] = dataclasses.field(default_factory=list)
    figures: list[Figure] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Total / caption / contrastive loss and the learning rate against the step."""
    train = [r for r in records if r.get("kind", "train") == "train" and r.get("loss") is not None]
    if not train:
        return None
    plt = _plt()
    steps = [r["step"] for r in train]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "caption", "contrastive"):
        vals = [r.get(key) for r in train]
        if any(v is not None for v in vals):
            ax.plot(steps, vals, label="total" if key == "loss" else key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr") for r in train], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("schedule")
    ax_lr.grid(alpha=0.3)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("i2t_R@1") is not None]
    if evals:
        ax_r = ax.twinx()
        ax_r.plot([r["step"] for r in evals], [r["i2t_R@1"] for r in evals], "o--", color="tab:red", label="held-out i2t R@1")
        ax_r.set_ylabel("R@1")
        ax_r.set_ylim(0, 1)
        ax_r.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scenes(images: torch.Tensor, generated: Sequence[str], truth: Sequence[str], path: Path, n: int = 16) -> Path | None:
    """A grid of scenes, each titled with the generated (G) and true (T) caption; a generated
    caption that equals the truth is drawn in green."""
    from .plots import caption_grid

    def picture(i: int) -> Any:
        return images[i].permute(1, 2, 0).clamp(0, 1).float().numpy()

    return caption_grid(picture, min(n, len(images)), generated, [[t] for t in truth], path, labels=("G", "T"),
                        nearest=True)


def retrieval_table(metrics: dict[str, Any]) -> str:
    """Markdown table of R@k in both directions against chance."""
    r = metrics.get("retrieval")
    if not r:
        return ""
    ks = sorted(int(k.split("@")[1]) for k in r if k.startswith("i2t_R@"))
    split = metrics.get("eval_split", {"held_out": True})
    label = "Held-out retrieval" if split.get("held_out") else "Retrieval on TRAINING rows (not held-out)"
    texts = f", {r['n_texts']} captions" if r.get("n_texts", r["gallery_size"]) != r["gallery_size"] else ""
    lines = [f"{label}, gallery of {r['gallery_size']} images{texts}", "",
             "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    lines.append("| image -> text | " + " | ".join(f"{r[f'i2t_R@{k}']:.3f}" for k in ks) + " |")
    lines.append("| text -> image | " + " | ".join(f"{r[f't2i_R@{k}']:.3f}" for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{r['chance'][f'R@{k}']:.4f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def retrieval_sections(metrics: dict[str, Any]) -> list[str]:
    """The retrieval table and its protocol line (none without ``metrics["retrieval"]``)."""
    table = retrieval_table(metrics)
    sections = [table] if table else []
    r = metrics.get("retrieval") or {}
    if r.get("protocol"):
        sections.append(f"Protocol: {r['protocol']}. Captions per image: {r.get('captions_per_image', 1):.2f}; "
                        f"caption texts shared by several images: {r.get('texts_shared_by_images', 0)}.")
    elif r.get("skipped_duplicates") is not None:
        sections.append(f"Each gallery caption is distinct: {r['skipped_duplicates']} held-out scenes repeating an "
                        f"earlier caption were skipped (identical texts cannot be told apart).")
    return sections


def caption_sections(metrics: dict[str, Any]) -> list[str]:
    """The greedy captions' table and how they were scored (none without ``metrics["caption"]``)."""
    cap = metrics.get("caption")
    if not cap:
        return []
    lines = ["Greedy captions", "", "| metric | value |", "|---|---|"]
    for key, label in (("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"),
                       ("cider_d", "CIDEr-D"),
                       ("emoji_acc_single", f"names the emoji, 1-emoji scenes (n={cap.get('n_single')})"),
                       ("emoji_acc_pair", f"names both emoji, 2-emoji scenes (n={cap.get('n_pair')})")):
        if key in cap:
            lines.append(f"| {label} | {_fmt(cap[key])} |")
    sections = ["\n".join(lines)]
    if cap.get("scorer") == "pycocoevalcap":
        why = f"the PTB jar failed: {cap['tokenizer_failed']}" if cap.get("tokenizer_failed") else "no Java"
        how = ("PTB tokenizer (Java)" if cap.get("tokenizer") == "ptb"
               else f"the regular-expression stand-in for the PTB tokenizer ({why})")
        absent = "".join(f" {k.upper()} not computed: {why}." for k, why in (cap.get("absent") or {}).items())
        sections.append(f"Scored with pycocoevalcap (coco-caption), captions tokenised with {how}; CIDEr-D is its "
                        f"CIDEr scorer.{absent}")
    return sections


def zero_shot_sections(metrics: dict[str, Any]) -> list[str]:
    """The held-out zero-shot line (none without ``metrics["zero_shot"]``)."""
    zs = metrics.get("zero_shot")
    if not zs:
        return []
    return [f"Zero-shot classification of {zs['n_images']} single-emoji scenes over {zs['n_classes']} classes: "
            f"top-1 {zs['top1']:.3f}, top-5 {zs['top5']:.3f} (chance {zs['chance_top1']:.4f})."]


def scenes_figure(images: torch.Tensor | None, generated: Sequence[str], truth: Sequence[str], *, grid: int = 16,
                  held_out: bool = True) -> list[Figure]:
    """``scenes.png``: the first ``grid`` images with generated (G) and true (T) captions (none
    without images or generated captions)."""
    if images is None or not generated:
        return []
    which = "Held-out images" if held_out else "Training images (not held-out)"
    return [Figure("scenes.png", lambda path: plot_scenes(images, generated, truth, path, grid),
                   caption=f"{which}, G = generated (greedy), T = true caption", alt="scenes")]


def image_text_report(metrics: dict[str, Any], images: torch.Tensor | None = None, generated: Sequence[str] = (),
                      truth: Sequence[str] = (), *, grid: int = 16) -> RunReport:
    """The report parts of an image-text evaluation (the ``pretrain`` task): ``retrieval.md``,
    the retrieval table and protocol, the caption table, the zero-shot line and ``scenes.png``,
    each where ``metrics`` / the images have it."""
    held_out = (metrics.get("eval_split") or {"held_out": True}).get("held_out")
    return RunReport(sections=retrieval_sections(metrics) + caption_sections(metrics) + zero_shot_sections(metrics),
                     figures=scenes_figure(images, generated, truth, grid=grid, held_out=bool(held_out)),
                     files={"retrieval.md": retrieval_table(metrics)})


def write_report(out_dir: str | Path, metrics: dict[str, Any], records: Sequence[dict[str, Any]] = (),
                 report: RunReport | None = None) -> Path:
    """Write a run's report folder; returns its path: ``metrics.json``, ``loss_curves.png``
    (from the training ``records``), ``report``'s files and figures, and ``report.md`` (the
    summary, the evaluated split, ``report``'s sections, the loss curves, ``report``'s figures).
    Nothing else: what is evaluated and drawn is the task's (``Task.evaluate``)."""
    report = report if report is not None else RunReport()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curves = plot_loss_curves(records, out / "loss_curves.png")
    for name, text in report.files.items():
        (out / name).write_text(text)

    lines = ["# mammut run report", ""]
    precision = metrics.get("precision")
    if precision and metrics.get("precision_reason"):
        precision = f"{precision} ({metrics['precision_reason']})"
    summary = [("steps", metrics.get("steps")), ("samples/s", metrics.get("samples_per_s")), ("precision", precision),
               ("train time (s)", metrics.get("train_time_s")), ("wall time (s)", metrics.get("wall_time_s")),
               ("emoji in play", metrics.get("num_emoji"))]
    lines += [f"- {k}: {_fmt(v)}" for k, v in summary if v is not None] + [""]
    split = metrics.get("eval_split")
    if split:
        if split.get("held_out"):
            lines += [f"Evaluated on held-out data: {split.get('source')}.", ""]
        else:
            lines += [f"**Not held-out.** Evaluated on the first rows of the training data ({split.get('source')}): "
                      f"{split.get('note', '')}.", ""]
    for section in report.sections:
        lines += [section, ""]
    if curves:
        lines += ["![loss curves](loss_curves.png)", ""]
    for figure in report.figures:
        if figure.draw(out / figure.file) is not None:
            lines += ([f"{figure.caption}:", ""] if figure.caption else []) + [f"![{figure.alt}]({figure.file})", ""]
    (out / "report.md").write_text("\n".join(lines))
    log.info("report written to %s", out)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with three decimals, ``None`` as ``n/a``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def write_benchmark_report(out_dir: str | Path, title: str, metrics: dict[str, Any], sections: Sequence[str] = (),
                           figures: Sequence[tuple[str, Path | None]] = ()) -> Path:
    """Write ``metrics.json`` and ``report.md`` (``title``, the evaluated model and data, the
    skipped images, then ``sections`` and ``figures`` as ``(caption, png path)`` under
    ``out_dir``, both as the benchmark returned them); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2))
    lines = [f"# {title}", ""]
    facts = [("model", metrics.get("source")), ("model class", metrics.get("model_class")),
             ("data", metrics.get("data")), ("device", metrics.get("device")),
             ("precision", ("bf16 autocast" if metrics.get("bf16") else "fp32")
              + (f" ({metrics['precision_reason']})" if metrics.get("precision_reason") else "")),
             ("images evaluated", metrics.get("n_images")), ("throughput (images/s)", metrics.get("images_per_s")),
             ("throughput (questions/s)", metrics.get("questions_per_s")),
             ("wall time (s)", metrics.get("wall_time_s"))]
    lines += [f"- {k}: {_fmt(v)}" for k, v in facts if v is not None]
    if "comparable_to_published" in metrics:
        unit = metrics.get("n_total_unit", "images")
        limit = metrics.get("limit")
        cut = f"--limit {limit} (a seeded random subset)" if limit is not None else "no --limit"
        lines.append(f"- full set: {metrics.get('n_total')} {unit}; {cut}; comparable to published numbers: "
                     + ("yes" if metrics["comparable_to_published"] else
                        "NO (" + ("; ".join(metrics.get("not_comparable_because") or ())
                                  or "a subset was evaluated or images were skipped") + ")"))
    left_out = {k: v for k, v in (metrics.get("data_left_out") or {}).items() if v}
    if left_out:
        lines.append("- left out when reading the data: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                        for k, v in left_out.items()))
    skipped = metrics.get("skipped") or {}
    if skipped:
        lines.append(f"- images skipped: {skipped.get('total', 0)} ({skipped.get('missing', 0)} missing, "
                     f"{skipped.get('corrupt', 0)} unreadable)")
        for example in skipped.get("examples", [])[:5]:
            lines.append(f"  - {example}")
    lines.append("")
    for section in sections:
        lines += [section.rstrip(), ""]
    for caption, png in figures:
        if png is not None:
            lines += [f"{caption}:", "", f"![{caption}]({Path(png).name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    log.info("report written to %s", out)
    return out
