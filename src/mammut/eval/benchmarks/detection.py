"""``mammut eval detection SOURCE [--data instances.json --images DIR --novel name,name]``:
open-vocabulary detection scored with pycocotools' COCOeval (AP, AP50, AP75 over all, base and
novel classes; :mod:`mammut.eval.detection`). Without ``--data``: the held-out emoji detection
scenes of SOURCE, a run trained with ``train.task: detection`` (its classes, novel split and
scene settings). With ``--data``: a COCO-format instances JSON, every category name as a text
query (``--prompt``), ``--novel`` naming the novel categories (default: the OV-COCO 17 it has).
SOURCE: a ``mammut_detector`` (anything ``mammut.load`` loads)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from . import Benchmark, register_benchmark


@register_benchmark
class DetectionBenchmark(Benchmark):
    name = "detection"
    help = "open-vocabulary detection: COCO AP / AP50 / AP75 on base and novel classes (pycocotools)"
    title = "Open-vocabulary detection"
    batch_size = 32
    summary_keys = ("AP50", "base_AP50", "novel_AP50")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="COCO-format instances JSON (default: the held-out emoji detection "
                                                    "scenes of SOURCE, a detection run)")
        p.add_argument("--images", default=None, help="folder the JSON's file names are relative to (default: its folder)")
        p.add_argument("--novel", default=None, help="comma-separated novel category names (default: the OV-COCO "
                                                     "novel categories the JSON has; emoji: the run's split)")
        p.add_argument("--prompt", default="a {}", help="text query of a class name (default 'a {}')")
        p.add_argument("--n", type=int, default=None, help="emoji scenes: how many held-out scenes (default: the run's "
                                                           "eval.n)")
        p.add_argument("--max-detections", type=int, default=100, help="detections kept per image (default 100)")
        p.add_argument("--nms", type=float, default=0.5, help="per-class NMS IoU before the best --max-detections are "
                                                              "kept (default 0.5; 1 = none, OWL-ViT's text path)")
        p.add_argument("--box-vote", type=float, default=0.3,
                       help="box voting: each box the mean of its image's token boxes overlapping it at this IoU, "
                            "weighted by their best score squared (default 0.3; 0 = the tokens' own boxes)")
        p.add_argument("--scene-set", type=int, default=0,
                       help="emoji scenes: which set of held-out scenes (default 0: the run's own; 1, 2, ...: other "
                            "held-out random streams, for the spread of a figure)")
        p.add_argument("--rescore-proposals", type=int, default=10,
                       help="a detector with a frozen pretrained image tower (model.region_size): proposals per image "
                            "re-scored by it (default 10; 0 = the detector's own scores)")

    def check(self, args: argparse.Namespace) -> None:
        from ..detection import require_pycocotools

        require_pycocotools()
        if "{}" not in args.prompt:
            raise ValueError(f"--prompt: expected a template with {{}} for the class name, got {args.prompt!r}")
        if args.max_detections < 1:
            raise ValueError(f"--max-detections: expected >= 1, got {args.max_detections}")
        from ..detection import check_box_vote, check_nms

        check_nms(args.nms, "--nms")
        check_box_vote(args.box_vote, "--box-vote")
        if args.scene_set < 0 or (args.scene_set and args.data is not None):
            raise ValueError(f"--scene-set: expected an int >= 0 for the held-out emoji scenes (no --data), got "
                             f"{args.scene_set}{' with --data' if args.data is not None else ''}")
        if args.rescore_proposals < 0:
            raise ValueError(f"--rescore-proposals: expected >= 0 (0: off), got {args.rescore_proposals}")
        if args.data is None:
            if args.images is not None or args.novel is not None:
                raise ValueError("--images / --novel: expected with --data (a COCO instances JSON), got no --data")
            if not (Path(args.source) / "config.yaml").is_file():
                raise ValueError(f"SOURCE: without --data, expected a run folder trained with train.task: detection, "
                                 f"got {args.source} (no config.yaml); pass --data instances.json --images DIR")
            from ...runs import read_run_config

            task = (read_run_config(Path(args.source)).get("train") or {}).get("task")
            if task != "detection":
                raise ValueError(f"SOURCE: without --data, expected a run trained with train.task: detection, got "
                                 f"{args.source} (train.task {task!r}); pass --data instances.json --images DIR")
            return
        path = Path(args.data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--data: no such file {path}")
        if args.images is not None and not Path(args.images).expanduser().is_dir():
            raise FileNotFoundError(f"--images: no such folder {args.images}")

    def data(self, args: argparse.Namespace) -> str:
        return str(args.data) if args.data else f"held-out emoji detection scenes of {args.source}"

    def run(self, em: Any, args: argparse.Namespace, out: Path) -> Any:
        from ..detection import (check_box_vote, check_nms, coco_ap, detection_table, emoji_ground_truth,
                                 plot_detections, predict, to_coco_results)

        model = em.model
        out.mkdir(parents=True, exist_ok=True)
        if not callable(getattr(model, "detect", None)):
            raise ValueError(f"SOURCE: mammut eval detection needs a detector (mammut_detector), got {em.name} "
                             f"from {em.source}")
        start = time.perf_counter()
        if args.data is None:
            items, names, base, novel, closed = _emoji_items(args, em)
            images = [it["image"] for it in items]
            scales = [items[0]["image"].shape[-1]] * len(items)
            skipped = 0
        else:
            items, names, base, novel, closed, ds, skipped = _coco_items(args, em)
            images = [it["image"] for it in items]
            scales = [float(it["scale"]) for it in items]
        import torch

        stacked = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
        queries = None if closed else em.tokenize([args.prompt.format(n) for n in names])
        rescore = _rescore(args, model, closed)
        t0 = time.perf_counter()
        dets = predict(model, stacked, queries, batch_size=args.batch_size, max_detections=args.max_detections,
                       device=em.device, autocast=em.autocast, nms=args.nms, class_softmax=_class_softmax(args, model),
                       seen=None if closed else base, rescore=rescore, box_vote=args.box_vote)
        infer = time.perf_counter() - t0
        categories = base if closed else list(range(len(names)))
        if args.data is None:
            gt = emoji_ground_truth(items, names, scales[0] if scales else 1)
            results = to_coco_results([it["image_id"] for it in items], dets, categories, scales)
        else:
            gt = ds.evaluation_ground_truth([it["image_id"] for it in items])
            results = to_coco_results([it["image_id"] for it in items], dets,
                                      [ds.category_ids[c] for c in categories], scales)
            base = [ds.category_ids[c] for c in base]
            novel = [ds.category_ids[c] for c in novel]
        ap = coco_ap(gt, results, base, novel)
        metrics = {"n_images": len(items), "scene_set": args.scene_set,
                   "AP": ap["all"]["AP"], "AP50": ap["all"]["AP50"], "AP75": ap["all"]["AP75"],
                   "base_AP50": ap["base"]["AP50"], "novel_AP50": ap["novel"]["AP50"], "detection": ap,
                   "images_per_s": len(items) / infer if infer > 0 else None,
                   "wall_time_s": time.perf_counter() - start, "prompt": args.prompt, "closed_vocabulary": closed,
                   "nms": check_nms(args.nms), "box_vote": check_box_vote(args.box_vote), "rescored": rescore is not None,
                   "rescore": None if rescore is None else dataclasses.asdict(rescore),
                   "skipped": {"total": skipped, "corrupt": skipped} if skipped else {},
                   "novel_classes": [names[i] for i in (novel if args.data is None else
                                                        [ds.category_ids.index(c) for c in novel])]}
        section = (f"## COCO AP on {len(items)} images\n\n{detection_table(ap)}\n"
                   f"{len(base)} base and {len(novel)} novel classes; queries {args.prompt!r} for every class; the "
                   f"{args.max_detections} best (token, class) pairs per image after "
                   f"{'per-class NMS at IoU ' + str(args.nms) if check_nms(args.nms) else 'no NMS'}"
                   f"{'; ' + rescore.describe() if rescore else ''}"
                   f"{f'; boxes voted over the tokens overlapping them at IoU >= {args.box_vote:g}' if check_box_vote(args.box_vote) else ''}. "
                   "Base / novel: COCOeval restricted to those classes, with every class's predictions.")
        figure = plot_detections(stacked[:12], items[:12], dets[:12], names, out / "detections.png",
                                 novel=[] if args.data else novel)
        return metrics, [section], [("true boxes dashed, predictions red", figure)]


def _rescore(args: argparse.Namespace, model: Any, closed: bool) -> Any:
    """The :class:`~mammut.eval.detection.Rescore` of a detector with a frozen pretrained image
    tower (None: no tower, the closed vocabulary or ``--rescore-proposals 0``): ``--rescore-proposals``
    proposals, weighted and hiding as a SOURCE run's ``task_options.rescore_*`` (as its own evaluation)."""
    from ..detection import Rescore

    if getattr(model, "region", None) is None or closed or args.rescore_proposals == 0:
        return None
    options: dict[str, Any] = {}
    if (Path(args.source) / "config.yaml").is_file():
        from ...runs import read_run_config

        options = read_run_config(Path(args.source)).get("task_options") or {}
    return Rescore.from_task_options(options, args.rescore_proposals)


def _class_softmax(args: argparse.Namespace, model: Any) -> float | None:
    """For a SOURCE run trained with ``task_options.loss_softmax``: its scoring temperature (the
    model's contrastive one; the detection task's ``class_softmax``), else None (sigmoid scores)."""
    if not (Path(args.source) / "config.yaml").is_file():
        return None
    from ...runs import read_run_config

    options = read_run_config(Path(args.source)).get("task_options") or {}
    if float(options.get("loss_softmax") or 0.0) <= 0:
        return None
    scale = getattr(getattr(model, "contrastive", None), "logit_scale", None)
    return float(scale().detach()) if callable(scale) else 1 / 0.07


def _emoji_items(args: argparse.Namespace, em: Any) -> tuple[list[Any], list[str], list[int], list[int], bool]:
    from ...runs import read_run_config
    from ...train.config import config_from_dict
    from ...train.task import get_task  # the task by name (eval never imports mammut.tasks)

    cfg = config_from_dict(read_run_config(Path(args.source)))
    if cfg.train.task != "detection" or cfg.data.kind != "emoji":
        raise ValueError(f"SOURCE: without --data, expected an emoji run trained with train.task: detection, got "
                         f"task {cfg.train.task!r} on data.kind {cfg.data.kind!r}; pass --data instances.json")
    task = get_task("detection")(cfg)
    seed = task.heldout_seed + args.scene_set  # another held-out random stream: scenes no run trained on either
    ds = task.dataset("heldout", seed)
    n = args.n or cfg.eval.n
    if args.limit:
        n = min(n, args.limit)
    return [ds[i] for i in range(n)], ds.class_names(), list(ds.base_ids), list(ds.novel_ids), task._closed()


def _coco_items(args: argparse.Namespace, em: Any) -> Any:
    from ...data.detection import OV_COCO_NOVEL, CocoInstances

    size = em.model.image_size
    probe = CocoInstances(args.data, args.images, image_size=size)
    if args.novel is not None:
        novel_names = [s.strip() for s in args.novel.split(",") if s.strip()]
    else:
        novel_names = [n for n in OV_COCO_NOVEL if n in probe.class_names()]
    ds = CocoInstances(args.data, args.images, novel=novel_names, image_size=size)
    closed = int(getattr(em.model.config, "num_classes", 0) or 0) > 0
    if closed and em.model.config.num_classes != len(ds.base_ids):
        raise ValueError(f"--data: the closed-vocabulary SOURCE scores {em.model.config.num_classes} classes, the "
                         f"JSON has {len(ds.base_ids)} base categories")
    n = len(ds) if not args.limit else min(args.limit, len(ds))
    items, skipped = [], 0
    for i in range(n):
        try:
            items.append(ds[i])
        except OSError:
            skipped += 1
    if skipped:
        import logging

        logging.getLogger(__name__).warning("detection: %d of %d images unreadable, skipped", skipped, n)
    if not items:
        raise ValueError(f"--images: none of the {n} images of {args.data} could be read under {ds.root}")
    return items, ds.class_names(), list(ds.base_ids), list(ds.novel_ids), closed, ds, skipped
