"""``mammut eval video-retrieval SOURCE [--data MSRVTT_JSFUSION_test.csv|MSRVTT_data.json|retrieval.json --videos DIR]``:
video-text retrieval R@1/5/10 both ways (the evaluation: :mod:`mammut.eval.video_eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import register_benchmark
from ._video_options import VideoBenchmark, check_video_arguments, video_arguments, video_options


@register_benchmark
class VideoRetrieval(VideoBenchmark):
    name = "video-retrieval"
    help = "video-text retrieval R@1/5/10 both ways (MSR-VTT CSV/JSON, LAVIS JSON; default: moving-emoji clips)"
    title = "Video-text retrieval"
    summary_keys = ("v2t_R@1", "v2t_R@5", "v2t_R@10", "t2v_R@1", "t2v_R@5", "t2v_R@10")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        video_arguments(p, "MSR-VTT CSV (video_id,sentence), MSRVTT_data.json, LAVIS retrieval JSON or CSV "
                           "(filepath,title)")
        p.add_argument("--split", default=None, help="MSRVTT_data.json only: the videos of this split (e.g. test)")

    def check(self, args: argparse.Namespace) -> None:
        check_video_arguments(args)

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..video_eval import evaluate_video_retrieval

        return evaluate_video_retrieval(em, out, split=args.split, emoji_clips=args.emoji_clips, **video_options(args))
