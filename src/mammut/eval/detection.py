"""Open-vocabulary detection: predictions, COCO AP with pycocotools, and the boxes figure.

- :func:`predict`: a detector's top-scoring ``(box, class)`` pairs per image (scores
  ``sigmoid(logit)`` over every token x query), duplicates of a class suppressed (per-class
  NMS at IoU ``nms``, default 0.5: two tokens boxing the same object under the same class are
  one true and one false positive for COCO AP; OWL-ViT's text path has none, ``nms=None``),
  the ``max_detections`` best kept, boxes as normalised x0, y0, x1, y1.
- **Re-scoring** (:class:`Rescore`, on by default for a detector with a frozen pretrained image
  tower, ``model.region_size > 0``): each image's best ``proposals`` boxes (tokens ranked by
  their best sigmoid score, class-agnostic NMS at IoU 0.5) are cut out, scaled so that their
  longer side is ``scales`` of the tower's image side, pasted on a canvas of the image's border
  colour and embedded by the frozen tower as pretraining embedded whole images (ViLD's cropped
  regions, at the object scale the model was pretrained on; averaged over the scales); each
  (proposal, class) pair then scores ``detector^(1 - a) * region^a`` (F-VLM's geometric
  ensemble), ``region`` the softmax over the queries of the crop's cosine to each at the
  pretrained temperature, ``a`` = ``alpha_seen`` (0.35) for classes trained with boxes and
  ``alpha_unseen`` (0.65) for the others (F-VLM's alpha / beta). Before a proposal is cut out,
  the other proposals the detector scores at least ``hide_others`` (0.15), overlapping it at IoU
  at most ``hide_iou`` (0.3) and not covering its centre, are painted over with the border colour
  (:func:`occluders`): their objects are not the one being named (OVSeg's masked crops, arXiv
  2210.04150, with the detector's own boxes as masks).
- **Box voting** (:func:`vote_boxes`, ``box_vote``, default IoU 0.3): each detection's box is
  replaced by the mean of the boxes of every token of its image overlapping it at IoU >= 0.3,
  weighted by the square of each token's best sigmoid score (box voting, Gidaris & Komodakis,
  arXiv 1505.01749; weighted box fusion, arXiv 1910.13302): one token's box is a noisy estimate,
  the tokens on an object agree on average.
- :func:`coco_ap`: pycocotools' ``COCOeval`` (bbox) on ground truth and predictions in COCO
  form: AP (IoU .50:.95), AP50 and AP75 over all classes, over the base and over the novel
  classes (COCOeval restricted to those category ids, with the predictions of every class: the
  generalized OV-COCO setting, where the novel AP50 is the field's headline).
- :func:`emoji_ground_truth` / :func:`to_coco_results`: the COCO dicts of normalised boxes.
- :func:`plot_detections`: a grid of images with the true (green, dashed) and predicted (red,
  with class and score) boxes.

pycocotools and scipy are the ``detection`` extra (``pip install "mammut-vl[detection]"``).

Legend: ``b`` images, ``m`` tokens, ``q`` queries, ``k`` boxes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["predict", "check_nms", "Rescore", "paste_crops", "occluders", "vote_boxes", "check_box_vote",
           "NMS_IOU", "BOX_VOTE_IOU", "top_box_recall",
           "coco_ap", "emoji_ground_truth", "to_coco_results", "plot_detections", "detection_table",
           "require_pycocotools", "Detections"]

Detections = dict[str, torch.Tensor]  # {"boxes": (k, 4) normalised xyxy, "scores": (k,), "labels": (k,) query index}


def require_pycocotools() -> Any:
    """pycocotools' ``COCO`` and ``COCOeval``, or an ImportError naming the extra."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ImportError(f"detection evaluation needs pycocotools ({exc}): pip install \"mammut-vl[detection]\"") from None
    return COCO, COCOeval


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_convert

    return box_convert(cxcywh, "cxcywh", "xyxy")


@dataclass(frozen=True)
class Rescore:
    """How :func:`predict` re-scores proposals with the detector's frozen pretrained image tower
    (see the module docstring). Defaults: F-VLM's alpha / beta (arXiv 2209.15639), 10
    proposals, crops at 24 / 28 / 32 px of a 64 px tower (the demo's emoji sizes)."""

    proposals: int = 10
    alpha_seen: float = 0.35
    alpha_unseen: float = 0.65
    scales: tuple[float, ...] = (0.375, 0.4375, 0.5)
    proposal_nms: float = 0.5
    hide_others: float | None = 0.15
    hide_iou: float = 0.3

    def __post_init__(self) -> None:
        if self.proposals < 1:
            raise ValueError(f"proposals: expected >= 1, got {self.proposals}")
        for key in ("alpha_seen", "alpha_unseen"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}: expected a weight in [0, 1], got {getattr(self, key)}")
        if not self.scales or not all(0.0 < float(v) <= 1.0 for v in self.scales):
            raise ValueError(f"scales: expected shares of the image side in (0, 1], got {self.scales}")
        if not 0.0 < self.proposal_nms <= 1.0:
            raise ValueError(f"proposal_nms: expected an IoU in (0, 1], got {self.proposal_nms}")
        if self.hide_others is not None and not 0.0 <= self.hide_others <= 1.0:
            raise ValueError(f"hide_others: expected a score in [0, 1] or None (never), got {self.hide_others}")
        if not 0.0 <= self.hide_iou <= 1.0:
            raise ValueError(f"hide_iou: expected an IoU in [0, 1], got {self.hide_iou}")

    @classmethod
    def from_task_options(cls, options: dict[str, Any], proposals: int | None = None) -> Rescore:
        """The re-scoring of a detection run's ``task_options`` (``rescore_proposals``,
        ``rescore_alpha`` [base, novel], ``rescore_hide_others``; these defaults where absent);
        ``proposals`` in place of the run's."""
        seen, unseen = options.get("rescore_alpha") or (cls.alpha_seen, cls.alpha_unseen)
        return cls(proposals=int(proposals if proposals is not None else options.get("rescore_proposals", cls.proposals)),
                   alpha_seen=float(seen), alpha_unseen=float(unseen),
                   hide_others=options.get("rescore_hide_others", cls.hide_others))

    def describe(self) -> str:
        """What the re-scoring does, as a clause for a report."""
        return (f"each image's {self.proposals} best proposals re-scored by the frozen pretrained image tower on their "
                f"crops, detector^{1 - self.alpha_seen:g} x region^{self.alpha_seen:g} for the classes trained with boxes "
                f"and ^{1 - self.alpha_unseen:g} x ^{self.alpha_unseen:g} for the others (F-VLM's ensemble)"
                + ("" if self.hide_others is None else
                   f", the other proposals scoring >= {self.hide_others:g} painted out of each crop"))


def _pixels(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel rows / columns ``(r0, r1, c0, c1)`` of a normalised x0, y0, x1, y1 box (at least one pixel)."""
    x0, y0, x1, y1 = box
    c0, r0 = min(max(int(x0 * w), 0), w - 1), min(max(int(y0 * h), 0), h - 1)
    return r0, min(max(round(y1 * h), r0 + 1), h), c0, min(max(round(x1 * w), c0 + 1), w)


def occluders(boxes: torch.Tensor, scores: torch.Tensor, min_score: float, max_iou: float) -> list[list[int]]:
    """For each of ``boxes`` ``(k, 4)`` (normalised x0, y0, x1, y1), the other boxes to paint out
    of its crop: those with ``scores`` ``(k,)`` at least ``min_score``, overlapping it at IoU at
    most ``max_iou`` and not covering its centre (another object, not a looser box of this one)."""
    from torchvision.ops import box_iou

    b = boxes.float()
    centre = (b[:, :2] + b[:, 2:]) / 2
    covers = ((b[None, :, :2] <= centre[:, None]) & (centre[:, None] <= b[None, :, 2:])).all(-1)  # [a, j]: j covers a's centre
    ok = (scores[None, :] >= min_score) & (box_iou(b, b) <= max_iou) & ~covers
    ok.fill_diagonal_(False)
    return [row.nonzero()[:, 0].tolist() for row in ok]


def paste_crops(image: torch.Tensor, boxes: torch.Tensor, size: int, scale: float,
                hide: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Crops ``(k, 3, size, size)`` of ``image`` ``(3, H, W)`` at ``boxes`` ``(k, 4)`` (normalised
    x0, y0, x1, y1; at least one pixel): each resized (aspect kept, antialiased) so that its longer
    side is ``scale * size`` and pasted in the middle of a canvas of the image's border colour
    (the per-channel median of its outermost pixels). ``hide[i]``: indices of other ``boxes``
    whose pixels are painted that colour in crop ``i`` (:func:`occluders`)."""
    import torch.nn.functional as F

    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    colour = border.float().median(dim=1).values.to(image.dtype)
    side = max(1, round(scale * size))
    out = colour.view(1, 3, 1, 1).expand(len(boxes), 3, size, size).clone()
    pixels = [_pixels(box, h, w) for box in boxes.float().tolist()]
    for i, (r0, r1, c0, c1) in enumerate(pixels):
        patch = image[:, r0:r1, c0:c1]
        if hide is not None and len(hide[i]):
            patch = patch.clone()
            for j in hide[i]:
                a0, a1, b0, b1 = pixels[j]
                patch[:, max(a0 - r0, 0):max(a1 - r0, 0), max(b0 - c0, 0):max(b1 - c0, 0)] = colour.view(3, 1, 1)
        f = side / max(patch.shape[1], patch.shape[2])
        ph, pw = max(1, round(patch.shape[1] * f)), max(1, round(patch.shape[2] * f))
        patch = F.interpolate(patch[None].float(), size=(ph, pw), mode="bilinear", antialias=True,
                              align_corners=False)[0].to(image.dtype)
        top, left = (size - ph) // 2, (size - pw) // 2
        out[i, :, top:top + ph, left:left + pw] = patch
    return out


def _rescored(model: Any, images: torch.Tensor, log_scores: torch.Tensor, box_sets: torch.Tensor,
              objectness: torch.Tensor, queries: torch.Tensor, opt: Rescore, seen: Sequence[int] | None,
              mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (proposal boxes ``(k, 4)``, ensembled log scores ``(k, q)``) (module docstring)."""
    import torch.nn.functional as F
    from torchvision.ops import nms as class_agnostic_nms

    size = int(model.config.region_size)
    scale = getattr(getattr(model, "contrastive", None), "logit_scale", None)
    tau = float(scale().detach()) if callable(scale) else 1 / 0.07
    nq = log_scores.shape[-1]
    alpha = torch.full((nq,), float(opt.alpha_unseen), device=log_scores.device)
    if seen is not None and len(seen):
        alpha[torch.as_tensor(list(seen), dtype=torch.long, device=alpha.device)] = float(opt.alpha_seen)
    qf = F.normalize(queries.float(), dim=-1)
    keeps = [class_agnostic_nms(box_sets[i], objectness[i], opt.proposal_nms)[:opt.proposals] for i in range(len(images))]
    hides = [None if opt.hide_others is None else
             occluders(box_sets[i, keep], objectness[i, keep].exp(), opt.hide_others, opt.hide_iou) for i, keep in enumerate(keeps)]
    crops = torch.cat([paste_crops(images[i], box_sets[i, keep].to(images.device), size, s, hides[i])
                       for i, keep in enumerate(keeps) for s in opt.scales])  # image-major, then scale
    embeds = model.region_embeds(crops).float()
    out, at = [], 0
    for i, keep in enumerate(keeps):
        k = len(keep)
        emb = embeds[at:at + k * len(opt.scales)].view(len(opt.scales), k, -1).mean(0)
        at += k * len(opt.scales)
        q = qf if qf.ndim == 2 else qf[i]
        region = F.log_softmax(tau * F.normalize(emb, dim=-1) @ q.t() + mask, dim=-1)
        mixed = (1 - alpha) * log_scores[i, keep] + alpha * region  # 0 x -inf (a class left out): nan -> -inf
        out.append((box_sets[i, keep], mixed.nan_to_num(nan=float("-inf"), neginf=float("-inf"))))
    return out


NMS_IOU = 0.5  # per-class NMS of predict() and the detection evaluations (None / 1: off)
_NMS_POOL = 1000  # candidates per image that NMS sees: at least 10x the detections kept
BOX_VOTE_IOU = 0.3  # box voting of predict() and the detection evaluations (None / 0: off)


def check_box_vote(iou: float | None, key: str = "box_vote") -> float | None:
    """``iou`` as an IoU in (0, 1] or None (0 and None: no box voting), else a ValueError naming ``key``."""
    if iou is None or float(iou) == 0.0:
        return None
    if not 0.0 < float(iou) <= 1.0:
        raise ValueError(f"{key}: expected an IoU in (0, 1] (0: no box voting), got {iou}")
    return float(iou)


def vote_boxes(boxes: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor, iou: float) -> torch.Tensor:
    """Box voting: each of ``boxes`` ``(k, 4)`` (x0, y0, x1, y1) replaced by the mean of the
    ``candidates`` ``(m, 4)`` overlapping it at IoU >= ``iou``, weighted by ``weights`` ``(m,)``
    (a box that none overlaps, or whose overlapping candidates all weigh 0, is kept)."""
    from torchvision.ops import box_iou

    if len(boxes) == 0 or len(candidates) == 0:
        return boxes
    w = (box_iou(boxes.float(), candidates.float()) >= iou).float() * weights.float()[None]
    total = w.sum(1, keepdim=True)
    fused = (w @ candidates.float()) / total.clamp_min(1e-12)
    return torch.where(total > 0, fused, boxes.float()).to(boxes.dtype)


def check_nms(nms: float | None, key: str = "nms") -> float | None:
    """``nms`` as an IoU in (0, 1) or None (1 and None: no suppression), else a ValueError naming ``key``."""
    if nms is None or float(nms) == 1.0:
        return None
    if not 0.0 < float(nms) < 1.0:
        raise ValueError(f"{key}: expected an IoU in (0, 1] (1: no NMS), got {nms}")
    return float(nms)


@torch.no_grad()
def predict(model: Any, images: torch.Tensor, queries: torch.Tensor | None, *, batch_size: int = 32,
            max_detections: int = 100, device: torch.device | str | None = None,
            autocast: Any = None, allowed: Sequence[int] | None = None,
            nms: float | None = NMS_IOU, class_softmax: float | None = None,
            rescore: Rescore | str | None = "auto", seen: Sequence[int] | None = None,
            box_vote: float | None = BOX_VOTE_IOU) -> list[Detections]:
    """Top ``max_detections`` detections per image of ``images`` ``(b, 3, S, S)`` for ``queries``
    (token ids ``(q, n)``, embeddings ``(q, l)``, or None: the model's learned classes);
    ``allowed``: only these query indices may be predicted (None: all); ``nms``: per-class NMS
    IoU (``torchvision.ops.batched_nms`` over each image's best ``max(1000, 10 *
    max_detections)`` pairs; None or 1: none); ``class_softmax``: a temperature ``t``, each
    score ``sigmoid(logit)`` times the softmax over the (allowed) queries of ``t * cos(class
    embedding, query)`` at that token (for a detector trained with ``task_options.loss_softmax``:
    "an object of this class here" times "which class it is"); ``rescore``: a :class:`Rescore`,
    ``"auto"`` (its defaults where the model keeps a frozen pretrained image tower, else none) or
    None, with ``seen`` the query indices of the classes trained with boxes (the others get
    ``alpha_unseen``); ``box_vote``: the IoU of :func:`vote_boxes` over the image's tokens,
    weighted by the square of each token's best sigmoid score (None or 0: the tokens' own
    boxes). Eval mode, no grad."""
    import torch.nn.functional as F
    from torchvision.ops import batched_nms

    nms = check_nms(nms)
    box_vote = check_box_vote(box_vote)
    if rescore == "auto":  # text queries and a frozen pretrained image tower: re-score
        rescore = Rescore() if getattr(model, "region", None) is not None and queries is not None else None
    elif rescore is not None and not isinstance(rescore, Rescore):
        raise ValueError(f"rescore: expected a Rescore, 'auto' or None, got {rescore!r}")
    if rescore is not None and getattr(model, "region", None) is None:
        raise ValueError("rescore: this detector keeps no pretrained image tower (model.region_size: 0)")
    if rescore is not None and queries is None:
        raise ValueError("rescore: expected text queries (the region tower scores crops against text embeddings), "
                         "got None (the learned closed-vocabulary classes)")
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = autocast if autocast is not None else contextlib.nullcontext
    out: list[Detections] = []
    try:
        with ctx():
            q = model.query_embeds(queries.to(dev) if queries is not None else None)
        for s in range(0, len(images), batch_size):
            with ctx():
                res = model.detect(images[s:s + batch_size].to(dev), q)
            logits = res["logits"].float()
            mask = torch.zeros(logits.shape[-1], device=logits.device)
            if allowed is not None:
                mask = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
                mask[torch.as_tensor(list(allowed), dtype=torch.long, device=logits.device)] = 0.0
            logits = F.logsigmoid(logits) + mask  # log scores: the same order as the logits
            if class_softmax is not None:
                qf = q.float()
                sim = torch.einsum("bml,ql->bmq" if qf.ndim == 2 else "bml,bql->bmq", res["class_embeds"].float(),
                                   qf if qf.ndim == 2 else qf[s:s + batch_size])
                logits = logits + F.log_softmax(class_softmax * sim + mask, dim=-1)
            boxes = _xyxy(res["boxes"].float()).clamp(0.0, 1.0)
            objectness = F.logsigmoid(res["logits"].float()).add(mask).amax(-1)
            vote_weight = objectness.mul(2).exp()  # the best sigmoid score, squared
            if rescore is not None:
                with ctx():
                    pairs = _rescored(model, images[s:s + batch_size].to(dev), logits, boxes, objectness,
                                      q if q.ndim == 2 else q[s:s + batch_size], rescore, seen, mask)
                for i, (box, value) in enumerate(pairs):
                    if box_vote is not None:
                        box = vote_boxes(box, boxes[i], vote_weight[i], box_vote)
                    out.append(_best(box, value, max_detections, nms))
                continue
            b, m, nq = logits.shape
            k = min(max_detections if nms is None else max(_NMS_POOL, 10 * max_detections), m * nq)
            top = logits.flatten(1).topk(k, dim=1)
            token, label = top.indices // nq, top.indices % nq
            for i in range(b):
                keep = torch.isfinite(top.values[i])
                box, value, lab = boxes[i, token[i][keep]], top.values[i][keep], label[i][keep]
                if nms is not None:  # sorted by score, best first
                    kept = batched_nms(box, value, lab, nms)[:max_detections]
                    box, value, lab = box[kept], value[kept], lab[kept]
                if box_vote is not None:
                    box = vote_boxes(box, boxes[i], vote_weight[i], box_vote)
                out.append({"boxes": box.cpu(), "scores": value.exp().cpu(), "labels": lab.cpu()})
    finally:
        model.train(was_training)
    return out


def _best(boxes: torch.Tensor, log_scores: torch.Tensor, max_detections: int, nms: float | None) -> Detections:
    """The best (box, class) pairs of one image's re-scored proposals ``(k, 4)``, ``(k, q)``."""
    from torchvision.ops import batched_nms

    k, nq = log_scores.shape
    flat = log_scores.flatten()
    top = flat.topk(min(len(flat), max_detections if nms is None else max(_NMS_POOL, 10 * max_detections)))
    keep = torch.isfinite(top.values)
    index, value = top.indices[keep], top.values[keep]
    box, lab = boxes[index // nq], index % nq
    if nms is not None:
        kept = batched_nms(box, value, lab, nms)[:max_detections]
        box, value, lab = box[kept], value[kept], lab[kept]
    return {"boxes": box.cpu(), "scores": value.exp().cpu(), "labels": lab.cpu()}


@torch.no_grad()
def top_box_recall(model: Any, images: torch.Tensor, queries: torch.Tensor, truth: Sequence[dict[str, Any]],
                   classes: Sequence[int], *, batch_size: int = 32, iou: float = 0.5) -> dict[str, Any]:
    """Single-query localisation: for each true box of a class in ``classes``, whether the box of
    the token scoring highest for that class's query (``queries`` indexed by class id) overlaps
    it by at least ``iou``. ``{"recall", "n"}`` (recall None without such boxes)."""
    from torchvision.ops import box_iou

    wanted = set(int(c) for c in classes)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    hits = n = 0
    try:
        q = model.query_embeds(queries.to(dev))
        for s in range(0, len(images), batch_size):
            res = model.detect(images[s:s + batch_size].to(dev), q)
            boxes = _xyxy(res["boxes"].float())
            for i, item in enumerate(truth[s:s + batch_size]):
                for box, label in zip(item["boxes"], item["labels"].tolist()):
                    if label not in wanted:
                        continue
                    best = int(res["logits"][i, :, label].argmax())
                    hits += int(box_iou(boxes[i, best:best + 1].cpu(), box.view(1, 4).float())[0, 0] >= iou)
                    n += 1
    finally:
        model.train(was_training)
    return {"recall": hits / n if n else None, "n": n, "iou": iou}


def emoji_ground_truth(items: Sequence[dict[str, Any]], class_names: Sequence[str], image_size: int) -> dict[str, Any]:
    """A COCO ground-truth dict of detection items (normalised boxes, class ids = category ids)."""
    images, anns = [], []
    for it in items:
        images.append({"id": int(it["image_id"]), "width": image_size, "height": image_size})
        for box, label in zip(it["boxes"].tolist(), it["labels"].tolist()):
            x0, y0, x1, y1 = (v * image_size for v in box)
            anns.append({"id": len(anns) + 1, "image_id": int(it["image_id"]), "category_id": int(label),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in enumerate(class_names)]}


def to_coco_results(image_ids: Sequence[int], detections: Sequence[Detections], category_ids: Sequence[int],
                    scales: Sequence[float]) -> list[dict[str, Any]]:
    """COCO result dicts: each image's boxes times its ``scale`` (pixels per normalised unit),
    query index ``j`` as category ``category_ids[j]``."""
    out = []
    for image_id, det, scale in zip(image_ids, detections, scales):
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x0, y0, x1, y1 = (v * scale for v in box)
            out.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return out


def _stats(coco_gt: Any, coco_dt: Any, cat_ids: Sequence[int], image_ids: Sequence[int]) -> dict[str, float | None]:
    _, COCOeval = require_pycocotools()
    present = {a["category_id"] for a in coco_gt.dataset["annotations"] if a["image_id"] in set(image_ids)}
    cats = [c for c in cat_ids if c in present]
    if not cats or coco_dt is None:
        return {"AP": None if not cats else 0.0, "AP50": None if not cats else 0.0, "AP75": None if not cats else 0.0,
                "n_classes": len(cats)}
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.catIds = list(cats)
    ev.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints; the library logs
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(max(ev.stats[0], 0.0)), "AP50": float(max(ev.stats[1], 0.0)), "AP75": float(max(ev.stats[2], 0.0)),
            "n_classes": len(cats)}


def coco_ap(ground_truth: dict[str, Any], results: list[dict[str, Any]], base_ids: Sequence[int],
            novel_ids: Sequence[int]) -> dict[str, Any]:
    """``{"all" | "base" | "novel": {"AP", "AP50", "AP75", "n_classes"}}`` from COCOeval (bbox,
    maxDets 100) over the classes with ground truth in the evaluated images (None where a
    group has none); ``ground_truth`` a COCO dict, ``results`` COCO result dicts."""
    COCO, _ = require_pycocotools()
    gt = COCO()
    gt.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results) if results else None
    image_ids = [im["id"] for im in ground_truth["images"]]
    all_ids = sorted(set(base_ids) | set(novel_ids))
    out = {name: _stats(gt, dt, ids, image_ids) for name, ids in (("all", all_ids), ("base", base_ids), ("novel", novel_ids))}
    out["n_images"] = len(image_ids)
    out["n_boxes"] = len(ground_truth["annotations"])
    out["n_detections"] = len(results)
    return out


def detection_table(ap: dict[str, Any], label: str = "model") -> str:
    """A markdown table of ``coco_ap``'s result."""
    from .report import markdown_table

    rows = [[group, ap[group]["n_classes"], ap[group]["AP"], ap[group]["AP50"], ap[group]["AP75"]]
            for group in ("all", "base", "novel")]
    return markdown_table(["classes", "n", "AP", "AP50", "AP75"], rows)


def plot_detections(images: torch.Tensor, truth: Sequence[dict[str, Any]], detections: Sequence[Detections],
                    names: Sequence[str], path: Path, *, n: int = 12, min_score: float = 0.3,
                    novel: Sequence[int] = ()) -> Path | None:
    """A grid of the first ``n`` images with the true boxes (green dashed; novel classes blue)
    and the predicted boxes scoring at least ``min_score`` (red, class name and score; the
    best one is drawn even below ``min_score``)."""
    from .report import _plt

    n = min(n, len(images))
    if n == 0:
        return None
    plt = _plt()
    from matplotlib.patches import Rectangle

    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    novel_set = set(novel)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].permute(1, 2, 0).clamp(0, 1).float().numpy()
        s = img.shape[0]
        ax.imshow(img, interpolation="nearest")
        for box, label in zip(truth[i]["boxes"].tolist(), truth[i]["labels"].tolist()):
            x0, y0, x1, y1 = (v * s for v in box)
            colour = "tab:blue" if label in novel_set else "tab:green"
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5, ls="--"))
        det = detections[i]
        for j, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())):
            if score < min_score and j > 0:
                break
            x0, y0, x1, y1 = (v * s for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="tab:red", lw=1.2))
            ax.text(x0, max(y0 - 1, 0), f"{names[label][:18]} {score:.2f}", color="white", fontsize=6,
                    bbox={"facecolor": "tab:red", "alpha": 0.7, "pad": 0.5, "lw": 0})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
