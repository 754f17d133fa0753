"""Greedy captioning of an openMaMMUT architecture: mammut's KV-cached decoding versus a decode
that re-runs the whole prefix at every step (``use_cache=False``, what the fork's open_clip
``generate`` does: no cache, image keys/values recomputed every step), same weights, same
images, in one run.

Model: the fork's ``mammut_ViT-B-32`` config (``--model``) through
``mammut_config_from_open_clip`` (vision ViT-B/32, decoder 12 layers 512 wide, cross-attention
after layers 1, 3, ..., 11, learned positions, untied 49,408-token head) with random weights
(nothing is downloaded; the weight mapping itself is tested in ``tests/test_open_mammut.py``).
Random weights never pick the end token early, so both sides generate ``--tokens`` tokens; the
captions are checked to be identical token for token.

Run: ``.venv/bin/python benchmarks/caption_open_mammut.py [--threads 2 --batch 4 --tokens 32]``.
Prints ms/caption for each and the ratio no-cache / cache (ratios within one run are what
matter on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402


def main() -> None:
    from mammut import MaMMUT
    from mammut.convert.open_mammut import OPEN_MAMMUT_MODELS, mammut_config_from_open_clip, open_mammut_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mammut_ViT-B-32", choices=OPEN_MAMMUT_MODELS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per caption")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = MaMMUT(mammut_config_from_open_clip(open_mammut_config(args.model))).eval().to(args.device)
    torch.nn.init.normal_(model.to_logits.weight, std=model.config.dim ** -0.5)  # the fork zero-inits it
    size = model.config.vit["image_size"]
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    opts = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    cached = model.generate(images, **opts)
    recomputed = model.generate(images, use_cache=False, **opts)
    same = torch.equal(cached, recomputed)
    times = interleaved({
        "cache": lambda: model.generate(images, **opts),
        "no_cache": lambda: model.generate(images, use_cache=False, **opts),
    }, args.repeats)

    print(f"{args.model} (random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"batch {args.batch}, {args.tokens} new tokens, {args.threads} threads, {args.device}, greedy")
    print(f"captions identical token for token: {same}")
    per = 1000.0 / args.batch
    print(f"mammut generate (KV cache)        : {times['cache'] * per:8.1f} ms/caption")
    print(f"re-run the prefix every step      : {times['no_cache'] * per:8.1f} ms/caption   "
          f"no-cache / cache = {times['no_cache'] / times['cache']:.2f}x")
    if not same:
        raise SystemExit("captions differ between the cached and the recomputed decode")


if __name__ == "__main__":
    main()
