"""``mammut eval videoqa SOURCE [--data test_qa.json --videos DIR] [--answers train_ans2label.json] [--prompt T]``:
MSRVTT-QA / MSVD-QA accuracy, overall and per question type (the evaluation: :mod:`mammut.eval.video_eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import check_generation, generation_arguments, generation_options, register_benchmark
from ._video_options import VideoBenchmark, check_video_arguments, video_arguments, video_options


@register_benchmark
class VideoQA(VideoBenchmark):
    name = "videoqa"
    help = "VideoQA accuracy (MSRVTT-QA / MSVD-QA JSON) by prompted generation (default: moving-emoji questions)"
    title = "Video question answering"
    summary_keys = ("accuracy",)
    unit = "questions"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        video_arguments(p, "MSRVTT-QA / MSVD-QA JSON: a list of {question, answer, video_id}")
        p.add_argument("--answers", default=None,
                       help="answer vocabulary (train_ans2label.json or a JSON list): answers outside it count as wrong")
        p.add_argument("--prompt", default=None, help="prompt template with {question} (default '{question} answer:'; "
                                                      "a VQA / VideoQA run uses its own)")
        generation_arguments(p, 10)

    def check(self, args: argparse.Namespace) -> None:
        check_video_arguments(args)
        check_generation(args)
        if args.answers is not None and not Path(args.answers).expanduser().is_file():
            raise FileNotFoundError(f"--answers: no such file {args.answers!r}")

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..video_eval import evaluate_videoqa

        return evaluate_videoqa(em, out, answers=args.answers, prompt=args.prompt, emoji_questions=args.emoji_clips,
                                generation=generation_options(args), **video_options(args))
