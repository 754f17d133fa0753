"""Build a model from a run config, and load a finished (or running) run back from its folder.

A run folder holds ``config.yaml`` (the resolved config: the model section filled in from
the tokenizer), ``tokenizer.json`` and ``checkpoints/step_*/model.safetensors``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..data.tokenizer import Tokenizer
from ..models import get_model_class
from .checkpointing import latest_valid_checkpoint, load_weights, verify_checkpoint
from .config import ConfigError, RunConfig, config_from_dict

__all__ = ["resolve_model_config", "build_model", "load_run", "RunFiles", "MEDIA_TOKEN"]

MEDIA_TOKEN = "<image>"  # where an image sits in an interleaved text (FlamingoPaLM's media_token_id)


def resolve_model_config(cfg: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``model:`` section with vocabulary size and special ids taken from the tokenizer
    (where left out or null) and the built-in ViT's image size from ``data.image_size``."""
    model = dict(cfg.model)
    cls = get_model_class(model["name"])
    fields = {f.name for f in dataclasses.fields(cls.config_class)} if dataclasses.is_dataclass(getattr(cls, "config_class", None)) else set()
    fill = {"num_tokens": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "media_token_id": tokenizer.token_to_id(MEDIA_TOKEN)}
    for key, value in fill.items():
        if key in fields and model.get(key) is None and value is not None:
            model[key] = value
    if model.get("num_tokens") is not None and model["num_tokens"] < tokenizer.vocab_size:
        raise ConfigError(f"model.num_tokens: expected >= the tokenizer's {tokenizer.vocab_size} ids, got {model['num_tokens']}")
    vit = model.get("vit")
    if isinstance(vit, dict):
        vit = dict(vit)
        vit.setdefault("image_size", cfg.data.image_size)
        if vit["image_size"] != cfg.data.image_size:
            raise ConfigError(f"model.vit.image_size: expected data.image_size={cfg.data.image_size}, got {vit['image_size']}")
        model["vit"] = vit
    return model


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """Instantiate a registered model from its (resolved) config section."""
    cls = get_model_class(model_cfg["name"])
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    config_class = getattr(cls, "config_class", None)
    try:
        if config_class is not None:
            return cls(config_class(**kwargs))
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc


@dataclasses.dataclass
class RunFiles:
    model: nn.Module
    tokenizer: Tokenizer
    config: RunConfig
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> RunFiles:
    """Model (eval mode, on CPU), tokenizer and config of a run folder, from its latest
    checkpoint or the given one."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"run_dir: expected a run folder with config.yaml, got {run}")
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    # the run's own copy of its tokenizer (written at the start of training), so a run folder
    # works from any directory and after a move; older runs fall back to data.tokenizer
    own = run / "tokenizer.json"
    tokenizer = Tokenizer.from_file(own if own.is_file() or not cfg.data.tokenizer else cfg.data.tokenizer)
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
