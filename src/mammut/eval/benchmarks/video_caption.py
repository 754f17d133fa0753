"""``mammut eval video-caption SOURCE [--data MSRVTT_data.json|cap_test.json|... --videos DIR] [--beams N ...]``:
video captioning scored with coco-caption's metrics (the evaluation: :mod:`mammut.eval.video_eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import check_generation, generation_arguments, generation_options, register_benchmark
from ._video_options import VideoBenchmark, check_video_arguments, video_arguments, video_options


@register_benchmark
class VideoCaption(VideoBenchmark):
    name = "video-caption"
    help = "video captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap (default: moving-emoji clips)"
    title = "Video captioning"
    summary_keys = ("bleu4", "meteor", "rouge_l", "cider_d")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        video_arguments(p, "MSRVTT_data.json, LAVIS caption JSON, COCO-style annotations or CSV")
        p.add_argument("--split", default=None, help="MSRVTT_data.json only: the videos of this split (e.g. test)")
        generation_arguments(p, 30)
        p.add_argument("--spice", action="store_true", help="also SPICE (needs Java 8)")
        p.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                       help="caption tokenisation: PTB (Java) when available, else the built-in stand-in")

    def check(self, args: argparse.Namespace) -> None:
        check_video_arguments(args)
        check_generation(args)

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..video_eval import evaluate_video_captioning

        return evaluate_video_captioning(em, out, split=args.split, emoji_clips=args.emoji_clips,
                                         generation=generation_options(args), spice=args.spice,
                                         tokenizer=args.tokenizer, **video_options(args))
