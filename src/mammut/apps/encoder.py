"""What the search applications need from a model: an :class:`Encoder` (preprocess an image,
embed images and texts, caption images), and :func:`load_encoder`, which builds one from
anything :func:`mammut.load` loads (a run folder, a checkpoint, an open_clip CoCa file, a local
HF snapshot).

Embeddings come back as float32 numpy arrays ``(n, dim)``, L2-normalised, computed by
:class:`mammut.Embedder`. A model whose image encoder is a video encoder (``clip_shape`` set:
frames and size) embeds and captions clips ``(n, t, 3, H, W)`` read from video files
(:meth:`ModelEncoder.read_video`); an image given to it (a search by image, an uploaded picture
to caption) is a still clip, the image repeated ``t`` times. Calls into one model are
serialised by a lock, so a server may call from several threads.

A model that finds text in images (an open-vocabulary ``mammut_detector``, a run trained with
``train.task: detection``) has ``can_locate`` true, and :meth:`ModelEncoder.locate` gives the
boxes of a query in an image (:func:`mammut.apps.detect.detect_image`); ``mammut serve`` shows
them on the search page. Any other encoder may leave both out (``can_locate`` is then false).

The model runs in a :class:`mammut.precision.Precision` (``fp32``, or ``bf16`` autocast):
``precision="auto"`` picks bf16 where the device computes it natively (see
:mod:`mammut.precision`); the choice and its reason are logged when the model is loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..embedder import Embedder
from ..models.contract import Captioner, ImageEmbedder, TextEmbedder
from ..precision import Precision, autocast, resolve_precision

log = logging.getLogger(__name__)

__all__ = ["Encoder", "ModelEncoder", "load_encoder"]


@runtime_checkable
class Encoder(Protocol):
    """The model side of indexing, search and serving."""

    name: str  # where it was loaded from (recorded in the index)

    @property
    def dim(self) -> int: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> float tensor ``(3, H, W)`` (must be picklable for DataLoader workers)."""
        ...

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        """``(n, 3, H, W)`` -> L2-normalised float32 ``(n, dim)``."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> L2-normalised float32 ``(n, dim)``."""
        ...

    def caption(self, pixels: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """``(n, 3, H, W)`` -> one caption each."""
        ...


class ModelEncoder:
    """An :class:`Encoder` over a mammut model (``embed_image``, ``embed_text``, ``caption``).

    ``tokenize(texts) -> LongTensor (b, n)``; ``tokenizer`` is what ``model.caption`` decodes with.
    ``precision``: a :class:`~mammut.precision.Precision`, or ``"auto"``/``"fp32"``/``"bf16"``
    (resolved for ``device``); default fp32, or bf16 with ``bf16=True`` (the older keyword).
    bf16 runs the model under bfloat16 autocast; embeddings are returned as float32.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenize: Callable[[list[str]], torch.Tensor], tokenizer: Any, *, name: str,
                 device: str | torch.device = "cpu", bf16: bool = False, max_new_tokens: int = 24,
                 precision: Precision | str | None = None) -> None:
        for protocol, attr in ((ImageEmbedder, "embed_image"), (TextEmbedder, "embed_text")):
            if not isinstance(model, protocol):
                raise TypeError(f"model: expected a contrastive model with {attr}(), got {type(model).__name__}")
        self.model = model.eval()
        self.transform = preprocess
        self.tokenize = tokenize
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.precision = _precision(precision, bf16, self.device)
        self.max_new_tokens = int(max_new_tokens)
        self._lock = threading.Lock()
        self._dim: int | None = None
        from ..data.video_files import model_clip_shape

        self.clip_shape: tuple[int, int] | None = model_clip_shape(model)  # (frames, image size) of a video model
        from .detect import finds_text

        self.can_locate: bool = self.clip_shape is None and finds_text(model)  # an open-vocabulary detector

    @property
    def bf16(self) -> bool:
        """Whether the model runs under bfloat16 autocast."""
        return self.precision.bf16

    def _embedder(self) -> Embedder:
        """The :class:`mammut.Embedder` of this encoder's current settings (calls go through it,
        one at a time under the lock)."""
        return Embedder(self.model, self.transform, self.tokenizer, device=self.device, precision=self.precision,
                        tokenize=self.tokenize)

    def _need(self, part: Any, what: str) -> None:
        """A part ``mammut.load`` could not find (falsy ``MissingComponent``): a user error naming it."""
        if not part:
            raise ValueError(f"--model: {self.name} cannot {what}: {getattr(part, 'reason', 'it is missing')}")

    @property
    def media(self) -> str:
        """``"video"`` for a model with a video encoder (it indexes video files), else ``"image"``."""
        return "image" if self.clip_shape is None else "video"

    @property
    def dim(self) -> int:
        if self._dim is None:
            probe = self.preprocess(Image.new("RGB", (32, 32)))[None]
            self._dim = int(self.embed_images(probe).shape[1])
        return self._dim

    def read_video(self, data: bytes, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """A video file's bytes -> ``(clip (t, 3, H, W), (width, height))``: ``t`` frames sampled
        uniformly (by seeking), each through the model's image preprocessing;
        :class:`mammut.data.video_files.VideoDecodeError` (an ``OSError``) naming ``where``."""
        from ..data.video_files import read_clip_with_stats
        from ..preprocess import ImagePreprocess

        if self.clip_shape is None:
            raise ValueError(f"--model: {self.name} takes only images, not videos ({where})")
        frames, size = self.clip_shape
        pre = self.transform if isinstance(self.transform, ImagePreprocess) else None
        clip, stats = read_clip_with_stats(data, frames=frames, image_size=size, preprocess=pre, where=where)
        return clip, stats["size"]

    def _clips(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels for the model: a video model gets clips, an image ``(n, 3, H, W)`` as a still clip."""
        if self.clip_shape is not None and pixels.ndim == 4:
            return pixels.unsqueeze(1).expand(-1, self.clip_shape[0], -1, -1, -1)
        want = 4 if self.clip_shape is None else 5
        if pixels.ndim != want:
            shape = "(n, 3, H, W)" if want == 4 else "(n, t, 3, H, W) or (n, 3, H, W)"
            raise ValueError(f"pixels: expected a tensor {shape}, got shape {tuple(pixels.shape)}")
        return pixels

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        self._need(self.transform, "read images")
        return self.transform(image)

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        pixels = self._clips(pixels)
        with self._lock:
            out = self._embedder().embed_images(pixels, batch_size=max(1, len(pixels)))
        return out.numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self._need(self.tokenizer, "read texts")
        texts = list(texts)
        with self._lock:
            out = self._embedder().embed_texts(texts, batch_size=max(1, len(texts)))
        return out.numpy()

    def caption(self, pixels: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        if not isinstance(self.model, Captioner):
            raise ValueError(f"--model: {type(self.model).__name__} has no generate(); it cannot caption images")
        self._need(self.tokenizer, "write captions")
        n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        pixels = self._clips(pixels)
        with self._lock:
            return self._embedder().caption(pixels, batch_size=max(1, len(pixels)), max_new_tokens=n)

    def locate(self, image: Image.Image, queries: Sequence[str], *, threshold: float = 0.1, nms: float = 0.3,
               max_detections: int = 20) -> list[dict[str, Any]]:
        """Where ``queries`` are in an RGB PIL ``image``: ``[{"query", "score", "box": [x0, y0, x1,
        y1] in the image's pixels}]``, best first (:func:`mammut.apps.detect.detect_image`, under
        this encoder's precision); a ValueError when the model is no open-vocabulary detector."""
        if not self.can_locate:
            raise ValueError(f"--model: {self.name} cannot locate text in images: it is not an open-vocabulary "
                             f"detector (a run trained with train.task: detection)")
        self._need(self.tokenizer, "read texts")
        from .detect import detect_image

        with self._lock, autocast(self.precision, self.device):
            return detect_image(self.model, self.tokenize, image, list(queries), threshold=threshold, nms=nms,
                                max_detections=max_detections)


def _precision(precision: Precision | str | None, bf16: bool, device: torch.device,
               default: str = "fp32") -> Precision:
    """``precision`` (or the older ``bf16`` flag) resolved for ``device``; ``ValueError`` naming it."""
    if isinstance(precision, Precision):
        if bf16 and not precision.bf16:
            raise ValueError(f"precision: bf16=True asks for bf16, got precision {precision.name!r} too")
        return precision
    if precision is None:
        precision = "bf16" if bf16 else default
    elif bf16 and precision != "bf16":
        raise ValueError(f"precision: bf16=True asks for bf16, got precision {precision!r} too")
    return resolve_precision(str(precision), device)


def load_encoder(source: str | Path, *, device: str | None = None, bf16: bool = False,
                 checkpoint: str | Path | None = None, max_new_tokens: int = 32,
                 precision: Precision | str | None = None) -> ModelEncoder:
    """An :class:`Encoder` for ``source``: anything :func:`mammut.load` loads (a run folder, a
    mammut checkpoint folder, an open_clip CoCa / openMaMMUT file, a local HF snapshot).
    ``precision``: ``"auto"`` (the default: bf16 where ``device`` has it natively), ``"fp32"``,
    ``"bf16"`` or a resolved :class:`~mammut.precision.Precision`; ``bf16=True`` is ``"bf16"``."""
    from ..loading import load

    if not str(source):
        raise ValueError("--model: expected a run folder or checkpoint, got ''")
    path = Path(source).expanduser()
    if not path.exists() and not str(source).startswith("hf-hub:"):
        raise FileNotFoundError(f"--model: no such run folder or checkpoint: {path}")
    dev = torch.device(device) if device else torch.device("cpu")
    chosen = _precision(precision, bf16, dev, default="auto")  # a bad value is refused before loading
    model, preprocess, tokenizer = load(str(source) if str(source).startswith("hf-hub:") else str(path),
                                        device=dev, checkpoint=checkpoint)
    log.info("loaded model %s on %s, precision %s (%s)", source, dev, chosen.name, chosen.reason)
    name = str(source) if str(source).startswith("hf-hub:") else str(path.absolute())
    return ModelEncoder(model, preprocess, lambda texts: tokenizer(texts), tokenizer, name=name, device=dev,
                        max_new_tokens=max_new_tokens, precision=chosen)
