"""Where a run's starting weights come from: ``train.init_from`` (a whole model, through the
task's ``init_model_section`` / ``adapt_init_state``) and ``train.image_encoder_from`` (only
the built-in ViT), each a run folder or an exported model folder (:func:`init_source`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models import get_model_spec
from .config import ConfigError, RunConfig

log = logging.getLogger("mammut.train.loop")  # the messages' logger as before the split (tests and users filter on it)

__all__ = ["InitSource", "init_source"]


def _image_encoder_model_section(cfg: RunConfig, source: dict[str, Any]) -> dict[str, Any]:
    """This run's ``model:`` section with the ``train.image_encoder_from`` source's ``vit``
    section (so its tensors fit); the keys that differed are logged. A video run
    (``model.encoder: {type: video_tube, ...}``) takes it as its encoder's ``vit``: the image
    model fine-tuned for video, as in the paper."""
    from ..encoders import ViTConfig

    key, name = "train.image_encoder_from", cfg.model["name"]
    config_class = get_model_spec(name).config_class
    if not (dataclasses.is_dataclass(config_class) and "vit" in {f.name for f in dataclasses.fields(config_class)}):
        raise ConfigError(f"{key}: expected a model with a built-in ViT (model.vit), got model.name={name!r}")
    encoder = cfg.model.get("encoder")
    video = isinstance(encoder, dict) and encoder.get("type") == "video_tube"
    if encoder is not None and not video:
        raise ConfigError(f"{key}: expected model.vit or a model.encoder of type 'video_tube' (its ViT is taken from the "
                          f"source), got model.encoder={encoder!r}")
    vit = source.get("vit")
    if not isinstance(vit, dict):
        raise ConfigError(f"{key}: expected a source whose model has a built-in ViT (a model.vit section), got "
                          f"{cfg.train.image_encoder_from} (model {source.get('name')!r}, model.vit={vit!r})")
    default_size = next(f.default for f in dataclasses.fields(ViTConfig) if f.name == "image_size")
    size = vit.get("image_size", default_size)
    if size != cfg.data.image_size:
        raise ConfigError(f"data.image_size: train.image_encoder_from's ViT takes {size}px images (its "
                          f"model.vit.image_size), got data.image_size={cfg.data.image_size}; set --data.image_size {size}")
    where = "model.encoder.vit" if video else "model.vit"
    own = {"image_size": cfg.data.image_size, **((encoder.get("vit") if video else cfg.model.get("vit")) or {})}
    taken = sorted(k for k in set(vit) | set(own) if vit.get(k) != own.get(k))
    if taken:
        log.info("%s: %s.%s taken from the source", key, where, f", {where}.".join(taken))
    if video:
        return dict(cfg.model, encoder={**encoder, "vit": dict(vit)})
    return dict(cfg.model, vit=dict(vit))


@dataclasses.dataclass
class InitSource:
    """What ``train.init_from`` points at: a run folder (its newest valid checkpoint) or a
    ``save_pretrained`` folder."""

    model_cfg: dict[str, Any]
    tokenizer: Path
    weights: Path

    def load_into(self, model: torch.nn.Module, adapt: Callable[..., Any] | None = None) -> None:
        """The source's weights into ``model``, through ``adapt`` (``Task.adapt_init_state``:
        ``(state, model) -> (state, new-parameter prefixes)``) when given. Every tensor of the
        source must have its place and shape; a parameter may be missing only under a prefix
        ``adapt`` names (kept at its initialisation, logged)."""
        from .checkpointing import load_weights

        state = load_weights(self.weights)
        fresh: tuple[str, ...] = ()
        if adapt is not None:
            state, fresh = adapt(state, model)
        target = model.state_dict()
        unexpected = sorted(set(state) - set(target))
        missing = sorted(k for k in set(target) - set(state) if not k.startswith(tuple(fresh)))
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}" for k in sorted(set(state) & set(target))
                  if state[k].shape != target[k].shape]
        if unexpected or missing or shapes:
            raise ConfigError(f"train.init_from: weights do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shapes {shapes[:5]})")
        model.load_state_dict(state, strict=False)
        new = sorted(set(target) - set(state))
        if new:
            log.info("train.init_from: %d tensors new in this model, kept at their initialisation (%s%s)", len(new),
                     ", ".join(new[:5]), ", ..." if len(new) > 5 else "")
        log.info("initialised from %s", self.weights)

    def load_image_encoder_into(self, model: torch.nn.Module, key: str = "train.image_encoder_from") -> None:
        """Only the built-in ViT: the source's ``img_encoder.*`` tensors into ``model.img_encoder``
        (into ``model.img_encoder.vit`` when it is a :class:`~mammut.encoders.VideoTubeViT`, whose
        tubes keep their initialisation); every tensor must be there with its shape."""
        from ..encoders import VideoTubeViT
        from .checkpointing import load_weights

        prefix = "img_encoder."
        state = {k[len(prefix):]: v for k, v in load_weights(self.weights).items() if k.startswith(prefix)}
        encoder = model.img_encoder.vit if isinstance(model.img_encoder, VideoTubeViT) else model.img_encoder
        target = encoder.state_dict()
        missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}" for k in sorted(set(state) & set(target))
                  if state[k].shape != target[k].shape]
        if missing or unexpected or shapes:
            raise ConfigError(f"{key}: the image encoder of {self.weights} does not fit this model's model.vit "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]})")
        encoder.load_state_dict(state)
        log.info("%s: loaded %d image-encoder tensors from %s", key, len(state), self.weights)


def init_source(path: str, key: str = "train.init_from") -> InitSource:
    """The model config, tokenizer and weights file of ``path`` (a run folder or an exported
    model folder); errors name ``key``."""
    from .checkpointing import latest_valid_checkpoint

    root = Path(path)
    if (root / "config.yaml").is_file():  # a run folder
        saved = yaml.safe_load((root / "config.yaml").read_text()) or {}
        ckpt = latest_valid_checkpoint(root)
        if ckpt is None:
            raise FileNotFoundError(f"{key}: no valid checkpoint under {root / 'checkpoints'}")
        return InitSource(dict(saved.get("model", {})), root / "tokenizer.json", ckpt / "model.safetensors")
    if (root / "config.json").is_file() and (root / "tokenizer.json").is_file():  # save_pretrained + tokenizer
        import json

        meta = json.loads((root / "config.json").read_text())
        model_cfg = {"name": meta.get("model_name"), **meta.get("config", {})}
        return InitSource(model_cfg, root / "tokenizer.json", root / "model.safetensors")
    raise FileNotFoundError(f"{key}: expected a run folder (config.yaml) or an exported model folder "
                            f"(config.json + tokenizer.json), got {root}")