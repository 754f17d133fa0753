"""The checkpoint *format* of mammut: ``config.json`` + ``model.safetensors``, without any model.

Layout of a checkpoint directory:

- ``model.safetensors``: the model's ``state_dict`` written by ``safetensors.torch.save_model``
  (tied weights, e.g. MaMMUT's ``token_emb``/``to_logits``, are stored once).
- ``config.json``: ``format``/``format_version``, ``library_version``, ``torch_version``,
  ``model_name`` (the registry name), ``config`` (the config dataclass's fields), ``dtype``,
  ``external_modules``, ``weights`` (file name, size, sha256) and ``companions`` (the
  preprocessing / tokenizer files the save wrote, see :mod:`mammut.models.companions`).

What is here needs no model registry: the names and version of the format, its errors
(:class:`CheckpointError`, :class:`UnsafePickleError` and :func:`refused_pickle` for pickled
weights files, read with ``torch.load(weights_only=True)`` and never unpickled otherwise),
:func:`read_checkpoint_config` (``config.json`` parsed and checked), and the weights file's
checks: its size and sha256 against ``config.json``, tensor names and shapes read from its
header and compared with a model's (tied weights grouped), and the copy tensor by tensor.

Writing and loading a *model* (``save_pretrained`` / ``load_pretrained``: the registry, external
modules, building on the meta device first) is :mod:`mammut.models.pretrained`, exported as
``mammut.save_pretrained`` / ``mammut.load_pretrained``; it builds on this module. This package
(``mammut.io``) is a leaf: the standard library and torch, safetensors imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from .atomic import sha256_file
from .coerce import coerce

__all__ = [
    "CheckpointError",
    "UnsafePickleError",
    "refused_pickle",
    "read_checkpoint_config",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "mammut"
FORMAT_VERSION = 1
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt/truncated files, a config that does not
    describe a model, or tensors that do not match the model the config builds."""


class UnsafePickleError(CheckpointError):
    """A pickled weights file that holds Python objects beyond tensors and plain containers:
    ``torch.load(weights_only=True)`` refused it, and it is never unpickled another way
    (unpickling such objects can run arbitrary code)."""


_UNPICKLER_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def refused_pickle(path: str | Path, exc: BaseException) -> UnsafePickleError:
    """The one-line error for ``path``, whose ``torch.load(weights_only=True)`` raised ``exc``
    (a ``pickle.UnpicklingError``): the file named, what it holds if torch said, and no advice
    to unpickle it anyway."""
    found = _UNPICKLER_GLOBAL.search(str(exc))
    if found:
        what = f"Python objects beyond tensors and plain containers (it refers to {found.group(1)})"
    else:
        detail = _UNPICKLER_ERROR.search(str(exc))
        note = detail.group(1).strip() if detail else ""
        note = note.split(". ")[0][:100] if "weights_only" not in note else ""
        what = "Python objects beyond tensors and plain containers" + (f" ({note})" if note else "")
    return UnsafePickleError(
        f"{path}: refused to load: it holds {what}; unpickling them could run arbitrary code, so it is not "
        f"unpickled. Load weights saved as tensors only (a .safetensors file, or a torch.save of a state_dict)"
    )


# ===================================================================================== write
def _library_version() -> str:
    return __version__


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need the 'safetensors' package: pip install 'mammut-vl[io]'") from err
    return st


def _to_jsonable(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: expected string keys to store in config.json, got {k!r}")
            out[str(k)] = _to_jsonable(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: cannot be stored in config.json (expected JSON-able values), got {type(value).__name__}")


# ===================================================================================== load
def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The parsed and checked ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: no checkpoint directory at {str(directory)!r}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"directory: {str(directory)!r} has no {CONFIG_NAME} (not a mammut checkpoint, or an interrupted save)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt {CONFIG_NAME}, not valid JSON ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: expected a mammut checkpoint config (\"format\": \"{FORMAT_NAME}\"), got {_short(document)}")
    version = document.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version: expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} was written by a newer mammut ({document.get('library_version')}); "
            f"this one ({_library_version()}) reads up to {FORMAT_VERSION}"
        )
    for key, kind in (("model_name", str), ("config", dict)):
        if not isinstance(document.get(key), kind):
            raise CheckpointError(f"{path}: {key}: expected a {kind.__name__}, got {_short(document.get(key))}")
    for key in ("external_modules", "weights", "companions"):
        if not isinstance(document.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key}: expected an object, got {_short(document.get(key))}")
    return document


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_weights_file(path: Path, recorded: dict[str, Any], verify: bool) -> None:
    size = path.stat().st_size
    expected = recorded.get("num_bytes")
    if isinstance(expected, int) and size != expected:
        raise CheckpointError(f"{path}: truncated or corrupt: {size} bytes, config.json records {expected}")
    digest = recorded.get("sha256")
    if verify and isinstance(digest, str) and sha256_file(path) != digest:
        raise CheckpointError(f"{path}: corrupt: sha256 differs from the one recorded in config.json (or the files are from different saves)")


def _open_weights(path: Path) -> Any:
    _safetensors()
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err})") from err


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no tensor is read)."""
    with _open_weights(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _load_weights(model: nn.Module, path: Path, strict: bool) -> None:
    """Check names and shapes against ``model``, then copy tensor by tensor."""
    state = model.state_dict()
    with _open_weights(path) as f:
        file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing, unexpected, mismatched = _compare(state, file_shapes)
        if mismatched or (strict and (missing or unexpected)):
            raise CheckpointError(_mismatch_message(type(model).__name__, path, missing, unexpected, mismatched))
        if missing:
            log.warning("%s: tensors not in the checkpoint (left as initialised): %s", path, _listing(missing))
        if unexpected:
            log.warning("%s: checkpoint tensors the model does not use: %s", path, _listing(unexpected))
        with torch.no_grad():
            for key in file_shapes:
                if key in state:
                    state[key].copy_(f.get_tensor(key))


def _compare(
    state: dict[str, torch.Tensor], file_shapes: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Missing (a whole tie group absent), unexpected, and shape-mismatched tensor names."""
    groups = _tie_groups(state)
    tied_with = {k: [o for o in group if o != k] for group in groups for k in group}
    missing = []
    for group in groups:
        if not any(k in file_shapes for k in group):
            missing.append(group[0] + _tied_note(group[1:]))
    unexpected = sorted(k for k in file_shapes if k not in state)
    mismatched = [
        f"{k}{_tied_note(tied_with[k])}: checkpoint {file_shapes[k]} vs model {tuple(state[k].shape)}"
        for k in sorted(file_shapes)
        if k in state and tuple(state[k].shape) != file_shapes[k]
    ]
    return missing, unexpected, mismatched


def _tied_note(others: list[str]) -> str:
    return f" (tied with {', '.join(others)})" if others else ""


def _tie_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """State-dict names grouped by the tensor they alias (tied weights share one group). On the
    meta device, where there is no storage, tied means the same tensor object (a state dict
    taken with ``keep_vars=True`` keeps a tied parameter's one object under each of its names)."""
    groups: dict[Any, list[str]] = {}
    for key, t in state.items():
        if t.device.type == "meta":
            ident: Any = ("meta", id(t))
        elif t.numel() == 0:
            ident = key
        else:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(ident, []).append(key)
    return list(groups.values())


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _mismatch_message(cls: str, path: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = [f"{path}: tensors do not match the {cls} its config.json builds (wrong config or external module?):"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}): {_listing(mismatched)}")
    return "\n".join(lines)


# ============================================================================ config <- JSON
def _config_from_json(config_class: type, data: dict[str, Any], where: str) -> Any:
    """The config dataclass from ``config.json`` (tuples and nested dataclasses restored by the
    field annotations, strict JSON types); an unknown field or a wrong value is a
    :class:`CheckpointError` naming the dotted key."""
    absent = sorted({f.name for f in dataclasses.fields(config_class) if f.init} - set(data))
    if absent:
        log.info("%s: fields %s absent, using their defaults", where, absent)
    return coerce(data, config_class, where, error=CheckpointError)
