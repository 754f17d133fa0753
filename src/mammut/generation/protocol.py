"""The decoder protocol, as typing Protocols: what ``generate`` needs of a model.

They live here, below the models (which import the generation package), and
:mod:`mammut.models.contract` re-exports them beside the other sides of the model contract.
Both are ``@runtime_checkable``: ``isinstance(model, Decoder)`` is how ``generate`` decides, so
any object with these members is accepted, a mammut model or not.

Legend: ``b`` batch, ``n`` new tokens, ``v`` vocabulary.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Decoder", "PositionBounded", "protocol_members", "missing_members"]


@runtime_checkable
class Decoder(Protocol):
    """A text decoder reading an image context (MaMMUT, CoCa, FlamingoPaLM).

    ``config`` has ``num_tokens``, ``pad_id``, ``eos_id`` (may be None) and ``bos_id`` (needed
    without a prompt)."""

    config: Any

    def image_context(self, images: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None) -> Any:
        """What the decoder reads, from pixels or precomputed encoder tokens (exactly one), encoded once
        (e.g. ``(b, m, d)``; FlamingoPaLM: perceived media and their time mask)."""
        ...

    def decode(self, text: torch.Tensor, context: Any = None, *, keep: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """Logits ``(b, n, v)`` of the new tokens ``text`` ``(b, n)``; ``keep`` ``(b, cached + n)``
        marks real tokens over the whole sequence so far, ``positions`` ``(b, n)`` count the real
        tokens before each, ``cache`` (a ``KVCache``) holds what came before and is appended to."""
        ...


@runtime_checkable
class PositionBounded(Protocol):
    """A decoder that can embed only so many positions (learned position tables)."""

    def decode_positions(self) -> int | None:
        """How many positions the decoder can embed (``None``: no limit); ``generate`` checks
        decoding against it so that the model's cached steps need not read positions back."""
        ...


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The public members a Protocol asks for (methods, properties and attributes), its bases' included."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base is Protocol or not getattr(base, "_is_protocol", False):
            continue
        names.update(n for n in (*vars(base), *getattr(base, "__annotations__", {})) if not n.startswith("_"))
    return tuple(sorted(names))


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (for error messages: ``isinstance`` decides)."""
    return [name for name in protocol_members(protocol) if not hasattr(obj, name)]
