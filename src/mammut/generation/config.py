"""``GenerationConfig``: every decoding option in one frozen dataclass, checked when it is
built (a bad value is an error naming the field), plus the merge of keyword arguments into it
(``generate(model, images, max_new_tokens=8)`` and ``generate(model, images, config=cfg,
max_new_tokens=8)`` alike) and its resolution against a model's config (eos, pad, bos)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = ["GenerationConfig", "GenerationOutput", "STRATEGIES", "STATIC_ROUND", "merge_config", "Resolved", "resolve"]

STRATEGIES = ("greedy", "beam", "sample")
STATIC_ROUND = 64  # a static cache's capacity is a multiple of this


class GenerationOutput(NamedTuple):
    """What ``generate(..., return_scores=True)`` returns.

    tokens ``(b, n)`` new ids, ``pad_id`` after each row's eos; scores ``(b,)`` sequence
    scores (summed log-probabilities over ``length ** length_penalty``); token_scores
    ``(b, n)`` per-token log-probabilities (0 at padding); logits ``(b, n, v)`` the raw model
    logits of every step (``return_logits=True``, greedy and sampling only; 0 at padding),
    else ``None``.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    token_scores: torch.Tensor
    logits: torch.Tensor | None = None


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def _float(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_token(name: str, value: object, num_tokens: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_tokens:
        raise ValueError(f"{name}: expected a token id in [0, {num_tokens}) (num_tokens), got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """How ``mammut.generation.generate`` decodes. Every field is also a keyword of
    ``generate`` (keywords override the fields of a ``config=`` given with them).

    max_new_tokens, min_new_tokens: at most / at least this many new tokens per row (eos is
        banned before ``min_new_tokens``).
    strategy: ``"greedy"``, ``"beam"`` or ``"sample"``.
    num_beams, length_penalty, early_stopping: beam search; ``early_stopping=True`` stops an
        image once it has ``num_beams`` finished hypotheses, ``False`` once no running beam can
        beat them. A sequence's score is its summed log-probability over
        ``length ** length_penalty`` (every strategy).
    temperature, top_k, top_p: sampling only.
    repetition_penalty: > 1 discourages tokens already in the prompt or the output (CTRL).
    eos_id, pad_id: ``None`` takes the model config's; with no eos every row runs to
        ``max_new_tokens``.
    use_cache: ``False`` re-runs the whole sequence at every step (for testing; same result).
    static_cache: every step after the prompt has the same shapes (a ``StaticKVCache``).
    compile: run that step through ``torch.compile`` (implies ``static_cache``).
    cuda_graph: replay the step as a CUDA graph (``None``: with ``compile=True`` on CUDA;
        ``True`` also without compiling; needs a static cache, implied).
    return_scores, return_logits: return a ``GenerationOutput`` instead of the ids
        (``return_logits``: greedy and sampling only).
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    strategy: str = "greedy"
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_id: int | None = None
    pad_id: int | None = None
    use_cache: bool = True
    static_cache: bool = False
    compile: bool = False
    cuda_graph: bool | None = None
    return_scores: bool = False
    return_logits: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens: expected at most max_new_tokens={self.max_new_tokens}, got {self.min_new_tokens}")
        _int("num_beams", self.num_beams, 1)
        for name, positive in (("length_penalty", False), ("temperature", True), ("repetition_penalty", True)):
            object.__setattr__(self, name, _float(name, getattr(self, name), positive=positive))
        if self.top_k is not None:
            _int("top_k", self.top_k, 1)
        top_p = self.top_p
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        for name in ("eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: expected a token id (an integer >= 0) or None, got {value!r}")
        for name in ("early_stopping", "use_cache", "static_cache", "compile", "return_scores", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool or None, got {type(self.cuda_graph).__name__}")
        if (self.static_cache or self.compile or self.cuda_graph) and not self.use_cache:
            raise ValueError("static_cache / compile / cuda_graph: need use_cache=True (they change how the cache is kept)")
        if self.strategy == "beam" and self.return_logits:
            raise ValueError("return_logits: not available with strategy='beam' (use 'greedy' or 'sample')")

    @property
    def static(self) -> bool:
        """Whether steps after the prompt keep one shape (static cache)."""
        return self.static_cache or self.compile or bool(self.cuda_graph)


FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationConfig))


def merge_config(config: GenerationConfig | None, kwargs: dict[str, Any], image_context: Any) -> tuple[GenerationConfig, dict[str, Any]]:
    """Split ``generate``'s keyword arguments into ``GenerationConfig`` fields (applied over
    ``config``) and arguments of ``image_context`` (e.g. Flamingo's ``time_mask``); any other
    keyword is a ``TypeError`` naming it."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config: expected a GenerationConfig or None, got {type(config).__name__}")
    fields = {k: v for k, v in kwargs.items() if k in FIELDS}
    rest = {k: v for k, v in kwargs.items() if k not in FIELDS}
    if rest:
        accepted = _keyword_names(image_context)
        unknown = [] if accepted is None else sorted(k for k in rest if k not in accepted)
        if unknown:
            owner = getattr(image_context, "__qualname__", "image_context")
            raise TypeError(
                f"generate: unknown keyword argument(s) {unknown}: neither GenerationConfig fields nor arguments "
                f"of {owner}"
            )
    base = config if config is not None else GenerationConfig()
    return (dataclasses.replace(base, **fields) if fields else base), rest


def _keyword_names(fn: Any) -> frozenset[str] | None:
    """Keyword parameters ``fn`` accepts besides ``images`` / ``image_tokens`` (which
    ``generate`` passes itself); ``None`` when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: let it decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in ok) - {"images", "image_tokens", "self"}


class Resolved(NamedTuple):
    """The model-dependent values of a config, checked against the vocabulary."""

    eos_id: int | None
    pad_id: int
    bos_id: int | None
    num_tokens: int


def resolve(config: GenerationConfig, model_config: Any, *, need_bos: bool) -> Resolved:
    num_tokens = int(model_config.num_tokens)
    eos_id = model_config.eos_id if config.eos_id is None else config.eos_id
    if eos_id is not None:
        eos_id = check_token("eos_id", eos_id, num_tokens)
    pad_id = check_token("pad_id", model_config.pad_id if config.pad_id is None else config.pad_id, num_tokens)
    bos_id = getattr(model_config, "bos_id", None)
    if need_bos and bos_id is not None:
        bos_id = check_token("bos_id", bos_id, num_tokens)
    return Resolved(eos_id, pad_id, bos_id, num_tokens)
