"""The one-token decoding step as plain functions (``mammut.layers.token_step``): the same
values as the modules, bit for bit, for every block kind a decoder uses; the modules (and their
hooks) whenever a hook is registered; never under autograd or acting dropout."""

import pytest
import torch

from mammut import MaMMUT
from mammut.generation import generate
from mammut.layers import KVCache
from mammut.layers import token_step as ts

from test_generation import BOS, EOS, VIT, VOCAB, build, inputs, sharpen

CONFIGS = {
    "parallel swiglu rotary": {},
    "sequential gelu learned positions, bias": dict(block="sequential", activation="gelu", positions="learned",
                                                    max_text_len=32, bias=True, cross_attend_layers=(1, 3)),
    "sequential, no feed-forward in cross layers' self block": dict(
        block="sequential", activation="quickgelu", cross_attend_layers=(2,), cross_self_ff=False),
    "grouped-query, rmsnorm": dict(kv_heads=1, heads=4, dim_head=8, norm="rmsnorm"),
}


def mammut(**kw):
    torch.manual_seed(0)
    base = dict(num_tokens=VOCAB, dim=32, depth=3, heads=2, dim_head=16, bos_id=BOS, eos_id=EOS, vit=VIT)
    return sharpen(MaMMUT(**{**base, **kw})).eval()


def steps(model, plans: bool, n: int = 6):
    """Per-step decoder states of a cached decode (a padded prompt, then ``n`` single
    tokens); ``plans=False`` forces the modules through a no-op hook."""
    handle = None if plans else model.register_forward_hook(lambda *a: None)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    prompt = torch.randint(4, VOCAB, (2, 3), generator=g)
    prompt[1, 0] = 0  # left pad on one row: the key mask is used
    keep = prompt != 0
    out = []
    with torch.inference_mode():
        context = model.image_context(images)
        cache = KVCache()
        pos = keep.long().cumsum(1) - 1
        model.decode_hidden(prompt, context, keep=keep, positions=pos.clamp(min=0), cache=cache)
        last = pos[:, -1:]
        for i in range(n):
            token = torch.randint(4, VOCAB, (2, 1), generator=g)
            keep = torch.cat((keep, torch.ones(2, 1, dtype=torch.bool)), dim=1)
            last = last + 1
            out.append(model.decode_hidden(token, context, keep=keep, positions=last, cache=cache))
        used = cache.plans.get(model) is not None
    if handle is not None:
        handle.remove()
    return out, used


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_functions_equal_the_modules_bitwise(name):
    model = mammut(**CONFIGS[name])
    fast, used = steps(model, plans=True)
    slow, used_slow = steps(model, plans=False)
    assert used and not used_slow
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mammut", "mammut_gqa_attnpool", "coca", "coca_open_clip_style", "flamingo"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generate_gives_the_same_tokens_and_scores_either_way(kind, strategy):
    """Rows ending at eos (they leave the batch), beams sharing an image's keys/values (the
    cross-attention step hands those to the module), padded prompts."""
    model = build(kind)
    images, prompts = inputs(kind)
    kw = dict(max_new_tokens=8, strategy=strategy, num_beams=3, return_scores=True)
    fast = generate(model, images, prompts, **kw)
    handle = model.register_forward_pre_hook(lambda *a: None)
    slow = generate(model, images, prompts, **kw)
    handle.remove()
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.scores, slow.scores)


def test_hooks_run_on_every_step():
    model = mammut()
    calls = []
    handle = model.layers[1].block.register_forward_hook(lambda *a: calls.append(1))
    images = torch.randn(2, 3, 32, 32)
    generate(model, images, max_new_tokens=5, min_new_tokens=5)
    handle.remove()
    assert len(calls) == 5  # the prompt and every later step went through the module
    calls.clear()
    generate(model, images, max_new_tokens=5, min_new_tokens=5)
    assert calls == []  # no hook left: the step functions


def test_a_global_hook_also_keeps_the_modules():
    model = mammut()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert ts.has_hooks(model)
        generate(model, torch.randn(1, 3, 32, 32), max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    assert seen.count("ParallelBlock") == 3 * len(model.layers)
    assert not ts.has_hooks(model)


def test_no_plan_under_autograd_or_acting_dropout_or_for_a_prompt():
    model = mammut()
    cache = KVCache()
    text = torch.randint(4, VOCAB, (2, 1))
    build = lambda: ["plan"]  # noqa: E731
    assert ts.token_plan(model, cache, text, build) is None  # empty cache: the prompt
    cache.plans.clear()
    cache._cross[model] = (torch.zeros(1), torch.zeros(1))  # something cached
    with torch.no_grad():
        assert ts.token_plan(model, cache, torch.randint(4, VOCAB, (2, 2)), build) is None  # two tokens
        model.train()
        assert ts.token_plan(model, cache, text, build) is None  # dropout would act
        from mammut.layers import no_dropout

        with no_dropout():
            assert ts.token_plan(model, cache, text, build) == ["plan"]
        model.eval()
    assert ts.token_plan(model, cache, text, build) is None  # autograd on
    with torch.no_grad():
        assert ts.token_plan(model, cache, text, build) == ["plan"]  # built once per cache


class _Adapter(torch.nn.Module):
    """A LoRA-style wrapper: the base linear plus a low-rank update, with a forward of its own."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight  # what a wrapper exposing its base weight looks like
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("part", ["self q/k/v", "cross query", "feed-forward", "norm"])
def test_replaced_parts_keep_their_own_forward(part):
    """An adapter around a projection (or torch's own LayerNorm in place of mammut's) is run
    as a module: its forward counts, never just the weight it exposes."""
    model = mammut()
    base, _ = steps(model, plans=True)
    layer = model.layers[0]
    if part == "self q/k/v":
        layer.block.attn.to_qkv = _Adapter(layer.block.attn.to_qkv)
    elif part == "cross query":
        layer.cross.attn.to_q = _Adapter(layer.cross.attn.to_q)
    elif part == "feed-forward":
        layer.block.ff.proj_out = _Adapter(layer.block.ff.proj_out)
    else:
        norm = torch.nn.LayerNorm(model.config.dim, elementwise_affine=True, bias=False)
        with torch.no_grad():
            norm.weight.mul_(2.0)
        layer.block.norm = norm
    fast, used = steps(model, plans=True)
    slow, _ = steps(model, plans=False)
    assert used
    assert not torch.equal(fast[-1], base[-1])  # the replacement changed the output ...
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)  # ... the same way on both paths


def test_the_benchmarks_hand_fused_bound_decodes_what_generate_does(monkeypatch):
    """``benchmarks/decode_bound.py``'s bound is only a bound if it computes the same step:
    its greedy tokens equal ``generate``'s (kept from rotting between benchmark runs)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_bound

    model = mammut(depth=4, cross_attend_every=2)
    with torch.inference_mode():
        context = model.image_context(torch.randn(2, 3, 32, 32))
        prompt = torch.randint(4, VOCAB, (2, 2))
        expected = model.generate(context=context, prompt=prompt, max_new_tokens=12, min_new_tokens=12)
        fused = decode_bound.Fused(model, context, capacity=14)
        assert torch.equal(fused.generate(prompt, 12), expected)
