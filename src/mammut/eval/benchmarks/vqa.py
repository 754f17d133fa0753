"""``mammut eval vqa SOURCE --questions Q.json --annotations A.json --images DIR [--prompt TEMPLATE]``:
VQAv2 accuracy by prompted generation (the evaluation and the official scoring rule: :mod:`mammut.eval.vqa`);
``--shots K --support Q.json --support-annotations A.json``: in-context examples for models that take media
sequences (:mod:`mammut.eval.fewshot`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._fewshot_options import add_fewshot_arguments, check_fewshot
from . import Benchmark, check_generation, common_options, generation_arguments, generation_options, register_benchmark


@register_benchmark
class Vqa(Benchmark):
    name = "vqa"
    help = "VQAv2 accuracy (questions + annotations JSON) by prompted generation"
    title = "Visual question answering"
    batch_size = 32
    summary_keys = ("accuracy",)
    unit = "questions"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--questions", required=True, help="VQAv2 questions JSON")
        p.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
        p.add_argument("--images", required=True, help="image folder (e.g. val2014)")
        p.add_argument("--image-template", default=None,
                       help="image file name, e.g. 'COCO_{subtype}_{image_id:012d}.jpg' (default: tried in turn)")
        p.add_argument("--prompt", default=None, help="prompt template with {question} (default '{question} answer:'; "
                                                      "a VQA-finetuned run uses its own)")
        generation_arguments(p, 10)
        add_fewshot_arguments(p, vqa=True)

    def check(self, args: argparse.Namespace) -> None:
        check_generation(args)
        check_fewshot(args)

    def data(self, args: argparse.Namespace) -> str:
        return f"{args.questions} + {args.annotations}"

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        if args.shots > 0:
            from ..fewshot import evaluate_fewshot_vqa

            return evaluate_fewshot_vqa(em, args, out, generation={"max_new_tokens": 10, **generation_options(args)})
        from ..vqa import evaluate_vqa

        return evaluate_vqa(em, args.questions, args.annotations, args.images, out, prompt=args.prompt,
                            image_template=args.image_template, generation=generation_options(args),
                            **common_options(args))
