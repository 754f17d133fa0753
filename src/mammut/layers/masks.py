"""Boolean attention masks. Convention: ``True`` = may attend.

Masks broadcast to ``(b, heads, q, k)``; a model builds one per forward and hands it to
every layer, so no layer rebuilds it.
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "padding_mask", "combine_masks", "is_right_padded", "positions_from_mask", "decoder_mask", "additive_mask"]


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """``(1, 1, q, k)``: query i (the last ``q_len`` of ``k_len`` positions) sees keys <= itself."""
    offset = k_len - q_len
    q = torch.arange(q_len, device=device).unsqueeze(-1) + offset
    k = torch.arange(k_len, device=device)
    return (k <= q)[None, None]


def padding_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep: ``(b, k)`` bool, ``True`` for real tokens -> ``(b, 1, 1, k)``."""
    if keep.dtype != torch.bool:
        raise TypeError(f"keep: expected a bool tensor, got {keep.dtype}")
    return keep[:, None, None, :]


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Logical AND of the given masks (``None`` entries are ignored)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else out & m
    return out


def is_right_padded(keep: torch.Tensor) -> bool:
    """True when every row is real tokens followed only by padding."""
    if keep.shape[-1] < 2:
        return True
    return bool((keep[:, 1:] <= keep[:, :-1]).all())


def positions_from_mask(keep: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: left padding does not shift a row. ``(b, n)``."""
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


def decoder_mask(keep: torch.Tensor, *, cache: object = None) -> torch.Tensor | None:
    """Key-padding mask for a causal decoder, or ``None`` where causality alone suffices:
    no padding at all, or right padding without a cache (pads come after every real token).
    keep: ``(b, cached + n)`` bool over the whole sequence so far; ``cache``: the step's
    ``KVCache`` or ``None``. A static cache (``cache.static``) always gets the mask, without
    looking at ``keep``'s values: its shapes, not its contents, decide (compiled steps). So
    does any cache off the CPU: reading ``keep`` there would wait for the device at every
    step (the mask of an all-real ``keep`` changes no value)."""
    if getattr(cache, "static", False) or (cache is not None and keep.device.type != "cpu"):
        return padding_mask(keep)
    if bool(keep.all()) or (cache is None and is_right_padded(keep)):
        return None
    return padding_mask(keep)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask (``True`` = may attend) as a bias to add to attention scores: 0 where
    allowed, ``-inf`` elsewhere (same shape)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
