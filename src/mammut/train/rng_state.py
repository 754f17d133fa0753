"""RNG state of a training checkpoint: ``rng_rank{r}.json``, one file per rank.

Each file holds rank r's torch CPU, CUDA (when initialised), numpy and python ``random``
states as JSON (byte states base64-encoded), so resuming unpickles nothing. Checkpoints
written before that hold ``rng_rank{r}.pt`` instead; it is still read, with
``torch.load(weights_only=True)`` and only the numpy types its state needs allowed, so a
crafted file is refused (``UnsafeCheckpointError``) before it can run code. The files are written
and read by :mod:`mammut.train.checkpointing` (which re-exports :func:`rng_state` and
:func:`set_rng_state`); this module only converts states to and from JSON.
"""

from __future__ import annotations

import base64
import binascii
import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "rng_to_json", "rng_from_json", "numpy_safe_globals"]


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if initialised, numpy, python ``random``)."""
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


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """``rng_state()``'s states as plain JSON values (byte states base64-encoded)."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    out: dict[str, Any] = {
        "format": 1,
        "torch": _b64(state["torch"]),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if "cuda" in state:
        out["cuda"] = [_b64(s) for s in state["cuda"]]
    return out


def rng_from_json(data: Any) -> dict[str, Any]:
    """The RNG states of ``rng_to_json``'s output; a ``ValueError`` for anything else."""
    try:
        n, p = data["numpy"], data["python"]
        state: dict[str, Any] = {
            "torch": _unb64(data["torch"]),
            "numpy": (str(n["kind"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                      float(n["cached_gaussian"])),
            "python": (int(p["version"]), tuple(int(v) for v in p["internal"]),
                       None if p["gauss_next"] is None else float(p["gauss_next"])),
        }
        if "cuda" in data:
            state["cuda"] = [_unb64(s) for s in data["cuda"]]
    except (KeyError, TypeError, ValueError, OverflowError, binascii.Error) as exc:
        raise ValueError(f"not an RNG state written by mammut ({type(exc).__name__}: {exc})") from None
    return state


def numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must allow to read a legacy ``.pt`` RNG state
    (numpy's state array), and nothing more."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
