"""Model registry: one file per architecture, each registering itself by name."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "get_model_class"]

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return wrap


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[nn.Module]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"model: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model from keyword arguments (its config fields)."""
    return get_model_class(name)(**kwargs)


def _load_all() -> None:
    # importing a model module registers it
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
