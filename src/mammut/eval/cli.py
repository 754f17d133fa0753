"""``mammut eval BENCHMARK SOURCE ...``: the registered benchmarks (:mod:`mammut.eval.benchmarks`)
on standard on-disk formats, for any model that ``mammut.load`` loads (SOURCE: a run folder, a
mammut checkpoint folder, a converted open_clip CoCa or openMaMMUT file).

    mammut eval zeroshot  SOURCE --data DIR [--classnames FILE|imagenet] [--templates FILE|imagenet|TEMPLATE]
    mammut eval retrieval SOURCE --data karpathy.json|captions.json|pairs.csv [--images DIR] [--split test]
    mammut eval caption   SOURCE --data captions.json [--images DIR] [--beams N --max-new-tokens N ...]
    mammut eval vqa       SOURCE --questions Q.json --annotations A.json --images DIR [--prompt TEMPLATE]

Every benchmark: --out DIR (default runs/eval-BENCHMARK-<time>), --device, --checkpoint, --precision (auto: bf16
autocast where the device runs it natively), --batch-size, --workers (image decoding processes), --limit N (a seeded
random N images / questions), --no-progress. Writes metrics.json, report.md and figures to --out.
(``mammut eval RUN`` without a benchmark evaluates a run folder with its training task's own evaluation.)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .benchmarks import get_benchmark, list_benchmarks, positive_int

log = logging.getLogger(__name__)

__all__ = ["benchmark_parser", "run_benchmark", "summary"]


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="run folder, mammut checkpoint folder, or converted open_clip CoCa / openMaMMUT file")
    p.add_argument("--out", default=None, help="report folder (default: runs/eval-BENCHMARK-<date-time>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder of a run (default: its latest)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the device runs bf16 natively, else fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--batch-size", type=positive_int, default=batch, help=f"images per batch (default {batch})")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (0: none; default 4)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate a seeded random subset of this many images (VQA: questions)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def benchmark_parser() -> argparse.ArgumentParser:
    """``mammut eval BENCHMARK ...``: one sub-command per registered benchmark."""
    p = argparse.ArgumentParser(prog="mammut eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in list_benchmarks():
        bench = get_benchmark(name)
        b = sub.add_parser(name, help=bench.help, description=bench.help)
        _common(b, bench.batch_size)
        bench.add_arguments(b)
    return p


def run_benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Check the options, load the model, run ``args.benchmark`` and write its report; returns
    ``(metrics, report folder)``."""
    from .model_source import load_eval_model
    from .report import write_benchmark_report

    bench = get_benchmark(args.benchmark)
    if args.workers < 0:
        raise ValueError(f"--workers: expected an integer >= 0, got {args.workers}")
    out = Path(args.out) if args.out else Path("runs") / f"eval-{bench.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    bench.check(args)  # bad options or data: the error comes before the model loads
    em = load_eval_model(args.source, device=args.device, checkpoint=args.checkpoint, precision=args.precision)
    metrics, sections, figures = bench.run(em, args, out)
    # "task": the benchmark's name (the key metrics.json has always had)
    metrics = {"task": bench.name, "source": str(args.source), "model_class": em.name, "device": str(em.device),
               "bf16": em.bf16, "precision": "bf16" if em.bf16 else "fp32", "precision_requested": args.precision,
               "precision_reason": em.precision_reason, "data": bench.data(args), **metrics,
               "wall_time_s": time.perf_counter() - started}
    return metrics, write_benchmark_report(out, f"{bench.title}: {Path(args.source).name}", metrics, sections, figures)


def summary(metrics: dict[str, Any], out: Path) -> str:
    """The lines ``mammut eval BENCHMARK`` prints."""
    skipped = metrics.get("skipped", {}).get("total", 0)
    return f"report: {out.resolve()}  (report.md, metrics.json)\n{get_benchmark(metrics['task']).summary(metrics)}" + \
        (f"; {skipped} images skipped (missing or unreadable)" if skipped else "")
