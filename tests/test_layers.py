import pytest
import torch
import torch.nn.functional as F

from mammut.layers import (
    Attention, AttentionPooler, CrossAttention, FeedForward, KVCache, ParallelBlock,
    attend, causal_mask, masked_mean, padding_mask,
)


def reference_attention(q, k, v, mask):
    """Plain softmax attention; rows with no allowed key give zero."""
    h, g = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // g, 1)
    v = v.repeat_interleave(h // g, 1)
    sim = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    sim = sim.masked_fill(~mask, float("-inf"))
    attn = sim.softmax(-1).nan_to_num(0.0)
    return attn @ v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attend_matches_reference_with_causal_and_padding(kv_heads):
    b, h, n, d = 2, 4, 7, 8
    q = torch.randn(b, h, n, d)
    k, v = torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 4:] = False
    mask = padding_mask(keep) & causal_mask(n, n)
    out = attend(q, k, v, causal=True, mask=padding_mask(keep))
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_attend_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 2, 1] = True
    out = attend(q, k, v, mask=mask)
    assert torch.isfinite(out).all()
    assert out[0, :, :2].abs().max() == 0
    torch.testing.assert_close(out[0, :, 2], v[0, :, 1])


def test_causal_attention_never_looks_ahead():
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(1, 6, 16)
    y = attn(x, causal=True)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y2 = attn(x2, causal=True)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_padding_keys_never_attended():
    attn = Attention(16, heads=2, dim_head=8)
    keep = torch.tensor([[True, True, True, False, False]])
    x = torch.randn(1, 5, 16)
    y = attn(x, mask=padding_mask(keep))
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 2, 16)
    y2 = attn(x2, mask=padding_mask(keep))
    torch.testing.assert_close(y[:, :3], y2[:, :3])


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_kv_cache_matches_full_causal_pass(kv_heads):
    block = ParallelBlock(32, heads=4, dim_head=8, kv_heads=kv_heads)
    x = torch.randn(2, 9, 32)
    full = block(x, causal=True)
    cache = KVCache()
    steps = [block(x[:, :4], causal=True, cache=cache)]  # a prompt, then one token at a time
    for t in range(4, 9):
        steps.append(block(x[:, t : t + 1], causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len(block.attn) == 9


def test_cross_attention_kv_computed_once_with_cache():
    xattn = CrossAttention(16, context_dim=12, heads=2, dim_head=8, norm_context=True)
    ctx = torch.randn(2, 5, 12)
    cache = KVCache()
    calls = []
    orig = xattn.project_context
    xattn.project_context = lambda c: calls.append(1) or orig(c)
    a = xattn(torch.randn(2, 1, 16), ctx, cache=cache)
    b = xattn(torch.randn(2, 1, 16), ctx, cache=cache)
    assert len(calls) == 1 and a.shape == b.shape == (2, 1, 16)


def test_cross_attention_key_mask():
    xattn = CrossAttention(16, heads=2, dim_head=8)
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    keep = torch.tensor([[True, True, False, False]])
    y = xattn(x, ctx, context_mask=keep)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = 5.0
    torch.testing.assert_close(y, xattn(x, ctx2, context_mask=keep))


def test_rotary_is_relative():
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(1, 4, 16)
    y = attn(x, positions=torch.arange(4))
    y_shift = attn(x, positions=torch.arange(4) + 11)
    torch.testing.assert_close(y, y_shift, atol=1e-5, rtol=1e-5)


def test_swiglu_and_gelu_feedforward_shapes():
    for act in ("swiglu", "gelu"):
        assert FeedForward(8, mult=2, activation=act)(torch.randn(3, 5, 8)).shape == (3, 5, 8)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, activation="relu6")


def test_attention_pooler_and_masked_mean():
    pool = AttentionPooler(16, num_queries=3, context_dim=10, heads=2, dim_head=8)
    assert pool(torch.randn(2, 7, 10)).shape == (2, 3, 16)
    x = torch.randn(2, 4, 3)
    keep = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(masked_mean(x, keep)[0], x[0, :2].mean(0))
    torch.testing.assert_close(masked_mean(x, keep)[1], x[1].mean(0))


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        Attention(16, heads=4, dim_head=4, kv_heads=3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_only_last_equals_the_full_block_sliced(causal, padded):
    torch.manual_seed(0)
    block = ParallelBlock(16, heads=4, dim_head=4, kv_heads=2)
    x = torch.randn(3, 7, 16)
    keep = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        keep[0, 2:5] = False  # padding inside, the last token real (a CLS after padded text)
    mask = padding_mask(keep) if padded else None
    positions = torch.arange(7).expand(3, 7)
    full = block(x, causal=causal, mask=mask, positions=positions)
    for last in (1, 3):
        part = block(x, causal=causal, mask=mask, positions=positions, only_last=last)
        assert part.shape == (3, last, 16)
        torch.testing.assert_close(part, full[:, -last:])


def test_pooler_projects_its_queries_once_and_equals_per_row_queries():
    torch.manual_seed(0)
    pool = AttentionPooler(16, num_queries=5, context_dim=12, heads=2, dim_head=8)
    tokens, keep = torch.randn(3, 6, 12), torch.rand(3, 6) > 0.3
    keep[:, 0] = True
    seen = []
    pool.attn.to_q.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = pool(tokens, keep)
    assert seen == [(1, 5, 16)]
    per_row = pool.norm(pool.attn(pool.queries.expand(3, -1, -1), tokens, context_mask=keep))
    torch.testing.assert_close(out, per_row)


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "keys", "per_query", "per_head"])
def test_both_attention_kernels_match_reference(monkeypatch, explicit, kv_heads, mask_kind):
    """CPU runs short attention as explicit matmuls and long attention through SDPA: both
    agree with the reference for every mask shape, grouped heads and n != m."""
    import mammut.layers.attention as A

    monkeypatch.setattr(A, "_CPU_EXPLICIT_MAX_SCORES", 1 << 30 if explicit else 0)
    g = torch.Generator().manual_seed(0)
    b, h, n, m, d = 2, 4, 3, 6, 8
    q = torch.randn(b, h, n, d, generator=g, requires_grad=True)
    k, v = torch.randn(b, kv_heads, m, d, generator=g), torch.randn(b, kv_heads, m, d, generator=g)
    full = torch.ones(b, h, n, m, dtype=torch.bool)
    causal, mask = False, None
    if mask_kind == "causal":
        causal, full = True, full & causal_mask(n, m)
    elif mask_kind == "keys":
        mask = torch.rand(b, 1, 1, m, generator=g) > 0.4
    elif mask_kind == "per_query":
        mask = torch.rand(b, 1, n, m, generator=g) > 0.4
    elif mask_kind == "per_head":
        mask = torch.rand(b, h, n, m, generator=g) > 0.4
    if mask is not None:
        full = full & mask
    out = attend(q, k, v, causal=causal, mask=mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, full))
    (grad,) = torch.autograd.grad(out.sum(), q)
    (want,) = torch.autograd.grad(reference_attention(q, k, v, full).sum(), q)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("shape", [(1, 12), (4, 1, 12), (2, 4, 12), (3, 3, 12), (0, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(shape, bias):
    """``Linear`` keeps nn.Linear's state dict and equals F.linear in values and gradients
    for any number of rows."""
    from mammut.layers import Linear

    torch.manual_seed(0)
    layer = Linear(12, 7, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    if x.numel():
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, (x, layer.weight), g), torch.autograd.grad(ref, (x, layer.weight), g))


def test_linear_keeps_autocast_dtypes():
    from mammut.layers import Linear

    layer = Linear(12, 7, bias=True)
    x = torch.randn(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_decoder_mask_only_where_causality_is_not_enough():
    from mammut.layers import decoder_mask

    full = torch.ones(2, 4, dtype=torch.bool)
    right = torch.tensor([[True, True, False, False], [True, True, True, True]])
    left = torch.tensor([[False, True, True, True], [True, True, True, True]])
    from mammut.layers import KVCache, StaticKVCache

    cache = KVCache()
    assert decoder_mask(full, cache=cache) is None and decoder_mask(full) is None
    assert decoder_mask(right) is None  # pads come after every real token
    for keep, c in ((right, cache), (left, None), (left, cache)):
        torch.testing.assert_close(decoder_mask(keep, cache=c), padding_mask(keep))
    # a static cache always gets the mask: its steps must not depend on keep's values
    for keep in (full, right, left):
        torch.testing.assert_close(decoder_mask(keep, cache=StaticKVCache(8)), padding_mask(keep))
