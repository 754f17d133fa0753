"""Training checkpoints: model weights in safetensors, plus optimiser, RNG and loop state.

Layout of ``<run>/checkpoints/step_00000100/``::

    model.safetensors   full (unsharded) weights; tied weights stored once (see metadata)
    optimizer.pt        full optimiser state keyed by parameter names (tensors and plain
                        containers only: loaded with ``torch.load(weights_only=True)``)
    state.json          step, samples seen (the data position), timings
    rng_rank{r}.json    torch / CUDA / numpy / python RNG states of rank r (JSON, no pickle)
    manifest.json       size and sha256 of every file above; written last

A checkpoint is written into a ``.tmp-`` folder, every file and the folder are fsynced, and the
folder is renamed into place when complete, so a run killed at any moment leaves either the
previous checkpoints or the new one, never half of one. ``manifest.json`` lets
:func:`verify_checkpoint` catch a file that was truncated or corrupted later;
:func:`latest_valid_checkpoint` is the newest checkpoint that verifies. The reading side
(listing, verification, :func:`load_weights`) is :mod:`mammut.runs`, the library's run-folder
reader that ``mammut.load`` uses without importing this package; it is re-exported here. Nothing is ever
unpickled beyond tensors and plain containers, so a crafted checkpoint cannot run code.

Works for plain, DDP and FSDP2 models through ``torch.distributed.checkpoint``'s full
state-dict helpers. A failed write (e.g. a full disk) raises :class:`CheckpointWriteError` on
every rank and removes the partial ``.tmp-`` folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_write_text, fsync_dir, fsync_file, sha256_file
from ..runs import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    CheckpointCorrupt,
    _step_of,
    latest_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_weights,
    verify_checkpoint,
)
from ..runs import select_checkpoint as _select_checkpoint
from .distributed import DistInfo, all_ranks_ok, barrier
from .rng_state import numpy_safe_globals, rng_from_json, rng_state, rng_to_json, set_rng_state

log = logging.getLogger(__name__)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "atomic_write_text",
    "save_weights",
    "load_weights",
    "rng_state",
    "set_rng_state",
    "CheckpointCorrupt",
    "UnsafeCheckpointError",
    "CheckpointWriteError",
    "MANIFEST_NAME",
]

_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


class UnsafeCheckpointError(CheckpointCorrupt):
    """A checkpoint file holds pickled objects other than tensors and plain containers: loading
    it could run arbitrary code, so it is refused."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. ``ENOSPC``: no space left on device); the partial
    ``.tmp-step_*`` folder was removed. ``str()`` is the one-line message naming the file
    ("no space left on device while writing PATH"); ``errno`` is set and ``path`` is the file
    (``filename`` stays ``None``: the message already names it)."""

    def __init__(self, code: int | None, message: str, path: str | Path | None = None) -> None:
        super().__init__(code, message)
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.strerror)


# --------------------------------------------------------------------------- files
# atomic writes, fsync and sha256: mammut.io.atomic (atomic_write_text is re-exported here)


class _RecordingWriter:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write: torch
    replaces it by ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = exc
            raise


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as exc:
            if writer.error is not None:
                raise writer.error from exc
            raise


def _write_error(exc: BaseException, path: Path) -> CheckpointWriteError | None:
    """The one-line :class:`CheckpointWriteError` for an I/O error while writing ``path``: an
    ``OSError``, safetensors' error that wraps one ("... (os error 28)"), or torch's
    ``RuntimeError: [enforce fail at inline_container.cc] ...`` when it lost the ``OSError``
    (then a full disk is told by the free space left). ``None`` if ``exc`` is not I/O."""
    text = str(exc)
    first = (text.splitlines() or [type(exc).__name__])[0]
    code: int | None
    if isinstance(exc, OSError):
        code = exc.errno
    elif isinstance(exc, SafetensorError) and (m := _OS_ERROR_CODE.search(text)):
        code = int(m.group(1))
    elif isinstance(exc, SafetensorError) and "I/O error" in text:
        code = errno.EIO
    elif isinstance(exc, RuntimeError) and any(k in text for k in _TORCH_WRITE_FAILURES):
        try:
            full = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free < _FULL_BYTES
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    else:
        return None
    if code == errno.ENOSPC:
        return CheckpointWriteError(code, f"no space left on device while writing {path}", path)
    if code == errno.EDQUOT:
        return CheckpointWriteError(code, f"disk quota exceeded while writing {path}", path)
    reason = os.strerror(code) if code is not None and not isinstance(exc, RuntimeError) else f"write failed ({first})"
    return CheckpointWriteError(code, f"{reason[:1].lower()}{reason[1:]} while writing {path}", path)


# --------------------------------------------------------------------------- safetensors


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors; tensors sharing storage (tied weights) are stored
    once and listed under the ``aliases`` metadata key."""
    tensors: dict[str, torch.Tensor] = {}
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.cpu().contiguous()
    meta = dict(metadata or {})
    meta["aliases"] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)


# --------------------------------------------------------------------------- torch.load
# RNG states (rng_rank{r}.json, legacy .pt): converted by mammut.train.rng_state (rng_state and
# set_rng_state are re-exported here), read here


def _safe_torch_load(path: Path, extra_globals: list[Any] | None = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything else is
    refused before it can run, with :class:`UnsafeCheckpointError` naming the file."""
    try:
        if extra_globals:
            with torch.serialization.safe_globals(extra_globals):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.split("error:", 1)[1].strip() for line in str(exc).splitlines() if "WeightsUnpickler error:" in line),
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain containers, and "
            f"unpickling them could run arbitrary code ({detail}). Only resume from checkpoints written by mammut."
        ) from None
    except (RuntimeError, EOFError) as exc:  # a truncated or otherwise broken zip/pickle
        raise CheckpointCorrupt(f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _load_rng(path: Path, rank: int, saved_world: Any) -> dict[str, Any]:
    json_file = path / f"rng_rank{rank}.json"
    legacy = path / f"rng_rank{rank}.pt"  # written before RNG states were JSON
    if json_file.is_file():
        try:
            return rng_from_json(json.loads(json_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointCorrupt(f"{json_file}: corrupt JSON ({exc})") from None
        except ValueError as exc:
            raise CheckpointCorrupt(f"{json_file}: {exc}") from None
    if legacy.is_file():
        state = _safe_torch_load(legacy, numpy_safe_globals())
        if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
            raise CheckpointCorrupt(f"{legacy}: not an RNG state written by mammut")
        return state
    raise ValueError(f"resume: {path} was written by {saved_world} ranks and has no RNG state for rank {rank}")


# --------------------------------------------------------------------------- folders
# listing, verification and the newest valid checkpoint: mammut.runs (the library's run-folder
# reader, which mammut.load uses without this package); re-exported here


# --------------------------------------------------------------------------- save / load


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, optim_sd


class _Phase:
    """One phase of a checkpoint save on every rank: I/O errors become
    :class:`CheckpointWriteError`, and the ranks agree (one all-reduce) on whether every rank
    succeeded, so a rank that failed never leaves the others waiting in a collective. On any
    failure rank 0 removes the partial folder and every rank raises."""

    def __init__(self, tmp: Path, info: DistInfo, what: str) -> None:
        self.tmp, self.info, self.what = tmp, info, what
        self.path: Path = tmp  # the file being written, for the message

    def writing(self, path: Path) -> Path:
        self.path = path
        return path

    def __enter__(self) -> _Phase:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        everyone_ok = all_ranks_ok(exc is None, f"checkpoint save ({self.what})")
        if not everyone_ok and self.info.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None:
            err = _write_error(exc, self.path)
            if err is not None:
                raise err from exc
            return False  # re-raise the original
        if not everyone_ok:
            raise CheckpointWriteError(errno.EIO, f"another rank failed while writing checkpoint {self.tmp} ({self.what}); "
                                       f"see its error", self.tmp)
        return False


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    info: DistInfo,
    keep: int = 2,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (every rank must call this); returns its folder.

    ``model`` is the unwrapped model (plain or with FSDP2-sharded parameters); ``state`` is
    the JSON-able loop state. Keeps the newest ``keep`` checkpoints (0 = all). Raises
    :class:`CheckpointWriteError` on every rank if any rank could not write its files (e.g.
    "no space left on device while writing PATH"); the ``.tmp-`` folder is then removed.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    model_sd, optim_sd = _state_dicts(model, optimizer)  # collective under FSDP

    with _Phase(tmp, info, "preparing the folder") as phase:
        if info.is_main:
            phase.writing(root).mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed while saving this step
                shutil.rmtree(tmp)
            phase.writing(tmp).mkdir()

    with _Phase(tmp, info, "writing files") as phase:
        rng_file = phase.writing(tmp / f"rng_rank{info.rank}.json")
        rng_file.write_text(json.dumps(rng_to_json(rng_state())), encoding="utf-8")
        fsync_file(rng_file)
        if info.is_main:
            weights = phase.writing(tmp / "model.safetensors")
            save_weights(model_sd, weights, metadata)
            fsync_file(weights)
            if optim_sd is not None:
                optim_file = phase.writing(tmp / "optimizer.pt")
                _torch_save(optim_sd, optim_file)
                fsync_file(optim_file)
            state_file = phase.writing(tmp / "state.json")
            atomic_write_text(state_file, json.dumps({"step": step, "world_size": info.world_size, **state}, indent=1))

    with _Phase(tmp, info, "committing") as phase:
        if info.is_main:
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step,
                        "world_size": info.world_size, "files": files}
            atomic_write_text(phase.writing(tmp / MANIFEST_NAME), json.dumps(manifest, indent=1))  # fsyncs tmp too
            if final.exists():  # re-saving a step (e.g. one moved aside as corrupt, then re-run)
                shutil.rmtree(final)
            phase.writing(final)
            os.replace(tmp, final)
            fsync_dir(root)
    if info.is_main:
        if keep > 0:
            older = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
            for old in older[: max(len(older) - (keep - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier("checkpoint save (pruning)")
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: DistInfo,
    *,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimiser state and this rank's RNG; returns ``state.json``.

    ``verify``: check the files against ``manifest.json`` first (:func:`verify_checkpoint`);
    pass ``False`` only when that was just done (the Trainer verifies on rank 0). Files are
    read with safetensors, JSON and ``torch.load(weights_only=True)`` only: a file holding
    other pickled objects raises :class:`UnsafeCheckpointError` without running anything."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"{path / 'state.json'}: corrupt JSON ({exc})") from None
    opts = StateDictOptions(full_state_dict=True, strict=True)
    try:
        weights = load_weights(path / "model.safetensors")
    except SafetensorError as exc:
        raise CheckpointCorrupt(f"{path / 'model.safetensors'}: unreadable ({exc})") from None
    optim_sd = _safe_torch_load(path / "optimizer.pt") if optimizer is not None else None
    rng = _load_rng(path, info.rank, state.get("world_size"))
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        # not strict: parameters a task never trains (a contrastive head under a captioning
        # loss) have no AdamW state yet; the model's weights stay strict
        set_optimizer_state_dict(model, optimizer, optim_sd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    set_rng_state(rng)
    if dist.is_available() and dist.is_initialized():
        barrier("loading a checkpoint")
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
