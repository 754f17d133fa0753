"""What the search applications need from a model: an :class:`Encoder` (preprocess an image,
embed images and texts, caption images), and :func:`load_encoder`, which builds one from
anything :func:`mammut.load` loads (a run folder, a checkpoint, an open_clip CoCa file, a local
HF snapshot).

Embeddings come back as float32 numpy arrays ``(n, dim)``, L2-normalised. Calls into one model
are serialised by a lock, so a server may call from several threads.
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
    ``bf16`` runs the model under bfloat16 autocast (embeddings are returned as float32).
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenize: Callable[[list[str]], torch.Tensor], tokenizer: Any, *, name: str,
                 device: str | torch.device = "cpu", bf16: bool = False, max_new_tokens: int = 24) -> None:
        for attr in ("embed_image", "embed_text"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"model: expected a contrastive model with {attr}(), got {type(model).__name__}")
        self.model = model.eval()
        self.transform = preprocess
        self.tokenize = tokenize
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.bf16 = bool(bf16)
        self.max_new_tokens = int(max_new_tokens)
        self._lock = threading.Lock()
        self._dim: int | None = None

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _need(self, part: Any, what: str) -> None:
        """A part ``mammut.load`` could not find (falsy ``MissingComponent``): a user error naming it."""
        if not part:
            raise ValueError(f"--model: {self.name} cannot {what}: {getattr(part, 'reason', 'it is missing')}")

    @property
    def dim(self) -> int:
        if self._dim is None:
            probe = self.preprocess(Image.new("RGB", (32, 32)))[None]
            self._dim = int(self.embed_images(probe).shape[1])
        return self._dim

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        self._need(self.transform, "read images")
        return self.transform(image)

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        if pixels.ndim != 4:
            raise ValueError(f"pixels: expected a tensor (n, 3, H, W), got shape {tuple(pixels.shape)}")
        with self._lock, torch.inference_mode(), self._autocast():
            out = self.model.embed_image(pixels.to(self.device))
        return out.float().cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self._need(self.tokenizer, "read texts")
        ids = self.tokenize(list(texts))
        with self._lock, torch.inference_mode(), self._autocast():
            out = self.model.embed_text(ids.to(self.device))
        return out.float().cpu().numpy()

    def caption(self, pixels: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        if not callable(getattr(self.model, "caption", None)):
            raise ValueError(f"--model: {type(self.model).__name__} has no caption(); it cannot caption images")
        self._need(self.tokenizer, "write captions")
        n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        with self._lock, torch.inference_mode(), self._autocast():
            return list(self.model.caption(pixels.to(self.device), self.tokenizer, max_new_tokens=n))


def load_encoder(source: str | Path, *, device: str | None = None, bf16: bool = False,
                 checkpoint: str | Path | None = None, max_new_tokens: int = 32) -> ModelEncoder:
    """An :class:`Encoder` for ``source``: anything :func:`mammut.load` loads (a run folder, a
    mammut checkpoint folder, an open_clip CoCa / openMaMMUT file, a local HF snapshot)."""
    from ..loading import load

    if not str(source):
        raise ValueError("--model: expected a run folder or checkpoint, got ''")
    path = Path(source).expanduser()
    if not path.exists() and not str(source).startswith("hf-hub:"):
        raise FileNotFoundError(f"--model: no such run folder or checkpoint: {path}")
    dev = torch.device(device) if device else torch.device("cpu")
    model, preprocess, tokenizer = load(str(source) if str(source).startswith("hf-hub:") else str(path),
                                        device=dev, checkpoint=checkpoint)
    log.info("loaded model %s on %s%s", source, dev, " (bf16 autocast)" if bf16 else "")
    name = str(source) if str(source).startswith("hf-hub:") else str(path.absolute())
    return ModelEncoder(model, preprocess, lambda texts: tokenizer(texts), tokenizer, name=name, device=dev,
                        bf16=bf16, max_new_tokens=max_new_tokens)
