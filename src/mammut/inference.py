"""Inference on trained models: load a run folder, read images from files, and embed or caption
in batches. One module that evaluation (``mammut.eval``), the CLI and later applications share,
so none of them reaches into the training loop.

- :func:`load_run`: model (eval mode, CPU), tokenizer and config of a run folder, from its
  newest checkpoint that verifies (a corrupt one is named in a warning, never loaded).
- :func:`read_metrics`: the records of a run's ``metrics.jsonl``.
- :func:`load_image_files`: image files -> a batch ``(n, 3, s, s)`` in a run's eval transform.
- :func:`run_preprocess`: that eval transform as a :class:`mammut.ImagePreprocess` (the one
  preprocessing definition :func:`mammut.load` returns too).
- :func:`embed_images` / :func:`embed_texts` / :func:`generate_captions`: batched, no grad.
  They switch the model to eval mode for the call and restore its mode (the caller owns the
  model; do not share it with a training thread during the call).
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

if TYPE_CHECKING:
    from .data.tokenizer import Tokenizer
    from .preprocess import ImagePreprocess

log = logging.getLogger(__name__)

__all__ = ["RunFiles", "load_run", "read_metrics", "load_image_files", "run_preprocess", "embed_images",
           "embed_texts", "generate_captions"]


@dataclasses.dataclass
class RunFiles:
    """What :func:`load_run` returns."""

    model: nn.Module
    tokenizer: Any  # mammut.data.tokenizer.Tokenizer
    config: Any  # mammut.train.config.RunConfig
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> RunFiles:
    """Model (eval mode, on CPU), tokenizer and config of a run folder, from its latest
    checkpoint or the given one. The tokenizer's ``context_length`` is the run's
    ``data.max_len`` (``tokenizer(texts)`` encodes as training did)."""
    import yaml

    from .data.tokenizer import Tokenizer
    from .train.build import build_model
    from .train.checkpointing import latest_valid_checkpoint, load_weights, verify_checkpoint
    from .train.config import config_from_dict

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"run_dir: expected a run folder with config.yaml, got {run}")
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    # the run's own copy of its tokenizer (written at the start of training), so a run folder
    # works from any directory and after a move; older runs fall back to data.tokenizer
    own = run / "tokenizer.json"
    tokenizer = Tokenizer.from_file(own if own.is_file() or not cfg.data.tokenizer else cfg.data.tokenizer,
                                    context_length=cfg.data.max_len)
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
    return RunFiles(model, tokenizer, cfg, ckpt, step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run) the last wins."""
    p = Path(path)
    if not p.is_file():
        return []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        by_key[(rec.get("kind", "train"), int(rec.get("step", -1)))] = rec
    return sorted(by_key.values(), key=lambda r: (r.get("step", -1), r.get("kind", "train")))


def run_preprocess(image_size: int, normalize: Any = False) -> ImagePreprocess:
    """A run's eval transform as a :class:`mammut.ImagePreprocess`: resize the short side
    (bicubic), centre crop, ``[0, 1]``, transparency on white; ``normalize`` (``data.normalize``):
    False, True (OpenAI CLIP mean/std) or ``(mean, std)``. The same pixels as
    ``mammut.data.datasets.image_transform(image_size, train=False, normalize=normalize)``."""
    from .data.datasets import image_transform

    if isinstance(normalize, list):
        normalize = tuple(normalize)
    try:
        return image_transform(image_size, train=False, normalize=False if normalize is None else normalize)
    except TypeError as exc:
        raise ValueError(f"normalize: expected False, True or (mean, std), got {normalize!r}") from exc


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
    for name in ("embed_image", "embed_text"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model: expected a contrastive model with {name}(), got {type(model).__name__}")


@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image embeddings ``(n, l)`` (float32, CPU)."""
    _check_model(model)
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images: expected a tensor (n, c, h, w), got {getattr(images, 'shape', type(images).__name__)}")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = [model.embed_image(images[s:s + batch_size].to(dev)).float().cpu() for s in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                batch_size: int = 256, truncate: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings ``(n, l)`` of strings (tokenised with BOS/EOS as in training)."""
    _check_model(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        ids = tokenizer.encode(list(texts[s:s + batch_size]), max_len, truncate=truncate).to(dev)
        out.append(model.embed_text(ids).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _ids_from(out: Any) -> torch.Tensor:
    for attr in ("sequences", "tokens", "ids"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or out.ndim != 2:
        raise TypeError(f"model.generate: expected token ids (b, n), got {type(out).__name__}")
    return out


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer: Tokenizer, images: torch.Tensor, *,
                      max_new_tokens: int = 24, batch_size: int = 128) -> list[str]:
    """Greedy captions of ``images`` ``(n, c, h, w)``, decoded (BOS/EOS/padding dropped)."""
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model: expected a captioning model with generate(), got {type(model).__name__}")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    captions: list[str] = []
    for s in range(0, len(images), batch_size):
        out = model.generate(images=images[s:s + batch_size].to(dev), max_new_tokens=max_new_tokens, strategy="greedy")
        captions += tokenizer.decode(_ids_from(out).cpu())
    model.train(was_training)
    return captions
