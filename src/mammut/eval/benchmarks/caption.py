"""``mammut eval caption SOURCE --data captions.json [--images DIR] [--beams N --max-new-tokens N ...]
[--shots K --support DATA --selection random|rices]``: captioning scored with coco-caption's metrics
(the evaluation: :mod:`mammut.eval.captioning`; with ``--shots K > 0``, in-context examples for
models that take media sequences: :mod:`mammut.eval.fewshot`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._fewshot_options import add_fewshot_arguments, check_fewshot
from . import (Benchmark, captions_data_arguments, check_generation, common_options, generation_arguments,
               generation_options, register_benchmark)


@register_benchmark
class Caption(Benchmark):
    name = "caption"
    help = "captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap"
    title = "Captioning"
    batch_size = 32
    summary_keys = ("bleu4", "meteor", "rouge_l", "cider_d")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        captions_data_arguments(p)
        generation_arguments(p, 30)
        p.add_argument("--spice", action="store_true",
                       help="also SPICE (needs Java 8; downloads Stanford CoreNLP once)")
        p.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                       help="caption tokenisation: PTB (Java) when available, else the built-in stand-in")
        add_fewshot_arguments(p)

    def check(self, args: argparse.Namespace) -> None:
        check_generation(args)
        check_fewshot(args)

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        if args.shots > 0:
            from ..fewshot import evaluate_fewshot_captioning

            return evaluate_fewshot_captioning(em, args, out, generation=generation_options(args))
        from ..captioning import evaluate_captioning

        return evaluate_captioning(em, args.data, out, images=args.images, split=args.split, img_key=args.img_key,
                                   caption_key=args.caption_key, generation=generation_options(args),
                                   spice=args.spice, tokenizer=args.tokenizer, **common_options(args))
