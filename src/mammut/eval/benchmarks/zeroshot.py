"""``mammut eval zeroshot SOURCE --data DIR [--classnames FILE|imagenet] [--templates FILE|imagenet|TEMPLATE]``:
zero-shot classification of an ImageFolder (the evaluation: :mod:`mammut.eval.zeroshot`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import Benchmark, common_options, register_benchmark


@register_benchmark
class ZeroShot(Benchmark):
    name = "zeroshot"
    help = "zero-shot classification of an ImageFolder (top-1/5, mean per-class recall, confusion matrix)"
    title = "Zero-shot classification"
    summary_keys = ("top1", "top5", "mean_per_class_recall")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, help="ImageFolder: one sub-folder of images per class")
        p.add_argument("--classnames", default=None,
                       help="file of class names: one per line in sorted folder order, or 'folder<TAB>name' lines "
                            "in any order naming every class folder once; or 'imagenet' (the shipped ImageNet-1k "
                            "names); default: the folder names")
        p.add_argument("--templates", default=None,
                       help="file of prompt templates with {} for the class name, 'imagenet' (CLIP's 80, the "
                            "default), or one template such as 'a photo of a {}.'")
        p.add_argument("--scoring", default="contrastive", choices=("contrastive", "generative"),
                       help="contrastive (default): cosine of image and class-prompt embeddings; generative: the "
                            "log-probability the captioner gives each class prompt as the image's caption "
                            "(MaMMUT, CoCa)")

    def check(self, args: argparse.Namespace) -> None:
        """A bad folder, names or templates file: the error comes before the model loads."""
        from ...data.formats import read_image_folder
        from ..zeroshot import load_classnames, load_templates

        load_classnames(args.classnames, read_image_folder(args.data).classes)
        load_templates(args.templates)

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..zeroshot import evaluate_zeroshot

        return evaluate_zeroshot(em, args.data, out, classnames=args.classnames, templates=args.templates,
                                 scoring=args.scoring, **common_options(args))
