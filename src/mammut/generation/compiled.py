"""Compiled decoding steps: ``torch.compile`` of the step, held per model, and CUDA graphs of
the step.

``compile=True`` runs every step after the prompt through ``torch.compile(dynamic=False)``
(static cache: one shape for all of them). The compiled step belongs to the model: a
``WeakKeyDictionary`` keyed by the model holds it (gone with the model), and each model's step
is a function of its own, so dynamo's per-function limit of graphs
(``torch._dynamo.config.recompile_limit``, default 8: batch sizes x capacities) counts per
model, not across every model of the process.

CUDA graphs (on CUDA, with ``compile=True`` by default, or ``cuda_graph=True``): the step is
captured once per ``generate`` call, at its first single-token step, and replayed for every
later token, so a step costs a few small input copies and one graph launch instead of a few
hundred kernel launches from Python. An explicit ``torch.cuda.CUDAGraph`` rather than
``torch.compile(mode="reduce-overhead")``, because what the step reads and writes besides its
inputs is per call: the cache's buffers (written in place), the cross-attention keys/values of
this call's images, a model's per-row state (Flamingo's media count). reduce-overhead would
need every such buffer marked as a static address and would re-record silently whenever a new
call brings new addresses, and its warm-up runs would advance per-row state twice; here
warm-up is one run on a side stream with that state saved and restored, capture is explicit
(``capture_error_mode="thread_local"``, so other threads using the GPU are not disturbed), and
a step that cannot be captured (a host sync in a third-party decoder) is an error that says
to pass ``cuda_graph=False``. The graph is captured around the compiled step when
``compile=True`` (fused kernels, replayed) and around the eager step otherwise.
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from typing import Any

import torch
from torch import nn

from ..layers.kv_cache import StaticKVCache
from .batch import StepFn

__all__ = ["compiled_step", "GraphedStep"]

logger = logging.getLogger(__name__)

_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict[Any, StepFn]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _own_function(fn: Any, model: nn.Module) -> Any:
    """A copy of ``fn`` with a code object of its own (dynamo keeps its graphs per code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{type(model).__name__}_{id(model):x}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compiled_step(model: nn.Module, fn: StepFn) -> StepFn:
    """``fn`` through ``torch.compile(dynamic=False)``, created once per model and ``fn``
    (dynamo then keeps one graph per batch size and cache capacity)."""
    with _LOCK:
        steps = _COMPILED.setdefault(model, {})
        step = steps.get(fn)
        if step is None:
            logger.info("generate: compile=True, the decoding step compiles on its first call (seconds to a minute)")
            step = steps[fn] = torch.compile(_own_function(fn, model), dynamic=False)
    return step


class GraphedStep:
    """A decoding step (``fn``, eager or compiled) replayed as a CUDA graph. Captured on its
    first call, over that call's static cache; later calls copy ``text``, ``keep`` and
    ``positions`` into the captured inputs and replay. Lives for one ``generate`` call."""

    def __init__(self, fn: StepFn) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, model: nn.Module, text: torch.Tensor, context: Any, keep: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> torch.Tensor:
        if self.graph is None:
            return self._capture(model, text, context, keep, positions, cache)
        for mine, new in zip(self.inputs, (text, keep, positions)):  # type: ignore[arg-type]
            mine.copy_(new)
        self.graph.replay()
        return self.out  # type: ignore[return-value]

    def _capture(self, model: nn.Module, text: torch.Tensor, context: Any, keep: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> torch.Tensor:
        if not isinstance(cache, StaticKVCache) or not cache.stable or text.device.type != "cuda":
            raise ValueError("cuda_graph: needs a static cache with stable buffers (StaticKVCache(stable=True)) on a CUDA device")
        self.inputs = (text.clone(), keep.clone(), positions.clone())
        args = (model, self.inputs[0], context, self.inputs[1], self.inputs[2], cache)
        device = text.device
        saved = cache.snapshot()  # per-row state a warm-up run advances (cache columns are rewritten alike)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.fn(*args)  # warm-up: lazy initialisation, compilation
        torch.cuda.current_stream(device).wait_stream(side)
        cache.restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self.fn(*args)
        except RuntimeError as err:
            raise RuntimeError(
                "cuda_graph: capturing the decoding step as a CUDA graph failed (does the model's decode step read a "
                "value back to the host?); generate with cuda_graph=False"
            ) from err
        self.graph = graph
        graph.replay()  # capture records, it does not run: this is the step itself
        return self.out  # type: ignore[return-value]
