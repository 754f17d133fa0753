"""One-token decoding steps as plain functions: what a cached decoding step runs in eager mode.

A decoding step after the prompt takes one token per row against a ``KVCache``, without
autograd or dropout. At decoder sizes such a step is dispatch-bound on a CPU: its kernels are
small and most of its time is Python, and a good part of that is ``nn.Module.__call__`` (about
60 module calls per step in a 4-layer MaMMUT, each a few microseconds of hook checks) and
attribute look-ups of parameters. So each decoder block can give its step as a plain function
(``block.token_step()``): the same arithmetic as the block's ``forward`` with a cache (same
kernels, same order, the same values), with its weights bound once as local variables and no
module calls inside. A model builds these functions once per ``KVCache`` (per ``generate``
call) through :func:`token_plan`, and runs them for every token after the prompt.

The plain functions are only used where they cannot differ from the modules: no forward hooks
or pre-hooks on any module of the model (nor global ones: then the modules run, hooks and
all), and not while ``torch.compile`` traces (it fuses the module path itself).

``TokenStep`` carries what every layer of one step shares: the cache, the rotary tables of
the step's positions and the additive form of the key mask, each computed on first use and
then reused by the other layers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules import module as _module

from .dropout import stochastic
from .kv_cache import KVCache

__all__ = ["TokenStep", "token_plan", "run_token_plan", "has_hooks"]


class TokenStep:
    """The inputs every layer of one single-token decoding step shares: ``cache``, the
    step's ``positions`` ``(b, 1)`` and key ``mask`` ``(b, 1, 1, m)`` bool or ``None``
    (every cached key may be attended)."""

    __slots__ = ("cache", "positions", "mask", "_tables", "_parts")

    def __init__(self, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.cache, self.positions, self.mask = cache, positions, mask
        self._tables: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}
        self._parts: dict[torch.dtype, Any] = {}

    def tables(self, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary.tables(positions)``, once per step for every layer of the same head size."""
        key = (rotary.dim_head, rotary.theta)
        found = self._tables.get(key)
        if found is None:
            found = self._tables[key] = rotary.tables(self.positions)
        return found

    def parts(self, dtype: torch.dtype, compute: Callable[..., Any]) -> Any:
        """``compute(mask, dtype, read=...)`` (the additive key mask of ``attention._mask_parts``),
        once per step and dtype; ``None`` without a mask."""
        if self.mask is None:
            return None
        found = self._parts.get(dtype)
        if found is None:
            read = self.mask.device.type == "cpu" and not self.cache.static
            found = self._parts[dtype] = compute(self.mask, dtype, read=read)
        return found


def has_hooks(model: nn.Module) -> bool:
    """Whether any forward hook or pre-hook would run in a module call of ``model``: global
    ones, or one registered on ``model`` or any of its modules."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def token_plan(model: nn.Module, cache: KVCache | None, text: torch.Tensor, build: Callable[[], Any]) -> Any:
    """The model's step functions (``build()``, a list per layer, built once per ``cache``)
    when this decoder call is a step they can run: one token per row against a non-empty
    cache, no autograd, no dropout acting on ``model``, no hooks anywhere in it, not under
    ``torch.compile``; else ``None`` (run the modules)."""
    if cache is None or text.shape[1] != 1 or len(cache) == 0 or torch.is_grad_enabled() or stochastic(model) \
            or torch.compiler.is_compiling():
        return None
    if model not in cache.plans:
        cache.plans[model] = None if has_hooks(model) else build()
    return cache.plans[model]


def run_token_plan(plan: list[tuple[Any, Any]], x: torch.Tensor, context: Any, s: TokenStep) -> torch.Tensor:
    """Run a plan of ``(self-attention step, cross-attention step or None)`` per layer."""
    for block, cross in plan:
        x = block(x, s)
        if cross is not None:
            x = cross(x, context, s)
    return x
