"""Base class of every mammut model: a config dataclass plus checkpoint methods.

The checkpoint code lives in ``mammut.models.pretrained`` and is imported only when used, so
``import mammut`` needs nothing beyond torch and einops. ``from_open_clip`` finds its converter
through ``mammut.models.open_clip_converter``, a lookup the package root registers
(``mammut.convert``, imported on first use): converters import models, models never import
converters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..generation.batch import logits_of_decode_hidden

__all__ = ["ModelBase"]


class ModelBase(nn.Module):
    """Subclasses set ``config_class`` and store their config as ``self.config``."""

    config_class: ClassVar[type]
    model_name: ClassVar[str]

    def _setup(self, config: Any, img_encoder: nn.Module | None, kwargs: dict[str, Any]) -> tuple[Any, int]:
        """The constructor steps every model shares: ``Model(Config(...))`` or ``Model(**fields)``
        (the seed READMEs' form, not both), the built-in ViT from ``config.vit`` or the encoder
        ``config.encoder`` declares (a :func:`~mammut.encoders.build_encoder` spec, e.g.
        ``{"type": "video_tube", "vit": {...}, "frames": 8}``) when no ``img_encoder`` is given,
        and the encoder's token width; returns ``(config, image_dim)``."""
        from ..encoders import ViT, ViTConfig, build_encoder

        name = type(self).__name__
        if config is not None and kwargs:
            raise TypeError(f"{name}: pass either a {self.config_class.__name__} or keyword arguments, not both")
        cfg = config if config is not None else self.config_class(**kwargs)
        self.config = cfg
        encoder = getattr(cfg, "encoder", None)
        if encoder is not None:
            if getattr(cfg, "vit", None) is not None:
                raise ValueError(f"{name}: encoder and vit both declare the image encoder; set only one of them "
                                 f"(a built-in ViT is encoder={{'type': 'vit', ...}})")
            if img_encoder is not None:
                raise ValueError(f"{name}: encoder (config) and img_encoder= both give the image encoder; pass only one of them")
            img_encoder = build_encoder(encoder)
        elif img_encoder is None and getattr(cfg, "vit", None) is not None:
            img_encoder = ViT(ViTConfig(**cfg.vit))
        self.img_encoder = img_encoder
        image_dim = getattr(cfg, "image_dim", None) or getattr(img_encoder, "dim", None) or cfg.dim
        return cfg, image_dim

    def image_tokens(self, images: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens ``(b, m, image_dim)`` from pixels (through ``self.img_encoder``) or
        given precomputed; checked against ``self.image_dim`` where the model sets it.

        Every image entry point (training losses, ``forward``, ``embed_image``,
        ``image_context`` hence generation) comes through here: NaN or inf pixels / tokens are
        a ``ValueError`` before the encoder runs (one check per call, never per decoding step).
        """
        from ..encoders import encode_images
        from . import _checks

        if (images is None) == (image_tokens is None):
            raise ValueError("images / image_tokens: expected exactly one of them")
        if image_tokens is not None:
            _checks.check_image_batch(image_tokens)
            tokens = image_tokens
        elif getattr(self, "img_encoder", None) is None:
            raise ValueError("images: this model has no img_encoder; pass image_tokens= or build it with img_encoder= / vit=")
        else:
            _checks.check_finite("images", images, "pixel values")
            tokens = encode_images(self.img_encoder, images)
        image_dim = getattr(self, "image_dim", None)
        if image_dim is not None and tokens.shape[-1] != image_dim:
            raise ValueError(f"image_tokens: expected width {image_dim} (image_dim), got {tuple(tokens.shape)}")
        return tokens

    @logits_of_decode_hidden
    def decode(self, text: torch.Tensor, context: Any = None, **kwargs: Any) -> torch.Tensor:
        """Decoder protocol (used by ``mammut.generation``): new tokens ``(b, n)`` and the
        model's image context -> logits ``(b, n, v)``, i.e. ``self.to_logits`` of the
        subclass's ``decode_hidden(text, context, keep=, positions=, cache=)``."""
        return self.to_logits(self.decode_hidden(text, context, **kwargs))

    def caption_loss_from_states(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token loss of the decoder's final normed states ``(b, n, d)`` through
        ``self.to_logits``: without ever forming the ``(b, n, vocab)`` logits when it is a plain
        bias-free linear (``linear_caption_loss``), through the logits otherwise (e.g. an M2PT
        pathway). ``labels`` ``(b, n)``: ids in ``[0, num_tokens)``; ``pad_id`` and ``-100``
        positions count for nothing."""
        from ..losses import check_labels

        check_labels(labels, self.config.num_tokens, shape=tuple(states.shape[:2]))
        return self._caption_loss_from_states(states, labels)

    def _caption_loss_from_states(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``caption_loss_from_states`` for labels already checked (``compute_losses`` checks
        them before any compute: no second host sync)."""
        from ..layers import Linear
        from ..losses import _caption_loss, _linear_caption_loss

        head, pad_id = self.to_logits, self.config.pad_id
        if type(head) in (nn.Linear, Linear) and head.bias is None:
            return _linear_caption_loss(states, head.weight, labels, pad_id)
        return _caption_loss(head(states), labels, pad_id)

    def caption_loss(self, text: torch.Tensor, images: Any = None, *, labels: torch.Tensor | None = None,
                     token_share: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token loss of the decoder reading ``images`` (the contract's captioning
        objective, shared by every decoder; tasks ``vqa`` and ``interleaved`` use it).

        Without ``labels`` the decoder reads ``text[:, :-1]`` and predicts ``text[:, 1:]``; with
        ``labels`` ``(b, n)`` position i predicts ``labels[:, i]`` (``-100`` / pad: no target, e.g.
        a VQA question). ``token_share`` weights the token mean (``mammut.tasks.token_shares``)."""
        from ._checks import check_labels, check_text

        cfg = self.config
        check_text(text, cfg.num_tokens, cfg.pad_id, min_len=1 if labels is not None else 2)
        if labels is not None:
            check_labels(labels, cfg.num_tokens, shape=tuple(text.shape))
        context = self.image_context(images) if images is not None else None
        if labels is None:
            inputs, labels = text[:, :-1], text[:, 1:]
        else:
            inputs = text
        loss = self._caption_loss_from_states(self.decode_hidden(inputs, context), self.caption_targets(labels))
        return loss if token_share is None else loss.float() * token_share.to(loss.device)

    def caption_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Targets the captioning loss may train (a model masks special tokens here)."""
        return labels

    @staticmethod
    def check_batch(text: torch.Tensor, tokens: torch.Tensor) -> None:
        if tokens.shape[0] != text.shape[0]:
            raise ValueError(f"text / images: batch sizes differ ({text.shape[0]} vs {tokens.shape[0]})")

    # ------------------------------------------------------------------ open_clip-style API
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's ``encode_image``: image embeddings ``(b, l)`` of pixels ``(b, c, h, w)``,
        L2-normalised only with ``normalize=True`` (``embed_image`` normalises by default).
        Floating pixels are cast to the model's dtype (a bf16 model takes float32 images)."""
        from .contract import ImageEmbedder

        if not isinstance(self, ImageEmbedder):
            raise TypeError(f"encode_image: {type(self).__name__} has no contrastive image embedding (embed_image)")
        return self.embed_image(self._as_model_dtype(images), normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's ``encode_text``: text embeddings ``(b, l)`` of right-padded token ids
        ``(b, n)`` (what the tokenizer of :func:`mammut.load` returns), L2-normalised only with
        ``normalize=True``."""
        from .contract import TextEmbedder

        if not isinstance(self, TextEmbedder):
            raise TypeError(f"encode_text: {type(self).__name__} has no contrastive text embedding (embed_text)")
        return self.embed_text(text, normalize=normalize)

    def _as_model_dtype(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(images) and images.is_floating_point():
            param = next(self.parameters(), None)
            if param is not None and param.is_floating_point() and images.dtype != param.dtype:
                return images.to(param.dtype)
        return images

    @property
    def image_size(self) -> int | None:
        """Side of the square images the image encoder expects (``None`` when it does not say)."""
        enc_cfg = getattr(getattr(self, "img_encoder", None), "config", None)
        size = getattr(enc_cfg, "image_size", None)
        if size is None:
            vit = getattr(self.config, "vit", None)
            size = vit.get("image_size") if isinstance(vit, dict) else None
        return size if isinstance(size, int) else None

    def set_image_size(self, image_size: int) -> None:
        """Run the image encoder at ``image_size`` (``ViT.set_image_size``: the positional grid is
        resampled once); ``config.vit["image_size"]`` follows, so ``save_pretrained`` /
        ``from_pretrained`` round-trip. The preprocessing must follow too:
        ``preprocess.with_image_size(image_size)``."""
        encoder = getattr(self, "img_encoder", None)
        if not callable(getattr(encoder, "set_image_size", None)):
            raise TypeError(f"set_image_size: the image encoder ({type(encoder).__name__}) has no set_image_size")
        encoder.set_image_size(image_size)
        vit = getattr(self.config, "vit", None)
        if isinstance(vit, dict):  # a new dict and config: the caller's config (or a registry preset) may be shared
            self.config = dataclasses.replace(self.config, vit={**vit, "image_size": image_size})
        spec = getattr(self.config, "encoder", None)
        if isinstance(spec, dict) and spec.get("type") in ("vit", "mammut.vit"):  # a ViT declared as encoder=
            if isinstance(spec.get("config"), dict):
                spec = {**spec, "config": {**spec["config"], "image_size": image_size}}
            else:
                spec = {**spec, "image_size": image_size}
            self.config = dataclasses.replace(self.config, encoder=spec)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``; ``preprocess=`` and
        ``tokenizer=`` are written beside them for :func:`mammut.load` (``mammut.save_pretrained``
        has the options)."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> "ModelBase":
        """Load a model written by ``save_pretrained`` (no network). The preprocessing and the
        tokenizer saved beside it (``save_pretrained(dir, preprocess=, tokenizer=)``) come back
        with it through ``model, preprocess, tokenizer = mammut.load(directory)``."""
        from .pretrained import load_pretrained

        return load_pretrained(directory, model_class=cls, **kwargs)

    @classmethod
    def from_open_clip(cls, name_or_config: Any, state_dict_or_path: Any, **kwargs: Any) -> "ModelBase":
        """This model holding open_clip weights, converted exactly (nothing is downloaded).

        ``name_or_config``: an open_clip model name (CoCa: ``"coca_ViT-B-32"``, ``"coca_ViT-L-14"``,
        read from the installed open_clip) or an open_clip config dict; ``state_dict_or_path``: a
        state dict, a checkpoint file or an open_clip model; ``kwargs``: the converter's options
        (e.g. ``dtype=``). The converter is the one ``mammut.convert.OPEN_CLIP_CONVERTERS``
        registers under this model's registry name (CoCa:
        ``mammut.convert.open_clip.coca_from_open_clip``), found through
        :func:`mammut.models.open_clip_converter`; it needs the ``interop`` extra."""
        from . import open_clip_converter

        return open_clip_converter(getattr(cls, "model_name", None))(name_or_config, state_dict_or_path, **kwargs)

    def generate(self, images: torch.Tensor | None = None, prompt: Any = None, **kwargs: Any) -> Any:
        """New token ids ``(b, n)`` for ``images`` (decoder models only); see
        ``mammut.generation.generate`` for the strategies and options."""
        from ..generation import generate

        return generate(self, images, prompt, **kwargs)

    def caption(self, images: torch.Tensor | None, tokenizer: Any, **kwargs: Any) -> list[str]:
        """Captions as strings, decoded by ``tokenizer`` (an object with ``decode(ids) -> list[str]``);
        options as ``generate``."""
        from ..generation import caption

        return caption(self, images, tokenizer, **kwargs)
