"""Numeric precision chosen for the hardware at hand: ``auto``, ``fp32`` or ``bf16``.

bf16 autocast pays only where the device computes in bf16 natively. On a CPU without it (AVX2,
or AVX-512 without the BF16 extension) oneDNN emulates bf16 matrix products and a training step
runs about 20x slower than in fp32 (the demo preset, 2 cores, AVX2: 1.9 against 41-43
samples/s). So ``auto`` picks:

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32;
- CPU: bf16 when the CPU has AVX512-BF16 or AMX tiles *and* oneDNN is allowed to use them
  (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours ``ONEDNN_MAX_CPU_ISA``),
  else fp32;
- anything else (MPS, XPU, ...): fp32.

An explicit ``bf16`` on a CPU without native support is honoured, with one warning per process
naming the measured cost. :func:`resolve_precision` returns the choice with its reason, for
the run's log, config and metrics.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision", "native_bf16", "resolve_precision", "autocast"]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")

_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is ``"fp32"`` or ``"bf16"``; ``requested`` what was asked
    (``auto`` included); ``reason`` one line saying why."""

    name: str
    requested: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def as_dict(self) -> dict[str, str]:
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


def _cpu_bf16() -> tuple[bool, str]:
    cap = torch.backends.cpu.get_cpu_capability()
    cpu = getattr(torch, "cpu", None)
    has_isa = any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if has_isa and onednn:
        return True, f"CPU with native bf16 (AVX512-BF16/AMX; ATen capability {cap})"
    if has_isa:
        return False, f"CPU has bf16 instructions but oneDNN may not use them (ATen capability {cap})"
    return False, f"CPU without native bf16 (ATen capability {cap}; no AVX512-BF16 or AMX)"


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, with the reason in words."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _cpu_bf16()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(dev)
        return bool(ok), f"{name} {'supports' if ok else 'lacks native'} bf16"
    return False, f"{dev.type} device: bf16 autocast not chosen automatically"


def resolve_precision(requested: str, device: str | torch.device) -> Precision:
    """``auto`` | ``fp32`` | ``bf16`` on ``device`` -> :class:`Precision` (see the module doc).

    Raises ``ValueError`` naming ``precision`` for any other value."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return Precision("fp32", requested, "fp32 requested")
    native, why = native_bf16(device)
    if requested == "auto":
        return Precision("bf16" if native else "fp32", requested, f"auto: {why}")
    if not native and torch.device(device).type == "cpu" and "cpu" not in _warned:
        _warned.add("cpu")
        warnings.warn(f"precision bf16 on a {why}: bf16 autocast is emulated there and measured about 20x "
                      f"slower than fp32 (demo preset, 2 AVX2 cores: 1.9 against 41-43 samples/s); "
                      f"use precision auto or fp32", RuntimeWarning, stacklevel=2)
    return Precision("bf16", requested, f"bf16 requested ({why})")


def autocast(precision: Precision | str, device: str | torch.device) -> torch.autocast:
    """``torch.autocast`` for ``precision`` on ``device`` (disabled for fp32)."""
    name = precision.name if isinstance(precision, Precision) else precision
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=name == "bf16")
