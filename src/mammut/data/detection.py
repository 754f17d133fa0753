"""Detection data: emoji detection scenes (the embedded default) and COCO-format instances files.

Both give items ``{"image": (3, S, S) float in [0, 1], "boxes": (k, 4) float normalised x0, y0,
x1, y1, "labels": (k,) long class ids, "image_id": int}`` and say which class ids are *novel*
(open-vocabulary detection: trained on the base classes only, scored on both).

Emoji detection scenes (:class:`DetectionScenes`): one to ``max_objects`` emoji of the run's
vocabulary (the same emoji, names and ids as :class:`mammut.data.scenes.EmojiScenes` with the
same ``num_emoji`` / ``vocab_seed``), each at its own size (``size_range``, a share of the image
side), placed at random where its box overlaps every earlier box by at most ``max_overlap``
IoU (later emoji are drawn over earlier ones: partial occlusion), on a plain or lightly coloured
background. Boxes are tight around each sprite's opaque pixels (alpha > 0.1). The classes are
split by id: every ``novel_every``-th id (ids ``novel_every - 1, 2 * novel_every - 1, ...``) is
novel. In the ``"train"`` split a novel emoji is never a target: with
``novel_in_train="background"`` (the OV-COCO convention: the images of novel classes are not
removed, only their labels) novel emoji appear in training images *unlabelled*, as background;
with ``"absent"`` training scenes hold base emoji only. The ``"heldout"`` split draws every emoji
(base and novel) from another random stream, all labelled. Scene ``i`` is a pure function of
``(seed, split, i)`` and the settings.

COCO instances (:class:`CocoInstances`): ``images``, ``annotations`` (``bbox`` = x, y, width,
height in pixels; ``iscrowd`` ones are kept for the evaluation, never as targets) and
``categories``; ``novel``: names of the novel categories (e.g. the OV-COCO split,
:data:`OV_COCO_NOVEL`). Each image is padded bottom / right with grey 0.5 to a square and
resized to ``S x S``, so its boxes scale by ``S / max(h, w)`` (no distortion).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import load_emoji_asset

log = logging.getLogger(__name__)

__all__ = ["DetectionScenes", "CocoInstances", "collate_detection", "OV_COCO_BASE", "OV_COCO_NOVEL",
           "NOVEL_IN_TRAIN", "letterbox"]

NOVEL_IN_TRAIN = ("background", "absent")
_SPLIT_CODE = {"train": 0, "heldout": 1}
_SALT = 0xDE7EC7  # a random stream of its own (not EmojiScenes')
_TRIES = 50

# OV-COCO (Detic's coco_zeroshot split, ../shared/reference.md D3): 48 base, 17 novel
OV_COCO_BASE = ("person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
                "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
                "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
                "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven",
                "toaster", "refrigerator", "book", "clock", "vase", "toothbrush")
OV_COCO_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
                 "knife", "cake", "couch", "keyboard", "sink", "scissors")


@dataclass(frozen=True)
class DetectionScene:
    """One scene: ``boxes`` (k, 4) normalised x0, y0, x1, y1 and ``labels`` (k,) of its targets;
    ``background`` the ids of the emoji drawn but not labelled (novel emoji in training)."""

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    background: tuple[int, ...]
    index: int

    def item(self) -> dict[str, Any]:
        return {"image": self.image, "boxes": self.boxes, "labels": self.labels, "image_id": self.index}


class DetectionScenes:
    """Emoji detection scenes (see the module docstring); ``ds[i]`` -> item dict."""

    def __init__(self, image_size: int = 128, num_emoji: int | None = 300, *, split: str = "train", seed: int = 0,
                 vocab_seed: int = 0, min_objects: int = 1, max_objects: int = 4,
                 size_range: tuple[float, float] = (0.12, 0.4), max_overlap: float = 0.3, novel_every: int = 5,
                 novel_in_train: str = "background", asset_path: str | None = None,
                 render_size: int | None = None) -> None:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split: expected one of {sorted(_SPLIT_CODE)}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size: expected an int >= 16, got {image_size!r}")
        if render_size is not None and (not isinstance(render_size, int) or render_size < 16):
            raise ValueError(f"render_size: expected null or an int >= 16, got {render_size!r}")
        if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 1 <= min_objects <= max_objects <= 16):
            raise ValueError(f"min_objects / max_objects: expected 1 <= min <= max <= 16, got {min_objects}, {max_objects}")
        lo, hi = (float(v) for v in size_range)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"size_range: expected 0 < low <= high <= 1 (shares of the image side), got {size_range}")
        if not 0.0 <= max_overlap < 1.0:
            raise ValueError(f"max_overlap: expected an IoU in [0, 1), got {max_overlap}")
        if not isinstance(novel_every, int) or novel_every < 2:
            raise ValueError(f"novel_every: expected an int >= 2 (every n-th class id is novel), got {novel_every!r}")
        if novel_in_train not in NOVEL_IN_TRAIN:
            raise ValueError(f"novel_in_train: expected one of {NOVEL_IN_TRAIN}, got {novel_in_train!r}")
        asset = load_emoji_asset(asset_path)
        total = len(asset)
        if num_emoji is None:
            vocab = np.arange(total)
        else:
            if not isinstance(num_emoji, int) or not novel_every <= num_emoji <= total:
                raise ValueError(f"num_emoji: expected null or an int in [{novel_every}, {total}], got {num_emoji!r}")
            vocab = np.sort(np.random.default_rng(vocab_seed).permutation(total)[:num_emoji])  # as EmojiScenes
        self.image_size, self.split, self.seed = image_size, split, int(seed)
        self.render_size = render_size or image_size  # drawn at this size, then resized to image_size
        self.min_objects, self.max_objects, self.max_overlap = min_objects, max_objects, float(max_overlap)
        self.novel_every, self.novel_in_train = novel_every, novel_in_train
        self._asset, self._rows = asset, vocab
        self._names = tuple(asset.names[i] for i in vocab)
        self.sizes = sorted({max(6, round(self.render_size * f)) for f in np.linspace(lo, hi, 8)})
        self._sprites: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        ids = np.arange(len(vocab))
        self.novel_ids: tuple[int, ...] = tuple(int(i) for i in ids[ids % novel_every == novel_every - 1])
        self.base_ids: tuple[int, ...] = tuple(int(i) for i in ids[ids % novel_every != novel_every - 1])
        self._drawn = np.array(self.base_ids if split == "train" and novel_in_train == "absent" else ids)

    def class_names(self) -> list[str]:
        """Emoji names in id order (those of EmojiScenes with the same num_emoji / vocab_seed)."""
        return list(self._names)

    def _sprite(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Premultiplied RGB (V, s, s, 3), alpha (V, s, s, 1) and tight boxes (V, 4) at ``size``."""
        if size not in self._sprites:
            rgba = torch.from_numpy(self._asset.images[self._rows]).float().div_(255.0).permute(0, 3, 1, 2)
            rgba[:, :3] *= rgba[:, 3:4]
            out = F.interpolate(rgba, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out = out.clamp_(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
            alpha = out[..., 3]
            opaque = alpha > 0.1
            rows, cols = opaque.any(axis=2), opaque.any(axis=1)
            tight = np.zeros((len(out), 4), dtype=np.float32)
            for v in range(len(out)):
                r, c = np.flatnonzero(rows[v]), np.flatnonzero(cols[v])
                tight[v] = (c[0], r[0], c[-1] + 1, r[-1] + 1) if len(r) else (0, 0, size, size)
            self._sprites[size] = (np.minimum(out[..., :3], out[..., 3:4]), out[..., 3:4], tight)
        return self._sprites[size]

    def _place(self, rng: np.random.Generator, k: int) -> list[tuple[int, int, int]]:
        s_img = self.render_size
        placed: list[tuple[int, int, int]] = []
        for _ in range(k):
            for _t in range(_TRIES):
                s = int(rng.choice(self.sizes))
                x, y = (int(v) for v in rng.integers(0, s_img - s + 1, size=2))
                if all(_iou((x, y, x + s, y + s), (px, py, px + ps, py + ps)) <= self.max_overlap for px, py, ps in placed):
                    placed.append((x, y, s))
                    break
        return placed

    def scene(self, index: int) -> DetectionScene:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index: expected an int >= 0, got {index!r}")
        index = int(index)
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], _SALT, index])
        k = int(rng.integers(self.min_objects, self.max_objects + 1))
        placed = self._place(rng, k)
        ids = [int(self._drawn[rng.integers(len(self._drawn))]) for _ in placed]
        n = self.render_size
        colour = np.ones(3, np.float32) if rng.random() < 0.3 else (1.0 - rng.uniform(0.0, 0.2, 3)).astype(np.float32)
        canvas = np.broadcast_to(colour, (n, n, 3)).copy()
        boxes, labels, background = [], [], []
        for eid, (x, y, s) in zip(ids, placed):
            rgb, alpha, tight = self._sprite(s)
            region = canvas[y:y + s, x:x + s]
            region *= 1.0 - alpha[eid]
            region += rgb[eid]
            if self.split == "train" and eid in self.novel_ids:
                background.append(eid)  # drawn, never a target
                continue
            x0, y0, x1, y1 = tight[eid]
            boxes.append(((x + x0) / n, (y + y0) / n, (x + x1) / n, (y + y1) / n))
            labels.append(eid)
        image = torch.from_numpy(canvas.clip(0.0, 1.0)).permute(2, 0, 1).contiguous()
        if n != self.image_size:  # the same scene at the model's input size (boxes are shares of the side)
            image = F.interpolate(image[None], size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
        return DetectionScene(image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                              torch.tensor(labels, dtype=torch.long), tuple(background), index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.scene(index).item()


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- COCO instances


class CocoInstances:
    """A COCO-format instances JSON (see the module docstring): ``ds[i]`` -> item dict of
    image ``i`` (its boxes normalised by ``max(h, w)``), with ``class_names()`` and
    ``novel_ids`` / ``base_ids`` (indices into the sorted category list)."""

    def __init__(self, path: str | Path, images: str | Path | None = None, *, novel: Sequence[str] | None = None,
                 image_size: int = 128, key: str = "--data") -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"{key}: no such file {self.path} (expected a COCO-format instances JSON)")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{key}: {self.path} is not a JSON file ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError(f"{key}: expected a COCO instances JSON with lists 'images', 'annotations' and "
                             f"'categories', got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        self.root = Path(images).expanduser() if images is not None else self.path.parent
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images: no such folder {self.root}")
        self.image_size = image_size
        self.data = data
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self._names = [str(c["name"]) for c in cats]
        self._index = {cid: i for i, cid in enumerate(self.category_ids)}
        names = set(self._names)
        novel = list(novel or ())
        unknown = [n for n in novel if n not in names]
        if unknown:
            raise ValueError(f"--novel: expected category names of {self.path.name} ({', '.join(self._names[:20])}"
                             f"{', ...' if len(self._names) > 20 else ''}), got {unknown}")
        self.novel_ids = tuple(i for i, n in enumerate(self._names) if n in set(novel))
        self.base_ids = tuple(i for i in range(len(self._names)) if i not in set(self.novel_ids))
        self.images = [im for im in data["images"] if "id" in im and "file_name" in im]
        if len(self.images) != len(data["images"]):
            log.warning("%s: %d image entries without id / file_name skipped", self.path,
                        len(data["images"]) - len(self.images))
        self._anns: dict[int, list[dict[str, Any]]] = {}
        bad = 0
        for a in data["annotations"]:
            box = a.get("bbox")
            if a.get("category_id") not in self._index or not (isinstance(box, list) and len(box) == 4) or box[2] <= 0 or box[3] <= 0:
                bad += 1
                continue
            self._anns.setdefault(int(a["image_id"]), []).append(a)
        self.skipped_annotations = bad
        if bad:
            log.warning("%s: %d annotations skipped (unknown category, or a bbox that is not [x, y, w, h] with "
                        "w, h > 0)", self.path, bad)
        self.unreadable = 0

    def class_names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, i: int) -> list[dict[str, Any]]:
        return self._anns.get(int(self.images[i]["id"]), [])

    def evaluation_ground_truth(self, image_ids: Sequence[int]) -> dict[str, Any]:
        """The COCO dict of ``image_ids`` (pixel boxes as in the file; ``area`` and ``iscrowd``
        filled where missing; the skipped annotations left out) for COCOeval."""
        keep = {int(i) for i in image_ids}
        anns = []
        for image_id in sorted(keep):
            for a in self._anns.get(image_id, []):
                x, y, w, h = (float(v) for v in a["bbox"])
                anns.append({**a, "id": a.get("id", len(anns) + 1), "area": a.get("area", w * h),
                             "iscrowd": int(a.get("iscrowd", 0)), "bbox": [x, y, w, h]})
        ids = [a["id"] for a in anns]
        if len(set(ids)) != len(ids):  # COCOeval needs distinct annotation ids
            anns = [{**a, "id": k + 1} for k, a in enumerate(anns)]
        return {"images": [im for im in self.images if int(im["id"]) in keep], "annotations": anns,
                "categories": self.data["categories"]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        entry = self.images[i]
        path = self.root / entry["file_name"]
        with Image.open(path) as im:
            image, side, (h, w) = letterbox(im, self.image_size)
        boxes, labels = [], []
        for a in self.annotations(i):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append((x / side, y / side, (x + bw) / side, (y + bh) / side))
            labels.append(self._index[a["category_id"]])
        return {"image": image, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long), "image_id": int(entry["id"]), "scale": side,
                "size": (h, w)}


def letterbox(image: Any, size: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """A PIL image padded bottom / right with grey 0.5 to a square and resized to ``(3, size,
    size)`` in [0, 1] (OWLv2's input; no distortion): ``(tensor, side of the square in pixels,
    (h, w) of the image)``; a normalised box times ``side`` is in the image's pixels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 0.5, dtype=np.float32)
    canvas[:h, :w] = rgb
    out = torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(out, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    return out[0].clamp(0, 1), side, (h, w)


def collate_detection(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items -> ``{"images": (b, 3, S, S), "boxes": [ (k_i, 4) ], "labels": [ (k_i,) ], "image_ids": [int]}``."""
    if not items:
        raise ValueError("items: expected at least one detection item, got none")
    return {"images": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "labels": [it["labels"] for it in items], "image_ids": [int(it["image_id"]) for it in items]}
