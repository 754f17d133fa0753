"""Applications on top of the library (photo search and captioning: ``mammut index``,
``search``, ``serve``). ``register_commands(subparsers)`` adds their CLI commands; each sets
``handler`` (``(args, emit) -> exit code``; ``emit(text)`` writes the command's output, the
CLI's stdout) with ``set_defaults``. This module imports only argparse:
a command's dependencies load when it runs.

Modules: ``collection`` (what a source holds), ``store`` (SQLite metadata), ``folder`` (an
index folder's layout), ``ann`` (FAISS indexes), ``build`` (embedding, resume, ``torchrun``),
``searcher`` (queries), ``encoder`` (the model side), ``server`` + ``page`` (the web app),
``demo`` (the held-out emoji scenes of a run), ``commands`` (the CLI handlers).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Emit = Callable[[str], None]

__all__ = ["register_commands"]


def _index(args: argparse.Namespace, emit: Emit) -> int:
    from .commands import run_index

    return run_index(args, emit)


def _search(args: argparse.Namespace, emit: Emit) -> int:
    from .commands import run_search

    return run_search(args, emit)


def _serve(args: argparse.Namespace, emit: Emit) -> int:
    from .commands import run_serve

    return run_serve(args, emit)


def _detect(args: argparse.Namespace, emit: Emit) -> int:
    from .detect import run_detect

    return run_detect(args, emit)


def _model_args(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--model", default=None, help=f"run folder or checkpoint (anything mammut.load loads); {default_help}")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the device computes bf16 natively (CUDA Ampere+, CPUs "
                        "with AVX512-BF16/AMX), else fp32; fp32; bf16 (bfloat16 autocast)")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                   help="the same as --precision bf16")


def register_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the application commands to ``mammut``'s subparsers."""
    ix = subparsers.add_parser(
        "index", help="embed a folder / CSV / shards of images (or videos) into a searchable index folder",
        description="Embed the images of SOURCE (a folder, searched recursively; a CSV/TSV with an image path "
                    "column and optional caption column; or local WebDataset shards; with a video model, the video "
                    "files of SOURCE instead) into the index folder --out: "
                    "float16 embeddings, SQLite metadata and a FAISS index. Run it again after a kill to resume "
                    "(finished chunks are kept); --add adds the new images of SOURCE to an index. Under torchrun, "
                    "the processes split the chunks.")
    ix.add_argument("source", nargs="?", default=None, help="folder, .csv/.tsv file, or shard pattern (data-{000..009}.tar)")
    ix.add_argument("--out", default=None, help="index folder (default with --demo-heldout: RUN/search-index)")
    _model_args(ix, "default with --add or --demo-heldout: the index's / the run's")
    ix.add_argument("--add", action="store_true",
                    help="add SOURCE's new images to the index in --out (no SOURCE: look at its sources again)")
    ix.add_argument("--demo-heldout", metavar="RUN", default=None,
                    help="index the held-out emoji scenes of an emoji run (e.g. the make demo run)")
    ix.add_argument("--n", type=int, default=512, help="with --demo-heldout: how many scenes (default 512)")
    ix.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    ix.add_argument("--workers", type=int, default=0, help="data-loader worker processes decoding images (default 0)")
    ix.add_argument("--chunk-size", type=int, default=1024,
                    help="images per chunk, the unit of resuming and of splitting across processes (default 1024)")
    ix.add_argument("--img-key", default="filepath", help="CSV: the image path column (default filepath)")
    ix.add_argument("--caption-key", default=None, help="CSV: the caption column (default: title, if present)")
    ix.add_argument("--image-root", default=None, help="CSV: folder relative image paths start from (default: the CSV's)")
    ix.add_argument("--ivf-threshold", type=int, default=None,
                    help="from this many images on, an IVF-PQ index instead of the exact one (default 100000; "
                         "with --add or a resumed build, the index settings default to the index's own)")
    ix.add_argument("--memory-budget", default=None,
                    help="most memory the index may take, e.g. 2G: picks exact vs IVF-PQ and the PQ code size; "
                         "an index that cannot fit is memory-mapped at search time")
    ix.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    ix.add_argument("--pq-m", type=int, default=None, help="PQ code bytes per vector (default: up to 32)")
    ix.add_argument("--train-size", type=int, default=None, help="vectors to train IVF-PQ on (default: a sample)")
    ix.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query (stored; default 32)")
    ix.add_argument("--rerank", type=int, default=16,
                    help="IVF-PQ: re-rank k*RERANK candidates exactly with the stored embeddings (0: off; default 16)")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    ix.set_defaults(handler=_index)

    se = subparsers.add_parser("search", help="search an index folder by text or by image")
    se.add_argument("dir", help="index folder (from mammut index)")
    se.add_argument("query", nargs="?", default=None, help="the text to search for")
    se.add_argument("--image", default=None, help="search by this image file instead")
    se.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    se.add_argument("--max-k", type=int, default=1000, help=argparse.SUPPRESS)
    se.add_argument("--json", action="store_true", help="print the results as JSON")
    se.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: the index's)")
    se.add_argument("--mmap", action="store_true", help="memory-map the FAISS index instead of reading it")
    _model_args(se, "default: the index's model")
    se.set_defaults(handler=_search)

    sv = subparsers.add_parser(
        "serve", help="a web page and JSON API to search and caption an index",
        description="Serve DIR (an index folder; or a run folder, whose held-out emoji scenes are indexed on first "
                    "use) on http://HOST:PORT: a search page, and a JSON API documented at /docs.")
    sv.add_argument("dir", help="index folder, or an emoji run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted, in MiB (default 10)")
    sv.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for (default 1000)")
    sv.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: the index's)")
    sv.add_argument("--mmap", action="store_true", help="memory-map the FAISS index instead of reading it")
    sv.add_argument("--timeout-keep-alive", type=float, default=5.0,
                    help="seconds an idle keep-alive connection is kept open (default 5)")
    sv.add_argument("--limit-concurrency", type=int, default=64,
                    help="most connections and requests at once; more are answered 503 (default 64)")
    sv.add_argument("--body-timeout", type=float, default=10.0,
                    help="seconds a request body may stall before a 408 closes its connection (default 10)")
    _model_args(sv, "default: the index's model")
    sv.set_defaults(handler=_serve)

    from .detect import add_detect_command  # argparse only at import time

    add_detect_command(subparsers, _detect)
