"""Handlers of ``mammut index``, ``mammut search`` and ``mammut serve`` (``args -> exit code``).
User errors are ``ValueError``/``OSError`` naming the argument; ``mammut.cli`` prints them as
one line and exits 2 (an index folder in use by another build, ``FolderLocked``, too)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .collection import display
from .demo import DEMO_INDEX, SCENES, is_run_folder, write_heldout_scenes

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU build it tried

__all__ = ["run_index", "run_search", "run_serve", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, name: str = "--memory-budget") -> int:
    """``"4G"``, ``"512M"``, ``"1.5G"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{name}: expected a size such as 4G, 512M or 1000000 (bytes), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _encoder(model: str | None, folder: Any, args: argparse.Namespace) -> Any:
    from .encoder import load_encoder

    source = model
    if source is None:
        source = folder.read_info().get("model") if folder is not None and folder.exists() else None
    if not source:
        raise ValueError("--model: expected a run folder or checkpoint (the index does not name one)")
    device = getattr(args, "device", None)
    if device is None:
        import os

        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    precision = getattr(args, "precision", None) or ("bf16" if getattr(args, "bf16", False) else "auto")
    return load_encoder(source, device=device, precision=precision)


@contextlib.contextmanager
def _folder_errors() -> Iterator[None]:
    """An index folder in use by another build (``FolderLocked``, a RuntimeError) as the CLI's
    one-line error."""
    from ..io.runlock import FolderLocked

    try:
        yield
    except FolderLocked as exc:
        raise ValueError(f"--out: {exc}") from None


def _same_model(model: str | None, index: Any) -> None:
    """``--model``, when given, must be the index's: vectors of another model are not comparable."""
    if model is None or not index.model:
        return

    def key(name: str) -> str:
        return name if name.startswith("hf-hub:") else str(Path(name).expanduser().resolve())

    if key(model) != key(index.model):
        raise ValueError(f"--model: {index.folder.root} was built with {index.model}; search it with that model "
                         f"(or leave --model out), got {model}")


def _build_demo(run: Path, out: Path, n: int, args: argparse.Namespace | None = None) -> Any:
    from .build import BuildOptions, build

    csv = write_heldout_scenes(run, out / SCENES, n)
    opts = BuildOptions(out=out, source=str(csv))
    if args is not None:
        opts = _build_options(args, out, str(csv))
    with _folder_errors():
        return build(opts, _encoder(str(run.absolute()), None, args or argparse.Namespace()))


def _build_options(args: argparse.Namespace, out: Path, source: str | None) -> Any:
    from .build import BuildOptions

    return BuildOptions(
        out=out, source=source, add=args.add, batch_size=args.batch_size, workers=args.workers,
        chunk_size=args.chunk_size, img_key=args.img_key, caption_key=args.caption_key,
        image_root=args.image_root, ivf_threshold=args.ivf_threshold,
        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None, nlist=args.nlist,
        pq_m=args.pq_m, train_size=args.train_size, nprobe=args.nprobe, rerank=args.rerank,
        progress=not args.no_progress)


def run_index(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    from .build import build
    from .folder import IndexFolder

    if args.demo_heldout:
        run = Path(args.demo_heldout).expanduser()
        if args.source:
            raise ValueError(f"SOURCE: --demo-heldout indexes the run's held-out scenes; got SOURCE {args.source} too")
        out = Path(args.out).expanduser() if args.out else run / DEMO_INDEX
        report = _build_demo(run, out, args.n, args)
    else:
        if not args.out:
            raise ValueError("--out: expected the index folder to write, got none")
        if not args.source and not args.add:  # --add alone: the sources of the index again
            raise ValueError("SOURCE: expected a folder, CSV/TSV file or shard pattern (or --demo-heldout RUN)")
        folder = IndexFolder(args.out)
        if args.add and not folder.exists():
            raise FileNotFoundError(f"--add: no index to add to in {folder.root} (build it first, without --add)")
        opts = _build_options(args, folder.root, args.source)
        opts.check()
        with _folder_errors():
            report = build(opts, _encoder(args.model, folder, args))
    if report.index:  # rank 0
        emit(f"{display(str(report.out))}: {report.total} images indexed ({report.total_corrupt} unreadable, skipped); "
              f"this run embedded {report.embedded} in {report.chunks_done} chunks "
              f"({report.chunks_skipped} already done), {report.images_per_s:.1f} images/s; {report.index}")
    return 0


def _open(directory: str, args: argparse.Namespace) -> Any:
    from .searcher import SearchIndex

    return SearchIndex(directory, mmap=True if args.mmap else None, nprobe=args.nprobe)


def run_search(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    from .searcher import check_k

    if (args.query is None) == (args.image is None):
        raise ValueError("QUERY: expected a text or --image FILE, got " + ("both" if args.query else "neither"))
    if args.query is not None and not args.query.strip():
        raise ValueError("QUERY: expected a non-empty text, got ''")
    k = check_k(args.k, args.max_k)
    index = _open(args.dir, args)
    _same_model(args.model, index)
    encoder = _encoder(args.model, index.folder, args)
    if args.image:
        from ..data.datasets import decode_image

        vec = encoder.embed_images(encoder.preprocess(decode_image(Path(args.image).expanduser(), where="--image"))[None])
    else:
        vec = encoder.embed_texts([args.query.strip()])
    hits = index.search(vec, k, args.max_k)[0]
    if args.json:
        # the path and member as they are, bytes that are not UTF-8 as JSON's \udcXX escapes (lossless:
        # os.fsencode gives the name's bytes back); "name" is printable
        emit(json.dumps([{"rank": r + 1, **h.public(), "path": h.record.path, "member": h.record.member or None}
                          for r, h in enumerate(hits)], indent=2, ensure_ascii=True))
        return 0
    width = max([4, *(len(h.record.name) for h in hits)])
    rows = [f"{'rank':>4}  {'score':>6}  {'id':>7}  {'name':<{width}}  caption"]
    rows += [f"{r + 1:>4}  {h.score:6.3f}  {h.record.id:>7}  {h.record.name:<{width}}  {h.record.caption or ''}"
             for r, h in enumerate(hits)]
    emit("\n".join(rows))
    return 0


def run_serve(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    from .folder import IndexFolder
    from .server import create_app, default_allowed_hosts

    directory = Path(args.dir).expanduser()
    if not IndexFolder(directory).exists() and is_run_folder(directory):
        run, directory = directory, directory / DEMO_INDEX
        if not IndexFolder(directory).exists() or IndexFolder(directory).read_info().get("status") != "ready":
            log.info("%s is a run folder: indexing its held-out scenes into %s first", run, directory)
            _build_demo(run, directory, 512)
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb: expected a size > 0, got {args.max_upload_mb}")
    for flag, value in (("--timeout-keep-alive", args.timeout_keep_alive), ("--body-timeout", args.body_timeout)):
        if not value > 0:
            raise ValueError(f"{flag}: expected a number of seconds > 0, got {value:g}")
    if args.limit_concurrency < 1:
        raise ValueError(f"--limit-concurrency: expected an int >= 1, got {args.limit_concurrency}")
    max_upload = int(args.max_upload_mb * 2**20)
    index = _open(str(directory), args)
    _same_model(args.model, index)
    host = args.host[1:-1] if args.host.startswith("[") and args.host.endswith("]") else args.host
    app = create_app(index, _encoder(args.model, index.folder, args), max_upload_bytes=max_upload, max_k=args.max_k,
                     allowed_hosts=default_allowed_hosts(host), body_timeout=args.body_timeout)
    import uvicorn

    netloc = f"[{host}]" if ":" in host else host
    emit(f"serving {index.size} images of {display(str(directory))} on http://{netloc}:{args.port} (API: /docs)")
    uvicorn.run(app, host=host, port=args.port, log_level="info", timeout_keep_alive=args.timeout_keep_alive,
                limit_concurrency=args.limit_concurrency)
    return 0
