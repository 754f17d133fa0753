"""Photo search figures (printed, not asserted):

1. index build throughput (images/s) of ``mammut index`` on held-out emoji scenes written as
   PNG files, with 0 and 2 data-loader workers;
2. query latency p50 / p99 and throughput of ``mammut serve``'s ``/api/search`` (text -> model
   -> FAISS -> SQLite -> JSON) over loopback, at 10k and 100k vectors, under a bounded load:
   ``--clients`` concurrent keep-alive clients for ``--duration`` seconds each (the server
   runs in its own process); plus the median time of the two parts that are not HTTP: the text
   embedding and the FAISS search;
3. recall@10 of the IVF-PQ index against the exact one, with and without the exact re-ranking
   of ``k * rerank`` candidates.

    .venv/bin/python benchmarks/search.py [--model RUN] [--sizes 10000,100000] [--dim 512]
        [--clients 8] [--duration 20] [--build-images 512] [--threads 2]

The index vectors are synthetic (clustered, L2-normalised, ``--dim``), so any size can be
served; queries go through the real model's text encoder (``--model``; default: a tiny run
trained here for a few seconds), projected to ``--dim`` by a fixed random matrix. The anchor is
clip-retrieval's back end, which reports about 50 ms per query and about 20 queries/s; those
figures are printed beside ours (theirs: CLIP ViT-B/32 text encoder, 512-d, their hardware).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLIP_RETRIEVAL = {"ms_per_query": 50.0, "queries_per_s": 20.0}  # as clip-retrieval reports for its back end
QUERIES = ["a cat left of a dog", "a red apple", "a smiling face above a star", "a rocket", "a tree right of a house",
           "a fish below a boat", "a heart", "a dog", "a pizza and a cake", "a sun above a cloud"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model


def tiny_run(root: Path) -> Path:
    run = root / "tiny-run"
    cmd = [sys.executable, "-m", "mammut.cli", "train", "--config", "tiny", "--train.out_dir", str(run),
           "--train.steps", "2", "--train.report", "false", "--train.progress", "false", "--train.tensorboard", "false"]
    subprocess.run(cmd, check=True, capture_output=True)
    return run


class Projected:
    """A model's encoder with its embeddings projected to ``dim`` (fixed random matrix)."""

    def __init__(self, base: Any, dim: int) -> None:
        self.base, self.name = base, base.name
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(base.dim, dim, generator=gen).numpy() / np.sqrt(dim)
        self.dim = dim

    def _out(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.proj
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.base.preprocess(image)

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        return self._out(self.base.embed_images(pixels))

    def embed_texts(self, texts: Any) -> np.ndarray:
        return self._out(self.base.embed_texts(texts))

    def caption(self, pixels: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        return self.base.caption(pixels, max_new_tokens)


# ----------------------------------------------------------------------------- synthetic indexes


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 256, latent: int | None = None) -> np.ndarray:
    """L2-normalised vectors in ``clusters`` clusters. ``latent=None``: isotropic noise in all
    ``dim`` directions (nearly equidistant neighbours: the hard case for PQ); ``latent=L``: the
    clusters live in an L-dimensional subspace (as real embeddings have a low intrinsic dimension)
    plus a little noise outside it. The same ``seed`` always gives the same space, whatever ``n``."""
    space = np.random.default_rng(12345)
    inner = latent or dim
    centres = space.normal(size=(clusters, inner)).astype(np.float32)
    basis = space.normal(size=(inner, dim)).astype(np.float32) / np.sqrt(inner) if latent else None
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, inner)).astype(np.float32)
        x = z if basis is None else z @ basis + 0.05 * rng.normal(size=(m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def synthetic_index(folder: Path, vectors: np.ndarray, image: Path, model: str, *, ivf_threshold: int,
                    chunk: int = 8192) -> float:
    """An index folder over ``vectors`` whose every entry shows ``image``; returns the seconds
    the FAISS part took (training + adding)."""
    from mammut.apps.build import BuildOptions, _finish
    from mammut.apps.collection import Item
    from mammut.apps.folder import IndexFolder, write_atomic
    from mammut.apps.store import MetadataStore

    size = image.stat().st_size
    items = [Item(str(image), member=f"v{i:08d}.png", offset=0, size=size) for i in range(len(vectors))]
    with MetadataStore(folder, create=True) as store:
        store.add_items(items, chunk)
    ix = IndexFolder(folder)
    ix.chunk_dir.mkdir(parents=True, exist_ok=True)
    for c, s in enumerate(range(0, len(vectors), chunk)):
        part = vectors[s:s + chunk].astype(np.float16)
        np.save(ix.chunk_npy(c), part)
        write_atomic(ix.chunk_done(c), json.dumps({"chunk": c, "ids": list(range(s, s + len(part))),
                                                   "sizes": [[64, 64]] * len(part), "corrupt": [], "errors": [],
                                                   "dim": vectors.shape[1], "rank": 0}).encode())
    opts = BuildOptions(out=folder, ivf_threshold=ivf_threshold)
    ix.write_info({"model": model, "status": "building", "sources": [{"source": "synthetic", "kind": "synthetic"}],
                   "chunk_size": chunk, "nprobe": opts.nprobe, "rerank": opts.rerank})
    t0 = time.perf_counter()
    _finish(ix, opts, vectors.shape[1])
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- serving under load


def serve_child(args: argparse.Namespace) -> None:
    """The server process: ``--child-serve DIR``."""
    import uvicorn

    from mammut.apps.encoder import load_encoder
    from mammut.apps.searcher import SearchIndex
    from mammut.apps.server import create_app

    torch.set_num_threads(args.threads)
    encoder = Projected(load_encoder(args.model), args.dim)
    app = create_app(SearchIndex(args.child_serve), encoder)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(folder: Path, args: argparse.Namespace, passes: list[tuple[int, float]]) -> list[dict[str, float]]:
    """One server process; for each ``(clients, seconds)`` pass, the latencies of its requests."""
    port = _free_port()
    cmd = [sys.executable, __file__, "--child-serve", str(folder), "--model", str(args.model), "--dim", str(args.dim),
           "--port", str(port), "--threads", str(args.threads)]
    child = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    try:
        deadline = time.monotonic() + 180
        while True:  # wait for the server (bounded)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/info")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        results = []
        for clients, seconds in passes:
            results.append(_load(port, clients, seconds))
    finally:
        child.terminate()
        child.wait(timeout=30)
    return results


def _load(port: int, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` keep-alive clients sending /api/search for ``seconds`` (and at most 100k requests each)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, i = [], seed
        while time.monotonic() < stop and len(mine) < 100_000:
            q = urllib.parse.urlencode({"q": QUERIES[i % len(QUERIES)], "k": 10})
            i += 1
            t0 = time.perf_counter()
            conn.request("GET", f"/api/search?{q}")
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - t0)
            if resp.status != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": errors[0], "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "qps": len(ms) / wall}


def parts(folder: Path, encoder: Any, repeats: int = 200) -> dict[str, float]:
    """Median ms of the text embedding and of the FAISS search (+ re-rank), in this process."""
    from mammut.apps.searcher import SearchIndex

    index = SearchIndex(folder)
    emb, search = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        q = encoder.embed_texts([QUERIES[i % len(QUERIES)]])
        t1 = time.perf_counter()
        index.search(q, 10)
        search.append(time.perf_counter() - t1)
        emb.append(t1 - t0)
    return {"embed_ms": float(np.median(emb)) * 1000, "search_ms": float(np.median(search)) * 1000}


# ----------------------------------------------------------------------------- main


def build_throughput(run: Path, root: Path, n: int, workers: list[int]) -> list[tuple[int, float]]:
    from mammut.apps.build import BuildOptions, build
    from mammut.apps.demo import write_heldout_scenes
    from mammut.apps.encoder import load_encoder

    csv = write_heldout_scenes(run, root / "scenes", n)
    encoder = load_encoder(run)
    out = []
    for w in workers:
        report = build(BuildOptions(out=root / f"build-w{w}", source=str(csv), workers=w, progress=False), encoder)
        out.append((w, report.images_per_s))
    return out


def recall(flat_dir: Path, ivf_dir: Path, queries: np.ndarray) -> dict[tuple[int, int], tuple[float, float]]:
    """(nprobe, rerank) -> (recall@10 against exact search, median ms a query)."""
    from mammut.apps.searcher import SearchIndex

    exact = [[h.record.id for h in row] for row in SearchIndex(flat_dir).search(queries, 10)]
    out = {}
    for nprobe in (32, 128):
        for rerank in (1, 4, 16):
            index = SearchIndex(ivf_dir, rerank=rerank, nprobe=nprobe)
            got, times = [], []
            for q in queries:
                t0 = time.perf_counter()
                got.append([h.record.id for h in index.search(q[None], 10)[0]])
                times.append(time.perf_counter() - t0)
            out[(nprobe, rerank)] = (float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])),
                                     float(np.median(times)) * 1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="run folder (default: a tiny run trained here)")
    p.add_argument("--sizes", default="10000,100000", help="index sizes to serve, comma-separated")
    p.add_argument("--dim", type=int, default=512, help="embedding size of the synthetic index (default 512, as CLIP B/32)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per index (default 20)")
    p.add_argument("--build-images", type=int, default=512, help="scenes to index for the build figure (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    p.add_argument("--latent", type=int, default=64, help="intrinsic dimension of the recall data (default 64)")
    p.add_argument("--recall-queries", type=int, default=500, help="queries for recall@10 (default 500)")
    p.add_argument("--child-serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_serve:
        serve_child(args)
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from mammut.apps.encoder import load_encoder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model is None:
            _log("training a tiny run for the model ...")
            args.model = str(tiny_run(root))
        _log("index build throughput ...")
        builds = build_throughput(Path(args.model), root, args.build_images, [0, 2])
        encoder = Projected(load_encoder(args.model), args.dim)
        image = next((root / "scenes").glob("*.png"))
        rows = []
        sizes = [int(s) for s in args.sizes.split(",")]
        for n in sizes:
            vectors = clustered(n, args.dim)
            kind_dir = root / f"idx-{n}"
            _log(f"{n} vectors: building the index ...")
            faiss_s = synthetic_index(kind_dir, vectors, image, str(Path(args.model).absolute()), ivf_threshold=100_000)
            kind = json.loads((kind_dir / "index.json").read_text())["index"]["kind"]
            _log(f"{n} vectors ({kind}): {args.clients} clients for {args.duration:.0f} s ...")
            one, many = load_test(kind_dir, args, [(1, max(5.0, args.duration / 4)), (args.clients, args.duration)])
            rows.append((n, kind, faiss_s, one, many, parts(kind_dir, encoder)))
        # recall at the largest size: exact vs IVF-PQ over the same vectors, two kinds of data
        n = max(sizes)
        rec = {}
        for name, latent in ((f"{args.latent}-d subspace", args.latent), ("isotropic", None)):
            vectors = clustered(n, args.dim, latent=latent)
            flat_dir, ivf_dir = root / f"recall-flat-{latent}", root / f"recall-ivf-{latent}"
            _log(f"recall@10 at {n} vectors ({name}) ...")
            synthetic_index(flat_dir, vectors, image, args.model, ivf_threshold=10**12)
            synthetic_index(ivf_dir, vectors, image, args.model, ivf_threshold=0)
            rec[name] = recall(flat_dir, ivf_dir, clustered(args.recall_queries, args.dim, seed=1, latent=latent))

    print(f"\nmammut photo search, {os.cpu_count()} CPUs, {args.threads} threads, model {args.model} "
          f"(text embeddings projected to {args.dim}-d)")
    print("\nindex build (held-out emoji scenes as PNG files, batch 64):")
    for w, ips in builds:
        print(f"  {args.build_images} images, {w} workers: {ips:8.1f} images/s")
    print(f"\n/api/search over loopback, k=10: 1 client for {max(5.0, args.duration / 4):.0f} s, then "
          f"{args.clients} clients for {args.duration:.0f} s (latency = one request's round trip):")
    print(f"  {'vectors':>8}  {'index':>6}  {'faiss build s':>13}  {'1 client p50/p99 ms':>19}  {'q/s':>6}  "
          f"{f'{args.clients} clients p50/p99 ms':>20}  {'q/s':>6}  {'errors':>6}  {'embed ms':>8}  {'search ms':>9}")
    for n, kind, fs, one, many, part in rows:
        print(f"  {n:>8}  {kind:>6}  {fs:13.1f}  {one['p50']:9.1f} / {one['p99']:6.1f}  {one['qps']:6.1f}  "
              f"{many['p50']:10.1f} / {many['p99']:6.1f}  {many['qps']:6.1f}  {one['errors'] + many['errors']:>6}  "
              f"{part['embed_ms']:8.2f}  {part['search_ms']:9.2f}")
    print(f"  {'clip-retrieval back end (reported)':>40}:  ~{CLIP_RETRIEVAL['ms_per_query']:.0f} ms per query, "
          f"~{CLIP_RETRIEVAL['queries_per_s']:.0f} queries/s")
    print(f"\nrecall@10 of IVF-PQ against exact search, {max(sizes)} vectors of {args.dim}, "
          f"{args.recall_queries} queries (rerank 1 = PQ codes only; R = the k*R best re-ranked exactly; the default is 16):")
    for name, table in rec.items():
        for nprobe in sorted({p for p, _ in table}):
            cells = "   ".join(f"rerank {r:>2}: {v:.3f} ({ms:.1f} ms)" for (p, r), (v, ms) in table.items() if p == nprobe)
            print(f"  {name:>18}, nprobe {nprobe:>3}:  {cells}")


if __name__ == "__main__":
    main()
