"""Model registry: one file per architecture, each registering itself with a :class:`ModelSpec`
(class, tiny config, block types, tasks, input kinds), imported by :func:`_load_all`. See
``mammut.models.contract`` for the contract.

Besides the architectures: :mod:`mammut.models.pretrained` (``save_pretrained`` /
``load_pretrained``) and :mod:`mammut.models.companions` (preprocessing and tokenizer files),
and the lookup ``Model.from_open_clip`` finds its converter through
(:func:`set_open_clip_lookup`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from .contract import ModelSpec

__all__ = ["register_model", "create_model", "list_models", "get_model_class", "get_model_spec", "ModelSpec",
           "set_open_clip_lookup", "open_clip_converter"]

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    tiny: Mapping[str, Any] | None = None,
    block_types: tuple[type[nn.Module], ...] = (),
    tasks: tuple[str, ...] = (),
    inputs: tuple[str, ...] = ("image",),
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls`` under ``name`` with its spec (see :class:`ModelSpec`;
    ``inputs``: the kinds of ``images`` it takes, keys of ``mammut.models.contract.INPUT_KINDS``)."""
    spec_inputs = tuple(inputs)

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, cls, dict(tiny or {}), tuple(block_types), tuple(tasks), spec_inputs)
        cls.model_name = name
        return cls

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Registered names (those that train on ``task`` when given)."""
    _load_all()
    return sorted(n for n, s in _REGISTRY.items() if task is None or task in s.tasks)


def get_model_spec(name: str) -> ModelSpec:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"model: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def get_model_class(name: str) -> type[nn.Module]:
    return get_model_spec(name).cls


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model from keyword arguments (its config fields)."""
    return get_model_class(name)(**kwargs)


def _load_all() -> None:
    # importing a model module registers it; listed by name (not discovered) so that every
    # import is visible to tools: tests/test_layering.py checks the list is complete
    from . import coca, detector, flamingo, mammut  # noqa: F401


# ---------------------------------------------------------------------------- open_clip converters
OpenClipLookup = Callable[[Any], Callable[..., nn.Module]]
_open_clip_lookup: OpenClipLookup | None = None


def set_open_clip_lookup(lookup: OpenClipLookup) -> None:
    """Where ``Model.from_open_clip`` finds its converter: ``lookup(model_name) -> converter``.
    The converters (``mammut.convert``) import the models, so the models never import them; the
    package root (``mammut/__init__.py``) registers ``mammut.convert.open_clip_converter`` here,
    imported on first use."""
    global _open_clip_lookup
    if not callable(lookup):
        raise TypeError(f"lookup: expected a callable model_name -> converter, got {type(lookup).__name__}")
    _open_clip_lookup = lookup


def open_clip_converter(model_name: Any) -> Callable[..., nn.Module]:
    """The open_clip converter of a model's registry name, through the registered lookup."""
    if _open_clip_lookup is None:
        raise LookupError("no open_clip converters are registered (mammut/__init__.py registers mammut.convert's)")
    return _open_clip_lookup(model_name)
