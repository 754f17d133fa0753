"""Checkpoints of every registered model: ``config.json`` + ``model.safetensors``.

Layout of a checkpoint directory:

- ``model.safetensors``: the model's ``state_dict`` written by ``safetensors.torch.save_model``
  (tied weights, e.g. MaMMUT's ``token_emb``/``to_logits``, are stored once).
- ``config.json``: ``format``/``format_version``, ``library_version``, ``torch_version``,
  ``model_name`` (the registry name), ``config`` (the config dataclass's fields), ``dtype``,
  ``external_modules``, ``weights`` (file name, size, sha256) and ``companions`` (the
  preprocessing / tokenizer files this save wrote, see :mod:`mammut.io.companions`).
- optional ``preprocess.json`` and ``mammut_tokenizer.json`` (+ ``tokenizer.json`` for a BPE):
  ``save_pretrained(model, dir, preprocess=, tokenizer=)``; :func:`mammut.load` reads them.

Both files are written by :func:`mammut.io.atomic.atomic_write` (temporary name, fsync, rename,
folder fsync), weights first, so a crash never leaves a half-written file under the final name,
and ``config.json`` (which records the weights' sha256) is the commit marker. ``config.json`` is
read back into the config dataclass by :mod:`mammut.io.coerce` (strict JSON types).

Loading verifies the sha256, builds the model from the config on the meta device (no memory)
and checks the file's tensor names and shapes, read from its header, against it (every
missing, unexpected or shape-mismatched tensor is named), so a ``config.json`` declaring another
model than the weights hold (a huge one, say) fails before any memory is allocated; only then is
the model built for real and the tensors copied in. Nothing is returned unless everything loaded.
Nothing touches the network.

Pickled weights files (open_clip ``.pt`` / ``.bin``, read by :func:`mammut.load`) are read
with ``torch.load(weights_only=True)``; one holding other Python objects is refused with
:class:`UnsafePickleError` (:func:`refused_pickle`) and never unpickled.

External modules: a submodule the config cannot rebuild (e.g. ``img_encoder=`` given to
``MaMMUT``) is saved with the rest of the weights and recorded under ``external_modules``. On
load it is rebuilt from its recorded spec when it has one (:class:`~mammut.encoders.external.
TimmEncoder` built with ``create``, :class:`~mammut.encoders.external.HFVisionEncoder`, our
``ViT``), otherwise the caller must pass a module of the same architecture under the same name
(``MaMMUT.from_pretrained(path, img_encoder=...)``); its weights are then overwritten with the
checkpoint's.

safetensors is imported lazily; ``import mammut`` does not need it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write, atomic_write_text, sha256_file
from .coerce import coerce

__all__ = [
    "CheckpointError",
    "UnsafePickleError",
    "refused_pickle",
    "save_pretrained",
    "load_pretrained",
    "read_checkpoint_config",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
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


# ===================================================================================== save
def save_pretrained(model: nn.Module, directory: str | Path, *, metadata: dict[str, Any] | None = None,
                    preprocess: Any = None, tokenizer: Any = None) -> Path:
    """Write ``model`` (any registered mammut model) to ``directory``; returns the directory.

    ``metadata``: extra JSON-able information stored under ``"metadata"`` in ``config.json``.
    ``preprocess`` (a :class:`mammut.ImagePreprocess`) and ``tokenizer`` (a
    :class:`mammut.data.tokenizer.Tokenizer` or :class:`mammut.convert.clip_tokenizer.CLIPTokenizer`,
    with its ``context_length``): written beside the model so that :func:`mammut.load` returns
    all three (see :mod:`mammut.io.companions`).
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


def _library_version() -> str:
    import mammut

    return str(getattr(mammut, "__version__", "unknown"))


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
    from ..models import get_model_class

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


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _check_weights_file(path: Path, recorded: dict[str, Any], verify: bool) -> None:
    size = path.stat().st_size
    expected = recorded.get("num_bytes")
    if isinstance(expected, int) and size != expected:
        raise CheckpointError(f"{path}: truncated or corrupt: {size} bytes, config.json records {expected}")
    digest = recorded.get("sha256")
    if verify and isinstance(digest, str) and sha256_file(path) != digest:
        raise CheckpointError(f"{path}: corrupt: sha256 differs from the one recorded in config.json (or the files are from different saves)")


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
