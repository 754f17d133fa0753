"""Emoji scenes: a deterministic, unbounded image-caption dataset that ships with the package.

Each scene is a small RGB image with one to three emoji (rendered from the embedded
Noto Color Emoji asset, see ``assets/NOTICE-emoji.txt``) on a plain or lightly coloured
background, and a compositional caption such as ``"a doughnut"`` or
``"a cat face above a pizza"``.  The spatial relation in a caption is derived from the
actual placement, so it is always true.

Item ``i`` of a dataset is a pure function of ``(seed, split, i)`` and the constructor
arguments.  A fixed ~20 % of unordered emoji *pairs* (chosen by hashing their codepoints)
is reserved for the ``"heldout"`` split; ``"train"`` multi-object scenes never contain
such a pair, so held-out scenes test compositional generalisation.  Single-object
held-out scenes draw from a different random stream (new positions, sizes, backgrounds)
over the same emoji vocabulary.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout")
_SPLIT_CODE = {"train": 0, "heldout": 1}
_PAIR_SALT = 0x5EED_E30_1
_MAX_PLACEMENT_TRIES = 200

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive x1/y1, pixels


# ----------------------------------------------------------------------------- asset


@dataclass(frozen=True)
class EmojiAsset:
    """The embedded emoji sprites and their metadata."""

    images: np.ndarray  # (N, S, S, 4) uint8 RGBA
    names: tuple[str, ...]
    codepoints: np.ndarray  # (N,) int64
    categories: tuple[str, ...]
    blocks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def default_asset_path() -> Path:
    """Path of the ``emoji.npz`` asset inside the installed package."""
    return Path(str(resources.files("mammut.data").joinpath("assets", "emoji.npz")))


@functools.lru_cache(maxsize=4)
def load_emoji_asset(path: str | None = None) -> EmojiAsset:
    """Load (and cache) the emoji asset; ``path`` defaults to the packaged ``emoji.npz``."""
    p = Path(path) if path is not None else default_asset_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"emoji asset not found at {p}; rebuild it with scripts/build_emoji_asset.py"
        )
    with np.load(p, allow_pickle=False) as data:
        images = np.ascontiguousarray(data["images"])
        names = tuple(str(n) for n in data["names"])
        codepoints = data["codepoints"].astype(np.int64)
        n = len(names)
        categories = tuple(str(c) for c in data["categories"]) if "categories" in data else ("",) * n
        blocks = tuple(str(b) for b in data["blocks"]) if "blocks" in data else ("",) * n
    if images.ndim != 4 or images.shape[-1] != 4 or images.shape[0] != n or images.dtype != np.uint8:
        raise ValueError(f"malformed emoji asset {p}: images {images.shape} {images.dtype}, {n} names")
    if len(set(names)) != n:
        raise ValueError(f"malformed emoji asset {p}: emoji names are not unique")
    return EmojiAsset(images, names, codepoints, categories, blocks)


# ----------------------------------------------------------------------------- held-out pairs


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _pair_uniform(cp_a: np.ndarray, cp_b: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per unordered codepoint pair (symmetric in a, b)."""
    a = np.asarray(cp_a, dtype=np.uint64)
    b = np.asarray(cp_b, dtype=np.uint64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = (lo << np.uint64(24)) ^ hi ^ np.uint64(_PAIR_SALT)
    return (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_heldout_pair(codepoint_a: int, codepoint_b: int, fraction: float = 0.2) -> bool:
    """Whether the unordered emoji pair (given by codepoints) is reserved for the held-out split."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if codepoint_a == codepoint_b:
        return False
    return bool(_pair_uniform(np.array([codepoint_a]), np.array([codepoint_b]))[0] < fraction)


# ----------------------------------------------------------------------------- geometry


def relation_from_boxes(box_a: Sequence[int], box_b: Sequence[int]) -> str | None:
    """Spatial relation of object A to object B (``"left of"``, ``"above"``, ...), or None if ambiguous.

    A relation holds when the boxes are separated along the dominant axis of the
    centre displacement, e.g. ``"left of"`` needs ``a.x1 <= b.x0`` and ``|dx| > |dy|``.
    Image coordinates: y grows downwards, so ``"above"`` means a smaller y.
    """
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    dx = (bx0 + bx1) - (ax0 + ax1)  # twice the centre displacement, exact in ints
    dy = (by0 + by1) - (ay0 + ay1)
    if abs(dx) > abs(dy):
        if ax1 <= bx0:
            return "left of"
        if bx1 <= ax0:
            return "right of"
    elif abs(dy) > abs(dx):
        if ay1 <= by0:
            return "above"
        if by1 <= ay0:
            return "below"
    return None


def _overlap(a: Box, b: Box, gap: int = 1) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Scene:
    """One generated scene. ``emoji_ids``, ``boxes`` and ``names`` are in caption order."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    caption: str
    emoji_ids: tuple[int, ...]
    names: tuple[str, ...]
    boxes: tuple[Box, ...]
    relations: tuple[str, ...]  # relation of object j to object j+1
    index: int

    @property
    def n_objects(self) -> int:
        """Number of emoji in the scene."""
        return len(self.emoji_ids)


def make_caption(names: Sequence[str], relations: Sequence[str]) -> str:
    """Caption for objects ``names`` with ``relations[j]`` relating object j to object j+1."""
    if len(relations) != max(len(names) - 1, 0):
        raise ValueError(f"need len(names) - 1 relations, got {len(names)} names and {len(relations)} relations")
    if not names:
        raise ValueError("names must not be empty")
    caption = f"a {names[0]}"
    if len(names) >= 2:
        caption += f" {relations[0]} a {names[1]}"
    for j in range(1, len(relations)):
        caption += f" and the {names[j]} {relations[j]} a {names[j + 1]}"
    return caption


class EmojiScenes(IterableDataset):
    """Deterministic, unbounded emoji scenes with compositional captions.

    Indexable (``ds[i]`` -> :class:`Scene`) and iterable (yields scenes ``start, start+1, ...``,
    sharded over DataLoader workers and distributed ranks; endless unless ``length`` is set).

    Args:
        image_size: side of the square image in pixels (>= 16).
        num_emoji: vocabulary size, a fixed subset of the asset chosen by ``vocab_seed``;
            ``None`` uses every emoji in the asset.
        max_objects: most emoji per scene (1..3); ``min_objects`` the fewest.
        split: ``"train"`` or ``"heldout"``.
        seed: seed of the per-item random stream.
        heldout_fraction: share of unordered emoji pairs reserved for ``"heldout"``.
        length: if set, ``len(ds)`` and the iteration stop after this many items.
        start: first index produced by iteration.
        vocab_seed: picks the emoji subset (kept separate from ``seed`` so that
            different seeds share one vocabulary).
        asset_path: alternative ``emoji.npz``.
    """

    def __init__(
        self,
        image_size: int = 64,
        num_emoji: int | None = 300,
        max_objects: int = 2,
        split: str = "train",
        seed: int = 0,
        *,
        min_objects: int = 1,
        heldout_fraction: float = 0.2,
        length: int | None = None,
        start: int = 0,
        vocab_seed: int = 0,
        asset_path: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not (isinstance(max_objects, int) and 1 <= max_objects <= 3):
            raise ValueError(f"max_objects must be an int in [1, 3], got {max_objects!r}")
        if not (isinstance(min_objects, int) and 1 <= min_objects <= max_objects):
            raise ValueError(f"min_objects must be an int in [1, max_objects={max_objects}], got {min_objects!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ValueError(f"length must be None or an int >= 0, got {length!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")

        asset = load_emoji_asset(asset_path)
        total = len(asset)
        if num_emoji is None:
            vocab = np.arange(total)
        else:
            if not isinstance(num_emoji, int) or not 1 <= num_emoji <= total:
                raise ValueError(f"num_emoji must be None or an int in [1, {total}], got {num_emoji!r}")
            vocab = np.sort(np.random.default_rng(vocab_seed).permutation(total)[:num_emoji])
        if max_objects >= 2 and len(vocab) < max_objects:
            raise ValueError(f"num_emoji={len(vocab)} is too small for max_objects={max_objects}")

        self.image_size = image_size
        self.split = split
        self.seed = int(seed)
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.heldout_fraction = float(heldout_fraction)
        self.length = length
        self.start = start
        self._asset = asset
        self._asset_index = vocab  # emoji id -> row in the asset
        self._names = tuple(asset.names[i] for i in vocab)
        self.codepoints = asset.codepoints[vocab].copy()

        # Unordered pairs (i < j) of emoji ids, split into train / held-out by codepoint hash.
        iu, ju = np.triu_indices(len(vocab), k=1)
        held = _pair_uniform(self.codepoints[iu], self.codepoints[ju]) < self.heldout_fraction
        self._heldout_mask = np.zeros((len(vocab), len(vocab)), dtype=bool)
        self._heldout_mask[iu, ju] = held
        self._heldout_mask[ju, iu] = held
        own = held if split == "heldout" else ~held
        self._pairs = np.stack([iu[own], ju[own]], axis=1).astype(np.int32)
        if max_objects >= 2 and len(self._pairs) == 0:
            raise ValueError(
                f"no {split} emoji pairs with num_emoji={len(vocab)} and heldout_fraction={heldout_fraction}"
            )

        fractions = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
        sizes = sorted({max(4, round(image_size * f)) for f in fractions})
        self._sizes_single = sizes
        self._sizes_multi = {2: sizes[:4], 3: sizes[:3]}
        self._sprites: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- vocabulary -----------------------------------------------------------------

    @property
    def num_emoji(self) -> int:
        """Number of emoji (classes) in the vocabulary."""
        return len(self._names)

    def class_names(self) -> list[str]:
        """Emoji names in id order (the zero-shot classes)."""
        return list(self._names)

    def pair_is_heldout(self, id_a: int, id_b: int) -> bool:
        """Whether the unordered pair of emoji ids is reserved for the held-out split."""
        return bool(self._heldout_mask[id_a, id_b])

    def split_pairs(self) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
        """All (train, held-out) unordered emoji-id pairs ``(i, j)`` with ``i < j``."""
        iu, ju = np.triu_indices(self.num_emoji, k=1)
        held = self._heldout_mask[iu, ju]
        train = set(zip(iu[~held].tolist(), ju[~held].tolist()))
        heldout = set(zip(iu[held].tolist(), ju[held].tolist()))
        return train, heldout

    # -- rendering ------------------------------------------------------------------

    def _sprite(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Premultiplied RGB (V, s, s, 3) and alpha (V, s, s, 1) float32 sprites at ``size``."""
        cached = self._sprites.get(size)
        if cached is None:
            rgba = torch.from_numpy(self._asset.images[self._asset_index]).float().div_(255.0)
            rgba = rgba.permute(0, 3, 1, 2)
            rgba[:, :3] *= rgba[:, 3:4]  # premultiply, so edges do not bleed
            out = F.interpolate(rgba, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out = out.clamp_(0.0, 1.0).permute(0, 2, 3, 1).contiguous().numpy()
            cached = (np.minimum(out[..., :3], out[..., 3:4]), out[..., 3:4])
            self._sprites[size] = cached
        return cached

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])

    def _choose_emoji(self, rng: np.random.Generator, k: int) -> list[int]:
        if k == 1:
            return [int(rng.integers(self.num_emoji))]
        a, b = (int(x) for x in self._pairs[rng.integers(len(self._pairs))])
        ids = [a, b]
        while len(ids) < k:  # held-out scenes: any third emoji; train: no held-out pair at all
            c = int(rng.integers(self.num_emoji))
            if c in ids:
                continue
            if self.split == "train" and any(self._heldout_mask[c, x] for x in ids):
                continue
            ids.append(c)
        order = rng.permutation(k)
        return [ids[o] for o in order]

    def _place(self, rng: np.random.Generator, k: int) -> tuple[list[Box], list[str]]:
        h = self.image_size
        if k == 1:
            s = int(rng.choice(self._sizes_single))
            x, y = (int(v) for v in rng.integers(0, h - s + 1, size=2))
            return [(x, y, x + s, y + s)], []
        sizes = self._sizes_multi[k]
        for _ in range(_MAX_PLACEMENT_TRIES):
            boxes: list[Box] = []
            for _j in range(k):
                s = int(rng.choice(sizes))
                x, y = (int(v) for v in rng.integers(0, h - s + 1, size=2))
                boxes.append((x, y, x + s, y + s))
            if any(_overlap(a, b) for a, b in itertools.combinations(boxes, 2)):
                continue
            rels = [relation_from_boxes(boxes[j], boxes[j + 1]) for j in range(k - 1)]
            if all(r is not None for r in rels):
                return boxes, [str(r) for r in rels]
        # Fallback (practically never reached): a row, left to right, smallest size.
        log.debug("placement fell back to a row layout for %d objects", k)
        s = sizes[0]
        step = (h - s) // (k - 1)
        y = int(rng.integers(0, h - s + 1))
        boxes = [(j * step, y, j * step + s, y + s) for j in range(k)]
        return boxes, ["left of"] * (k - 1)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.3:
            colour = np.ones(3, dtype=np.float32)
        else:
            colour = (1.0 - rng.uniform(0.0, 0.2, size=3)).astype(np.float32)
        return np.broadcast_to(colour, (self.image_size, self.image_size, 3)).copy()

    def draw(self, rng: np.random.Generator, emoji_ids: Sequence[int], boxes: Sequence[Box]) -> torch.Tensor:
        """An image ``(3, H, W)`` in [0, 1]: a background drawn from ``rng``, then emoji
        ``emoji_ids[j]`` in ``boxes[j]`` (square boxes, in order: later ones on top)."""
        canvas = self._background(rng)
        for eid, (x0, y0, x1, y1) in zip(emoji_ids, boxes):
            rgb, alpha = self._sprite(x1 - x0)
            region = canvas[y0:y1, x0:x1]
            region *= 1.0 - alpha[eid]
            region += rgb[eid]
        return torch.from_numpy(canvas.clip(0.0, 1.0)).permute(2, 0, 1).contiguous()

    def scene(self, index: int) -> Scene:
        """Generate scene ``index`` (a pure function of seed, split, index and settings)."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = self._rng(index)
        k = int(rng.integers(self.min_objects, self.max_objects + 1))
        ids = self._choose_emoji(rng, k)
        boxes, relations = self._place(rng, k)
        image = self.draw(rng, ids, boxes)
        names = tuple(self._names[i] for i in ids)
        return Scene(
            image=image,
            caption=make_caption(names, relations),
            emoji_ids=tuple(ids),
            names=names,
            boxes=tuple(boxes),
            relations=tuple(relations),
            index=index,
        )

    __getitem__ = scene

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("EmojiScenes is unbounded (length=None) and has no len()")
        return self.length

    def __iter__(self) -> Iterator[Scene]:
        shard, num_shards = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shard, num_shards = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        if info is not None:
            shard, num_shards = shard * info.num_workers + info.id, num_shards * info.num_workers
        stop = None if self.length is None else self.start + self.length
        indices = itertools.count(self.start + shard, num_shards)
        for i in indices:
            if stop is not None and i >= stop:
                return
            yield self.scene(i)

    def batch(self, indices: Sequence[int] | range) -> tuple[torch.Tensor, list[str], list[tuple[int, ...]], list[int]]:
        """Scenes ``indices`` as ``(images (n, 3, H, W), captions, emoji_ids, n_objects)``."""
        scenes = [self.scene(i) for i in indices]
        if not scenes:
            raise ValueError("indices must not be empty")
        return (
            torch.stack([s.image for s in scenes]),
            [s.caption for s in scenes],
            [s.emoji_ids for s in scenes],
            [s.n_objects for s in scenes],
        )


class HeldoutSet(NamedTuple):
    """A fixed evaluation set of emoji scenes."""

    images: torch.Tensor  # (n, 3, H, W) float32 in [0, 1]
    captions: list[str]
    emoji_ids: list[tuple[int, ...]]
    n_objects: list[int]


def heldout_set(
    n: int = 512,
    image_size: int = 64,
    num_emoji: int | None = 300,
    max_objects: int = 2,
    seed: int = 0,
    **kwargs: object,
) -> HeldoutSet:
    """The first ``n`` held-out scenes: ``(images, captions, emoji_ids, n_objects)``.

    Extra keyword arguments go to :class:`EmojiScenes` (use the training set's
    ``num_emoji``/``vocab_seed`` so the ids match its :meth:`EmojiScenes.class_names`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    ds = EmojiScenes(image_size, num_emoji, max_objects, split="heldout", seed=seed, **kwargs)  # type: ignore[arg-type]
    return HeldoutSet(*ds.batch(range(n)))


def verify_split_disjoint(train: EmojiScenes, heldout: EmojiScenes, n: int = 2000) -> dict[str, int]:
    """Check that no held-out pair occurs in training scenes; raise RuntimeError if one does.

    Checks the pair partition itself and the first ``n`` scenes of both datasets
    (every multi-object held-out scene must contain a held-out pair, no training
    scene may contain one).  Returns counts of what was checked.
    """
    if not isinstance(train, EmojiScenes) or not isinstance(heldout, EmojiScenes):
        raise TypeError(
            f"train and heldout must be EmojiScenes, got {type(train).__name__} and {type(heldout).__name__}"
        )
    if train.split != "train" or heldout.split != "heldout":
        raise ValueError(f"expected splits ('train', 'heldout'), got ({train.split!r}, {heldout.split!r})")
    if not np.array_equal(train.codepoints, heldout.codepoints):
        raise ValueError("train and heldout use different emoji vocabularies (num_emoji/vocab_seed differ)")
    train_pairs, heldout_pairs = train.split_pairs()
    if train_pairs & heldout_pairs:
        raise RuntimeError(f"{len(train_pairs & heldout_pairs)} pairs are in both splits")
    seen_train: set[tuple[int, int]] = set()
    for i in range(n):
        ids = train.scene(i).emoji_ids
        for a, b in itertools.combinations(ids, 2):
            pair = (min(a, b), max(a, b))
            if pair in heldout_pairs:
                raise RuntimeError(f"train scene {i} contains held-out pair {pair}")
            seen_train.add(pair)
    seen_heldout: set[tuple[int, int]] = set()
    for i in range(n):
        ids = heldout.scene(i).emoji_ids
        if len(ids) < 2:
            continue
        pairs = {(min(a, b), max(a, b)) for a, b in itertools.combinations(ids, 2)}
        if not pairs & heldout_pairs:
            raise RuntimeError(f"held-out scene {i} has no held-out pair: {sorted(pairs)}")
        seen_heldout |= pairs & heldout_pairs
    if seen_train & seen_heldout:
        raise RuntimeError("a pair was seen in both splits")
    return {
        "train_pairs": len(train_pairs),
        "heldout_pairs": len(heldout_pairs),
        "train_pairs_seen": len(seen_train),
        "heldout_pairs_seen": len(seen_heldout),
        "scenes_checked": 2 * n,
    }
