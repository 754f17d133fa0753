"""The few-shot options of ``mammut eval caption`` and ``mammut eval vqa`` (standard library only:
the CLI reads the benchmark registry on every command); the evaluation: :mod:`mammut.eval.fewshot`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_fewshot_arguments", "check_fewshot", "MAX_SHOTS"]

MAX_SHOTS = 32


def _shots(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SHOTS}], got {text!r}") from None
    if not 0 <= value <= MAX_SHOTS:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SHOTS}], got {value}")
    return value


def add_fewshot_arguments(p: argparse.ArgumentParser, *, vqa: bool = False) -> None:
    """``--shots``, ``--support``, ``--support-images``, ``--selection``, ``--rices-run``, ``--seed``."""
    g = p.add_argument_group("few-shot (in-context examples; models that take media sequences, e.g. FlamingoPaLM)")
    g.add_argument("--shots", type=_shots, default=0, help="in-context examples per query (default 0: the plain prompt)")
    g.add_argument("--support", default=None,
                   help=("VQAv2 questions JSON the examples come from (with --support-annotations; default: the "
                         "evaluated questions, never one about the query's own image)") if vqa else
                   ("the support set the examples come from (same formats as --data; default: --data itself, "
                    "the query never among its own examples)"))
    g.add_argument("--support-images", default=None, help="folder the --support file names are relative to")
    if vqa:
        g.add_argument("--support-annotations", default=None, help="VQAv2 annotations JSON of the --support questions")
    g.add_argument("--selection", choices=("random", "rices"), default="random",
                   help="random (seeded) or rices: the most similar support images by image embedding")
    g.add_argument("--rices-run", default=None,
                   help="contrastive model (run folder, checkpoint) whose image embeddings rices uses "
                        "(default: the evaluated model, if it is contrastive)")
    g.add_argument("--seed", type=int, default=0, help="random selection's seed (default 0)")


def check_fewshot(args: argparse.Namespace) -> None:
    """The few-shot options, before the model loads (errors name the option)."""
    if args.shots == 0:
        for opt, value in (("--support", args.support), ("--rices-run", args.rices_run)):
            if value is not None:
                raise ValueError(f"{opt}: only with --shots K > 0, got --shots 0")
        return
    if args.support is not None and hasattr(args, "support_annotations") and not args.support_annotations:
        raise ValueError("--support-annotations: expected the support questions' annotations JSON with --support")
    if args.support is not None:
        path = Path(args.support).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--support: expected a captions file (.json, .csv, .tsv), got {path} "
                                    f"({'a folder' if path.is_dir() else 'no such file'})")
    if args.rices_run is not None:
        if args.selection != "rices":
            raise ValueError(f"--rices-run: only with --selection rices, got --selection {args.selection}")
        if not Path(args.rices_run).expanduser().exists():
            raise FileNotFoundError(f"--rices-run: no such run folder or file: {args.rices_run}")
