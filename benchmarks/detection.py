"""Open-vocabulary detection at inference on CPU: images/s and peak memory of
``MaMMUTDetector.detect`` (every token's box and its logits for every query) plus the top-100
selection (``mammut.eval.detection.predict``), against the same model's image embedding
(``embed_image``: the encoder alone, the pretrained model's cost) at the same size, measured in
one run (interleaved rounds, medians), so the ratio holds on a shared machine; and the same
``predict`` with each image's 10 best proposals re-scored by the frozen pretrained image tower on
their crops (``Rescore``, the evaluation's default for a detector with ``model.region_size``).

    .venv/bin/python benchmarks/detection.py [--run RUN] [--sizes 64,96,128] [--batch 32] [--queries 300]
        [--threads 2] [--repeats 5] [--precision fp32|bf16]

Model: ``--run`` (a detection run: its weights) or the ``detection`` preset's architecture on
the ``demo`` MaMMUT (random init; the speed does not depend on the weights), eval mode, no grad.
Peak memory: each setting runs in a fresh process; the figure is the peak resident set during
the first ``predict`` call of a batch (``/proc/self/statm``, sampled every millisecond by a
thread) minus the resident set just before it: the working set the call adds (later calls reuse
the freed memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(run: str | None, size: int) -> torch.nn.Module:
    from mammut.train.build import build_model
    from mammut.train.config import load_config

    if run:
        import mammut

        model = mammut.load(run)[0]
        if model.image_size != size:
            model.set_image_size(size)
        return model.eval()
    cfg = load_config("demo")
    section = {**cfg.model, "name": "mammut_detector", "num_tokens": 2048, "pad_id": 0, "bos_id": 1, "eos_id": 2,
               "region_size": cfg.data.image_size}
    section["vit"] = {**section["vit"], "image_size": size}
    return build_model(section).eval()


class RssPeak:
    """Peak resident set during a ``with`` block, sampled every millisecond from /proc/self/statm."""

    def __enter__(self) -> "RssPeak":
        import threading

        self._page = resource.getpagesize() // 1024
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.added_kib = self.peak - self.start


def one(args: argparse.Namespace, size: int) -> dict:
    """One setting, in this process: throughput of detect+predict and of embed_image, peak memory."""
    from _timing import interleaved  # benchmarks/_timing.py

    from mammut.eval.detection import Rescore, predict

    torch.set_num_threads(args.threads)
    model = build(args.run, size)
    images = torch.rand(args.batch, 3, size, size)
    queries = torch.randint(3, model.config.num_tokens, (args.queries, 8))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else None
    with torch.no_grad():
        q = model.query_embeds(queries)
    rescore = Rescore() if getattr(model, "region", None) is not None else None
    with torch.inference_mode():
        with RssPeak() as peak:
            predict(model, images, q, batch_size=args.batch, autocast=ctx, rescore=rescore)
    peak_kib = peak.added_kib

    def detect() -> None:
        with torch.inference_mode():
            predict(model, images, q, batch_size=args.batch, autocast=ctx, rescore=None)

    def rescored() -> None:
        with torch.inference_mode():
            predict(model, images, q, batch_size=args.batch, autocast=ctx, rescore=rescore)

    def embed() -> None:
        with torch.inference_mode(), (ctx() if ctx else torch.autocast("cpu", enabled=False)):
            model.embed_image(images)

    fns = {"detect": detect, "embed": embed, **({"rescored": rescored} if rescore is not None else {})}
    t = interleaved(fns, args.repeats)
    return {"size": size, "tokens": (size // 8) ** 2, "detect_images_per_s": args.batch / t["detect"],
            "rescored_images_per_s": args.batch / t["rescored"] if "rescored" in t else None,
            "embed_images_per_s": args.batch / t["embed"], "peak_mib": peak_kib / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None)
    p.add_argument("--sizes", default="64,96,128")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(args, args.one)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(size), "--batch", str(args.batch), "--queries", str(args.queries),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--precision", args.precision]
        if args.run:
            cmd += ["--run", args.run]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1]["process_s"] = time.perf_counter() - start
    print(f"detect = tokens + boxes + {args.queries} query logits + top-100 per image; embed = embed_image "
          f"(the encoder and pooling); batch {args.batch}, {args.threads} threads, {args.precision}, "
          f"torch {torch.__version__}")
    print("rescored = detect + each image's 10 best proposals re-scored by the frozen pretrained image tower (3 crops "
          "each); peak MiB: the first predict call as the evaluation runs it (with re-scoring where the model has the tower)")
    print("| image px | tokens | detect images/s | rescored images/s | embed images/s | detect / embed | rescored / embed "
          "| peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        re, emb = r["rescored_images_per_s"], r["embed_images_per_s"]
        re_cells = f"{re:.1f}" if re else "n/a", f"{re / emb:.2f}" if re else "n/a"
        print(f"| {r['size']} | {r['tokens']} | {r['detect_images_per_s']:.1f} | {re_cells[0]} | {emb:.1f} | "
              f"{r['detect_images_per_s'] / emb:.2f} | {re_cells[1]} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
