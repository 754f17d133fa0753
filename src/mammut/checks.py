"""Input checks that the models and generation share (torch only): clear errors before any
heavy compute. Model-specific checks live in ``mammut.models._checks``, which re-exports these.
"""

from __future__ import annotations

import torch

__all__ = ["check_finite"]


def check_finite(name: str, x: object, what: str = "values") -> None:
    """A float tensor ``x`` must hold only finite numbers: ``ValueError`` naming ``name`` and
    counting the NaN and inf entries otherwise. One host sync (counts only on the error path);
    anything that is not a float tensor is left to the type checks."""
    if not torch.is_tensor(x) or not (x.is_floating_point() or x.is_complex()):
        return
    if bool(torch.isfinite(x).all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = x.numel() - nan - int(torch.isfinite(x).sum())
    raise ValueError(f"{name}: expected finite {what}, got {nan} NaN and {inf} inf")
