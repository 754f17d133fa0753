"""Checkpoints of every registered model: ``save_pretrained`` / ``load_pretrained``
(``config.json`` + ``model.safetensors``; the format itself is :mod:`mammut.io.checkpoint`).

- ``save_pretrained(model, dir, preprocess=, tokenizer=)`` writes ``model.safetensors``, the
  companions (``preprocess.json``, ``mammut_tokenizer.json`` + ``tokenizer.json`` for a BPE;
  :mod:`mammut.models.companions`) and ``config.json`` last. Every file is written by
  :func:`mammut.io.atomic.atomic_write` (temporary name, fsync, rename, folder fsync), weights
  first, so a crash never leaves a half-written file under the final name, and ``config.json``
  (which records the weights' sha256) is the commit marker. :func:`mammut.load` reads them all.
- ``load_pretrained`` verifies the sha256, reads ``config.json`` back into the config dataclass
  (:mod:`mammut.io.coerce`, strict JSON types), builds the model from the config on the meta
  device (no memory) and checks the file's tensor names and shapes, read from its header,
  against it (every missing, unexpected or shape-mismatched tensor is named), so a
  ``config.json`` declaring another model than the weights hold (a huge one, say) fails before
  any memory is allocated; only then is the model built for real and the tensors copied in.
  Nothing is returned unless everything loaded. Nothing touches the network.

External modules: a submodule the config cannot rebuild (e.g. ``img_encoder=`` given to
``MaMMUT``) is saved with the rest of the weights and recorded under ``external_modules``. On
load it is rebuilt from its recorded spec when it has one (:class:`~mammut.encoders.external.
TimmEncoder` built with ``create``, :class:`~mammut.encoders.external.HFVisionEncoder`, our
``ViT``), otherwise the caller must pass a module of the same architecture under the same name
(``MaMMUT.from_pretrained(path, img_encoder=...)``); its weights are then overwritten with the
checkpoint's.

This module lives in ``mammut.models`` because the models' own ``save_pretrained`` /
``from_pretrained`` use it and it needs the model registry: ``models -> io``, never the reverse.
safetensors is imported lazily; ``import mammut`` does not need it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic import atomic_write, atomic_write_text, sha256_file
from ..io.checkpoint import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    CheckpointError,
    _check_weights_file,
    _compare,
    _config_from_json,
    _file_shapes,
    _library_version,
    _load_weights,
    _mismatch_message,
    _safetensors,
    _to_jsonable,
    read_checkpoint_config,
)

__all__ = ["save_pretrained", "load_pretrained"]

log = logging.getLogger(__name__)


def save_pretrained(model: nn.Module, directory: str | Path, *, metadata: dict[str, Any] | None = None,
                    preprocess: Any = None, tokenizer: Any = None) -> Path:
    """Write ``model`` (any registered mammut model) to ``directory``; returns the directory.

    ``metadata``: extra JSON-able information stored under ``"metadata"`` in ``config.json``.
    ``preprocess`` (a :class:`mammut.ImagePreprocess`) and ``tokenizer`` (a
    :class:`mammut.tokenizer.Tokenizer` or :class:`mammut.clip_tokenizer.CLIPTokenizer`,
    with its ``context_length``): written beside the model so that :func:`mammut.load` returns
    all three (see :mod:`mammut.models.companions`).
    """
    from .companions import check_companions, save_companions

    name, config = _model_identity(model)
    check_companions(preprocess, tokenizer)  # before anything is written
    _check_preprocess_size(model, preprocess)
    config_json = _to_jsonable(dataclasses.asdict(config), "config")
    externals = _external_modules(model)
    float_dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "torch_version": torch.__version__.split("+")[0],
        "model_name": name,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config_json,
        "dtype": str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else None,
        "external_modules": externals,
        "metadata": _to_jsonable(metadata or {}, "metadata"),
    }
    st = _safetensors()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(path: Path) -> None:
        header = {"format": "pt", "mammut.format_version": str(FORMAT_VERSION), "mammut.model_name": name}
        st.save_model(model, str(path), metadata=header)

    weights_path = directory / WEIGHTS_NAME
    atomic_write(weights_path, write_weights)
    document["weights"] = {"file": WEIGHTS_NAME, "num_bytes": weights_path.stat().st_size, "sha256": sha256_file(weights_path)}
    document["companions"] = save_companions(directory, preprocess=preprocess, tokenizer=tokenizer)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(document, indent=2, sort_keys=False) + "\n")
    log.info("saved %s (%d tensors) to %s", name, len(model.state_dict()), directory)
    return directory


def _check_preprocess_size(model: nn.Module, preprocess: Any) -> None:
    size = getattr(preprocess, "image_size", None)
    want = getattr(model, "image_size", None)
    if size is not None and want is not None and size != want:
        log.warning("preprocess.image_size %s differs from the model's image size %s: mammut.load will use %s",
                    size, want, want)


def _model_identity(model: nn.Module) -> tuple[str, Any]:
    name = getattr(type(model), "model_name", None)
    config = getattr(model, "config", None)
    config_class = getattr(type(model), "config_class", None)
    if not isinstance(name, str) or config_class is None:
        raise TypeError(f"model: expected a registered mammut model (with model_name and config_class), got {type(model).__name__}")
    if not (dataclasses.is_dataclass(config) and isinstance(config, config_class)):
        raise TypeError(f"model.config: expected a {config_class.__name__} dataclass, got {type(config).__name__}")
    return name, config


def _external_modules(model: nn.Module) -> dict[str, Any]:
    """Submodules handed to the constructor (``img_encoder=`` ...) that building the model from
    its config alone would not recreate identically."""
    from ..encoders.external import encoder_spec

    children = dict(model.named_children())
    candidates = [name for name in _module_parameters(type(model)) if name in children]
    if not candidates:
        return {}
    fresh = _build_reference(model)
    out = {}
    for name in candidates:
        child = children[name]
        ref = getattr(fresh, name, None) if fresh is not None else None
        if isinstance(ref, nn.Module) and type(ref) is type(child) and _shapes(ref) == _shapes(child):
            continue  # the config rebuilds it (e.g. MaMMUT's built-in ViT)
        inner = getattr(child, "model", None) or getattr(child, "vit", None)
        out[name] = {
            "class": f"{type(child).__module__}.{type(child).__qualname__}",
            "wraps": f"{type(inner).__module__}.{type(inner).__qualname__}" if isinstance(inner, nn.Module) else None,
            "spec": _to_jsonable(encoder_spec(child), f"{name} spec"),
            "num_parameters": sum(p.numel() for p in child.parameters()),
        }
    return out


def _module_parameters(cls: type) -> list[str]:
    """Named constructor parameters besides ``config``: where external modules come in."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover
        return []
    return [p.name for p in params if p.kind in kinds and p.name not in ("self", "config")]


def _build_reference(model: nn.Module) -> nn.Module | None:
    """``type(model)(config)`` on the meta device (no memory, no RNG use), or None if that fails."""
    cls = type(model)
    with torch.random.fork_rng(devices=[]):
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    return cls(model.config)
            except Exception as err:  # noqa: BLE001 - any failure means "cannot rebuild from config"
                log.debug("building %s from its config on %s failed: %s", cls.__name__, device, err)
    log.warning("%s cannot be built from its config alone; treating its module arguments as external", cls.__name__)
    return None


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_pretrained(
    directory: str | Path,
    model_class: type[nn.Module] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    verify: bool = True,
    **modules: nn.Module,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`; returns the model in eval mode.

    ``model_class``: expected class (default: the registered class of the config's model name).
    ``device``/``dtype``: where and in which floating dtype to put the model (default: CPU and
    the dtype it was saved in). ``strict=False`` tolerates missing/unexpected tensors (logged);
    shape mismatches always fail. ``verify`` checks the weights' sha256 against ``config.json``.
    ``modules``: external submodules by name (e.g. ``img_encoder=``) for checkpoints that
    recorded one without a spec; they are modified in place (weights from the checkpoint).
    """
    from . import get_model_class

    directory = Path(directory)
    document = read_checkpoint_config(directory)
    name = document["model_name"]
    if model_class is None:
        try:
            model_class = get_model_class(name)
        except ValueError as err:
            raise CheckpointError(f"{directory / CONFIG_NAME}: model_name: {err}") from err
    elif getattr(model_class, "model_name", None) != name:
        raise CheckpointError(
            f"{directory}: holds a {name!r} model, not {getattr(model_class, 'model_name', model_class.__name__)!r} "
            f"({model_class.__name__}); load it with mammut.load_pretrained(path)"
        )
    config = _config_from_json(model_class.config_class, document["config"], f"{directory / CONFIG_NAME}: config")
    externals = _external_inputs(document.get("external_modules", {}), modules, directory)

    weights_path = directory / str(document.get("weights", {}).get("file", WEIGHTS_NAME))
    if not weights_path.is_file():
        raise FileNotFoundError(f"directory: {str(directory)!r} has {CONFIG_NAME} but no {weights_path.name}")
    _check_weights_file(weights_path, document.get("weights", {}), verify)
    _check_declared_shapes(model_class, config, externals, weights_path, strict, directory)

    try:
        model = model_class(config, **externals)
    except TypeError as err:
        raise CheckpointError(f"{directory}: could not build {model_class.__name__} from the checkpoint's config: {err}") from err
    _load_weights(model, weights_path, strict)

    target_dtype = dtype
    if target_dtype is None and isinstance(document.get("dtype"), str):
        target_dtype = getattr(torch, document["dtype"], None)
    if device is not None or (isinstance(target_dtype, torch.dtype) and target_dtype.is_floating_point):
        model = model.to(device=device, dtype=target_dtype)
    model.eval()
    log.info("loaded %s from %s", name, directory)
    return model


def _external_inputs(recorded: dict[str, Any], given: dict[str, nn.Module], directory: Path) -> dict[str, nn.Module]:
    """The external modules to build the model with: given ones, else rebuilt from their spec."""
    from ..encoders.external import build_encoder

    unknown = sorted(set(given) - set(recorded))
    if unknown:
        hint = f"it has external modules {sorted(recorded)}" if recorded else "it has no external modules"
        raise TypeError(f"load_pretrained: unexpected keyword argument(s) {unknown} for the checkpoint at {directory}: {hint}")
    out: dict[str, nn.Module] = {}
    for name, info in recorded.items():
        info = info if isinstance(info, dict) else {}
        if name in given:
            if not isinstance(given[name], nn.Module):
                raise TypeError(f"{name}: expected an nn.Module, got {type(given[name]).__name__}")
            out[name] = given[name]
        elif info.get("spec") is not None:
            try:
                out[name] = build_encoder(info["spec"])
            except (ValueError, TypeError, KeyError) as err:
                raise CheckpointError(f"{directory / CONFIG_NAME}: external_modules.{name}.spec cannot be built: {err}") from err
        else:
            wrapped = f" wrapping {info['wraps']}" if info.get("wraps") else ""
            raise TypeError(
                f"{name}: this checkpoint was saved with an external {name} ({info.get('class', '?')}{wrapped}) that its "
                f"config cannot rebuild; pass {name}=<a module of the same architecture> (its weights are loaded from "
                f"the checkpoint)"
            )
    return out


def _check_declared_shapes(model_class: type[nn.Module], config: Any, externals: dict[str, nn.Module], path: Path,
                           strict: bool, directory: Path) -> None:
    """The model ``config`` declares, built on the meta device (no memory, RNG untouched), against
    the tensor names and shapes of the weights file's header: a mismatch is a
    :class:`CheckpointError` before the real model is allocated. A model class that cannot be
    built on the meta device is checked after it is built, by :func:`_load_weights`."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = model_class(config, **externals)
    except TypeError as err:
        raise CheckpointError(f"{directory}: could not build {model_class.__name__} from the checkpoint's config: {err}") from err
    except Exception as err:  # noqa: BLE001 - e.g. a constructor that runs an external module: checked once built
        log.debug("building %s on the meta device failed (%s: %s); its shapes are checked once it is built",
                  model_class.__name__, type(err).__name__, err)
        return
    missing, unexpected, mismatched = _compare(skeleton.state_dict(keep_vars=True), _file_shapes(path))
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(model_class.__name__, path, missing, unexpected, mismatched))


