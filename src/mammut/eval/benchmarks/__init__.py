"""Benchmarks: what ``mammut eval BENCHMARK SOURCE ...`` runs on standard on-disk data, for any
model ``mammut.load`` loads. (A *task* is something else: what a run trains on, ``train.task``,
:mod:`mammut.tasks`; ``mammut eval RUN`` scores a run folder with its task's own evaluation.)

One file per benchmark in this package, each registering a :class:`Benchmark` with
:func:`register_benchmark`; every module here is imported when the registry is first read, so
a new benchmark is one new file (a benchmark registered from elsewhere, e.g. a test, works the
same once its module is imported). ``mammut eval`` (:mod:`mammut.eval.cli`) loops over the
registry: it adds each benchmark's sub-command with the options every benchmark takes (SOURCE,
``--out``, ``--device``, ``--checkpoint``, ``--precision``, ``--batch-size``, ``--workers``,
``--limit``, ``--no-progress``) and the benchmark's own (:meth:`Benchmark.add_arguments`), runs
:meth:`Benchmark.check` before the model loads, then :meth:`Benchmark.run`, and writes the
report (:func:`mammut.eval.report.write_benchmark_report`) with the sections and figures the
benchmark returned, titled :attr:`Benchmark.title`.

Benchmark modules import only the standard library at the top (the CLI reads the registry on
every ``mammut`` command); their evaluation code is imported inside ``run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "Benchmark",
    "register_benchmark",
    "get_benchmark",
    "list_benchmarks",
    "positive_int",
    "common_options",
    "captions_data_arguments",
    "generation_arguments",
    "generation_options",
    "check_generation",
]

_BENCHMARKS: dict[str, "Benchmark"] = {}


class Benchmark:
    """One ``mammut eval`` benchmark. Subclasses set ``name``, ``help`` and ``title`` and
    implement :meth:`run`; the rest has defaults."""

    name: ClassVar[str]  # the sub-command: mammut eval NAME SOURCE ...
    help: ClassVar[str]  # one line: the sub-command's help and description
    title: ClassVar[str]  # report.md's title, followed by ": <SOURCE's name>"
    batch_size: ClassVar[int] = 64  # the default --batch-size
    summary_keys: ClassVar[tuple[str, ...]] = ()  # metrics printed after the run
    unit: ClassVar[str] = "images"  # what the printed count (n_questions, else n_images) counts

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the benchmark's own options (the common ones are already there)."""

    def check(self, args: argparse.Namespace) -> None:
        """Check the options and data before the model loads (raise ``ValueError`` / ``OSError``
        naming the option: the CLI prints it as one line)."""

    def data(self, args: argparse.Namespace) -> str:
        """What ``metrics["data"]`` and the report say was evaluated (default: ``--data``)."""
        return str(getattr(args, "data", ""))

    def run(self, em: Any, args: argparse.Namespace,
            out: Path) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
        """Evaluate ``em`` (a :class:`mammut.eval.model_source.EvalModel`) and write any extra
        files and figures under ``out``; returns ``(metrics, report sections (markdown),
        figures as (caption, png path))``."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any]) -> str:
        """The result line printed after the run: ``summary_keys`` on the count of ``unit``."""
        figures = ", ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics.get(k), float) else f"{k} n/a"
                            for k in self.summary_keys)
        n = metrics.get("n_questions", metrics.get("n_images"))
        return f"{self.name}: {figures} on {n} {self.unit}"


def register_benchmark(benchmark: Any) -> Any:
    """Register a :class:`Benchmark` instance, or a subclass (instantiated; usable as a class
    decorator, returning the class)."""
    obj = benchmark() if isinstance(benchmark, type) else benchmark
    if not isinstance(obj, Benchmark):
        raise TypeError(f"benchmark: expected a Benchmark subclass or instance, got {type(obj).__name__}")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name or name.startswith("-") or "/" in name:
        raise ValueError(f"benchmark name: expected a word such as 'zeroshot', got {name!r}")
    held = _BENCHMARKS.get(name)
    if held is not None and type(held) is not type(obj):
        raise ValueError(f"benchmark name {name!r} is already registered")
    _BENCHMARKS[name] = obj
    return benchmark


def _load_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_benchmarks() -> list[str]:
    """The registered benchmark names, sorted."""
    _load_all()
    return sorted(_BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    _load_all()
    if name not in _BENCHMARKS:
        raise ValueError(f"benchmark: expected one of {sorted(_BENCHMARKS)}, got {name!r}")
    return _BENCHMARKS[name]


# --------------------------------------------------------------------------- shared options


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every evaluation function takes from the common options."""
    return dict(batch_size=args.batch_size, workers=args.workers, limit=args.limit, progress=not args.no_progress)


def captions_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--data`` (Karpathy / COCO-captions JSON or CSV/TSV), ``--images``, ``--split``, ``--img-key``, ``--caption-key``."""
    p.add_argument("--data", required=True,
                   help="Karpathy-split JSON, COCO-captions JSON, or .csv/.tsv with one row per caption")
    p.add_argument("--images", default=None, help="folder the image file names are relative to (default: the "
                                                  "--data file's folder)")
    p.add_argument("--split", default="test",
                   help="Karpathy JSON only: the split (train, val, test, restval, all; default test)")
    p.add_argument("--img-key", default="filepath", help="CSV column of the image path (default filepath)")
    p.add_argument("--caption-key", default="title", help="CSV column of the caption (default title)")


def generation_arguments(p: argparse.ArgumentParser, max_new: int) -> None:
    """The generation options (``mammut.generation.GenerationConfig``) with ``max_new`` new tokens by default."""
    g = p.add_argument_group("generation (mammut.generation.GenerationConfig)")
    g.add_argument("--beams", type=positive_int, default=1, help="beam search with N beams (1: greedy, the default)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new, help=f"default {max_new}")
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam scores: log-prob / length ** this")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """``GenerationConfig`` keyword arguments from :func:`generation_arguments`' options."""
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


def check_generation(args: argparse.Namespace) -> None:
    """Build a ``GenerationConfig`` from the options, so a bad value fails before the model loads."""
    from ...generation import GenerationConfig

    GenerationConfig(**generation_options(args))
