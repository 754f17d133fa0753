"""Build a model from a run config (loading a run folder back: ``mammut.inference.load_run``;
without the training stack: :mod:`mammut.runs`).

A run folder holds ``config.yaml`` (the resolved config: the model section filled in from
the tokenizer), ``tokenizer.json`` and ``checkpoints/step_*/model.safetensors``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..constants import MEDIA_TOKEN  # where an image sits in an interleaved text (FlamingoPaLM's media_token_id)
from ..models import get_model_spec
from ..tokenizer import Tokenizer
from .config import ConfigError, RunConfig

__all__ = ["resolve_model_config", "build_model", "MEDIA_TOKEN"]


def resolve_model_config(cfg: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``model:`` section with vocabulary size and special ids taken from the tokenizer
    (where left out or null) and the built-in ViT's image size from ``data.image_size``."""
    model = dict(cfg.model)
    config_class = get_model_spec(model["name"]).config_class
    fields = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    fill = {"num_tokens": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "media_token_id": tokenizer.token_to_id(MEDIA_TOKEN)}
    for key, value in fill.items():
        if key in fields and model.get(key) is None and value is not None:
            model[key] = value
    if model.get("num_tokens") is not None and model["num_tokens"] < tokenizer.vocab_size:
        raise ConfigError(f"model.num_tokens: expected >= the tokenizer's {tokenizer.vocab_size} ids, got {model['num_tokens']}")
    model["vit"] = _vit_image_size(model.get("vit"), cfg.data.image_size, "model.vit")
    encoder = model.get("encoder")
    if isinstance(encoder, dict) and isinstance(encoder.get("vit"), dict):  # e.g. {type: video_tube, vit: {...}}
        model["encoder"] = {**encoder, "vit": _vit_image_size(encoder["vit"], cfg.data.image_size, "model.encoder.vit")}
    if model["vit"] is None and "vit" not in cfg.model:
        del model["vit"]
    return model


def _vit_image_size(vit: Any, image_size: int, key: str) -> Any:
    """A ViT section with ``image_size`` from ``data.image_size`` (left out), or an error naming
    ``key`` when it differs."""
    if not isinstance(vit, dict):
        return vit
    vit = dict(vit)
    vit.setdefault("image_size", image_size)
    if vit["image_size"] != image_size:
        raise ConfigError(f"{key}.image_size: expected data.image_size={image_size}, got {vit['image_size']}")
    return vit


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """Instantiate a registered model from its (resolved) config section."""
    spec = get_model_spec(model_cfg["name"])
    cls, config_class = spec.cls, spec.config_class
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    try:
        if config_class is not None:
            return cls(config_class(**kwargs))
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc
