"""Generation benchmark: tokens/s and ms per caption for mammut's generation (greedy and beam
search, with and without the KV cache) against open_clip 3.3.0's ``CoCa.generate`` at an
equivalent size, measured in the same run (timings are interleaved round by round, so the
ratios hold better than the absolute figures on a busy machine), plus the cost of one
decoding step as the caption grows against the memory-bandwidth floor of a step, and the
per-step overhead at a tiny size against Hugging Face ``transformers``' GPT-2.

    .venv/bin/python benchmarks/generate.py [--threads 2] [--repeats 3] [--beams 6]
        [--parts table,steps,lengths,tiny] [--full] [--no-open-clip]

Parts: ``table`` (whole captions vs open_clip), ``steps`` (one step as the caption grows; the
weight-read floor; eager greedy per step against that floor), ``lengths`` (whole captions of
growing length), ``tiny`` (the tiny config below: cached vs recomputing at 64 new tokens,
per-token time vs GPT-2 with its KV cache, ATen calls per step counted with torch.profiler).

Reference config: image 128, patch 16, ViT 256 x 4 layers, 4 heads x 64; text width 256,
4 heads x 64, vocab 8192; batch 4, 32 new tokens, fp32, ``torch.inference_mode()``.
- ours: MaMMUT, depth 4, cross-attention every 2 (layers 2 and 4), attention-pooled image
  context of 255 tokens (as open_clip's), random init.
- open_clip: ``open_clip.CoCa`` with 2 unimodal + 2 multimodal layers (each multimodal layer
  has self- and cross-attention), attentional pooler with 256 queries (255 context tokens),
  random init. Greedy = ``generation_type="top_k", top_k=1`` (sampling from the single top
  token is argmax); beam = ``generation_type="beam_search"`` with ``num_beam_groups=1``
  (plain beam search, as ours), and its default ``num_beam_groups=3`` (diverse groups) for
  reference; ``min_seq_len=0``. open_clip has no KV cache: every step re-runs the whole
  prefix and recomputes the cross-attention keys/values; its beam search encodes every image
  once per beam.
"compiled" rows: ``generate(..., compile=True)`` (static cache, the decoding step through
``torch.compile``; its first call compiles, printed apart and left out of the table).
Both stop on eos id 2 (a random model practically never emits it, so every caption runs to 32
tokens; the script prints the lengths). open_clip's CoCa leaves ``text_decoder.text_projection``
at zero when built from a config, so it is initialised here (normal, std dim ** -0.5).
Tiny config (``--parts tiny``): MaMMUT width 128, depth 4, cross-attention every 2, 4 heads x 32,
vocab 8192, a 64 px image of 16 patches (ViT 128 x 2), batch 2, a prompt of 2 tokens, 64 new
tokens (``min_new_tokens=64``: every row runs the full length), decoding from a precomputed
image context (the image is encoded outside the timing, as GPT-2 has none); eager, and with
``compile=True`` for reference (its first call, which compiles, is the warm-up). Against
``GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=8192,
n_positions=128))``, random init, ``generate(do_sample=False, use_cache=True,
min_new_tokens=64, max_new_tokens=64)`` on the same prompt ids. GPT-2 has 4 blocks; ours has 4
self-attention blocks and 2 cross-attention blocks (each with its feed-forward), as the
reference config. ATen calls per step: calls made from Python (``top-level``) and all (nested
included), from the difference between 17 and 1 new tokens, over 16.
Note: with 2 threads on a machine whose cores are busy with other work, OpenMP threads wait
on each other and fine-grained work (one token per step) suffers far more than big matmuls;
compare with ``--threads 1`` when the load average is above the core count.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from _timing import interleaved  # benchmarks/_timing.py (the script's own folder is on sys.path)

IMAGE, PATCH, VIT_DIM, VIT_DEPTH, HEADS, DIM_HEAD = 128, 16, 256, 4, 4, 64
DIM, VOCAB, DEPTH, XATTN_EVERY, QUERIES = 256, 8192, 4, 2, 256
BATCH, NEW, LONG, BOS, EOS, PAD = 4, 32, 75, 1, 2, 0


def ours() -> torch.nn.Module:
    from mammut import MaMMUT

    return MaMMUT(
        dim=DIM, num_tokens=VOCAB, depth=DEPTH, cross_attend_every=XATTN_EVERY, heads=HEADS, dim_head=DIM_HEAD,
        image_pool="attention", num_img_queries=QUERIES - 1, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        vit=dict(image_size=IMAGE, patch_size=PATCH, dim=VIT_DIM, depth=VIT_DEPTH, heads=HEADS, dim_head=DIM_HEAD),
    ).eval()


def open_clip_coca() -> torch.nn.Module | None:
    try:
        import open_clip
    except ImportError:
        return None
    text = dict(context_length=76, vocab_size=VOCAB, width=DIM, heads=HEADS, layers=DEPTH // 2, embed_cls=True, output_tokens=True)
    multimodal = dict(context_length=76, vocab_size=VOCAB, width=DIM, heads=HEADS, layers=DEPTH // 2, attn_pooler_heads=HEADS)
    vision = dict(image_size=IMAGE, patch_size=PATCH, width=VIT_DIM, layers=VIT_DEPTH, head_width=DIM_HEAD,
                  attentional_pool=True, attn_pooler_queries=QUERIES, attn_pooler_heads=HEADS, output_tokens=True)
    model = open_clip.CoCa(DIM, multimodal, text, vision, pad_id=PAD).eval()
    # built without pretrained weights, the decoder's output projection is left at zero: every
    # logit ties and top_k=1 would sample uniformly (stopping early on eos/pad); give it values
    torch.nn.init.normal_(model.text_decoder.text_projection, std=DIM**-0.5)
    return model


def step_cost(model: torch.nn.Module, context: torch.Tensor, length: int, *, cached: bool, repeats: int) -> float:
    """Seconds for the decoding step that produces token ``length`` (batch ``BATCH``): with the
    cache one new token against ``length - 1`` cached; without, the whole prefix again."""
    from mammut.layers import KVCache

    text = torch.randint(3, VOCAB, (BATCH, length))
    keep = torch.ones_like(text, dtype=torch.bool)
    times = []
    for _ in range(repeats + 1):
        if cached:  # a prompt, one step (the cache makes room), then the timed step
            cache = KVCache()
            model.decode(text[:, :-2], context, keep=keep[:, :-2], cache=cache)
            model.decode(text[:, -2:-1], context, keep=keep[:, :-1], positions=torch.full((BATCH, 1), length - 2), cache=cache)
            t = time.perf_counter()
            model.decode(text[:, -1:], context, keep=keep, positions=torch.full((BATCH, 1), length - 1), cache=cache)
        else:
            t = time.perf_counter()
            model.decode(text, context, keep=keep)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beams", type=int, default=6)
    p.add_argument("--no-open-clip", action="store_true")
    p.add_argument("--full", action="store_true", help="also 512 new tokens without the cache (minutes)")
    p.add_argument("--parts", default="table,steps,lengths,tiny", help="comma-separated subset of table,steps,lengths,tiny")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ours()
    images = torch.randn(BATCH, 3, IMAGE, IMAGE)
    k = args.beams

    def gen(**kw: object) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(images, max_new_tokens=NEW, **kw)

    fns: dict[str, Callable[[], object]] = {
        "ours greedy, cache": gen(),
        "ours greedy, no cache": gen(use_cache=False),
        f"ours beam {k}, cache": gen(strategy="beam", num_beams=k),
        f"ours beam {k}, no cache": gen(strategy="beam", num_beams=k, use_cache=False),
        "ours greedy, compiled": gen(compile=True),
        f"ours beam {k}, compiled": gen(strategy="beam", num_beams=k, compile=True),
    }
    oc = None if args.no_open_clip else open_clip_coca()
    if oc is not None:
        common = dict(seq_len=NEW + 1, sot_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, min_seq_len=0)
        fns["open_clip greedy (top_k=1)"] = lambda: oc.generate(images, generation_type="top_k", top_k=1, **common)
        fns[f"open_clip beam {k}"] = lambda: oc.generate(images, generation_type="beam_search", num_beams=k, num_beam_groups=1, **common)
        fns[f"open_clip beam {k}, 3 groups (default)"] = lambda: oc.generate(
            images, generation_type="beam_search", num_beams=k, num_beam_groups=3, **common)
        # the longest caption open_clip's 76-token context allows
        long = dict(common, seq_len=LONG + 1)
        fns[f"ours greedy, cache, {LONG} tokens"] = lambda: model.generate(images, max_new_tokens=LONG)
        fns[f"open_clip greedy, {LONG} tokens"] = lambda: oc.generate(images, generation_type="top_k", top_k=1, **long)
    elif not args.no_open_clip:
        print("open_clip not installed: skipped")

    with torch.inference_mode():
        if "table" in parts:
            table(fns, args.repeats, args.threads, k, oc is not None)
        if "steps" in parts:
            steps(model, images, args.repeats)
            per_step(model, images, floor(model, args.repeats), args.repeats)
        if "lengths" in parts:
            lengths(model, images, args.full)
        if "tiny" in parts:
            tiny(args.repeats)


def table(fns: dict[str, Callable[[], object]], repeats: int, threads: int, k: int, with_open_clip: bool) -> None:
    lengths, first = {}, {}
    for name, fn in fns.items():  # the first call also compiles the "compiled" rows' step
        t = time.perf_counter()
        lengths[name] = fn().shape[1]
        first[name] = time.perf_counter() - t
    print("first call (compiles the step; not in the table): " + ", ".join(
        f"{name} {first[name]:.1f} s" for name in fns if "compiled" in name))
    times = interleaved(fns, repeats)
    print(f"threads {threads}, batch {BATCH}, {NEW} new tokens unless stated, {repeats} interleaved rounds (median)")
    print(f"{'method':38s} {'ms/batch':>9s} {'ms/caption':>10s} {'tokens/s':>9s} {'out len':>7s}")
    for name, sec in times.items():
        n = lengths[name] - (1 if name.startswith("open_clip") else 0)  # open_clip returns the start token too
        print(f"{name:38s} {sec * 1e3:9.1f} {sec * 1e3 / BATCH:10.1f} {BATCH * n / sec:9.1f} {n:7d}")
    if with_open_clip:
        g, b = times["open_clip greedy (top_k=1)"], times[f"open_clip beam {k}"]
        b3 = times[f"open_clip beam {k}, 3 groups (default)"]
        ours_g, ours_b = times["ours greedy, cache"], times[f"ours beam {k}, cache"]
        print(f"speed-up vs open_clip: greedy {g / ours_g:.1f}x (target >= 8x), beam {b / ours_b:.1f}x "
              f"(vs its default 3-group beam search {b3 / ours_b:.1f}x; target >= 5x); without our cache: "
              f"greedy {g / times['ours greedy, no cache']:.1f}x, beam {b / times[f'ours beam {k}, no cache']:.1f}x; "
              f"compiled: greedy {g / times['ours greedy, compiled']:.1f}x, beam {b / times[f'ours beam {k}, compiled']:.1f}x")
        print(f"speed-up vs open_clip at {LONG} new tokens: greedy "
              f"{times[f'open_clip greedy, {LONG} tokens'] / times[f'ours greedy, cache, {LONG} tokens']:.1f}x")


def steps(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> None:
    """Cost of one step as the caption grows: flat with the cache, growing without."""
    context = model.image_context(images)
    print(f"\nms for the step that makes token L (batch {BATCH}):")
    print(f"{'L':>5s} {'cache':>8s} {'no cache':>9s}")
    for length in (32, 128, 512):
        c = step_cost(model, context, length, cached=True, repeats=max(repeats, 5))
        u = step_cost(model, context, length, cached=False, repeats=repeats)
        print(f"{length:5d} {c * 1e3:8.2f} {u * 1e3:9.2f}")


def floor(model: torch.nn.Module, repeats: int) -> float:
    """What one cached step cannot go below at batch 4: one pass over the decoder's weight
    matrices (4 rows through each; cross-attention key/value projections excluded as they are
    cached), about 33 MB of fp32 weights, with ``F.linear`` and with the product taken the
    other way round (``(W @ x.T).T``, weights on the left; what mammut's ``Linear`` did for a
    few rows before ``F.linear`` became the faster one). Returns the faster, in seconds.
    (``attention_floor`` adds what the weights leave out: the attention kernels' reads.)"""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (n.startswith("layers.") and not n.endswith("to_kv") or n == "to_logits")]
    mods = dict(model.named_modules())
    inputs = {n: torch.randn(BATCH, mods[n].in_features) for n in names}
    size = sum(mods[n].weight.numel() for n in names) * 4 / 1e6
    best = float("inf")
    for label, fn in (("F.linear", F.linear), ("weights on the left", lambda x, w: (w @ x.t()).t().contiguous())):
        ts = []
        for _ in range(max(repeats, 5) + 1):
            t = time.perf_counter()
            for n in names:
                fn(inputs[n], mods[n].weight)
            ts.append(time.perf_counter() - t)
        sec = statistics.median(ts[1:])
        best = min(best, sec)
        print(f"floor: the decoder's {len(names)} weight matrices ({size:.0f} MB) once at batch {BATCH}, {label}: "
              f"{sec * 1e3:.2f} ms ({size / 1e3 / sec:.1f} GB/s)")
    return best


def attention_floor(model: torch.nn.Module, context: torch.Tensor, floor_s: float, length: int, repeats: int) -> float:
    """The weight-read floor plus what it leaves out: each attention layer's one SDPA call of
    the step (a query per row against ``length`` cached keys/values in the self-attention
    layers, against the image context's keys/values in the cross-attention layers: 5.3 MB at
    the reference config with 32 cached tokens), timed back to back; returns the sum, in seconds."""
    from mammut.layers.attention import Attention, CrossAttention

    calls = []
    for m in model.layers.modules():  # the decoder's (not the image encoder's or pooler's)
        if isinstance(m, Attention):
            kv = torch.randn(BATCH, m.kv_heads, length, m.dim_head)
        elif isinstance(m, CrossAttention):
            kv = torch.randn(BATCH, m.kv_heads, context.shape[1], m.dim_head)
        else:
            continue
        calls.append((torch.randn(BATCH, m.heads, 1, m.dim_head), kv, kv.clone()))
    ts = []
    for _ in range(max(repeats, 5) + 1):
        t = time.perf_counter()
        for q, k, v in calls:
            F.scaled_dot_product_attention(q, k, v)
        ts.append(time.perf_counter() - t)
    sec = statistics.median(ts[1:])
    size = sum(k.numel() + v.numel() for _, k, v in calls) * 4 / 1e6
    print(f"attention reads: {len(calls)} one-query SDPA calls ({size:.1f} MB of keys/values; {length} cached tokens, "
          f"{context.shape[1]} image tokens) {sec * 1e3:.2f} ms; floor with them {(floor_s + sec) * 1e3:.2f} ms")
    return floor_s + sec


def per_step(model: torch.nn.Module, images: torch.Tensor, floor_s: float, repeats: int) -> None:
    """Greedy decoding per step against the weight-read floor and the floor with the
    attention reads: whole generations of 64 and of 1 new token (every row runs the full
    length), the difference over 63 (the image encoding and the prompt step cancel out);
    eager and ``compile=True`` (compiled before timing); interleaved rounds, medians."""
    context = model.image_context(images)
    n = 64
    full = attention_floor(model, context, floor_s, n // 2, repeats)

    def gen(k: int, **kw: object) -> Callable[[], object]:
        return lambda: model.generate(context=context, max_new_tokens=k, min_new_tokens=k, eos_id=None, **kw)

    fns = {"long": gen(n), "one": gen(1), "compiled long": gen(n, compile=True), "compiled one": gen(1, compile=True)}
    fns["compiled long"](), fns["compiled one"]()  # compiles (batch and capacity as timed)
    times = interleaved(fns, max(repeats, 5))
    for label, prefix in (("eager", ""), ("compile=True", "compiled ")):
        sec = (times[prefix + "long"] - times[prefix + "one"]) / (n - 1)
        print(f"{label} greedy per step (batch {BATCH}, {n} new tokens, loop included): {sec * 1e3:.2f} ms = "
              f"{sec / floor_s:.2f}x the weight-read floor (target <= 1.3x), {sec / full:.2f}x the floor with the attention reads")


def aten_calls(fn: Callable[[], object], fn_one: Callable[[], object], steps: int) -> tuple[float, float]:
    """ATen calls per decoding step: (made from Python, all including nested), from the
    difference between a run of ``steps + 1`` new tokens and a run of 1."""
    from torch.profiler import ProfilerActivity, profile

    def count(f: Callable[[], object]) -> tuple[int, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            f()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
        return len(top), len(events)

    (t1, a1), (tn, an) = count(fn_one), count(fn)
    return (tn - t1) / steps, (an - a1) / steps


def tiny(repeats: int) -> None:
    """The tiny config (see the module docstring): cached vs recomputing, vs GPT-2, ATen calls."""
    from mammut import MaMMUT

    vocab, n, batch = 8192, 64, 2
    torch.manual_seed(0)
    model = MaMMUT(dim=128, num_tokens=vocab, depth=4, cross_attend_every=2, heads=4, dim_head=32, bos_id=BOS,
                   eos_id=EOS, pad_id=PAD, vit=dict(image_size=64, patch_size=16, dim=128, depth=2, heads=4, dim_head=32)).eval()
    images = torch.randn(batch, 3, 64, 64)
    prompt = torch.randint(3, vocab, (batch, 2))
    context = model.image_context(images)

    def ours(k: int, **kw: object) -> Callable[[], object]:
        return lambda: model.generate(context=context, prompt=prompt, max_new_tokens=k, min_new_tokens=k, **kw)

    fns: dict[str, Callable[[], object]] = {"cached": ours(n), "recomputing (use_cache=False)": ours(n, use_cache=False),
                                            "cached, compile=True": ours(n, compile=True)}
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        gpt = None
        print("transformers not installed: GPT-2 skipped")
    else:
        transformers.logging.set_verbosity_error()
        gpt = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=vocab, n_positions=128)).eval()
        ones = torch.ones_like(prompt)
        fns[f"GPT-2 (transformers {transformers.__version__}), KV cache"] = lambda: gpt.generate(
            prompt, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
            pad_token_id=PAD, eos_token_id=EOS)
    times = interleaved(fns, max(repeats, 7))
    print(f"\ntiny config (width 128, depth 4, 4 heads x 32, vocab {vocab}), batch {batch}, prompt 2, {n} new tokens, "
          f"{max(repeats, 7)} interleaved rounds (median):")
    for name, sec in times.items():
        print(f"  {name:44s} {sec * 1e3:8.1f} ms  {sec * 1e3 / n:6.3f} ms/token")
    cached = times["cached"]
    print(f"  cached vs recomputing: {times['recomputing (use_cache=False)'] / cached:.2f}x faster (target >= 4x); "
          f"compiled: {times['recomputing (use_cache=False)'] / times['cached, compile=True']:.2f}x")
    if gpt is not None:
        hf = next(v for k, v in times.items() if k.startswith("GPT-2"))
        print(f"  per token, GPT-2 / ours: {hf / cached:.2f} (target >= 1: ours no slower)")
    top, total = aten_calls(ours(17), ours(1), 16)
    print(f"  ATen calls per cached step: {top:.0f} from Python, {total:.0f} with nested calls")
    if gpt is not None:
        hf_top, hf_total = aten_calls(
            lambda: gpt.generate(prompt, attention_mask=ones, max_new_tokens=17, min_new_tokens=17, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=EOS),
            lambda: gpt.generate(prompt, attention_mask=ones, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=EOS), 16)
        print(f"  ATen calls per GPT-2 step: {hf_top:.0f} from Python, {hf_total:.0f} with nested calls")


def lengths(model: torch.nn.Module, images: torch.Tensor, full: bool) -> None:
    """Whole greedy captions of growing length (no eos), with and without the cache."""
    print(f"\nwhole greedy captions, batch {BATCH} (with the cache, ms per new token should stay flat):")
    print(f"{'new':>5s} {'cache ms':>9s} {'ms/token':>8s} {'tokens/s':>8s} {'no-cache ms':>11s} {'ms/token':>8s} {'tokens/s':>8s}")
    for n in (32, 128, 512):
        row = f"{n:5d}"
        for cached in (True, False):
            if not cached and n > 128 and not full:
                row += f" {'(--full)':>11s}"
                continue
            t = time.perf_counter()
            model.generate(images, max_new_tokens=n, eos_id=None, use_cache=cached)
            sec = time.perf_counter() - t
            row += f" {sec * 1e3:{9 if cached else 11}.1f} {sec * 1e3 / n:8.2f} {BATCH * n / sec:8.1f}"
        print(row)


if __name__ == "__main__":
    main()
