"""Model registry: one file per architecture, each registering itself with a :class:`ModelSpec`
(class, tiny config, block types, tasks). See ``mammut.models.contract`` for the contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from .contract import ModelSpec

__all__ = ["register_model", "create_model", "list_models", "get_model_class", "get_model_spec", "ModelSpec"]

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    tiny: Mapping[str, Any] | None = None,
    block_types: tuple[type[nn.Module], ...] = (),
    tasks: tuple[str, ...] = (),
    media: bool = False,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls`` under ``name`` with its spec (see :class:`ModelSpec`)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, cls, dict(tiny or {}), tuple(block_types), tuple(tasks), media)
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
    # importing a model module registers it
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "contract":
            importlib.import_module(f"{__name__}.{info.name}")
