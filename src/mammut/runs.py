"""A training run folder, read here and only here (library: the training stack is not imported).

Layout, as ``mammut train`` writes it::

    config.yaml        the resolved run config (its ``model:`` section filled in from the tokenizer)
    tokenizer.json     the run's own copy of its tokenizer
    metrics.jsonl      one JSON record per logged step (:func:`read_metrics`)
    checkpoints/step_XXXXXXXX/
        model.safetensors  full weights, tied ones stored once (``aliases`` metadata, :func:`load_weights`)
        state.json, optimizer.pt, rng_rank{r}.json
        manifest.json      size and sha256 of every file above, written last (:func:`verify_checkpoint`)
    model/             the final weights exported with ``save_pretrained`` (preprocessing and tokenizer
                       beside them) when training ends

:func:`load_run_model` is what :func:`mammut.load` does with a run folder: the exported
``model/`` when it is at least as new as the run's newest checkpoint; otherwise (a run that
was interrupted, went on after its export, or predates exports) the newest checkpoint that
verifies, built from ``config.yaml``'s ``model:`` section through the model registry. The
preprocessing and the tokenizer are the run's eval transform (``data.image_size``,
``data.normalize``) and ``tokenizer.json`` at context length ``data.max_len``.

The training checkpoint's *reading* side lives here too (listing, manifest verification,
weights with their aliases); ``mammut.train.checkpointing`` writes checkpoints and re-exports
these. ``config.yaml`` is read with PyYAML, safetensors files with safetensors (both imported
when used).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .io.atomic import sha256_file
from .io.checkpoint import CheckpointError

__all__ = [
    "CheckpointCorrupt",
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "REQUIRED_FILES",
    "EXPORT_NAME",
    "RunModel",
    "list_checkpoints",
    "latest_checkpoint",
    "verify_checkpoint",
    "select_checkpoint",
    "latest_valid_checkpoint",
    "load_weights",
    "read_metrics",
    "read_run_config",
    "run_tokenizer",
    "run_preprocess",
    "checkpoint_model",
    "load_run_model",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mammut-train-checkpoint"
MANIFEST_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "state.json")
EXPORT_NAME = "model"  # <run>/model: save_pretrained of the final weights

_STEP_DIR = re.compile(r"^step_(\d+)$")

# config.yaml's data keys this module reads, with DataConfig's defaults (mammut.train.config;
# tests/test_layering.py checks that the two agree)
DATA_DEFAULTS: dict[str, Any] = {"image_size": 64, "normalize": False, "max_len": 32, "tokenizer": None}


class CheckpointCorrupt(CheckpointError):
    """A training checkpoint whose files are missing, truncated, corrupt or unreadable; the
    message names the file. A ``ValueError`` (via ``mammut.io.CheckpointError``)."""


# ============================================================================ metrics
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run) the last wins."""
    p = Path(path)
    if not p.is_file():
        return []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        by_key[(rec.get("kind", "train"), int(rec.get("step", -1)))] = rec
    return sorted(by_key.values(), key=lambda r: (r.get("step", -1), r.get("kind", "train")))


# ============================================================================ checkpoints
def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run (renamed into place, not yet verified), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder, *not* verified (see :func:`latest_valid_checkpoint`)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    mf = path / MANIFEST_NAME
    try:
        doc = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"{mf}: corrupt manifest ({exc})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointCorrupt(f"{mf}: corrupt manifest (expected files: {{name: {{bytes, sha256}}}})")
    if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("version"), int) or doc["version"] > MANIFEST_VERSION:
        raise CheckpointCorrupt(f"{mf}: expected format {MANIFEST_FORMAT!r} version <= {MANIFEST_VERSION}, "
                                f"got {doc.get('format')!r} version {doc.get('version')!r}")
    return files


def verify_checkpoint(path: str | Path) -> None:
    """Check a training checkpoint folder against its ``manifest.json`` (every file present,
    of the recorded size and sha256); raises :class:`CheckpointCorrupt` naming the bad file.

    A checkpoint without a manifest (written before checksums were added) is accepted with a
    warning after a structural check (``state.json`` parses, the safetensors header reads):
    refusing it would make runs started with an older mammut unresumable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointCorrupt(f"{path}: expected a checkpoint folder, got {'a file' if path.exists() else 'nothing'}")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointCorrupt(f"{path / name}: missing")
    if not (path / MANIFEST_NAME).is_file():
        _check_structure(path)
        log.warning("%s has no %s (written by an older mammut): its files cannot be verified", path, MANIFEST_NAME)
        return
    files = _read_manifest(path)
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointCorrupt(f"{path / MANIFEST_NAME}: does not list {name}")
    for name, entry in files.items():
        f = path / name
        if Path(name).name != name:
            raise CheckpointCorrupt(f"{path / MANIFEST_NAME}: expected plain file names, got {name!r}")
        if not f.is_file():
            raise CheckpointCorrupt(f"{f}: missing (listed in {MANIFEST_NAME})")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointCorrupt(f"{f}: truncated or overwritten: {size} bytes, {MANIFEST_NAME} records {entry['bytes']}")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointCorrupt(f"{f}: corrupt: sha256 differs from the one recorded in {MANIFEST_NAME}")


def _check_structure(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"{path / 'state.json'}: corrupt JSON ({exc})") from None
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointCorrupt(f"{path / 'model.safetensors'}: unreadable ({exc})") from None


def select_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, CheckpointCorrupt]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with their errors (each
    logged as a warning)."""
    skipped: list[tuple[Path, CheckpointCorrupt]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
        except CheckpointCorrupt as exc:
            log.warning("skipping checkpoint %s: %s", ckpt.name, exc)
            skipped.append((ckpt, exc))
            continue
        return ckpt, skipped
    return None, skipped


def latest_valid_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint` (``None`` if
    none does); every newer one skipped is logged as a warning naming its bad file."""
    return select_checkpoint(run_dir)[0]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by ``mammut.train.checkpointing.save_weights`` (tensors
    sharing storage were stored once and listed under the ``aliases`` metadata key: restored)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        out[name] = out[source]
    return out


# ============================================================================ config, tokenizer, preprocessing
def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """``config.yaml`` of a run folder as plain data (``FileNotFoundError`` naming the folder
    when it has none). ``mammut.train.config.config_from_dict`` turns it into a ``RunConfig``."""
    import yaml

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"run_dir: expected a run folder with config.yaml, got {run}")
    document = yaml.safe_load(cfg_path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{cfg_path}: expected a mapping of config sections, got {type(document).__name__}")
    return document


def _data_section(config: dict[str, Any]) -> dict[str, Any]:
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"config.yaml: data: expected a mapping, got {type(data).__name__}")
    return {**DATA_DEFAULTS, **{k: data[k] for k in DATA_DEFAULTS if k in data}}


def run_tokenizer(run_dir: str | Path, config: dict[str, Any] | None = None) -> Any:
    """The run's tokenizer (:class:`mammut.tokenizer.Tokenizer`) at context length
    ``data.max_len`` (``tokenizer(texts)`` encodes as training did): the run's own copy
    ``tokenizer.json`` (written at the start of training, so a run folder works from any
    directory and after a move); older runs fall back to ``data.tokenizer``."""
    from .tokenizer import Tokenizer

    run = Path(run_dir)
    data = _data_section(read_run_config(run) if config is None else config)
    own = run / "tokenizer.json"
    return Tokenizer.from_file(own if own.is_file() or not data["tokenizer"] else data["tokenizer"],
                               context_length=data["max_len"])


def run_preprocess(image_size: int, normalize: Any = False) -> Any:
    """A run's eval transform as a :class:`mammut.ImagePreprocess`: resize the short side
    (bicubic), centre crop, ``[0, 1]``, transparency on white; ``normalize`` (``data.normalize``):
    False, True (OpenAI CLIP mean/std) or ``(mean, std)``. The same pixels as
    ``mammut.data.datasets.image_transform(image_size, train=False, normalize=normalize)``."""
    from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    if isinstance(normalize, list):
        normalize = tuple(normalize)
    if normalize is None or normalize is False:
        return ImagePreprocess(image_size)
    if normalize is True:
        return ImagePreprocess(image_size, mean=CLIP_MEAN, std=CLIP_STD)
    expected = f"normalize: expected False, True or (mean, std), got {normalize!r}"
    if not isinstance(normalize, tuple):
        raise ValueError(expected)
    try:
        if len(normalize) != 2 or len(normalize[0]) != 3 or len(normalize[1]) != 3:
            raise ValueError(f"normalize must be False, True or (mean[3], std[3]), got {normalize!r}")
    except TypeError:  # a mean or std without a length
        raise ValueError(expected) from None
    return ImagePreprocess(image_size, mean=normalize[0], std=normalize[1])


def _run_preprocess_of(config: dict[str, Any]) -> Any:
    data = _data_section(config)
    return run_preprocess(data["image_size"], data["normalize"])


# ============================================================================ the model
class RunModel(NamedTuple):
    """What :func:`load_run_model` returns: the model (eval mode, CPU), its preprocessing and
    tokenizer, and where the weights came from (``<run>/model`` or a checkpoint folder)."""

    model: nn.Module
    preprocess: Any
    tokenizer: Any
    source: Path


def _model_from_section(section: Any, where: str) -> nn.Module:
    """A registered model built from ``config.yaml``'s ``model:`` section (its config dataclass
    read as ``load_pretrained`` reads ``config.json``: strict types, dotted keys in errors)."""
    from .io.coerce import coerce
    from .models import get_model_spec

    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ValueError(f"{where}: expected a mapping with the registered model's name, got {section!r:.80}")
    spec = get_model_spec(section["name"])
    cls, config_class = spec.cls, spec.config_class
    fields = {k: v for k, v in section.items() if k != "name"}
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return cls(**fields)
    return cls(coerce(fields, config_class, where, error=ValueError))


def checkpoint_model(run_dir: str | Path, checkpoint: str | Path, config: dict[str, Any] | None = None) -> nn.Module:
    """The model of a run's checkpoint folder (eval mode, CPU): built from ``config.yaml``'s
    ``model:`` section, weights from the checkpoint's ``model.safetensors`` (strict). A
    checkpoint with a manifest (or named ``step_*``) is verified first: a flipped byte or a
    truncated file is an error, never loaded."""
    run, ckpt = Path(run_dir), Path(checkpoint)
    config = read_run_config(run) if config is None else config
    if (ckpt / MANIFEST_NAME).is_file() or ckpt.name.startswith("step_"):
        verify_checkpoint(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"run_dir: no checkpoint with model.safetensors under {run / 'checkpoints'}")
    model = _model_from_section(config.get("model"), f"{run / 'config.yaml'}: model")
    model.load_state_dict(load_weights(ckpt / "model.safetensors"), strict=True)
    return model.eval()


def _written(ckpt: Path) -> float:
    """When a checkpoint folder was completed (its manifest, else its weights, was written)."""
    for name in (MANIFEST_NAME, "model.safetensors"):
        if (ckpt / name).is_file():
            return (ckpt / name).stat().st_mtime
    return ckpt.stat().st_mtime


def _export_of(run: Path) -> Path | None:
    config = run / EXPORT_NAME / "config.json"
    if not config.is_file():
        return None
    try:
        if json.loads(config.read_text(encoding="utf-8")).get("format") != "mammut":
            return None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return run / EXPORT_NAME


def _weights_source(run: Path) -> Path:
    """``<run>/model`` when it is at least as new as the newest checkpoint that verifies (no
    checksum is computed when it is newer than every checkpoint), else that checkpoint."""
    export = _export_of(run)
    ckpts = list_checkpoints(run)
    exported = (export / "config.json").stat().st_mtime if export is not None else None
    if exported is not None and (not ckpts or _written(ckpts[-1]) <= exported):
        return export  # type: ignore[return-value]
    chosen, _ = select_checkpoint(run)  # the newest that verifies; corrupt ones are named in a warning
    if chosen is None:
        if export is not None:
            log.warning("%s: no checkpoint verifies; loading the exported %s", run, EXPORT_NAME)
            return export
        raise FileNotFoundError(f"run_dir: no checkpoint with model.safetensors under {run / 'checkpoints'}")
    if exported is not None and _written(chosen) <= exported:
        return export  # type: ignore[return-value]
    if export is not None:
        log.info("%s: %s is older than checkpoint %s (the run went on after it was exported); loading the checkpoint",
                 run, EXPORT_NAME, chosen.name)
    return chosen


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> RunModel:
    """Model (eval mode, CPU), preprocessing and tokenizer of a run folder, without the
    training stack: ``checkpoint`` (a checkpoint folder) when given; else the exported
    ``<run>/model`` when it is at least as new as the run's newest checkpoint that verifies,
    otherwise that checkpoint (see the module doc)."""
    run = Path(run_dir)
    config = read_run_config(run)
    source = Path(checkpoint) if checkpoint is not None else _weights_source(run)
    preprocess: Any = None
    tokenizer: Any = None
    if source == run / EXPORT_NAME:
        from .io.checkpoint import read_checkpoint_config
        from .models.companions import companion_paths, load_preprocess, load_tokenizer
        from .models.pretrained import load_pretrained

        model = load_pretrained(source)
        files = companion_paths(source, read_checkpoint_config(source))
        if "preprocess" in files:
            preprocess = load_preprocess(files["preprocess"])
        if "tokenizer" in files:
            tokenizer = load_tokenizer(files["tokenizer"])
            if getattr(tokenizer, "context_length", None) is None:  # an older export: a bare tokenizer.json
                tokenizer = None
    else:
        model = checkpoint_model(run, source, config)
    if preprocess is None:
        preprocess = _run_preprocess_of(config)
    if tokenizer is None:
        tokenizer = run_tokenizer(run, config)
    return RunModel(model, preprocess, tokenizer, source)
