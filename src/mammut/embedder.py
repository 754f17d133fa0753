"""One way to embed and caption with a loaded model: :class:`Embedder`, beside :func:`mammut.load`.

::

    model, preprocess, tokenizer = mammut.load("path/to/run_or_checkpoint")
    embedder = mammut.Embedder(model, preprocess, tokenizer, device="cuda", precision="auto")
    images = embedder.embed_images([Image.open(p) for p in paths])   # (n, l) float32, CPU
    texts = embedder.embed_texts(["a cat", "a dog"])                 # (n, l) float32, CPU
    captions = embedder.caption(images_tensor, max_new_tokens=24)    # list[str]

Every call runs in batches of ``batch_size`` with no autograd, under the chosen precision
(:func:`mammut.precision.resolve_precision`: ``fp32``, or ``bf16`` autocast; ``auto`` picks bf16
only where the device computes it natively), with the model switched to eval mode for the
call and its own mode restored afterwards. Embeddings are the model's ``embed_image`` /
``embed_text`` (L2-normalised), returned as float32 on the CPU whatever the precision.

The evaluation (``mammut.eval.model_source.EvalModel``), the search applications
(``mammut.apps.encoder.ModelEncoder``) and ``mammut.inference`` embed and caption through it.
One call at a time per model (the call switches the model's mode): share an embedder between
threads behind a lock, as ``ModelEncoder`` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .models.contract import Captioner, ContrastiveEmbedder, Decoder, ImageEmbedder, MediaDecoder, TextEmbedder
from .precision import Precision, autocast, resolve_precision

__all__ = ["Embedder", "token_ids"]

log = logging.getLogger(__name__)


def token_ids(out: Any) -> torch.Tensor:
    """Token ids ``(b, n)`` from what a model's ``generate`` returned: a tensor, an object with
    ``sequences`` / ``tokens`` / ``ids`` (e.g. :class:`mammut.GenerationOutput`), or a tuple
    whose first item is the ids."""
    for attr in ("sequences", "tokens", "ids"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not torch.is_tensor(out) or out.ndim != 2:
        raise TypeError(f"model.generate: expected token ids (b, n), got {type(out).__name__}")
    return out


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


class Embedder:
    """Batched embedding and captioning with ``model`` (see the module doc).

    - ``preprocess``: PIL image -> ``(3, s, s)`` (a :class:`mammut.ImagePreprocess`); needed
      only to embed PIL images.
    - ``tokenizer``: ``tokenizer(texts) -> LongTensor (b, n)`` and ``tokenizer.decode(ids)``
      (what :func:`mammut.load` returns); needed to embed texts and to caption.
    - ``device``: where inputs go, and the model with them when it is elsewhere (default: the
      device of the model's parameters).
    - ``precision``: a :class:`~mammut.precision.Precision`, or ``"auto"`` / ``"fp32"`` /
      ``"bf16"`` resolved for ``device`` (default ``fp32``).
    - ``batch_size``: rows per model call (each method takes ``batch_size=`` for one call).
    - ``tokenize``: how texts become ids (default ``tokenizer(list(texts))``).
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Any], torch.Tensor] | None = None,
                 tokenizer: Any = None, *, device: str | torch.device | None = None,
                 precision: Precision | str = "fp32", batch_size: int = 128,
                 tokenize: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.batch_size = self._check_batch_size(batch_size)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = _model_device(model) if device is None else torch.device(device)
        if device is not None and not _same_device(_model_device(model), self.device):
            log.info("moving %s to %s", type(model).__name__, self.device)
            model.to(self.device)
        self.precision = precision if isinstance(precision, Precision) else resolve_precision(str(precision), self.device)
        self._tokenize = tokenize

    # ------------------------------------------------------------------ what the model can do
    # (the Protocols of mammut.models.contract: any object with their members qualifies)
    @property
    def contrastive(self) -> bool:
        """Whether the model embeds images and texts (``ContrastiveEmbedder``)."""
        return isinstance(self.model, ContrastiveEmbedder)

    @property
    def captioner(self) -> bool:
        """Whether the model generates text (``Captioner``: ``generate``)."""
        return isinstance(self.model, Captioner)

    @property
    def media(self) -> bool:
        """A media model (``MediaDecoder``, Flamingo): images ``(b, 1, c, h, w)`` and a media
        token in the prompt."""
        return isinstance(self.model, MediaDecoder)

    # ------------------------------------------------------------------ embedding
    def embed_images(self, images: torch.Tensor | Sequence[Any], *, batch_size: int | None = None) -> torch.Tensor:
        """L2-normalised image embeddings ``(n, l)``, float32 on the CPU, of a pixel tensor
        ``(n, c, h, w)`` or a list of PIL images (through ``preprocess``)."""
        self._need(ImageEmbedder, "a contrastive model with embed_image()")
        pixels = self._pixels(images)
        return self._run(lambda part: self.model.embed_image(part.to(self.device, non_blocking=True)),
                         pixels, batch_size)

    def embed_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """L2-normalised text embeddings ``(n, l)``, float32 on the CPU, of strings (tokenised
        by ``tokenize``, default ``tokenizer(texts)``: texts longer than its context are cut)."""
        self._need(TextEmbedder, "a contrastive model with embed_text()")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
        return self._run(lambda part: self.model.embed_text(self.tokenize(part).to(self.device, non_blocking=True)),
                         texts, batch_size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Ids ``(b, n)`` of ``texts`` as the embedder feeds them to the model."""
        if self._tokenize is not None:
            return self._tokenize(list(texts))
        if not callable(self.tokenizer):  # a MissingComponent is callable: it raises saying what is missing
            raise ValueError(f"tokenizer: expected a tokenizer to embed texts, got {type(self.tokenizer).__name__}")
        return self.tokenizer(list(texts))

    # ------------------------------------------------------------------ generation
    def generate(self, images: torch.Tensor | Sequence[Any], prompt: Sequence[Sequence[int]] | None = None, *,
                 batch_size: int | None = None, **options: Any) -> torch.Tensor:
        """Generated token ids ``(n, m)`` on the CPU (``options``: ``model.generate``'s, e.g.
        ``max_new_tokens``, ``strategy``); batches of different lengths are right-padded with the
        tokenizer's (else the model's) ``pad_id``. A media model gets images ``(b, 1, c, h, w)``
        and, without ``prompt`` (one id list per image), ``[bos, <image>]`` per row."""
        parts = list(self._generations(images, prompt, batch_size, options))
        if len(parts) == 1:
            return parts[0]
        pad = getattr(self.tokenizer, "pad_id", None)
        if pad is None and isinstance(self.model, Decoder):
            pad = self.model.config.pad_id
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=int(pad or 0)) for p in parts])

    def caption(self, images: torch.Tensor | Sequence[Any], prompt: Sequence[Sequence[int]] | None = None, *,
                batch_size: int | None = None, **options: Any) -> list[str]:
        """The generations of :meth:`generate`, decoded by ``tokenizer.decode`` (one string per image)."""
        self._need_captioner()
        decode = getattr(self.tokenizer, "decode", None)
        if not callable(decode):
            raise ValueError(f"tokenizer: expected a tokenizer with decode() to caption, got {type(self.tokenizer).__name__}")
        return [text for ids in self._generations(images, prompt, batch_size, options) for text in decode(ids)]

    def _generations(self, images: torch.Tensor | Sequence[Any], prompt: Sequence[Sequence[int]] | None,
                     batch_size: int | None, options: dict[str, Any]) -> Iterator[torch.Tensor]:
        """Token ids ``(b, n)`` on the CPU, batch by batch."""
        self._need_captioner()
        pixels = self._pixels(images)
        if prompt is not None and len(prompt) != len(pixels):
            raise ValueError(f"prompt: expected one prompt per image ({len(pixels)}), got {len(prompt)}")
        size = self._check_batch_size(self.batch_size if batch_size is None else batch_size)
        media = self.media
        with self._calling():
            for start in range(0, max(len(pixels), 1), size):
                part = pixels[start:start + size].to(self.device, non_blocking=True)
                rows = None if prompt is None else [list(p) for p in prompt[start:start + size]]
                if media:
                    part = part.unsqueeze(1)
                    if rows is None:
                        rows = [[self.model.config.bos_id, self.model.media_token_id]] * len(part)
                extra = {} if rows is None else {"prompt": rows}
                yield token_ids(self.model.generate(part, **extra, **options)).cpu()

    # ------------------------------------------------------------------ machinery
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the chosen precision on ``device`` (disabled for fp32)."""
        return autocast(self.precision, self.device)

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """No autograd, the chosen precision, eval mode for the call (the model's mode restored)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                yield
        finally:
            self.model.train(was_training)

    def _run(self, step: Callable[[Any], torch.Tensor], rows: Any, batch_size: int | None) -> torch.Tensor:
        size = self._check_batch_size(self.batch_size if batch_size is None else batch_size)
        with self._calling():
            out = [step(rows[start:start + size]).float().cpu() for start in range(0, max(len(rows), 1), size)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _pixels(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        if torch.is_tensor(images):
            if images.ndim < 1:
                raise ValueError(f"images: expected a batch (n, c, h, w), got shape {tuple(images.shape)}")
            return images
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError(f"images: expected a tensor (n, c, h, w) or a list of PIL images, got {type(images).__name__}")
        if not callable(self.preprocess):  # a MissingComponent is callable: it raises saying what is missing
            raise ValueError(f"preprocess: expected an image preprocessing for PIL images, got {type(self.preprocess).__name__}")
        if not images:
            raise ValueError("images: expected at least one image, got an empty list")
        return torch.stack([self.preprocess(image) for image in images])

    def _need_captioner(self) -> None:
        self._need(Captioner, "a captioning model with generate()")

    def _need(self, protocol: type, what: str) -> None:
        if not isinstance(self.model, protocol):
            raise TypeError(f"model: expected {what}, got {type(self.model).__name__}")

    @staticmethod
    def _check_batch_size(batch_size: Any) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        return batch_size

    def __repr__(self) -> str:
        return (f"Embedder({type(self.model).__name__}, device={self.device}, precision={self.precision.name}, "
                f"batch_size={self.batch_size})")
