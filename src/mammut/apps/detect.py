"""``mammut detect IMG [IMG ...] --run RUN --queries "a cat, a red car"``: open-vocabulary
detection of free-text queries with a ``mammut_detector`` (a run trained with
``train.task: detection``, or anything ``mammut.load`` loads that holds one).

Each image is padded bottom / right with grey to a square and resized to the model's input
size (no distortion, :func:`mammut.data.detection.letterbox`); every image token gives a box
and a score per query (``sigmoid`` of its logit). Kept: scores of at least ``--threshold``,
then per query non-maximum suppression at ``--nms`` IoU (``torchvision.ops.batched_nms``;
OWL-ViT's text path has none, 1 turns it off), at most ``--max-detections`` per image, each
box voted over the tokens overlapping it at IoU >= ``--box-vote`` (0.3; weights: each token's
best score over the queries, squared; :func:`mammut.eval.detection.vote_boxes`, as the
detection evaluations; 0 turns it off). Writes
``OUT/<stem>.detections.png`` (the image with its boxes) and ``OUT/<stem>.detections.json``
(``{"image", "width", "height", "queries", "detections": [{"query", "score", "box": [x0, y0,
x1, y1] in the image's pixels}]}``) and prints one line per image.

:func:`detect_image` is the whole detection of one image; ``mammut serve`` calls it (through
:meth:`mammut.apps.encoder.ModelEncoder.locate`) to show where a text query is in each result
when the served model :func:`finds_text`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["add_detect_command", "run_detect", "detect_image", "finds_text", "parse_queries"]


def add_detect_command(subparsers: Any, handler: Callable[..., int]) -> None:
    p = subparsers.add_parser(
        "detect", help="find free-text queries in images: boxes drawn on the image and written as JSON",
        description="Open-vocabulary detection with a mammut_detector run: every query (comma-separated free text) "
                    "is scored at every image token; the boxes above --threshold are drawn on the image "
                    "(OUT/<stem>.detections.png) and written as JSON (OUT/<stem>.detections.json).")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--run", required=True, help="a detection run folder (or anything mammut.load loads)")
    p.add_argument("--queries", required=True, help='comma-separated text queries, e.g. "a cat, a red car"')
    p.add_argument("--out", default=None, help="output folder (default: beside each image)")
    p.add_argument("--threshold", type=float, default=0.1, help="lowest score kept (default 0.1, as OWL-ViT)")
    p.add_argument("--nms", type=float, default=0.3, help="per-query NMS IoU (default 0.3; 1 = none)")
    p.add_argument("--max-detections", type=int, default=20, help="most boxes per image (default 20)")
    p.add_argument("--box-vote", type=float, default=0.3,
                   help="each box the score-weighted mean of the token boxes overlapping it at this IoU (default 0.3; "
                        "0 = each token's own box)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint of the run (default: its newest valid one)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.set_defaults(handler=handler)


def parse_queries(text: str) -> list[str]:
    """``"a cat, a red car"`` -> ``["a cat", "a red car"]``; a ValueError naming --queries when empty."""
    queries = [q.strip() for q in text.split(",") if q.strip()]
    if not queries:
        raise ValueError(f"--queries: expected comma-separated text queries such as \"a cat, a red car\", got {text!r}")
    return queries


def finds_text(model: Any) -> bool:
    """Whether ``model`` finds free-text queries in images: an open-vocabulary detector (a
    ``detect(images, queries)`` method and no learned closed-vocabulary class list)."""
    if not callable(getattr(model, "detect", None)):
        return False
    return int(getattr(getattr(model, "config", None), "num_classes", 0) or 0) == 0


def detect_image(model: Any, tokenizer: Any, image: Any, queries: list[str], *, threshold: float = 0.1,
                 nms: float = 0.3, max_detections: int = 20, box_vote: float | None = 0.3) -> list[dict[str, Any]]:
    """Detections of ``queries`` in a PIL ``image``: ``[{"query", "score", "box": [x0, y0, x1, y1]
    pixels}]``, best first (see the module docstring)."""
    import torch
    from torchvision.ops import batched_nms, box_convert

    from ..data.detection import letterbox
    from ..eval.detection import vote_boxes

    size = model.image_size
    pixels, side, (h, w) = letterbox(image, size)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.detect(pixels.unsqueeze(0).to(dev), tokenizer(queries).to(dev))
    scores = torch.sigmoid(out["logits"][0].float())  # (m, q)
    boxes = box_convert(out["boxes"][0].float(), "cxcywh", "xyxy").clamp(0, 1)
    token, label = (scores >= threshold).nonzero(as_tuple=True)
    s, b = scores[token, label], boxes[token]
    if len(s) and nms < 1.0:
        keep = batched_nms(b, s, label, nms)
    else:
        keep = s.argsort(descending=True)
    keep = keep[:max_detections]
    kept = b[keep]
    if box_vote:
        kept = vote_boxes(kept, boxes, scores.amax(-1) ** 2, box_vote)
    found = []
    for k, box in zip(keep.tolist(), kept):
        x0, y0, x1, y1 = (float(v) * side for v in box)
        found.append({"query": queries[int(label[k])], "score": round(float(s[k]), 4),
                      "box": [round(min(x0, w), 1), round(min(y0, h), 1), round(min(x1, w), 1), round(min(y1, h), 1)]})
    return found


def _draw(image: Any, found: list[dict[str, Any]], path: Path) -> None:
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 200))
    for det in found:
        x0, y0, x1, y1 = det["box"]
        draw.rectangle([x0, y0, x1, y1], outline=(230, 30, 30), width=width)
        label = f"{det['query']} {det['score']:.2f}"
        tw = draw.textlength(label)
        draw.rectangle([x0, max(0, y0 - 11), x0 + tw + 4, max(11, y0)], fill=(230, 30, 30))
        draw.text((x0 + 2, max(0, y0 - 11)), label, fill=(255, 255, 255))
    canvas.save(path)


def run_detect(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    from PIL import Image, UnidentifiedImageError

    queries = parse_queries(args.queries)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: expected a score in [0, 1], got {args.threshold}")
    if not 0.0 < args.nms <= 1.0:
        raise ValueError(f"--nms: expected an IoU in (0, 1], got {args.nms}")
    if args.max_detections < 1:
        raise ValueError(f"--max-detections: expected >= 1, got {args.max_detections}")
    from ..eval.detection import check_box_vote

    check_box_vote(args.box_vote, "--box-vote")
    paths = [Path(p).expanduser() for p in args.images]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"IMG: no such file {p}")
    run = Path(args.run).expanduser()
    if not run.exists():
        raise FileNotFoundError(f"--run: no such run folder or file {run}")
    from ..loading import load

    model, _, tokenizer = load(run, device=args.device, checkpoint=args.checkpoint)
    if not callable(getattr(model, "detect", None)):
        raise ValueError(f"--run: expected a detector (a run trained with train.task: detection), got "
                         f"{type(model).__name__} from {run}")
    model.eval()
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise OSError(f"IMG: {p} is not a readable image ({exc})") from None
        found = detect_image(model, tokenizer, image, queries, threshold=args.threshold, nms=args.nms,
                             max_detections=args.max_detections, box_vote=args.box_vote)
        folder = out if out is not None else p.parent
        png, js = folder / f"{p.stem}.detections.png", folder / f"{p.stem}.detections.json"
        _draw(image, found, png)
        js.write_text(json.dumps({"image": str(p), "width": image.width, "height": image.height, "queries": queries,
                                  "detections": found}, indent=2))
        best = ", ".join(f"{d['query']} {d['score']:.2f}" for d in found[:3]) or "nothing above the threshold"
        emit(f"{p}: {len(found)} boxes ({best}) -> {png}, {js}")
    return 0
