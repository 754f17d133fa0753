"""Self- and cross-attention on ``torch.nn.functional.scaled_dot_product_attention``.

Legend: ``b`` batch, ``n`` query tokens, ``m`` context (key) tokens, ``h`` query heads,
``g`` key/value heads (``g`` divides ``h``: multi-query when ``g == 1``), ``d`` head size.
Masks are bool, ``True`` = may attend, broadcastable to ``(b, h, n, m)`` (see ``masks.py``).
A query row with no key it may attend to gets an exact zero output, never NaN.

Kernels: SDPA's fused kernels, except on CPU where explicit matmuls + softmax are faster when
gradients flow through short sequences and in bf16/fp16 (see ``_sdpa``).

Decoding with a ``KVCache`` and no autograd takes a leaner path with the same values: the
fused projection's output stays in its ``(b, n, heads, d)`` layout, queries and keys are
rotated in place by tables built once per call for all layers, keys and values go into the
cache in one copy, and a one-token query reads the cache in one SDPA call with the key mask
as an additive bias built once per call for all layers. ``token_step()`` gives that path for
one token as a plain function with the weights bound once (see ``token_step.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import stochastic
from .kv_cache import KVCache
from .linear import Linear, plain_linear
from .masks import additive_mask, causal_mask, combine_masks
from .norms import make_norm
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_
from .token_step import TokenStep

__all__ = ["attend", "Attention", "CrossAttention"]

# ``enable_gqa`` arrived in torch 2.5; the library supports torch >= 2.4
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


# on CPU, attention with at most this many scores per head runs as explicit matmuls + softmax
# when gradients flow (training)
_CPU_EXPLICIT_MAX_SCORES = 1 << 16


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (``attn_mask`` bool or additive), except on CPU in
    bf16/fp16 (autocast) and, when gradients flow, for short sequences (at most
    ``_CPU_EXPLICIT_MAX_SCORES`` scores per head): there the fused CPU kernel's forward +
    backward is slower than explicit matmuls + softmax (``_explicit_attention``; measured in
    ``benchmarks/train_step.py``); and under ``torch.compile``, which fuses the explicit form
    itself. Without gradients, eagerly (evaluation, embedding, generation), the fused kernel is
    the faster (``benchmarks/embed.py``, ``benchmarks/generate.py``).
    Grouped-query k/v (fewer heads than q) are shared without copies."""
    n, m = q.shape[-2], k.shape[-2]
    if q.device.type == "cpu" and (
        q.dtype in (torch.bfloat16, torch.float16)
        or (n * m <= _CPU_EXPLICIT_MAX_SCORES
            and (q.requires_grad or k.requires_grad or v.requires_grad or torch.compiler.is_compiling()))
    ):
        return _explicit_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=True
        )
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # torch < 2.5
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scores, softmax (in float32) and weighted sum as plain matmuls; the ``r = h / g`` query
    heads of a key/value head are grouped against it, so k/v are never repeated."""
    b, h, n, d = q.shape
    g, m = k.shape[1], k.shape[2]
    r = h // g
    # the group's query rows stacked against its one k/v head: only q (the small side when
    # decoding against a cache) may be copied, never the cached k/v
    scores = ((q * d**-0.5).reshape(b, g, r * n, d) @ k.transpose(-2, -1)).view(b, g, r, n, m)
    if is_causal:
        attn_mask = causal_mask(n, m, q.device)
    if attn_mask is not None:
        mask = attn_mask.unflatten(1, (g, r)) if attn_mask.shape[1] == h else attn_mask.unsqueeze(2)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1) if scores.dtype == torch.float32 else scores.float().softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return (probs.view(b, g, r * n, m) @ v).view(b, h, n, d)


def _mask_parts(mask: torch.Tensor, dtype: torch.dtype, *, read: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A key mask ``(b, 1, 1, m)`` for one query per row as (an additive bias of ``dtype``,
    rows with no key allowed to attend anywhere; the ``(b, 1, 1)`` factor that zeroes those
    rows' outputs, or ``None`` when every row has a key). ``read``: whether the mask's values
    may be read on the host to skip the factor (on CPU, outside compiled or captured steps)."""
    has_key = mask.any(dim=-1, keepdim=True)
    if read and bool(has_key.all()):
        return additive_mask(mask, dtype), None
    return additive_mask(mask | ~has_key, dtype), has_key.reshape(has_key.shape[0], 1, 1).to(dtype)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: tuple | None) -> torch.Tensor:
    """One query per row: q ``(b, h, 1, d)`` (any strides), k/v ``(b, g, m, d)`` ->
    ``(b, 1, h * d)``; ``parts``: ``_mask_parts`` of the key mask, or ``None``. The same values
    as ``attend`` for one query, in one kernel call."""
    b, h, _, d = q.shape
    out = _sdpa(q, k, v, attn_mask=None if parts is None else parts[0]).reshape(b, 1, h * d)
    return out if parts is None or parts[1] is None else out * parts[1]


def _split_heads(qkv: torch.Tensor, n: int, h: int, g: int, d: int,
                 tables: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``(b, h, n, d)`` and keys/values ``(2, b, g, n, d)`` as strided views of the fused
    projection's output ``qkv`` ``(b, n, (h + 2g) d)`` (one call each, instead of slicing,
    viewing and permuting), queries and keys rotated in place by ``tables``
    (``RotaryEmbedding.tables``) when given."""
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    b, big, at = qkv.shape[0], h + 2 * g, qkv.storage_offset()
    q = qkv.as_strided((b, h, n, d), (n * big * d, d, big * d, 1), at)
    kv = qkv.as_strided((2, b, g, n, d), (g * d, n * big * d, d, big * d, 1), at + h * d)  # keys, values
    if tables is not None:  # queries and keys at once (q and kv see it)
        apply_rotary_(qkv.as_strided((b, n, h + g, d), (n * big * d, big * d, d, 1), at), *tables)
    return q, kv


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q ``(b, h, n, d)``, k/v ``(b, g, m, d)`` -> ``(b, h, n, d)``.

    ``causal`` aligns the queries with the last ``n`` keys (correct with a KV cache).
    """
    n, m = q.shape[-2], k.shape[-2]
    if mask is None:
        # fast paths: no mask tensor at all
        use_causal = causal and n > 1
        if use_causal and n != m:
            mask = causal_mask(n, m, q.device)
        else:
            return _sdpa(q, k, v, is_causal=use_causal, dropout_p=dropout_p)
    elif causal and n > 1:  # a single query is the last position: it sees every key
        mask = combine_masks(mask, causal_mask(n, m, q.device))
    # rows that may attend to nothing: attend anywhere (finite), then zero them (no host sync)
    has_key = mask.any(dim=-1, keepdim=True)
    out = _sdpa(q, k, v, attn_mask=mask | ~has_key, dropout_p=dropout_p)
    return out * has_key.to(out.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, rotary positions and
    grouped-query heads (``kv_heads``).

    forward: x ``(b, n, dim)`` -> ``(b, n, dim)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        rotary: bool = True,
        rotary_theta: float = 10000.0,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.dropout = dropout
        self.to_qkv = Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=bias)
        self.to_out = Linear(heads * dim_head, dim, bias=bias)
        self.rotary = RotaryEmbedding(dim_head, theta=rotary_theta) if rotary else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        only_last: int | None = None,
    ) -> torch.Tensor:
        """``mask`` covers all keys (cached + new); ``positions`` ``(n,)`` or ``(b, n)``
        default to the next positions after what ``cache`` holds. ``only_last``: outputs for
        the last ``only_last`` tokens only, ``(b, only_last, dim)`` (every token still serves
        as key/value), e.g. when only a final CLS token is read."""
        b, n, _ = x.shape
        h, g, d = self.heads, self.kv_heads, self.dim_head
        if cache is not None and only_last is None and not torch.is_grad_enabled() and not (self.dropout and stochastic(self)):
            return self._cached(x, causal, mask, positions, cache)
        # split, not slicing: a slice's backward zero-fills the whole tensor once per slice
        qk, v = self.to_qkv(x).view(b, n, h + 2 * g, d).split((h + g, g), dim=2)
        if self.rotary is not None:
            if positions is None:
                start = cache.seq_len(self) if cache is not None else 0
                positions = torch.arange(start, start + n, device=x.device)
            cos, sin = self.rotary(positions)  # b|1 1 n d
            qk = apply_rotary(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # queries and keys at once
        q, k = qk.split((h, g), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(self, k, v)
        if only_last is not None:
            n = only_last
            q = q[:, :, -n:]
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., -n:, :]
        out = attend(q, k, v, causal=causal, mask=mask, dropout_p=self.dropout if stochastic(self) else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def _cached(
        self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """``forward`` with a cache and no autograd (decoding): the same values, fewer kernels.
        The projection's output ``(b, n, H, d)`` (``H = h + 2g`` heads: queries, keys, values)
        is used in place: rotated, then read through strided views."""
        b, n, _ = x.shape
        h, g, d = self.heads, self.kv_heads, self.dim_head
        big = h + 2 * g
        qkv = self.to_qkv(x)
        tables = None
        if self.rotary is not None:
            if positions is None:
                start = cache.seq_len(self)
                positions = torch.arange(start, start + n, device=x.device)
            rotary = self.rotary
            tables = cache.per_call(f"rotary {d} {rotary.theta}", positions, lambda: rotary.tables(positions))
        if torch.compiler.is_compiling():  # functional form: dynamo traces no storage offset, inductor fuses it all
            heads = qkv.view(b, n, big, d)
            qk, v = heads[:, :, : h + g], heads[:, :, h + g:]
            if tables is not None:
                qk = (qk.float() * tables[0] + qk.float().roll(d // 2, -1) * tables[1]).to(qk.dtype)
            q = qk[:, :, :h].transpose(1, 2)
            kv = torch.cat((qk[:, :, h:], v), dim=2).view(b, n, 2, g, d).permute(2, 0, 3, 1, 4)
        else:  # strided views of the projection, one call each, rotated in place
            q, kv = _split_heads(qkv, n, h, g, d, tables)
        k, v = cache.append_kv(self, kv)  # keys and values together: one copy into the cache
        if n == 1 and (mask is None or mask.shape[1] == 1):  # one query: it sees every cached key
            dtype, read = q.dtype, mask is not None and mask.device.type == "cpu" and not cache.static
            parts = None if mask is None else \
                cache.per_call(f"mask {dtype}", mask, lambda: _mask_parts(mask, dtype, read=read))
            return self.to_out(_one_query(q, k, v, parts))
        out = attend(q, k, v, causal=causal, mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def token_step(self) -> Callable[[torch.Tensor, TokenStep], torch.Tensor]:
        """This layer's one-token decoding step as a plain function ``(x (b, 1, dim), step) ->
        (b, 1, dim)``: ``forward`` with the step's cache, positions and mask (no autograd, no
        dropout), the same kernels and values, weights bound once (see ``token_step.py``).
        A subclass, or projections that are not plain linears (an adapter's wrapper), get
        ``forward`` itself."""
        layer = self
        if type(self) is not Attention or not plain_linear(self.to_qkv, self.to_out) or \
                not (self.rotary is None or type(self.rotary) is RotaryEmbedding):
            return lambda x, s: layer(x, causal=True, mask=s.mask, positions=s.positions, cache=s.cache)
        w, bias, w_out, b_out = self.to_qkv.weight, self.to_qkv.bias, self.to_out.weight, self.to_out.bias
        h, g, d, rotary = self.heads, self.kv_heads, self.dim_head, self.rotary

        def step(x: torch.Tensor, s: TokenStep) -> torch.Tensor:
            qkv = F.linear(x, w, bias)
            q, kv = _split_heads(qkv, 1, h, g, d, None if rotary is None else s.tables(rotary))
            k, v = s.cache.append_kv(layer, kv)
            return F.linear(_one_query(q, k, v, s.parts(q.dtype, _mask_parts)), w_out, b_out)

        return step


class CrossAttention(nn.Module):
    """Queries from ``x`` ``(b, n, dim)``, keys/values from ``context`` ``(b, m, context_dim)``.

    ``context_mask``: ``(b, m)`` (key padding) or ``(b, n, m)`` (per query, e.g. Flamingo's
    media masking). With a ``cache`` the context keys/values are projected once.
    Keys/values with fewer rows ``b'`` than ``x`` (``b'`` divides ``b``) are shared: rows
    ``i * b / b'`` to ``(i + 1) * b / b' - 1`` read row ``i`` (beam search keeps one copy of each
    image's keys/values in the cache, read once per step for all its beams).
    ``x`` with one row and a context with ``b`` rows: the same queries for every row (learned
    queries, as in a pooler), projected once.
    ``bias``: biases in the projections; ``norm_bias``: a bias in the context norm.
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        norm_context: bool = False,
        norm: str = "layernorm",
        bias: bool = False,
        norm_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got {kv_heads}")
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.dropout = dropout
        self.context_norm = make_norm(norm, context_dim, bias=norm_bias) if norm_context else nn.Identity()
        self.to_q = Linear(dim, heads * dim_head, bias=bias)
        self.to_kv = Linear(context_dim, 2 * kv_heads * dim_head, bias=bias)
        self.to_out = Linear(heads * dim_head, dim, bias=bias)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context ``(b, m, context_dim)`` -> k, v ``(b, g, m, d)``."""
        b, m, _ = context.shape
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        g, d = self.kv_heads, self.dim_head
        # contiguous per head: a cache keeps them, and every decoding step multiplies by them
        return k.view(b, m, g, d).transpose(1, 2).contiguous(), v.view(b, m, g, d).transpose(1, 2).contiguous()

    def token_step(self) -> Callable[[torch.Tensor, torch.Tensor, TokenStep], torch.Tensor]:
        """The one-token decoding step as a plain function ``(x (b, 1, dim), context, step) ->
        (b, 1, dim)``: ``forward`` with the step's cache and no context mask, weights bound once
        (rows that share an image's keys/values, as beams do, go through ``forward``; so does
        everything for a subclass or projections that are not plain linears)."""
        layer = self
        if type(self) is not CrossAttention or not plain_linear(self.to_q, self.to_out):
            return lambda x, context, s: layer(x, context, cache=s.cache)
        w_q, b_q, w_out, b_out = self.to_q.weight, self.to_q.bias, self.to_out.weight, self.to_out.bias
        h, d = self.heads, self.dim_head

        def step(x: torch.Tensor, context: torch.Tensor, s: TokenStep) -> torch.Tensor:
            k, v = s.cache.cross(layer, lambda: layer.project_context(context))
            b = x.shape[0]
            if k.shape[0] != b:
                return layer(x, context, cache=s.cache)
            q = F.linear(x, w_q, b_q).view(b, 1, h, d).transpose(1, 2)
            return F.linear(_one_query(q, k, v, None), w_out, b_out)

        return step

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        if cache is not None and n == 1 and context_mask is None and not torch.is_grad_enabled() \
                and not (self.dropout and stochastic(self)):
            k, v = cache.cross(self, lambda: self.project_context(context))
            if k.shape[0] == b:  # one query per row against its own image (beams share: below)
                return self.to_out(_one_query(self.to_q(x).view(b, 1, h, d).transpose(1, 2), k, v, None))
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        if b == 1 and context.shape[0] > 1 and cache is None:  # shared queries
            b = context.shape[0]
            q = q.expand(b, -1, -1, -1)
        if cache is not None:
            k, v = cache.cross(self, lambda: self.project_context(context))
        else:
            k, v = self.project_context(context)
        shared = k.shape[0]
        if shared != b:  # groups of rows share keys/values: the group's queries go in together
            if shared < 1 or b % shared:
                raise ValueError(f"context: expected a batch dividing the text's {b} rows, got {shared}")
            group = b // shared
            q = q.view(shared, group, h, n, d).transpose(1, 2).reshape(shared, h, group * n, d)
            if context_mask is not None and context_mask.shape[0] == b:  # per row -> per group
                m = context_mask.shape[-1]
                per_query = context_mask[:, None, :] if context_mask.ndim == 2 else context_mask
                context_mask = per_query.expand(b, n, m).reshape(shared, group * n, m)
            elif context_mask is not None and context_mask.ndim == 3:  # per image, per query
                m = context_mask.shape[-1]
                context_mask = context_mask[:, None].expand(shared, group, n, m).reshape(shared, group * n, m)
        mask = None
        if context_mask is not None:
            mask = context_mask[:, None, None, :] if context_mask.ndim == 2 else context_mask[:, None]
        out = attend(q, k, v, mask=mask, dropout_p=self.dropout if stochastic(self) else 0.0)
        if shared != b:
            out = out.view(shared, h, b // shared, n, d).transpose(1, 2).reshape(b, h, n, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
