"""Training checkpoints: model weights in safetensors, plus optimiser, RNG and loop state.

Layout of ``<run>/checkpoints/step_00000100/``::

    model.safetensors   full (unsharded) weights; tied weights stored once (see metadata)
    optimizer.pt        full optimiser state keyed by parameter names
    state.json          step, samples seen (the data position), timings
    rng_rank{r}.pt      torch / CUDA / numpy / python RNG states of rank r

A checkpoint is written into a ``.tmp-`` folder and renamed into place when complete, so a
run killed at any moment leaves either the previous checkpoints or the new one, never half
of one. Works for plain, DDP and FSDP2 models through ``torch.distributed.checkpoint``'s
full state-dict helpers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "save_weights",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`save_weights` (aliases restored)."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        out[name] = out[source]
    return out


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- folders


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, optim_sd


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
    the JSON-able loop state. Keeps the newest ``keep`` checkpoints (0 = all).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    model_sd, optim_sd = _state_dicts(model, optimizer)  # collective under FSDP
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        save_weights(model_sd, tmp / "model.safetensors", metadata)
        if optim_sd is not None:
            torch.save(optim_sd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": info.world_size, **state}, indent=1))
    barrier()
    if info.is_main:
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: DistInfo,
) -> dict[str, Any]:
    """Restore weights, optimiser state and this rank's RNG; returns ``state.json``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    opts = StateDictOptions(full_state_dict=True, strict=True)
    weights = load_weights(path / "model.safetensors")
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    rng_file = path / f"rng_rank{info.rank}.pt"
    if not rng_file.is_file():
        saved_world = state.get("world_size")
        raise ValueError(f"resume: {path} was written by {saved_world} ranks and has no RNG state for rank {info.rank}")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    if dist.is_available() and dist.is_initialized():
        barrier()
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
