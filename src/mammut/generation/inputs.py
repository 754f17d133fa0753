"""What ``generate`` takes in, checked and put in shape before any compute: prompts (a
padded tensor or a list of rows of any lengths) turned into left-padded ids and a real-token
mask, and the image context's batch (a tensor, or a tuple / list / dict of them) selected row
by row. Every check here runs once per ``generate`` call, never per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["Context", "PromptLike", "select_context", "context_batch", "context_tensors", "prompt_rows", "prepare_prompt"]

Context = Any  # a tensor, or a tuple / list / dict of them (batch as dim 0), or None
PromptLike = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]] | None


def select_context(context: Context, index: torch.Tensor) -> Context:
    """``index_select(0, index)`` on every tensor in ``context`` (tensor, tuple, list, dict
    or ``None``; other leaves are returned unchanged)."""
    if context is None:
        return None
    if torch.is_tensor(context):
        return context.index_select(0, index)
    if isinstance(context, Mapping):
        return type(context)((k, select_context(v, index)) for k, v in context.items())
    if isinstance(context, tuple):
        items = [select_context(v, index) for v in context]
        return type(context)(*items) if hasattr(context, "_fields") else tuple(items)
    if isinstance(context, list):
        return [select_context(v, index) for v in context]
    return context


def context_batch(context: Context) -> int | None:
    """Batch size of a context: dim 0 of its first tensor."""
    if torch.is_tensor(context):
        return context.shape[0] if context.ndim else None
    values = context.values() if isinstance(context, Mapping) else context if isinstance(context, (tuple, list)) else ()
    for v in values:
        size = context_batch(v)
        if size is not None:
            return size
    return None


def context_tensors(context: Context) -> list[torch.Tensor]:
    """Every tensor in ``context`` (tensor, tuple, list, dict, nested)."""
    if torch.is_tensor(context):
        return [context]
    values = context.values() if isinstance(context, Mapping) else context if isinstance(context, (tuple, list)) else ()
    return [t for v in values for t in context_tensors(v)]


def _is_int_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def prompt_rows(prompt: PromptLike, pad_id: int) -> list[torch.Tensor] | list[list[int]]:
    """Real token ids of each prompt row: 1-D long tensors (tensor prompts, CPU or not) or
    lists of ints (list prompts)."""
    if torch.is_tensor(prompt):
        if prompt.ndim != 2 or not _is_int_tensor(prompt):
            raise ValueError(f"prompt: expected an integer tensor (batch, length), got {prompt.dtype} of shape {tuple(prompt.shape)}")
        if prompt.shape[1] == 0:
            raise ValueError(f"prompt: expected at least one token per row, got shape {tuple(prompt.shape)}")
        keep = prompt != pad_id
        left = bool((keep[:, 1:] >= keep[:, :-1]).all())  # pads, then tokens
        right = bool((keep[:, 1:] <= keep[:, :-1]).all())  # tokens, then pads
        if not (left or right):
            raise ValueError(f"prompt: expected rows padded with pad_id={pad_id} on one side only (right, as a tokenizer gives), "
                             "got pad_id between real tokens")
        return [row[k] for row, k in zip(prompt.long(), keep)]
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise TypeError(f"prompt: expected a LongTensor (batch, length), a list of 1-D tensors or a list of id lists, got {type(prompt).__name__}")
    rows: list[Any] = []
    for i, row in enumerate(prompt):
        if torch.is_tensor(row):
            if row.ndim != 1 or not _is_int_tensor(row):
                raise ValueError(f"prompt: row {i}: expected a 1-D integer tensor, got {row.dtype} of shape {tuple(row.shape)}")
            rows.append(row.long())
        elif isinstance(row, Sequence) and not isinstance(row, (str, bytes)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            rows.append(list(row))
        else:
            raise TypeError(f"prompt: row {i}: expected a 1-D integer tensor or a list of ints, got {type(row).__name__}")
    return rows


def prepare_prompt(
    prompt: PromptLike, batch: int, *, pad_id: int, bos_id: int | None, num_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids ``(b, p)`` left-padded with ``pad_id`` and keep ``(b, p)`` (True = real token).
    Token ids are checked here, with one host read for all tensor rows together."""
    if prompt is None:
        if bos_id is None:
            raise ValueError("prompt: no prompt given and model.config.bos_id is None; pass prompt= (e.g. the start token) "
                             "or set bos_id in the model config")
        ids = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    rows = prompt_rows(prompt, pad_id)
    if len(rows) != batch:
        raise ValueError(f"prompt: expected {batch} rows (one per image), got {len(rows)}")
    lengths = [len(row) for row in rows]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt: row {i} has no real token (only pad_id={pad_id}, or empty)")
    tensors = [i for i, row in enumerate(rows) if torch.is_tensor(row)]
    # min, max and pad count of every tensor row in one host read
    stats = torch.stack([torch.stack((rows[i].min(), rows[i].max(), (rows[i] == pad_id).sum())) for i in tensors]).tolist() \
        if tensors else []
    checks = dict(zip(tensors, stats))
    for i, row in enumerate(rows):
        lo, hi, pads = checks[i] if i in checks else (min(row), max(row), sum(t == pad_id for t in row))
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"prompt: row {i}: expected token ids in [0, {num_tokens}) (num_tokens), got values in [{lo}, {hi}]")
        if pads:
            raise ValueError(f"prompt: row {i} holds pad_id={pad_id} as a real token")
    width = max(lengths)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    keep = torch.zeros(batch, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        n = lengths[i]
        ids[i, width - n:] = row.cpu() if torch.is_tensor(row) else torch.tensor(row, dtype=torch.long)
        keep[i, width - n:] = True
    return ids.to(device), keep.to(device)
