"""Converters for other projects' weights into mammut models (our own format: ``mammut.io.checkpoint``, ``mammut.models.pretrained``).

- :mod:`mammut.convert.open_clip`: open_clip CoCa (``coca_ViT-B-32``, ``coca_ViT-L-14`` or a
  config dict) -> :class:`~mammut.models.coca.CoCa`, exact to 1e-4;
- :mod:`mammut.convert.open_mammut`: openMaMMUT (LAION's open_clip fork, ``mammut_ViT-*`` or a
  config dict in the fork's schema) -> :class:`~mammut.models.mammut.MaMMUT`;
- :mod:`mammut.convert.clip_tokenizer`: open_clip's CLIP BPE tokenizer behind our tokenizer
  interface (the ids those checkpoints use); it lives in the library as
  :mod:`mammut.clip_tokenizer` (checkpoints save and load it) and is re-exported here.

Dependency direction: ``convert -> models``, never the reverse. ``Model.from_open_clip(name_or_config,
state_dict_or_path)`` (defined once, on :class:`~mammut.models._base.ModelBase`) finds its
converter through ``mammut.models.open_clip_converter``, a lookup that the package root
(``mammut/__init__.py``) registers: :func:`open_clip_converter` below, this package imported on
first use. No module of ``mammut.models`` imports this package, so the two never import each
other (a contract in ``pyproject.toml`` checks it), and ``import mammut`` does not load it. A converter for another model is a function
``(name_or_config, state_dict_or_path, **options) -> model`` added to ``OPEN_CLIP_CONVERTERS``
under the model's registry name.

Importing this package needs only torch; running a converter needs the ``interop`` extra
(open-clip-torch for its model configs and tokenizer, safetensors for ``.safetensors`` files).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .clip_tokenizer import CLIPTokenizer
from .open_clip import (
    OPEN_CLIP_COCA_MODELS,
    coca_config_from_open_clip,
    coca_from_open_clip,
    convert_open_clip_coca_state_dict,
    open_clip_model_config,
)
from .open_mammut import (
    OPEN_MAMMUT_CONFIGS,
    OPEN_MAMMUT_MODELS,
    convert_open_mammut_state_dict,
    mammut_config_from_open_clip,
    mammut_from_open_clip,
)

__all__ = [
    "OPEN_CLIP_CONVERTERS",
    "open_clip_converter",
    "CLIPTokenizer",
    "OPEN_CLIP_COCA_MODELS",
    "open_clip_model_config",
    "coca_config_from_open_clip",
    "convert_open_clip_coca_state_dict",
    "coca_from_open_clip",
    "OPEN_MAMMUT_MODELS",
    "OPEN_MAMMUT_CONFIGS",
    "mammut_config_from_open_clip",
    "convert_open_mammut_state_dict",
    "mammut_from_open_clip",
]

# model registry name -> converter of open_clip weights into that model
OPEN_CLIP_CONVERTERS: dict[str, Callable[..., nn.Module]] = {
    "coca": coca_from_open_clip,
    "mammut": mammut_from_open_clip,
}


def open_clip_converter(model_name: Any) -> Callable[..., nn.Module]:
    """The open_clip converter registered for a model's registry name (``"coca"``)."""
    try:
        return OPEN_CLIP_CONVERTERS[model_name]
    except (KeyError, TypeError):
        raise ValueError(
            f"model: expected a model with an open_clip converter ({', '.join(sorted(OPEN_CLIP_CONVERTERS))}), "
            f"got {model_name!r}"
        ) from None
