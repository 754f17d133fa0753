"""When mammut's training-time randomness acts: dropout, attention dropout, ViT patch dropout
and cropped positional embeddings.

They act when their module is in train mode (``module.training``), as in PyTorch, unless the
calling thread is inside ``no_dropout()``. ``mammut.generation.generate`` (hence ``caption``)
decodes inside it: a model left in train mode, even one that another thread is training at
the same time, generates exactly what it generates in eval mode, and generation never calls
``.train()`` / ``.eval()`` nor changes any module attribute.

The switch is a ``contextvars.ContextVar``: it belongs to the thread (or asyncio task) that
set it, never to the model. ``torch.compile`` guards on it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dropout", "no_dropout", "dropout_enabled", "stochastic"]

_NO_DROPOUT: contextvars.ContextVar[bool] = contextvars.ContextVar("mammut_no_dropout", default=False)


@contextmanager
def no_dropout() -> Iterator[None]:
    """Inside this context, in this thread only, every mammut module behaves as in eval mode
    where it would otherwise act at random (dropout, attention dropout, patch dropout, cropped
    positional embeddings), whatever its ``training`` flag. Nothing is changed on any module."""
    token = _NO_DROPOUT.set(True)
    try:
        yield
    finally:
        _NO_DROPOUT.reset(token)


def dropout_enabled() -> bool:
    """False inside ``no_dropout()`` (in the calling thread), True otherwise."""
    return not _NO_DROPOUT.get()


def stochastic(module: nn.Module) -> bool:
    """Whether ``module``'s training-time randomness acts now: ``module.training`` and not
    inside ``no_dropout()``."""
    return module.training and not _NO_DROPOUT.get()


class Dropout(nn.Dropout):
    """``nn.Dropout`` that also stands down inside ``no_dropout()`` (same parameters, same
    state dict: none)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Dropout's name
        if self.p == 0.0 or not stochastic(self):
            return input  # identity: no kernel call (decoding steps are dispatch-bound)
        return F.dropout(input, self.p, True, self.inplace)
