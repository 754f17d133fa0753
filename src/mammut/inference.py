"""Inference on trained models: load a run folder, read images from files, and embed or caption
in batches. One module that evaluation (``mammut.eval``), the CLI and later applications share,
so none of them reaches into the training loop.

- :func:`load_run`: model (eval mode, CPU), tokenizer and config of a run folder, from its
  newest checkpoint that verifies (a corrupt one is named in a warning, never loaded).
- :func:`read_metrics`: the records of a run's ``metrics.jsonl``.
- :func:`load_image_files`: image files -> a batch ``(n, 3, s, s)`` in a run's eval transform.
- :func:`run_preprocess`: that eval transform as a :class:`mammut.ImagePreprocess` (the one
  preprocessing definition :func:`mammut.load` returns too).
- :func:`embed_images` / :func:`embed_texts` / :func:`generate_captions`: batched, no grad,
  through :class:`mammut.Embedder`. They switch the model to eval mode for the call and restore
  its mode (the caller owns the model; do not share it with a training thread during the call).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .models.contract import Captioner, ImageEmbedder, TextEmbedder

if TYPE_CHECKING:
    from .preprocess import ImagePreprocess
    from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["RunFiles", "load_run", "read_metrics", "load_image_files", "run_preprocess", "embed_images",
           "embed_texts", "generate_captions"]


@dataclasses.dataclass
class RunFiles:
    """What :func:`load_run` returns."""

    model: nn.Module
    tokenizer: Any  # mammut.tokenizer.Tokenizer
    config: Any  # mammut.train.config.RunConfig
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> RunFiles:
    """Model (eval mode, on CPU), tokenizer and config of a run folder, from its latest
    checkpoint that verifies or the given one. The tokenizer's ``context_length`` is the run's
    ``data.max_len`` (``tokenizer(texts)`` encodes as training did). The folder is read by
    :mod:`mammut.runs`; this adds the checked ``RunConfig`` and builds the model with
    ``mammut.train.build.build_model`` (a bad ``model:`` section is a ``ConfigError``)."""
    from .runs import latest_valid_checkpoint, load_weights, read_run_config, run_tokenizer, verify_checkpoint
    from .train.build import build_model
    from .train.config import config_from_dict

    run = Path(run_dir)
    document = read_run_config(run)
    cfg = config_from_dict(document)
    tokenizer = run_tokenizer(run, document)
    if checkpoint is not None:
        ckpt: Path | None = Path(checkpoint)
        if (ckpt / "manifest.json").is_file() or ckpt.name.startswith("step_"):
            verify_checkpoint(ckpt)  # a flipped byte or a truncated file is an error, never loaded
    else:
        ckpt = latest_valid_checkpoint(run)  # the newest that verifies; corrupt ones are named in a warning
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"run_dir: no checkpoint with model.safetensors under {run / 'checkpoints'}")
    model = build_model(cfg.model)
    model.load_state_dict(load_weights(ckpt / "model.safetensors"), strict=True)
    model.eval()
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else -1
    if (ckpt / "best.json").is_file():  # train.keep_best's RUN/best
        step = int(json.loads((ckpt / "best.json").read_text()).get("step", -1))
    return RunFiles(model, tokenizer, cfg, ckpt, step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run) the last wins
    (:func:`mammut.runs.read_metrics`)."""
    from .runs import read_metrics as read

    return read(path)


def run_preprocess(image_size: int, normalize: Any = False) -> ImagePreprocess:
    """A run's eval transform as a :class:`mammut.ImagePreprocess`: resize the short side
    (bicubic), centre crop, ``[0, 1]``, transparency on white; ``normalize`` (``data.normalize``):
    False, True (OpenAI CLIP mean/std) or ``(mean, std)``. The same pixels as
    ``mammut.data.datasets.image_transform(image_size, train=False, normalize=normalize)``
    (:func:`mammut.runs.run_preprocess`)."""
    from .runs import run_preprocess as preprocess

    return preprocess(image_size, normalize)


def load_image_files(paths: Sequence[str | Path], image_size: int | None = None, normalize: Any = False, *,
                     preprocess: Any = None) -> torch.Tensor:
    """Image files -> ``(n, 3, s, s)`` through ``preprocess`` (a :class:`mammut.ImagePreprocess`,
    e.g. from :func:`mammut.load`), or else a run's eval transform at ``image_size``
    (:func:`run_preprocess`); a missing file or one that is not an image is an error naming it."""
    from PIL import Image

    if preprocess is None:
        if image_size is None:
            raise ValueError("image_size / preprocess: expected one of them, got neither")
        preprocess = run_preprocess(image_size, normalize)
    elif image_size is not None:
        raise ValueError("image_size / preprocess: expected one of them, got both")
    tf = preprocess
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"images: no such file {p}")
        try:
            with Image.open(p) as img:
                img.load()
                out.append(tf(img))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying "not an image I can read"
            raise ValueError(f"images: expected an image file, got {p} ({type(exc).__name__}: {exc})") from None
    return torch.stack(out)


def _check_model(model: nn.Module) -> None:
    for protocol, name in ((ImageEmbedder, "embed_image"), (TextEmbedder, "embed_text")):
        if not isinstance(model, protocol):
            raise TypeError(f"model: expected a contrastive model with {name}(), got {type(model).__name__}")


def embed_images(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image embeddings ``(n, l)`` (float32, CPU): :meth:`mammut.Embedder.embed_images`
    on the model's device, in fp32."""
    from .embedder import Embedder

    _check_model(model)
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images: expected a tensor (n, c, h, w), got {getattr(images, 'shape', type(images).__name__)}")
    return Embedder(model, batch_size=batch_size).embed_images(images)


def embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                batch_size: int = 256, truncate: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings ``(n, l)`` of strings (tokenised with BOS/EOS as in training:
    ``tokenizer.encode(texts, max_len, truncate=truncate)``): :meth:`mammut.Embedder.embed_texts`."""
    from .embedder import Embedder

    _check_model(model)
    embedder = Embedder(model, tokenizer=tokenizer, batch_size=batch_size,
                        tokenize=lambda part: tokenizer.encode(part, max_len, truncate=truncate))
    return embedder.embed_texts(list(texts))


def generate_captions(model: nn.Module, tokenizer: Tokenizer, images: torch.Tensor, *,
                      max_new_tokens: int = 24, batch_size: int = 128) -> list[str]:
    """Greedy captions of ``images`` ``(n, c, h, w)``, decoded (BOS/EOS/padding dropped):
    :meth:`mammut.Embedder.caption`."""
    from .embedder import Embedder

    if not isinstance(model, Captioner):
        raise TypeError(f"model: expected a captioning model with generate(), got {type(model).__name__}")
    embedder = Embedder(model, tokenizer=tokenizer, batch_size=batch_size)
    return embedder.caption(images, max_new_tokens=max_new_tokens, strategy="greedy")
