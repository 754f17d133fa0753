"""Third-party vision encoders as ``img_encoder=``: timm, Hugging Face, vit-pytorch.

Legend: ``b`` batch, ``c`` channels, ``H``/``W`` image size, ``n`` image tokens, ``d`` the
encoder's width (``adapter.dim``).

Every adapter maps images ``(b, c, H, W)`` to tokens ``(b, n, d)`` and exposes ``.dim`` (so a
model's ``image_dim`` can be left out) and ``check_images`` (clear errors before compute):

- :class:`TimmEncoder` wraps a timm model and returns ``forward_features`` (patch tokens, with
  the class/register tokens unless ``patch_tokens_only``; feature maps are flattened).
  A plain timm model's ``forward`` returns class logits, so it needs this adapter.
- :class:`HFVisionEncoder` wraps a Hugging Face vision tower (``CLIPVisionModel``,
  ``SiglipVisionModel``, ...) and returns ``last_hidden_state`` or a chosen hidden layer.
- :class:`VitPytorchEncoder` wraps a vit-pytorch ``Extractor`` (or a vit-pytorch ViT, which it
  puts inside one) and returns its embeddings.

:func:`wrap_encoder` picks the adapter for a module. An adapter built declaratively
(:meth:`TimmEncoder.create`, any :class:`HFVisionEncoder`, our ``ViT``) has an
:func:`encoder_spec`, a JSON-able description that :func:`build_encoder` turns back into the
same architecture (random init, no download). Checkpoints store it, so a model with such an
encoder reloads without being handed one. String specs: ``"timm:vit_tiny_patch16_224"``.
Encoder types are registered (:func:`register_encoder`): ``mammut.vit`` (alias ``vit``),
``video_tube`` (:class:`~mammut.encoders.video.VideoTubeViT` around our ViT), ``timm``,
``transformers`` (alias ``hf``); a model config's ``encoder`` field takes such a spec.

This module imports only torch; timm / transformers / vit-pytorch are imported when used
(``pip install mammut-vl[interop]``).
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .adapters import as_image_tokens
from .video import VideoTubeConfig, VideoTubeViT
from .vit import ViT, ViTConfig

__all__ = [
    "EncoderAdapter",
    "TimmEncoder",
    "HFVisionEncoder",
    "VitPytorchEncoder",
    "wrap_encoder",
    "encoder_spec",
    "build_encoder",
    "register_encoder",
    "registered_encoders",
]

log = logging.getLogger(__name__)

# timm.create_model arguments a spec may not carry: they download or read weights
_TIMM_FORBIDDEN = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path"})


def _require(package: str, what: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs the '{package}' package: pip install 'mammut-vl[interop]'") from err


def _check_image_tensor(images: Any) -> None:
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise TypeError(f"images: expected a float tensor (b, c, h, w), got {type(images).__name__} {getattr(images, 'dtype', '')}")
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (batch, channels, height, width), got {tuple(images.shape)}")


def _check_image_shape(images: torch.Tensor, channels: int | None, size: tuple[int, int] | None, who: str) -> None:
    _check_image_tensor(images)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images: {who} expects {channels} channels, got shape {tuple(images.shape)}")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"images: {who} expects height x width {size[0]} x {size[1]}, got shape {tuple(images.shape)}")


class EncoderAdapter(nn.Module):
    """Base of the adapters: holds the wrapped ``model``, its width ``dim`` and an optional
    spec. Subclasses implement ``forward`` (images ``(b, c, H, W)`` -> tokens ``(b, n, dim)``)."""

    def __init__(self, model: nn.Module, *, dim: int, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer (the encoder's token width), got {dim!r}")
        self.model = model
        self._dim = dim
        self._spec = spec

    @property
    def dim(self) -> int:
        """Width of the returned tokens."""
        return self._dim

    def encoder_spec(self) -> dict[str, Any] | None:
        """A JSON-able description :func:`build_encoder` rebuilds, or None if unknown."""
        return copy.deepcopy(self._spec)

    def check_images(self, images: torch.Tensor) -> None:
        _check_image_tensor(images)

    def _tokens(self, out: Any) -> torch.Tensor:
        tokens = as_image_tokens(out)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"img_encoder: {type(self).__name__} returned width {tokens.shape[-1]}, expected dim={self.dim}")
        return tokens

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ---------------------------------------------------------------------------------- timm
def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.") and hasattr(module, "forward_features")


class TimmEncoder(EncoderAdapter):
    """A timm model's ``forward_features`` as tokens ``(b, n, d)``.

    Transformers give ``(b, prefix + patches, d)``; with ``patch_tokens_only`` the
    ``num_prefix_tokens`` class/register tokens are dropped. CNN feature maps ``(b, d, h, w)``
    (or ``(b, h, w, d)`` for NHWC models) become ``h * w`` tokens.
    Build with :meth:`create` to get a spec (checkpoints then rebuild it by themselves).
    """

    def __init__(self, model: nn.Module, *, patch_tokens_only: bool = False, spec: dict[str, Any] | None = None) -> None:
        if not hasattr(model, "forward_features"):
            raise TypeError(f"model: expected a timm model with forward_features, got {type(model).__name__}")
        dim = getattr(model, "num_features", None) or getattr(model, "embed_dim", None)
        super().__init__(model, dim=int(dim) if dim else 0, spec=spec)
        self.patch_tokens_only = patch_tokens_only

    @classmethod
    def create(cls, name: str, *, patch_tokens_only: bool = False, **kwargs: Any) -> "TimmEncoder":
        """``timm.create_model(name, pretrained=False, **kwargs)`` wrapped, with a spec.
        ``kwargs`` must be JSON-able (they are stored in checkpoints)."""
        bad = sorted(_TIMM_FORBIDDEN & kwargs.keys())
        if bad:
            raise ValueError(f"kwargs: {bad} are not allowed (random init only; load weights separately)")
        timm = _require("timm", "TimmEncoder")
        model = timm.create_model(name, pretrained=False, **kwargs)
        spec = {"type": "timm", "name": name, "kwargs": dict(kwargs), "patch_tokens_only": patch_tokens_only}
        return cls(model, patch_tokens_only=patch_tokens_only, spec=spec)

    def check_images(self, images: torch.Tensor) -> None:
        patch = getattr(self.model, "patch_embed", None)
        proj = getattr(patch, "proj", None)
        channels = getattr(proj, "in_channels", None)
        size = getattr(patch, "img_size", None) if getattr(patch, "strict_img_size", False) else None
        _check_image_shape(images, channels, tuple(size) if size is not None else None, f"timm {type(self.model).__name__}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(b, c, H, W)`` -> tokens ``(b, n, d)``."""
        self.check_images(images)
        x = self.model.forward_features(images)
        if isinstance(x, (tuple, list)):
            x = x[-1]
        if torch.is_tensor(x) and x.ndim == 4:
            fmt = getattr(self.model, "output_fmt", "NCHW")
            if str(getattr(fmt, "value", fmt)).upper() == "NHWC":
                x = x.flatten(1, 2)
            else:
                x = x.flatten(2).transpose(1, 2)
        elif torch.is_tensor(x) and x.ndim == 3 and self.patch_tokens_only:
            x = x[:, int(getattr(self.model, "num_prefix_tokens", 0)):]
        return self._tokens(x)


# -------------------------------------------------------------------------- Hugging Face
def _is_hf_vision(module: nn.Module) -> bool:
    is_pretrained = any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__)
    return is_pretrained and getattr(module, "main_input_name", None) == "pixel_values"


class HFVisionEncoder(EncoderAdapter):
    """A Hugging Face vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ...) as tokens.

    Returns ``last_hidden_state`` ``(b, n, d)`` or, with ``hidden_layer`` (e.g. ``-2``),
    that entry of ``hidden_states``. ``patch_tokens_only`` drops a CLIP-style class token.
    Always has a spec (the model's class name and config), so checkpoints rebuild it.
    """

    def __init__(self, model: nn.Module, *, hidden_layer: int | None = None, patch_tokens_only: bool = False) -> None:
        if not _is_hf_vision(model):
            raise TypeError(f"model: expected a Hugging Face vision model (main_input_name 'pixel_values'), got {type(model).__name__}")
        config = model.config
        dim = getattr(config, "hidden_size", None)
        if dim is None:
            raise TypeError(f"model: {type(model).__name__}.config has no hidden_size")
        spec = {
            "type": "transformers",
            "class": type(model).__name__,
            "config": config.to_dict(),
            "hidden_layer": hidden_layer,
            "patch_tokens_only": patch_tokens_only,
        }
        super().__init__(model, dim=int(dim), spec=spec)
        self.hidden_layer = hidden_layer
        self.patch_tokens_only = patch_tokens_only
        embeddings = getattr(getattr(model, "vision_model", model), "embeddings", None)
        self.num_prefix_tokens = 1 if hasattr(embeddings, "class_embedding") else 0

    def encoder_spec(self) -> dict[str, Any] | None:
        spec = super().encoder_spec()
        spec["config"] = self.model.config.to_dict()  # current config, in case it was edited
        return spec

    def check_images(self, images: torch.Tensor) -> None:
        config = self.model.config
        size = getattr(config, "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        _check_image_shape(images, getattr(config, "num_channels", None), size, type(self.model).__name__)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(b, c, H, W)`` -> tokens ``(b, n, d)``."""
        self.check_images(images)
        if self.hidden_layer is None:
            x = self.model(pixel_values=images).last_hidden_state
        else:
            x = self.model(pixel_values=images, output_hidden_states=True).hidden_states[self.hidden_layer]
        if self.patch_tokens_only:
            x = x[:, self.num_prefix_tokens:]
        return self._tokens(x)


# --------------------------------------------------------------------------- vit-pytorch
def _is_vit_pytorch(module: nn.Module) -> bool:
    return type(module).__module__.startswith("vit_pytorch.")


def _vit_pytorch_dim(vit: nn.Module) -> int | None:
    """The token width of a vit-pytorch ViT: its head's input or its final norm's width."""
    for name in ("linear_head", "mlp_head"):
        head = getattr(vit, name, None)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if linears:
            return int(linears[0].in_features)
    norm = getattr(getattr(vit, "transformer", None), "norm", None)
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    return None


class VitPytorchEncoder(EncoderAdapter):
    """A vit-pytorch ``Extractor`` (its embeddings ``(b, n, d)``) with ``.dim``.

    Given a bare vit-pytorch ViT it builds ``Extractor(vit, return_embeddings_only=True,
    detach=False)``. ``dim`` is read from the ViT's head when not given. No spec: a checkpoint
    of a model with this encoder needs ``img_encoder=`` at load time.
    """

    def __init__(self, module: nn.Module, *, dim: int | None = None) -> None:
        if type(module).__name__ == "Extractor":
            extractor = module
        elif _is_vit_pytorch(module) and hasattr(module, "transformer"):
            extractor_mod = _require("vit_pytorch.extractor", "VitPytorchEncoder")
            extractor = extractor_mod.Extractor(module, return_embeddings_only=True, detach=False)
        else:
            raise TypeError(f"module: expected a vit-pytorch Extractor or ViT, got {type(module).__name__}")
        dim = dim if dim is not None else _vit_pytorch_dim(extractor.vit)
        if dim is None:
            raise ValueError(f"dim: could not read the token width of {type(extractor.vit).__name__}; pass dim=")
        super().__init__(extractor, dim=dim)
        if getattr(extractor, "detach_fn", None) is not None and extractor.detach_fn.__name__ != "identity":
            log.warning("Extractor(detach=True): the image encoder receives no gradient (use detach=False to train it)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(b, c, H, W)`` -> tokens ``(b, n, d)``."""
        self.check_images(images)
        return self._tokens(self.model(images, return_embeddings_only=True))


# ----------------------------------------------------------------------- specs, wrapping
def wrap_encoder(module: nn.Module, **kwargs: Any) -> nn.Module:
    """The adapter for ``module``: timm -> :class:`TimmEncoder`, Hugging Face vision model ->
    :class:`HFVisionEncoder`, vit-pytorch Extractor/ViT -> :class:`VitPytorchEncoder`.
    Adapters, our ``ViT`` and other modules are returned unchanged. ``kwargs`` go to the adapter.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, (EncoderAdapter, ViT)):
        return module
    if _is_timm(module):
        return TimmEncoder(module, **kwargs)
    if _is_hf_vision(module):
        return HFVisionEncoder(module, **kwargs)
    if type(module).__name__ == "Extractor" or (_is_vit_pytorch(module) and hasattr(module, "transformer")):
        return VitPytorchEncoder(module, **kwargs)
    if kwargs:
        raise TypeError(f"wrap_encoder: no adapter for {type(module).__name__}, so no keyword arguments apply (got {sorted(kwargs)})")
    return module


# ------------------------------------------------------------------------ encoder registry
@dataclass(frozen=True)
class _EncoderType:
    name: str
    build: Callable[[dict[str, Any]], nn.Module]
    spec: Callable[[nn.Module], dict[str, Any] | None] | None


_ENCODERS: dict[str, _EncoderType] = {}
_ALIASES: dict[str, str] = {}


def register_encoder(
    type_name: str,
    build_fn: Callable[[dict[str, Any]], nn.Module],
    spec_fn: Callable[[nn.Module], dict[str, Any] | None] | None = None,
    *,
    aliases: tuple[str, ...] = (),
) -> None:
    """Declare an encoder type for :func:`build_encoder` / :func:`encoder_spec` and the models'
    ``encoder=`` config field. ``build_fn(spec)`` builds a module (random init) from a spec dict
    ``{"type": type_name, ...}``; ``spec_fn(module)`` returns such a dict for a module of this
    type, or None for any other module. ``aliases``: other names accepted in ``spec["type"]``."""
    names = (type_name, *aliases)
    for name in names:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"type_name / aliases: expected non-empty names without ':', got {name!r}")
        if name in _ENCODERS or name in _ALIASES:
            raise ValueError(f"type_name: encoder type {name!r} is already registered")
    if not callable(build_fn) or (spec_fn is not None and not callable(spec_fn)):
        raise TypeError("build_fn / spec_fn: expected callables")
    _ENCODERS[type_name] = _EncoderType(type_name, build_fn, spec_fn)
    for alias in aliases:
        _ALIASES[alias] = type_name


def registered_encoders() -> list[str]:
    """Every name :func:`build_encoder` accepts in ``spec["type"]`` (types and aliases)."""
    return sorted({*_ENCODERS, *_ALIASES})


def encoder_spec(module: nn.Module) -> dict[str, Any] | None:
    """A JSON-able spec that :func:`build_encoder` turns back into ``module``'s architecture,
    or None when unknown (e.g. a vit-pytorch model or an arbitrary module)."""
    for entry in _ENCODERS.values():
        spec = entry.spec(module) if entry.spec is not None else None
        if spec is not None:
            return spec
    if isinstance(module, EncoderAdapter):
        return module.encoder_spec()
    return None


def build_encoder(spec: str | dict[str, Any], **kwargs: Any) -> nn.Module:
    """Build an encoder (random init, never a download) from a spec.

    ``spec``: ``"timm:NAME"`` (``kwargs`` go to ``timm.create_model``), ``"vit"`` (``kwargs``
    are ``ViTConfig`` fields), or a dict ``{"type": ..., ...}`` of a registered type
    (:func:`registered_encoders`; :func:`encoder_spec` gives one):
    ``{"type": "vit", "config": {ViTConfig fields}}`` (or the fields beside ``type``),
    ``{"type": "video_tube", "vit": {ViTConfig fields}, VideoTubeConfig fields...}``,
    ``{"type": "timm", "name": ..., "kwargs": {...}}``,
    ``{"type": "transformers" | "hf", "class": ..., "config": {...}}``.
    """
    if isinstance(spec, str):
        kind, _, name = spec.partition(":")
        if kind == "timm" and name:
            return TimmEncoder.create(name, **kwargs)
        if kind in ("vit", "mammut.vit") and not name:
            return ViT(ViTConfig(**kwargs))
        raise ValueError(f"spec: expected 'timm:<model name>' or 'vit', got {spec!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise TypeError(f"spec: expected a string or a dict with a 'type' key, got {spec!r}")
    if kwargs:
        raise TypeError(f"build_encoder: keyword arguments apply only to string specs, got {sorted(kwargs)}")
    kind = _ALIASES.get(spec["type"], spec["type"])
    entry = _ENCODERS.get(kind)
    if entry is None:
        raise ValueError(f"spec['type']: unknown encoder type {spec['type']!r}; registered types: {registered_encoders()}")
    return entry.build(spec)


def _vit_config(fields: Any, key: str) -> ViTConfig:
    if not isinstance(fields, dict):
        raise TypeError(f"{key}: expected a dict of ViTConfig fields, got {fields!r}")
    cfg = dict(fields)
    for name in ("cpe_scale", "cpe_ratio"):
        if isinstance(cfg.get(name), list):
            cfg[name] = tuple(cfg[name])
    return ViTConfig(**cfg)


def _build_vit(spec: dict[str, Any]) -> nn.Module:
    rest = {k: v for k, v in spec.items() if k != "type"}
    if "config" in rest:
        if len(rest) > 1:
            raise TypeError(f"spec: a 'vit' spec takes either 'config' or ViTConfig fields, got {sorted(rest)}")
        return ViT(_vit_config(rest["config"], "spec['config']"))
    return ViT(_vit_config(rest, "spec"))


def _vit_spec(module: nn.Module) -> dict[str, Any] | None:
    return {"type": "mammut.vit", "config": asdict(module.config)} if isinstance(module, ViT) else None


def _build_video_tube(spec: dict[str, Any]) -> nn.Module:
    rest = {k: v for k, v in spec.items() if k not in ("type", "vit")}
    if "vit" not in spec:
        raise KeyError("spec['vit']: a 'video_tube' spec needs its ViT's ViTConfig fields under 'vit'")
    vit = ViT(_vit_config(spec["vit"], "spec['vit']"))
    return VideoTubeViT(vit, VideoTubeConfig(**rest))


def _video_tube_spec(module: nn.Module) -> dict[str, Any] | None:
    if not isinstance(module, VideoTubeViT):
        return None
    return {"type": "video_tube", "vit": asdict(module.vit.config), **asdict(module.config)}


def _build_timm(spec: dict[str, Any]) -> nn.Module:
    return TimmEncoder.create(spec["name"], patch_tokens_only=bool(spec.get("patch_tokens_only", False)), **dict(spec.get("kwargs") or {}))


def _build_transformers(spec: dict[str, Any]) -> nn.Module:
    transformers = _require("transformers", "HFVisionEncoder")
    cls_name = spec.get("class")
    model_cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise ValueError(f"spec['class']: expected a transformers model class name, got {cls_name!r}")
    config = model_cls.config_class.from_dict(dict(spec["config"]))
    return HFVisionEncoder(model_cls(config), hidden_layer=spec.get("hidden_layer"), patch_tokens_only=bool(spec.get("patch_tokens_only", False)))


def _adapter_spec(cls: type[EncoderAdapter]) -> Callable[[nn.Module], dict[str, Any] | None]:
    return lambda module: module.encoder_spec() if isinstance(module, cls) else None


register_encoder("mammut.vit", _build_vit, _vit_spec, aliases=("vit",))
register_encoder("video_tube", _build_video_tube, _video_tube_spec)
register_encoder("timm", _build_timm, _adapter_spec(TimmEncoder))
register_encoder("transformers", _build_transformers, _adapter_spec(HFVisionEncoder), aliases=("hf",))
