"""Options shared by the video benchmarks (``video-retrieval``, ``video-caption``, ``videoqa``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import Benchmark, positive_int

SAMPLINGS = ("uniform", "stride")


def video_arguments(p: argparse.ArgumentParser, data_help: str) -> None:
    """``--data`` (optional: the held-out moving-emoji clips without it), ``--videos``,
    ``--video-template``, ``--frames``, ``--sampling``, ``--stride``, ``--emoji-clips``."""
    p.add_argument("--data", default=None, help=data_help + " (default: held-out moving-emoji clips)")
    p.add_argument("--videos", default=None, help="folder of the video files (default: the --data file's folder)")
    p.add_argument("--video-template", default=None,
                   help="video file name from its id, e.g. 'video{video_id}.mp4' (default: tried in turn)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames per clip (default: the video encoder's; 8 for an image-only model)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="uniform",
                   help="uniform over the clip (default) or --stride frames apart, centred")
    p.add_argument("--stride", type=positive_int, default=None, help="with --sampling stride: frames between samples")
    p.add_argument("--emoji-clips", type=positive_int, default=256,
                   help="without --data: how many held-out moving-emoji clips / questions (default 256)")


def check_video_arguments(args: argparse.Namespace) -> None:
    if args.sampling == "stride" and args.stride is None:
        raise ValueError("--stride: expected a number of frames with --sampling stride, got none")
    if args.sampling != "stride" and args.stride is not None:
        raise ValueError(f"--stride: only used with --sampling stride, got --stride {args.stride} with --sampling "
                         f"{args.sampling}")
    if args.data is not None and not Path(args.data).expanduser().is_file():
        raise FileNotFoundError(f"--data: no such file {args.data!r}")
    if args.videos is not None and not Path(args.videos).expanduser().is_dir():
        raise FileNotFoundError(f"--videos: no such folder {args.videos!r}")


def video_options(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation functions' keyword arguments from the common and video options."""
    return dict(data=args.data, videos=args.videos, video_template=args.video_template, frames=args.frames,
                sampling=args.sampling, stride=args.stride, batch_size=args.batch_size, workers=args.workers,
                limit=args.limit, progress=not args.no_progress)


class VideoBenchmark(Benchmark):
    """A video benchmark: counts videos, says what default data it used."""

    batch_size = 16
    unit = "videos"

    def data(self, args: argparse.Namespace) -> str:
        return str(args.data) if args.data is not None else f"moving-emoji held-out clips ({args.emoji_clips})"

    def summary(self, metrics: dict[str, Any]) -> str:
        line = super().summary({**metrics, "n_images": metrics.get("n_videos")})
        skipped = (metrics.get("videos_skipped") or {}).get("total", 0)
        return line + (f"; {skipped} videos skipped (missing or unreadable)" if skipped else "")
