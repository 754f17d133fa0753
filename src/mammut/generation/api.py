"""``generate`` and ``caption``: arguments checked once, the image encoded once, then the
decoding loop of the chosen strategy (``loop.py``, ``beam.py``) over the ``DecodeRows``."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

from ..layers.dropout import Dropout, no_dropout
from .. import checks as _checks
from . import compiled
from .batch import DecodeRows, step_function
from .beam import beam_search
from .config import GenerationConfig, GenerationOutput, merge_config, resolve
from .inputs import Context, PromptLike, context_batch, context_tensors, prepare_prompt
from .loop import Processor, greedy_or_sample
from .protocol import Decoder, PositionBounded, missing_members

__all__ = ["generate", "caption"]

logger = logging.getLogger(__name__)


def generate(
    model: nn.Module,
    images: torch.Tensor | None = None,
    prompt: PromptLike = None,
    config: GenerationConfig | None = None,
    *,
    image_tokens: torch.Tensor | None = None,
    context: Context = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerationOutput:
    """Generate up to ``max_new_tokens`` new tokens per image with ``model`` (any decoder
    following the decoder protocol, see the package docstring).

    Inputs (exactly one): ``images`` (whatever ``model.image_context`` takes, batch first),
    ``image_tokens`` (precomputed encoder tokens) or ``context`` (the output of
    ``model.image_context``).

    prompt: ``None`` (start from ``model.config.bos_id``), a LongTensor ``(b, p)`` padded with
        ``pad_id`` (right-padded as a tokenizer gives; left-padded works too), or a list of
        ``b`` 1-D tensors / id lists of any lengths. Taken verbatim (add a start token
        yourself if the model expects one); the output holds only the new tokens.
    config: a ``GenerationConfig`` (strategy, lengths, eos / pad, cache, compile, outputs);
        its fields are also accepted as keywords, which override it. Other keywords go to
        ``model.image_context`` when it takes them (e.g. Flamingo's ``time_mask``); any other
        keyword is a ``TypeError`` naming it.
    generator: a ``torch.Generator`` for reproducible sampling.

    Returns new token ids ``(b, n)``, ``n <= max_new_tokens`` (the longest row), rows
    right-padded with ``pad_id`` after their eos; with ``return_scores`` / ``return_logits`` a
    ``GenerationOutput``.

    Train / eval mode: ``generate`` never calls ``.train()`` / ``.eval()`` and changes no
    module state, so it is safe on a model that other threads use (e.g. one being trained).
    It always decodes without dropout: mammut's dropout, attention dropout, ViT patch dropout
    and cropped positional embeddings stand down inside ``mammut.layers.no_dropout()``, a
    switch local to the calling thread, so a model in train mode generates exactly what it
    generates in eval mode, while a training step in another thread keeps its dropout.
    Modules that are not mammut's (a timm / Hugging Face / vit-pytorch encoder, ``nn.Dropout``
    or ``nn.BatchNorm`` of your own) cannot be switched that way: if any is in train mode it
    keeps its train-mode behaviour and ``generate`` logs a warning naming it (once per model);
    call ``model.eval()`` first for deterministic captions from such a model.

    Inputs are checked once, before any compute (never inside the per-token step): NaN or inf
    ``images`` / ``image_tokens`` / ``context`` are a ``ValueError`` naming the argument and
    counting the bad values.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"model: expected a decoder following the decoder protocol, {type(model).__name__} lacks "
                        f"{missing_members(model, Decoder)}")
    cfg, image_kwargs = merge_config(config, kwargs, model.image_context)
    ids_cfg = resolve(cfg, model.config, need_bos=prompt is None)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if cfg.strategy != "sample" and (cfg.temperature != 1.0 or cfg.top_k is not None or cfg.top_p is not None):
        logger.warning("generate: temperature / top_k / top_p only apply to strategy='sample'; ignored for %r", cfg.strategy)
    given = [name for name, x in (("images", images), ("image_tokens", image_tokens), ("context", context)) if x is not None]
    if len(given) != 1:
        raise ValueError(f"images / image_tokens / context: expected exactly one of them, got {given or 'none'}")
    if context is not None and image_kwargs:
        raise ValueError(f"{sorted(image_kwargs)}: image_context arguments given with a precomputed context=")
    source = images if images is not None else image_tokens if image_tokens is not None else context
    batch = context_batch(source)
    if batch is None or batch < 1:
        raise ValueError(f"{given[0]}: expected a batch-first tensor (or tuple/dict of them) with at least one row")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    graphs = cfg.cuda_graph if cfg.cuda_graph is not None else cfg.compile and device.type == "cuda"
    if graphs and device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a model on a CUDA device, this one is on {device.type}")
    ids, keep = prepare_prompt(prompt, batch, pad_id=ids_cfg.pad_id, bos_id=ids_cfg.bos_id,
                               num_tokens=ids_cfg.num_tokens, device=device)
    limit = _position_limit(model, keep, cfg.max_new_tokens)

    if context is not None:  # images / image_tokens are checked by model.image_context
        for tensor in context_tensors(context):
            _checks.check_finite("context", tensor)
    _warn_outside_no_dropout(model)

    # the model's mode is left alone (other threads may be training it): mammut's dropout,
    # attention dropout and patch dropout stand down in this thread only (see the docstring)
    with no_dropout(), torch.inference_mode():
        if context is None:  # NaN / inf pixels or tokens: a ValueError here, once, not per step
            context = model.image_context(images=images, **image_kwargs) if images is not None else \
                model.image_context(image_tokens=image_tokens, **image_kwargs)
        first = step_function(model)
        step = compiled.compiled_step(model, first) if cfg.compile else first
        if graphs:
            step = compiled.GraphedStep(step)
        rows = DecodeRows(ids, keep, context, max_new=cfg.max_new_tokens, pad_id=ids_cfg.pad_id, vocab=ids_cfg.num_tokens,
                     track_seen=cfg.repetition_penalty != 1.0, use_cache=cfg.use_cache, static=cfg.static, first=first,
                     step=step, keep_logits=cfg.return_logits, position_limit=limit, stash=cfg.strategy != "beam",
                     stable=graphs)
        proc = Processor(cfg, eos_id=ids_cfg.eos_id, pad_id=ids_cfg.pad_id, vocab=ids_cfg.num_tokens, device=device)
        if cfg.strategy == "beam":
            out = beam_search(model, rows, proc, cfg, eos_id=ids_cfg.eos_id)
        else:
            out = greedy_or_sample(model, rows, proc, cfg, eos_id=ids_cfg.eos_id, generator=generator)
    return out if (cfg.return_scores or cfg.return_logits) else out.tokens


def _position_limit(model: nn.Module, keep: torch.Tensor, max_new: int) -> int | None:
    """The decoder's position limit (``model.decode_positions()``, e.g. learned positions)
    when some row could reach it: then the loop checks live rows before each step; else
    ``None`` (the common case: no check, no host read)."""
    limit = model.decode_positions() if isinstance(model, PositionBounded) else None
    if limit is None:
        return None
    longest = int(keep.sum(dim=1).max())  # real prompt tokens; the model checks the prompt itself
    return limit if longest + max_new - 1 > limit else None


# torch.nn modules whose forward depends on train mode (no_dropout() cannot reach them)
_TORCH_MODE_DEPENDENT = (
    nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.MultiheadAttention, nn.RNNBase,
)
_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _outside_no_dropout(model: nn.Module) -> list[str]:
    """Names of the modules in train mode that may still act at random (or update running
    statistics) inside ``no_dropout()``: torch.nn dropout / batch norm / ... and any module
    that is neither mammut's nor torch's (its descendants are not listed again)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not module.training or any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(module, Dropout) or any(c.__module__.startswith("mammut.") for c in type(module).__mro__):
            continue  # mammut's (or a subclass of one): no_dropout() reaches it, its children are checked
        if type(module).__module__.startswith("torch."):
            if isinstance(module, _TORCH_MODE_DEPENDENT) and (
                getattr(module, "p", None) or getattr(module, "dropout", None)
                or getattr(module, "track_running_stats", False)
            ):
                found.append(name or type(module).__name__)
            continue
        found.append(name or type(module).__name__)  # a third-party module: its train mode is unknown to us
    return found


def _warn_outside_no_dropout(model: nn.Module) -> None:
    if model in _warned or not any(m.training for m in model.modules()):
        return
    found = _outside_no_dropout(model)
    if found:
        _warned.add(model)
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        logger.warning(
            "generate: %s is in train mode and is not a mammut module, so generation cannot switch its "
            "dropout / batch statistics off without changing the model; call model.eval() first for "
            "deterministic decoding (warned once per model)", shown,
        )


def caption(model: nn.Module, images: torch.Tensor | None, tokenizer: Any, **kwargs: Any) -> list[str]:
    """Captions as strings: ``generate(model, images, **kwargs)`` then ``tokenizer.decode``
    (any object with ``decode(ids (b, n)) -> list[str]``, e.g. ``mammut.tokenizer.Tokenizer``).
    Like ``generate`` it leaves the model's train / eval mode alone and decodes without dropout."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer: expected an object with decode(ids) -> list[str], got {type(tokenizer).__name__}")
    config = kwargs.get("config")
    if kwargs.get("return_scores") or kwargs.get("return_logits") or (
            isinstance(config, GenerationConfig) and (config.return_scores or config.return_logits)):
        raise ValueError("return_scores / return_logits: not available in caption(); call generate()")
    tokens = generate(model, images, **kwargs)
    return list(tokenizer.decode(tokens.cpu()))
