"""The generation package's contract and its fast paths: ``GenerationConfig``, the per-model
compiled step, the KV cache's buffers, the decoding step without host reads (what a CUDA graph
captures), rotary tables, one-query attention, bf16 weights. CUDA-marked tests at the end run
on a GPU machine only (``pytest -m cuda``)."""

import gc
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mammut.generation import GenerationConfig, GenerationOutput, caption, generate
from mammut.layers import KVCache, StaticKVCache, apply_rotary
from mammut.layers.rotary import RotaryEmbedding, apply_rotary_

from test_generation import KINDS, MEDIA, VOCAB, build, inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------- GenerationConfig
def test_config_and_keywords_are_the_same_call():
    model = build("mammut")
    images, prompts = inputs("mammut")
    cfg = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5, return_scores=True)
    by_config = generate(model, images, prompts, cfg)
    by_keywords = generate(model, images, prompts, strategy="beam", num_beams=3, max_new_tokens=5, return_scores=True)
    assert isinstance(by_config, GenerationOutput)
    assert torch.equal(by_config.tokens, by_keywords.tokens)
    torch.testing.assert_close(by_config.scores, by_keywords.scores)
    # keywords override the config's fields; the config itself is left as it was
    longer = generate(model, images, prompts, config=cfg, max_new_tokens=7, eos_id=None)
    assert longer.tokens.shape[1] == 7 and cfg.max_new_tokens == 5
    assert torch.equal(model.generate(images, prompts, config=cfg).tokens, by_config.tokens)


def test_unknown_keywords_are_an_error_naming_them():
    model = build("mammut")
    images, prompts = inputs("mammut")
    with pytest.raises(TypeError, match=r"max_new_token'.*GenerationConfig"):
        generate(model, images, prompts, max_new_token=5)
    with pytest.raises(TypeError, match="config: expected a GenerationConfig"):
        generate(model, images, prompts, config=dict(max_new_tokens=5))


@pytest.mark.skipif("flamingo" not in KINDS, reason="needs mammut.models.flamingo")
def test_image_context_keywords_still_pass_through():
    model = build("flamingo")
    images, prompts = inputs("flamingo")
    time_mask = torch.ones(images.shape[0], 1, dtype=torch.bool)
    with_mask = generate(model, images, prompts, max_new_tokens=4, time_mask=time_mask)
    assert torch.equal(with_mask, generate(model, images, prompts, max_new_tokens=4))
    with pytest.raises(TypeError, match="time_masks"):
        generate(model, images, prompts, max_new_tokens=4, time_masks=time_mask)


@pytest.mark.parametrize("kw, name, error", [
    (dict(max_new_tokens=0), "max_new_tokens", ValueError), (dict(top_p=2.0), "top_p", ValueError),
    (dict(strategy="nucleus"), "strategy", ValueError), (dict(temperature=math.nan), "temperature", ValueError),
    (dict(eos_id=-1), "eos_id", ValueError), (dict(use_cache=1), "use_cache", TypeError),
    (dict(early_stopping="yes"), "early_stopping", TypeError), (dict(cuda_graph="auto"), "cuda_graph", TypeError),
    (dict(compile=True, use_cache=False), "use_cache=True", ValueError),
    (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens", ValueError),
])
def test_config_checks_its_fields_when_built(kw, name, error):
    with pytest.raises(error, match=name):
        GenerationConfig(**kw)


def test_config_is_frozen_and_caption_refuses_scores_through_it():
    cfg = GenerationConfig()
    with pytest.raises(AttributeError):
        cfg.max_new_tokens = 3  # type: ignore[misc]

    class Tok:
        def decode(self, ids):
            return [str(row) for row in ids.tolist()]

    model = build("mammut")
    images, prompts = inputs("mammut")
    with pytest.raises(ValueError, match="return_scores"):
        caption(model, images, Tok(), prompt=prompts, config=GenerationConfig(return_scores=True))


def test_cuda_graph_needs_a_cuda_model():
    model = build("mammut")
    images, prompts = inputs("mammut")
    with pytest.raises(ValueError, match="cuda_graph: needs a model on a CUDA device"):
        generate(model, images, prompts, cuda_graph=True)


# ------------------------------------------------------------------------- the compiled step, per model
def test_compiled_step_is_held_per_model_and_goes_with_it():
    from mammut.generation import batch, compiled

    a, b = build("mammut"), build("mammut")
    fn = batch.step_function(a)
    step = compiled.compiled_step(a, fn)
    assert compiled.compiled_step(a, fn) is step  # made once per model (torch.compile is lazy: nothing compiles here)
    assert compiled.compiled_step(b, fn) is not step
    assert a in compiled._COMPILED and b in compiled._COMPILED
    del a, step
    gc.collect()
    assert len(compiled._COMPILED) == 1  # the entry went with its model


def test_logits_of_the_last_position_only_equal_decode():
    from mammut.generation import batch

    model = build("mammut")
    assert batch.step_function(model) is batch._hidden_last

    class Overridden(type(model)):
        def decode(self, text, context=None, **kw):  # a decoder with its own decode keeps it
            return super().decode(text, context, **kw)

    model.__class__ = Overridden
    assert batch.step_function(model) is batch.decode_last
    text = torch.randint(4, VOCAB, (3, 5))
    keep = torch.ones_like(text, dtype=torch.bool)
    context = model.image_context(inputs("mammut")[0])
    positions = torch.arange(5).expand(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(batch._hidden_last(model, text, context, keep, positions, None),
                                   batch.decode_last(model, text, context, keep, positions, None))


# ------------------------------------------------------------------------- no host read inside a step
class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_static_steps_never_read_the_device(kind, strategy, monkeypatch):
    """What a CUDA graph captures (every step after the prompt with a static cache) holds no
    host read: no argument check, no data-dependent branch (CoCa's learned positions and
    Flamingo's media count included)."""
    from mammut.generation import api, batch

    model = build(kind)
    images, prompts = inputs(kind)
    steps: list[list[str]] = []
    real = batch.step_function(model)

    def spy(model, text, *args):
        if text.shape[1] > 1:  # the prompt: checked like any input
            return real(model, text, *args)
        with _Ops() as ops:
            out = real(model, text, *args)
        steps.append(ops.names)
        return out

    monkeypatch.setattr(api, "step_function", lambda model: spy)
    generate(model, images, prompts, max_new_tokens=5, strategy=strategy, num_beams=2, static_cache=True, eos_id=None)
    assert len(steps) == 4
    for names in steps:
        assert not HOST_READS & set(names), sorted(HOST_READS & set(names))


@pytest.mark.skipif("coca" not in KINDS, reason="needs mammut.models.coca")
def test_learned_positions_past_the_table_are_an_error_naming_max_new_tokens():
    model = build("coca_open_clip_style")  # 77 learned positions
    images, _ = inputs("coca_open_clip_style", b=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (70,), generator=g), torch.randint(4, VOCAB, (2,), generator=g)]
    assert model.decode_positions() == 77
    assert generate(model, images, prompts, max_new_tokens=8, eos_id=None).shape == (2, 8)  # positions 0 .. 76
    for static in (False, True):
        with pytest.raises(ValueError, match="max_new_tokens: a row reaches position 77"):
            generate(model, images, prompts, max_new_tokens=9, eos_id=None, static_cache=static)


# ------------------------------------------------------------------------- cache buffers
def test_kv_cache_reserves_once_and_grows_by_doubling_without_a_reserve():
    layer = torch.nn.Linear(1, 1)
    k = torch.randn(2, 1, 3, 4)
    reserved = KVCache(reserve=10)
    reserved.append(layer, k, k)
    first = reserved._self[layer].buf.data_ptr()
    for _ in range(7):
        step = torch.randn(2, 1, 1, 4)
        out_k, out_v = reserved.append(layer, step, -step)
    assert reserved._self[layer].buf.data_ptr() == first and reserved.seq_len(layer) == 10
    torch.testing.assert_close(out_k[:, :, -1:], step)
    torch.testing.assert_close(out_v[:, :, -1:], -step)
    torch.testing.assert_close(out_k[:, :, :3], k)
    growing = KVCache()
    growing.append(layer, k, k)
    for i in range(20):
        growing.append(layer, torch.full((2, 1, 1, 4), float(i)), torch.zeros(2, 1, 1, 4))
    kk, _ = growing.append(layer, torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    assert kk.shape == (2, 1, 24, 4) and growing._self[layer].buf.shape[-2] >= 24
    torch.testing.assert_close(kk[0, 0, 3:23, 0], torch.arange(20.0))
    with pytest.raises(ValueError, match="reserve"):
        KVCache(reserve=0)


def test_per_call_values_are_shared_within_a_call_only():
    cache, key, calls = KVCache(), torch.zeros(1), []

    def compute():
        calls.append(1)
        return len(calls)

    assert cache.per_call("x", key, compute) == 1 and cache.per_call("x", key, compute) == 2  # no call begun: no sharing
    cache.begin_call()
    assert cache.per_call("x", key, compute) == 3 and cache.per_call("x", key, compute) == 3
    assert cache.per_call("x", torch.zeros(1), compute) == 4  # another key object
    cache.begin_call()
    assert cache.per_call("x", key, compute) == 5


def test_static_cache_reorders_in_place_and_restores_state():
    layer = torch.nn.Linear(1, 1)
    cache = StaticKVCache(8, stable=True)
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    cache.append(layer, k, -k)
    cache.set_state("count", torch.tensor([1, 2]))
    buf, state = cache._self[layer].buf, cache.state["count"]
    cache.reorder(torch.tensor([1, 0]), cross=False)
    assert cache._self[layer].buf is buf and cache.state["count"] is state  # same tensors, same addresses
    torch.testing.assert_close(buf[0, :, :, :3], k.flip(0))
    assert cache.state["count"].tolist() == [2, 1]
    saved = cache.snapshot()
    cache.set_state("count", torch.tensor([7, 7]))
    assert cache.state["count"] is state and state.tolist() == [7, 7]
    cache.restore(saved)
    assert state.tolist() == [2, 1]
    cache.at(3)
    index = cache.index
    cache.at(4)
    assert cache.index is index and int(index) == 4  # the column lives in one tensor
    unstable = StaticKVCache(8)  # without CUDA graphs a reorder makes new buffers (one copy, not two)
    unstable.append(layer, k, -k)
    buf = unstable._self[layer].buf
    unstable.reorder(torch.tensor([1, 0]), cross=False)
    assert unstable._self[layer].buf is not buf
    torch.testing.assert_close(unstable._self[layer].buf[0, :, :, :3], k.flip(0))


# ------------------------------------------------------------------------- layers
def test_rotary_tables_rotate_as_apply_rotary_bitwise():
    rot = RotaryEmbedding(16)
    positions = torch.tensor([[0, 3, 7], [2, 5, 900]])
    t = torch.randn(2, 3, 5, 16)  # (b, n, heads, d)
    cos, sin = rot(positions)
    want = apply_rotary(t, cos.transpose(1, 2), sin.transpose(1, 2))
    got = t.clone()
    apply_rotary_(got, *rot.tables(positions))
    assert torch.equal(got, want)
    half = t.to(torch.bfloat16)
    got = half.clone()
    apply_rotary_(got, *rot.tables(positions))
    assert torch.equal(got, apply_rotary(half, cos.transpose(1, 2), sin.transpose(1, 2)))


def test_bf16_model_keeps_rotary_frequencies_in_float32():
    model = build("mammut").to(torch.bfloat16)
    rotary = model.layers[0].block.attn.rotary
    assert rotary.inv_freq.dtype == rotary.sign.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, RotaryEmbedding(rotary.dim_head).inv_freq, atol=0, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_query_attention_equals_attend(kv_heads):
    from mammut.layers import attend
    from mammut.layers.attention import _mask_parts, _one_query

    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 8)
    k, v = torch.randn(3, kv_heads, 6, 8), torch.randn(3, kv_heads, 6, 8)
    mask = torch.tensor([[True] * 6, [False, True, False, True, True, False], [False] * 6])[:, None, None, :]
    for m in (None, mask):
        want = attend(q, k, v, mask=m).transpose(1, 2).reshape(3, 1, 32)
        for read in (False, True):
            got = _one_query(q, k, v, None if m is None else _mask_parts(m, q.dtype, read=read))
            torch.testing.assert_close(got, want)
    assert bool((got[2] == 0).all())  # a row with no key: exactly zero


def test_attention_without_gradients_equals_the_training_kernel():
    """No-grad attention on CPU takes SDPA's fused kernel; with gradients, explicit matmuls:
    the same values."""
    from mammut.layers import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 9, 9) > 0.3
    for causal, m in ((True, None), (False, mask), (True, mask)):
        with torch.no_grad():
            fused = attend(q, k, v, causal=causal, mask=m)
        explicit = attend(q.requires_grad_(), k, v, causal=causal, mask=m)
        q.requires_grad_(False)
        torch.testing.assert_close(fused, explicit.detach())


# ------------------------------------------------------------------------- bf16 weights
def test_bf16_weights_decode_on_cpu():
    model = build("mammut")
    images, prompts = inputs("mammut")
    ref = generate(model, images, prompts, max_new_tokens=8, eos_id=None)
    half = build("mammut").to(torch.bfloat16)
    out = generate(half, images.to(torch.bfloat16), prompts, max_new_tokens=8, eos_id=None, return_scores=True)
    assert out.tokens.shape == ref.shape and out.tokens.dtype == torch.long and out.scores.dtype == torch.float32
    assert (out.tokens == ref).float().mean() > 0.5  # a sharpened model: mostly the fp32 tokens
    static = generate(half, images.to(torch.bfloat16), prompts, max_new_tokens=8, eos_id=None, static_cache=True)
    assert static.shape == ref.shape


# ------------------------------------------------------------------------- CUDA (a GPU machine)
def _cuda(kind):
    return build(kind).cuda()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_steps_give_the_eager_tokens(kind):
    model = _cuda(kind)
    images, prompts = inputs(kind)
    images = images.cuda()
    eos = int(generate(model, images, prompts, max_new_tokens=4, eos_id=None)[0, 1])
    for kw in (dict(eos_id=eos), dict(eos_id=None, repetition_penalty=1.3),
               dict(strategy="beam", num_beams=3, eos_id=eos), dict(strategy="beam", num_beams=3, eos_id=None)):
        eager = generate(model, images, prompts, max_new_tokens=8, return_scores=True, **kw)
        for extra in (dict(cuda_graph=True), dict(compile=True)):
            graphed = generate(model, images, prompts, max_new_tokens=8, return_scores=True, **kw, **extra)
            assert torch.equal(graphed.tokens, eager.tokens), (kind, kw, extra)
            torch.testing.assert_close(graphed.scores, eager.scores, atol=1e-4, rtol=0)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replays_the_flamingo_media_count():
    model = _cuda("flamingo")
    images, prompts = inputs("flamingo")
    images = images.cuda()
    model.config.media_token_id = MEDIA
    kw = dict(max_new_tokens=10, eos_id=None, strategy="beam", num_beams=4)
    assert torch.equal(generate(model, images, prompts, cuda_graph=True, **kw), generate(model, images, prompts, **kw))


@pytest.mark.cuda
@needs_cuda
def test_bf16_cuda_graph_decoding_matches_bf16_eager():
    model = _cuda("mammut").to(torch.bfloat16)
    images, prompts = inputs("mammut")
    images = images.cuda().to(torch.bfloat16)
    eager = generate(model, images, prompts, max_new_tokens=8, eos_id=None)
    graphed = generate(model, images, prompts, max_new_tokens=8, eos_id=None, cuda_graph=True)
    assert graphed.shape == eager.shape
    assert (graphed == eager).float().mean() > 0.9  # bf16 rounds differently with a longer (masked) key axis


@pytest.mark.cuda
@needs_cuda
def test_decoding_step_uses_fused_sdpa_on_cuda():
    from torch.profiler import ProfilerActivity, profile

    model = _cuda("mammut")
    images, prompts = inputs("mammut")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, images.cuda(), prompts, max_new_tokens=3, eos_id=None)
    names = {e.name for e in prof.events()}
    assert any("flash" in n or "efficient" in n or "cudnn" in n for n in names if "scaled_dot_product" in n), \
        sorted(n for n in names if "scaled_dot_product" in n)
