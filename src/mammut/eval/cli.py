"""``mammut eval TASK SOURCE ...``: the standard evaluation tasks on standard on-disk formats,
for any model that ``mammut.load`` loads (SOURCE: a run folder, a mammut checkpoint folder, a
converted open_clip CoCa or openMaMMUT file).

    mammut eval zeroshot  SOURCE --data DIR [--classnames FILE|imagenet] [--templates FILE|imagenet|TEMPLATE]
    mammut eval retrieval SOURCE --data karpathy.json|captions.json|pairs.csv [--images DIR] [--split test]
    mammut eval caption   SOURCE --data captions.json [--images DIR] [--beams N --max-new-tokens N ...]
    mammut eval vqa       SOURCE --questions Q.json --annotations A.json --images DIR [--prompt TEMPLATE]

Every task: --out DIR (default runs/eval-TASK-<time>), --device, --checkpoint, --precision (auto: bf16 autocast where
the device runs it natively), --batch-size, --workers (image decoding processes), --limit N (a seeded random N
images / questions), --no-progress. Writes metrics.json, report.md and figures to --out.
(``mammut eval RUN`` without a task evaluates a run folder on its own held-out data.)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["TASKS", "task_parser", "run_task"]

TASKS: dict[str, str] = {
    "zeroshot": "zero-shot classification of an ImageFolder (top-1/5, mean per-class recall, confusion matrix)",
    "retrieval": "image-text retrieval R@1/5/10 both ways (Karpathy JSON, COCO captions JSON or CSV)",
    "caption": "captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap",
    "vqa": "VQAv2 accuracy (questions + annotations JSON) by prompted generation",
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="run folder, mammut checkpoint folder, or converted open_clip CoCa / openMaMMUT file")
    p.add_argument("--out", default=None, help="report folder (default: runs/eval-TASK-<date-time>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder of a run (default: its latest)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the device runs bf16 natively, else fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--batch-size", type=_positive, default=batch, help=f"images per batch (default {batch})")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (0: none; default 4)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="evaluate a seeded random subset of this many images (VQA: questions)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _captions_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="Karpathy-split JSON, COCO-captions JSON, or .csv/.tsv with one row per caption")
    p.add_argument("--images", default=None, help="folder the image file names are relative to (default: the "
                                                  "--data file's folder)")
    p.add_argument("--split", default="test",
                   help="Karpathy JSON only: the split (train, val, test, restval, all; default test)")
    p.add_argument("--img-key", default="filepath", help="CSV column of the image path (default filepath)")
    p.add_argument("--caption-key", default="title", help="CSV column of the caption (default title)")


def _generation(p: argparse.ArgumentParser, max_new: int) -> None:
    g = p.add_argument_group("generation (mammut.generation.GenerationConfig)")
    g.add_argument("--beams", type=_positive, default=1, help="beam search with N beams (1: greedy, the default)")
    g.add_argument("--max-new-tokens", type=_positive, default=max_new, help=f"default {max_new}")
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam scores: log-prob / length ** this")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.beams > 1:
        opts.update(strategy="beam", num_beams=args.beams, length_penalty=args.length_penalty)
    else:
        opts["strategy"] = "greedy"
    if args.min_new_tokens:
        opts["min_new_tokens"] = args.min_new_tokens
    if args.repetition_penalty != 1.0:
        opts["repetition_penalty"] = args.repetition_penalty
    return opts


def task_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mammut eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    z = sub.add_parser("zeroshot", help=TASKS["zeroshot"], description=TASKS["zeroshot"])
    _common(z, 64)
    z.add_argument("--data", required=True, help="ImageFolder: one sub-folder of images per class")
    z.add_argument("--classnames", default=None,
                   help="file of class names: one per line in sorted folder order, or 'folder<TAB>name' lines "
                        "in any order naming every class folder once; or 'imagenet' (the shipped ImageNet-1k "
                        "names); default: the folder names")
    z.add_argument("--templates", default=None,
                   help="file of prompt templates with {} for the class name, 'imagenet' (CLIP's 80, the default), "
                        "or one template such as 'a photo of a {}.'")
    r = sub.add_parser("retrieval", help=TASKS["retrieval"], description=TASKS["retrieval"])
    _common(r, 64)
    _captions_data(r)
    c = sub.add_parser("caption", help=TASKS["caption"], description=TASKS["caption"])
    _common(c, 32)
    _captions_data(c)
    _generation(c, 30)
    c.add_argument("--spice", action="store_true", help="also SPICE (needs Java 8; downloads Stanford CoreNLP once)")
    c.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="caption tokenisation: PTB (Java) when available, else the built-in stand-in")
    v = sub.add_parser("vqa", help=TASKS["vqa"], description=TASKS["vqa"])
    _common(v, 32)
    v.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    v.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
    v.add_argument("--images", required=True, help="image folder (e.g. val2014)")
    v.add_argument("--image-template", default=None,
                   help="image file name, e.g. 'COCO_{subtype}_{image_id:012d}.jpg' (default: tried in turn)")
    v.add_argument("--prompt", default=None, help="prompt template with {question} (default '{question} answer:'; "
                                                  "a VQA-finetuned run uses its own)")
    _generation(v, 10)
    return p


def run_task(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Load the model, run ``args.task`` and write its report; returns ``(metrics, report folder)``."""
    from .model_source import load_eval_model
    from .report import write_task_report

    if args.workers < 0:
        raise ValueError(f"--workers: expected an integer >= 0, got {args.workers}")
    out = Path(args.out) if args.out else Path("runs") / f"eval-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    if args.task == "zeroshot":  # a bad folder, names or templates file: the error comes before the model loads
        from ..data.formats import read_image_folder
        from .zeroshot import load_classnames, load_templates

        load_classnames(args.classnames, read_image_folder(args.data).classes)
        load_templates(args.templates)
    em = load_eval_model(args.source, device=args.device, checkpoint=args.checkpoint, precision=args.precision)
    common = dict(batch_size=args.batch_size, workers=args.workers, limit=args.limit, progress=not args.no_progress)
    if args.task == "zeroshot":
        from .zeroshot import evaluate_zeroshot

        metrics, sections, figures = evaluate_zeroshot(em, args.data, out, classnames=args.classnames,
                                                       templates=args.templates, **common)
        title, data = "Zero-shot classification", args.data
    elif args.task == "retrieval":
        from .retrieval import evaluate_retrieval

        metrics, sections, figures = evaluate_retrieval(em, args.data, out, images=args.images, split=args.split,
                                                        img_key=args.img_key, caption_key=args.caption_key, **common)
        title, data = "Image-text retrieval", args.data
    elif args.task == "caption":
        from .captioning import evaluate_captioning

        metrics, sections, figures = evaluate_captioning(
            em, args.data, out, images=args.images, split=args.split, img_key=args.img_key,
            caption_key=args.caption_key, generation=generation_options(args), spice=args.spice,
            tokenizer=args.tokenizer, **common)
        title, data = "Captioning", args.data
    else:
        from .vqa_task import evaluate_vqa

        metrics, sections, figures = evaluate_vqa(em, args.questions, args.annotations, args.images, out,
                                                  prompt=args.prompt, image_template=args.image_template,
                                                  generation=generation_options(args), **common)
        title, data = "Visual question answering", f"{args.questions} + {args.annotations}"
    metrics = {"task": args.task, "source": str(args.source), "model_class": em.name, "device": str(em.device),
               "bf16": em.bf16, "precision": "bf16" if em.bf16 else "fp32", "precision_requested": args.precision,
               "precision_reason": em.precision_reason, "data": str(data), **metrics, "wall_time_s": time.perf_counter() - started}
    return metrics, write_task_report(out, f"{title}: {Path(args.source).name}", metrics, sections, figures)


def summary(metrics: dict[str, Any], out: Path) -> str:
    """The lines ``mammut eval TASK`` prints."""
    task = metrics["task"]
    keys = {"zeroshot": ("top1", "top5", "mean_per_class_recall"),
            "retrieval": ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"),
            "caption": ("bleu4", "meteor", "rouge_l", "cider_d"),
            "vqa": ("accuracy",)}[task]
    figures = ", ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics.get(k), float) else f"{k} n/a" for k in keys)
    skipped = metrics.get("skipped", {}).get("total", 0)
    n = metrics.get("n_questions", metrics.get("n_images"))
    unit = "questions" if task == "vqa" else "images"
    return f"report: {out.resolve()}  (report.md, metrics.json)\n{task}: {figures} on {n} {unit}" + \
        (f"; {skipped} images skipped (missing or unreadable)" if skipped else "")
