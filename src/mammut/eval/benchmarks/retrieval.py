"""``mammut eval retrieval SOURCE --data karpathy.json|captions.json|pairs.csv [--images DIR] [--split test]``:
image-text retrieval (the evaluation: :mod:`mammut.eval.retrieval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import Benchmark, captions_data_arguments, common_options, register_benchmark


@register_benchmark
class Retrieval(Benchmark):
    name = "retrieval"
    help = "image-text retrieval R@1/5/10 both ways (Karpathy JSON, COCO captions JSON or CSV)"
    title = "Image-text retrieval"
    summary_keys = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        captions_data_arguments(p)

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..retrieval import evaluate_retrieval

        return evaluate_retrieval(em, args.data, out, images=args.images, split=args.split, img_key=args.img_key,
                                  caption_key=args.caption_key, **common_options(args))
