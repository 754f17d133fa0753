"""Generation (mammut.generation) on every decoder that follows the decoder protocol."""

import importlib.util
import shutil

import pytest
import torch

from mammut import MaMMUT
from mammut.generation import generate, select_context
from mammut.layers import CrossAttention

VIT = dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2, dim_head=24)
VOCAB, BOS, EOS, MEDIA = 64, 1, 2, 3


def sharpen(model, scale=10.0):
    """Random init gives near-uniform next-token distributions; scale the (tied) embedding so
    choices are clear-cut and eos actually competes."""
    with torch.no_grad():
        model.token_emb.weight.mul_(scale)
    return model


def build(kind: str):
    torch.manual_seed(0)
    common = dict(num_tokens=VOCAB, dim=32, heads=2, dim_head=16, bos_id=BOS, eos_id=EOS, vit=VIT)
    if kind == "mammut":
        model = MaMMUT(depth=4, cross_attend_every=2, **common)
    elif kind == "mammut_gqa_attnpool":
        model = MaMMUT(depth=3, kv_heads=1, image_pool="attention", num_img_queries=5,
                       **{**common, "heads": 4, "dim_head": 8})
    elif kind == "coca":
        from mammut.models.coca import CoCa

        model = CoCa(unimodal_depth=1, multimodal_depth=2, num_img_queries=6, **common)
    elif kind == "coca_open_clip_style":
        from mammut.models.coca import CoCa

        model = CoCa(unimodal_depth=1, multimodal_depth=1, num_img_queries=6, block="sequential", activation="gelu",
                     positions="learned", bias=True, context_norm=True, tie_embeddings=False, **common)
    else:  # flamingo
        from mammut.models.flamingo import FlamingoPaLM

        model = FlamingoPaLM(depth=2, cross_attn_every=1, media_token_id=MEDIA, perceiver_num_latents=4,
                             perceiver_depth=1, **common)
        with torch.no_grad():  # open the tanh gates so the media matter
            for name, p in model.named_parameters():
                if name.endswith("_gate"):
                    p.fill_(1.0)
    return sharpen(model.eval())


KINDS = ["mammut", "mammut_gqa_attnpool"]
if importlib.util.find_spec("mammut.models.coca") is not None:
    KINDS += ["coca", "coca_open_clip_style"]
if importlib.util.find_spec("mammut.models.flamingo") is not None:
    KINDS += ["flamingo"]


def inputs(kind: str, b: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, 32, 32, generator=g)
    lengths = [1, 4, 2, 3][:b]
    prompts = [torch.randint(4, VOCAB, (n,), generator=g) for n in lengths]
    if kind == "flamingo":
        images = images.unsqueeze(1)  # (b, media, c, h, w)
        prompts = [torch.cat((torch.tensor([MEDIA]), p)) for p in prompts]
    return images, prompts


def right_padded(prompts):
    out = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


# ------------------------------------------------------------------------- cache
@pytest.mark.parametrize("kind", KINDS)
def test_cached_and_uncached_greedy_agree_at_every_step(kind):
    model = build(kind)
    images, prompts = inputs(kind)
    runs = [generate(model, images, prompts, max_new_tokens=8, use_cache=c, return_logits=True, eos_id=None) for c in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].logits.shape == (3, 8, VOCAB)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[0].scores, runs[1].scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_prompts_of_different_lengths_equal_each_row_alone(kind):
    model = build(kind)
    images, prompts = inputs(kind)
    for strategy in ("greedy", "beam"):
        kw = dict(max_new_tokens=6, strategy=strategy, num_beams=3, return_scores=True)
        batched = generate(model, images, right_padded(prompts), **kw)
        listed = generate(model, images, [p.tolist() for p in prompts], **kw)
        assert torch.equal(batched.tokens, listed.tokens)
        for i, p in enumerate(prompts):
            alone = generate(model, images[i:i + 1], [p], **kw)
            n = alone.tokens.shape[1]
            assert torch.equal(batched.tokens[i, :n], alone.tokens[0]), (strategy, i)
            assert bool((batched.tokens[i, n:] == 0).all())
            torch.testing.assert_close(batched.scores[i], alone.scores[0], atol=1e-5, rtol=0)


def test_image_encoded_once_and_cross_kv_projected_once_per_layer(monkeypatch):
    model = build("mammut")
    images, prompts = inputs("mammut")
    calls = {"context": 0, "project": 0, "decode_rows": []}
    image_context, decode, project = model.image_context, model.decode_hidden, CrossAttention.project_context

    def count_context(*a, **kw):
        calls["context"] += 1
        return image_context(*a, **kw)

    def count_decode(text, *a, **kw):
        calls["decode_rows"].append(text.shape)
        return decode(text, *a, **kw)

    def count_project(self, context):
        calls["project"] += 1
        return project(self, context)

    monkeypatch.setattr(model, "image_context", count_context)
    monkeypatch.setattr(model, "decode_hidden", count_decode)
    monkeypatch.setattr(CrossAttention, "project_context", count_project)
    generate(model, images, prompts, strategy="beam", num_beams=4, max_new_tokens=5, eos_id=None)
    assert calls["context"] == 1
    assert calls["project"] == len(model.config.cross_attention_layers())
    # the prompt runs once per image, then one token per beam and step
    assert calls["decode_rows"][0] == (3, 4)
    assert all(shape == (12, 1) for shape in calls["decode_rows"][1:])
    assert len(calls["decode_rows"]) == 5


def test_finished_rows_leave_the_batch(monkeypatch):
    model = build("mammut")
    images, prompts = inputs("mammut")
    first = generate(model, images, prompts, max_new_tokens=6, eos_id=None)
    eos = int(first[1, 2])  # row 1 "ends" at its third token
    rows = []
    decode = model.decode_hidden
    monkeypatch.setattr(model, "decode_hidden", lambda text, *a, **kw: rows.append(text.shape[0]) or decode(text, *a, **kw))
    out = generate(model, images, prompts, max_new_tokens=6, eos_id=eos)
    stop = next(j for j in range(6) if out[1, j] == eos)
    assert out[1, stop + 1:].eq(0).all()
    assert rows[stop + 1] < 3  # the finished row no longer runs
    # the other rows are unchanged by the drop, up to their own eos
    for i in (0, 2):
        m = int((first[i] == eos).nonzero()[0]) + 1 if bool((first[i] == eos).any()) else 6
        assert torch.equal(out[i, :m], first[i, :m])


# ------------------------------------------------------------------------- beams
@pytest.mark.parametrize("kind", KINDS[:3])
def test_beam_search_with_one_beam_equals_greedy(kind):
    model = build(kind)
    images, prompts = inputs(kind)
    greedy = generate(model, images, prompts, max_new_tokens=8, return_scores=True)
    beam = generate(model, images, prompts, strategy="beam", num_beams=1, max_new_tokens=8, return_scores=True)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(greedy.token_scores, beam.token_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("eos", [EOS, None])
def test_beam_search_never_scores_below_greedy(length_penalty, eos):
    model = build("mammut")
    images, prompts = inputs("mammut")
    kw = dict(max_new_tokens=7, eos_id=eos, length_penalty=length_penalty, return_scores=True)
    greedy = generate(model, images, prompts, **kw)
    for early in (True, False):
        beam = generate(model, images, prompts, strategy="beam", num_beams=4, early_stopping=early, **kw)
        assert bool((beam.scores >= greedy.scores - 1e-5).all()), (beam.scores, greedy.scores)
        # the reported score is the sum of the token scores over the length, as for greedy
        lengths = (beam.tokens != 0).sum(1)
        torch.testing.assert_close(beam.scores, beam.token_scores.sum(1) / lengths.float() ** length_penalty)


def test_beam_search_is_exact_when_it_keeps_every_prefix():
    # two new tokens and num_beams = vocab: every first token stays, so beam search must
    # find the best of all vocab**2 continuations (brute force by teacher forcing)
    model = build("mammut")
    images, prompts = inputs("mammut", b=2)
    beam = generate(model, images, prompts, strategy="beam", num_beams=VOCAB, max_new_tokens=2, eos_id=None,
                    length_penalty=0.0, return_scores=True)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            context = model.image_context(images[i:i + 1])
            first = model.decode(p[None], context)[0, -1]
            first[0] = -float("inf")  # pad is never generated
            first = first.log_softmax(-1)
            seqs = torch.cat((p.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]), dim=1)
            second = model.decode(seqs, context.expand(VOCAB, -1, -1))[:, -1]
            second[:, 0] = -float("inf")
            second = second.log_softmax(-1)
            total = first[:, None] + second
            best = total.flatten().argmax()
            assert beam.tokens[i].tolist() == [int(best // VOCAB), int(best % VOCAB)]
            torch.testing.assert_close(beam.scores[i], total.flatten()[best], atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_token_scores_match_teacher_forcing(strategy):
    model = build("mammut")
    images, prompts = inputs("mammut")
    out = generate(model, images, prompts, strategy=strategy, num_beams=3, max_new_tokens=6, return_scores=True)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            n = int((out.tokens[i] != 0).sum())
            seq = torch.cat((p, out.tokens[i, :n]))[None]
            logits = model.decode(seq, model.image_context(images[i:i + 1]))[0]
            logits[:, 0] = -float("inf")
            want = logits[len(p) - 1:-1].log_softmax(-1).gather(1, seq[0, len(p):, None]).squeeze(1)
            torch.testing.assert_close(out.token_scores[i, :n], want, atol=1e-5, rtol=0)


def test_beam_search_cached_equals_uncached():
    model = build("mammut")
    images, prompts = inputs("mammut")
    runs = [generate(model, images, prompts, strategy="beam", num_beams=3, max_new_tokens=6, use_cache=c, return_scores=True)
            for c in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].scores, runs[1].scores, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- static cache, compiled steps
def _eos_hit_early(model, images, prompts):
    """A token greedy decoding produces at step 2 of row 0: as eos, rows finish at different steps."""
    return int(generate(model, images, prompts, max_new_tokens=4, eos_id=None)[0, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_gives_the_dynamic_cache_results(kind):
    """Fixed shapes (full-capacity keys, masked; done rows kept in the batch) change nothing:
    same tokens, scores and logits for greedy and beam search, with prompts of different
    lengths and rows finishing at different steps."""
    model = build(kind)
    images, prompts = inputs(kind)
    eos = _eos_hit_early(model, images, prompts)
    runs = [
        dict(max_new_tokens=8, eos_id=None, return_logits=True),
        dict(max_new_tokens=8, eos_id=eos, return_logits=True),
        dict(max_new_tokens=7, strategy="beam", num_beams=3, eos_id=eos, return_scores=True),
        dict(max_new_tokens=7, strategy="beam", num_beams=3, eos_id=eos, early_stopping=False, length_penalty=0.5,
             return_scores=True),
        dict(max_new_tokens=6, repetition_penalty=1.5, return_scores=True),
    ]
    for kw in runs:
        dynamic = generate(model, images, prompts, **kw)
        static = generate(model, images, prompts, static_cache=True, **kw)
        assert torch.equal(static.tokens, dynamic.tokens), kw
        torch.testing.assert_close(static.scores, dynamic.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(static.token_scores, dynamic.token_scores, atol=1e-5, rtol=0)
        if static.logits is not None:
            torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=0)
    assert bool((generate(model, images, prompts, max_new_tokens=8, eos_id=eos) == 0).any()), "no row finished early"


@pytest.mark.skipif("flamingo" not in KINDS, reason="needs mammut.models.flamingo")
def test_static_cache_counts_generated_media_tokens():
    """Flamingo's media masking reads whether each new token is real: with a static cache
    the new token's column is the cache's, not ``keep``'s last one."""
    model = build("flamingo")
    images, prompts = inputs("flamingo")
    beam = dict(strategy="beam", num_beams=4, max_new_tokens=8, eos_id=None, return_scores=True)
    for media in range(4, VOCAB):  # a media token id that beam search then generates
        if any(bool((p[1:] == media).any()) for p in prompts):
            continue  # one media item per row: the prompt holds its one media token
        model.config.media_token_id = media
        with_media = [torch.cat((torch.tensor([media]), p[1:])) for p in prompts]
        if bool((generate(model, images, with_media, **beam).tokens == media).any()):
            break
    else:
        pytest.fail("no media token id is ever generated: the test needs one")
    for kw in (beam, dict(beam, strategy="greedy")):
        dynamic = generate(model, images, with_media, **kw)
        static = generate(model, images, with_media, static_cache=True, **kw)
        assert torch.equal(static.tokens, dynamic.tokens), (kw, media)
        torch.testing.assert_close(static.token_scores, dynamic.token_scores, atol=1e-5, rtol=0)


@pytest.mark.skipif("coca" not in KINDS, reason="needs mammut.models.coca")
def test_static_cache_finished_rows_stop_counting_positions():
    """A finished row kept in the batch must not run past learned positions (max_text_len)."""
    model = build("coca_open_clip_style")  # learned positions, 76 of them
    images, _ = inputs("coca_open_clip_style", b=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (70,), generator=g), torch.randint(4, VOCAB, (2,), generator=g)]
    for kw in (dict(), dict(strategy="beam", num_beams=1)):  # one beam: the image is done at its first eos
        eos = int(generate(model, images, prompts, max_new_tokens=1, eos_id=None, **kw)[0, 0])  # row 0 ends at once
        dynamic = generate(model, images, prompts, max_new_tokens=12, eos_id=eos, return_scores=True, **kw)
        assert dynamic.tokens[0, 0] == eos and dynamic.tokens.shape[1] > 6
        static = generate(model, images, prompts, max_new_tokens=12, eos_id=eos, return_scores=True, static_cache=True, **kw)
        assert torch.equal(static.tokens, dynamic.tokens), kw
        torch.testing.assert_close(static.scores, dynamic.scores, atol=1e-5, rtol=0)


def test_static_cache_keeps_one_shape_per_step(monkeypatch):
    """Every step after the prompt sees the same shapes (what lets one compiled graph serve
    them all): one token per row, keys over the whole capacity, no row dropped."""
    from mammut import generation
    from mammut.generation import api, batch

    model = build("mammut")
    images, prompts = inputs("mammut")
    eos = _eos_hit_early(model, images, prompts)
    shapes = []
    real = batch.step_function(model)

    def spy(model, text, context, keep, positions, cache):
        shapes.append((tuple(text.shape), tuple(keep.shape), tuple(positions.shape)))
        return real(model, text, context, keep, positions, cache)

    monkeypatch.setattr(api, "step_function", lambda model: spy)
    out = generate(model, images, prompts, max_new_tokens=9, eos_id=eos, static_cache=True)
    capacity = generation.STATIC_ROUND
    assert shapes[0] == ((3, 4), (3, 4), (3, 4))  # the prompt, left-padded to 4 columns
    assert set(shapes[1:]) == {((3, 1), (3, capacity), (3, 1))}
    assert len(shapes) == out.shape[1]


def test_static_kv_cache_checks_its_use():
    from mammut.layers import StaticKVCache

    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(0)
    cache, layer = StaticKVCache(4), torch.nn.Linear(1, 1)
    k = torch.randn(2, 1, 3, 8)
    assert cache.append(layer, k, k)[0].shape == (2, 1, 3, 8)  # the prompt gets back its own columns
    with pytest.raises(ValueError, match="one token per call"):
        cache.append(layer, k, k)
    with pytest.raises(ValueError, match="column"):
        cache.at(4)
    cache.at(3)
    full_k, _ = cache.append(layer, k[:, :, :1], k[:, :, :1])
    assert full_k.shape == (2, 1, 4, 8)
    torch.testing.assert_close(full_k[:, :, 3], k[:, :, 0])
    torch.testing.assert_close(full_k[:, :, :3], k)
    with pytest.raises(ValueError, match="capacity=4"):
        StaticKVCache(4).append(layer, torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8))
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(build("mammut"), torch.randn(1, 3, 32, 32), static_cache=True, use_cache=False)
    with pytest.raises(TypeError, match="compile: expected a bool"):
        generate(build("mammut"), torch.randn(1, 3, 32, 32), compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("kind", ["mammut", "coca"])
def test_compiled_steps_give_the_same_tokens(kind, monkeypatch):
    from mammut.generation import compiled

    calls = []
    compiled_step = compiled.compiled_step  # the per-model torch.compile wrapper

    def counting(model, fn):
        step = compiled_step(model, fn)

        def counted(*args):
            calls.append(1)
            return step(*args)

        return counted

    monkeypatch.setattr(compiled, "compiled_step", counting)
    model = build(kind)
    images, prompts = inputs(kind)
    eos = _eos_hit_early(model, images, prompts)
    for kw in (dict(eos_id=eos), dict(strategy="beam", num_beams=3, eos_id=eos)):
        dynamic = generate(model, images, prompts, max_new_tokens=8, return_scores=True, **kw)
        calls.clear()
        compiled = generate(model, images, prompts, max_new_tokens=8, return_scores=True, compile=True, **kw)
        assert len(calls) == compiled.tokens.shape[1] - 1  # every step after the prompt went through torch.compile
        assert torch.equal(compiled.tokens, dynamic.tokens), kw
        torch.testing.assert_close(compiled.scores, dynamic.scores, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- lengths, eos
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_eos_and_min_max_lengths(strategy):
    model = build("mammut")
    images, prompts = inputs("mammut")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    free = generate(model, images, prompts, max_new_tokens=10, strategy=strategy, eos_id=None, generator=g())
    assert free.shape == (3, 10) and bool((free != 0).all())
    eos = int(free[0, 1])  # a token the model does produce early
    out = generate(model, images, prompts, max_new_tokens=10, strategy=strategy, eos_id=eos, generator=g())
    assert out.shape[1] <= 10
    for row in out:
        hits = (row == eos).nonzero().flatten()
        if len(hits):  # pad after the first eos, nothing else
            assert bool((row[hits[0] + 1:] == 0).all())
        else:
            assert bool((row != 0).all()) and out.shape[1] == 10
    if strategy != "beam":  # same choices up to the eos
        assert bool((out == eos).any(dim=1)[0])
    late = generate(model, images, prompts, max_new_tokens=10, min_new_tokens=4, strategy=strategy, eos_id=eos, generator=g())
    assert not bool((late[:, :4] == eos).any())
    assert bool((late[:, :4] != 0).all())
    one = generate(model, images, prompts, max_new_tokens=1, strategy=strategy, generator=g())
    assert one.shape == (3, 1)


def test_no_prompt_starts_from_bos_and_needs_one():
    model = build("mammut")
    images, _ = inputs("mammut")
    assert torch.equal(generate(model, images, max_new_tokens=5), generate(model, images, [[BOS]] * 3, max_new_tokens=5))
    model.config.bos_id = None
    with pytest.raises(ValueError, match="prompt.*bos_id"):
        generate(model, images)


# ------------------------------------------------------------------------- sampling
def test_sampling_reproducible_and_filters():
    model = build("mammut")
    images, prompts = inputs("mammut")

    def sample(seed, **kw):
        return generate(model, images, prompts, strategy="sample", max_new_tokens=8, eos_id=None,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0, temperature=5.0), sample(1, temperature=5.0))
    greedy = generate(model, images, prompts, max_new_tokens=8, eos_id=None)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)
    # top-k: every sampled token is among the k best of its step
    out = generate(model, images, prompts, strategy="sample", max_new_tokens=6, eos_id=None, top_k=3,
                   generator=torch.Generator().manual_seed(5), return_logits=True)
    top3 = out.logits.topk(3, dim=-1).indices
    assert bool((top3 == out.tokens.unsqueeze(-1)).any(-1).all())


def test_repetition_penalty_discourages_repeats():
    model = build("mammut")
    images, prompts = inputs("mammut")
    plain = generate(model, images, prompts, max_new_tokens=12, eos_id=None)
    assert any(len(set(r.tolist())) < 12 for r in plain)  # sharpened random models loop
    out = generate(model, images, prompts, max_new_tokens=12, eos_id=None, repetition_penalty=1e4)
    for row, p in zip(out, prompts):
        assert len(set(row.tolist())) == 12
        assert not set(row.tolist()) & set(p.tolist())


# ------------------------------------------------------------------------- API
def test_bad_arguments_name_the_argument():
    model = build("mammut")
    images, prompts = inputs("mammut")
    bad = [
        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(num_beams=0, strategy="beam"), "num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0, strategy="sample"), "temperature"), (dict(strategy="nucleus"), "strategy"),
        (dict(min_new_tokens=40, max_new_tokens=8), "min_new_tokens"), (dict(top_k=0), "top_k"),
        (dict(eos_id=VOCAB), "eos_id"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(strategy="beam", return_logits=True), "return_logits"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            generate(model, images, prompts, **kw)
    for prompt, what in [([[5, VOCAB]] * 3, "prompt.*num_tokens"), ([[5, -1]] * 3, "prompt"), ([[5]] * 2, "prompt.*3 rows"),
                         (torch.tensor([[5, 0, 6]] * 3), "prompt.*pad_id"), ([[5], [], [6]], "prompt: row 1")]:
        with pytest.raises(ValueError, match=what):
            generate(model, images, prompt)
    with pytest.raises(ValueError, match="images / image_tokens / context"):
        generate(model, None, prompts)


def test_context_and_tokenizer_entry_points():
    model = build("mammut")
    images, prompts = inputs("mammut")
    ref = model.generate(images, prompts, max_new_tokens=5)
    context = model.image_context(images)
    assert torch.equal(generate(model, context=context, prompt=prompts, max_new_tokens=5), ref)
    tokens = model.image_tokens(images)
    assert torch.equal(generate(model, image_tokens=tokens, prompt=prompts, max_new_tokens=5), ref)

    class Tok:
        def decode(self, ids):
            return [" ".join(str(i) for i in row if i not in (0, EOS)) for row in ids.tolist()]

    texts = model.caption(images, Tok(), prompt=prompts, max_new_tokens=5)
    assert texts == Tok().decode(ref)
    model.train()
    assert torch.equal(model.generate(images, prompts, max_new_tokens=5), ref) and model.training


def test_cross_attention_shares_keys_values_across_groups_of_rows():
    from mammut.layers import KVCache

    xattn = CrossAttention(16, context_dim=12, heads=4, dim_head=8, kv_heads=2, norm_context=True)
    x, ctx = torch.randn(6, 2, 16), torch.randn(2, 5, 12)
    full = ctx.repeat_interleave(3, dim=0)  # rows 0-2 read image 0, rows 3-5 image 1
    torch.testing.assert_close(xattn(x, ctx), xattn(x, full))
    key_mask = torch.tensor([[True, True, False, True, True], [True] * 5])
    want = xattn(x, full, context_mask=key_mask.repeat_interleave(3, 0))
    torch.testing.assert_close(xattn(x, ctx, context_mask=key_mask), want)  # mask per image
    torch.testing.assert_close(xattn(x, ctx, context_mask=key_mask.repeat_interleave(3, 0)), want)  # per row
    per_query = torch.rand(6, 2, 5) > 0.3
    torch.testing.assert_close(xattn(x, ctx, context_mask=per_query), xattn(x, full, context_mask=per_query))
    want = xattn(x, full, context_mask=per_query[::3].repeat_interleave(3, 0))
    torch.testing.assert_close(xattn(x, ctx, context_mask=per_query[::3]), want)
    cache = KVCache()
    xattn(x[::3], ctx, cache=cache)  # keys/values for the two images, then shared by 3 rows each
    torch.testing.assert_close(xattn(x, ctx, cache=cache), xattn(x, full))


def test_select_context_structures():
    t = torch.arange(6).view(3, 2)
    idx = torch.tensor([2, 0])
    out = select_context({"a": (t, t + 1), "b": [t], "c": None, "d": 3}, idx)
    assert torch.equal(out["a"][1], (t + 1)[idx]) and torch.equal(out["b"][0], t[idx]) and out["c"] is None and out["d"] == 3
