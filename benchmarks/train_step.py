"""Training-step benchmark: step time, samples/s, peak memory, matmul GFLOP/step, GFLOP/s
and MFU (against a 2048x2048 fp32 matmul measured in the same run), for mammut's MaMMUT
and, when installed, the anchor package mammut-pytorch==0.0.7 at the same config.

    .venv/bin/python benchmarks/train_step.py [--threads 2] [--steps 10] [--warmup 3] [--compile]

The models run in interleaved rounds (one step of each per round); figures are medians.

Reference config (issue "Foundation"): image 128, patch 16, ViT 256 x 4 layers, 4 heads,
dim_head 64; text width 256, 4 heads, vocab 8192, length 64, batch 16, depth 4,
cross-attention every 2.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

IMAGE, PATCH, VIT_DIM, VIT_DEPTH, HEADS, DIM_HEAD = 128, 16, 256, 4, 4, 64
DIM, VOCAB, SEQ, BATCH, DEPTH, XATTN_EVERY, QUERIES = 256, 8192, 64, 16, 4, 2, 256


def matmul_step() -> tuple[Callable[[], None], float]:
    """The MFU yardstick: one 2048x2048 fp32 matmul."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return (lambda: a @ b), 2 * 2048**3


def ours(seed_compatible: bool) -> torch.nn.Module:
    from mammut import MaMMUT

    options = dict(contrastive_pass="causal", text_pool="cls", image_pool="attention", num_img_queries=QUERIES, kv_heads=1, contrastive_loss="softmax") if seed_compatible else {}
    return MaMMUT(
        dim=DIM, num_tokens=VOCAB, depth=DEPTH, cross_attend_every=XATTN_EVERY, heads=HEADS, dim_head=DIM_HEAD,
        vit=dict(image_size=IMAGE, patch_size=PATCH, dim=VIT_DIM, depth=VIT_DEPTH, heads=HEADS, dim_head=DIM_HEAD), **options,
    )


def anchor() -> torch.nn.Module | None:
    try:
        from mammut_pytorch.mammut_pytorch import MaMMUT as SeedMaMMUT
        from vit_pytorch import ViT
        from vit_pytorch.extractor import Extractor
    except ImportError:
        return None
    vit = ViT(image_size=IMAGE, patch_size=PATCH, num_classes=1, dim=VIT_DIM, depth=VIT_DEPTH, heads=HEADS, dim_head=DIM_HEAD, mlp_dim=4 * VIT_DIM)
    vit = Extractor(vit, return_embeddings_only=True, detach=False)
    return SeedMaMMUT(
        dim=DIM, num_tokens=VOCAB, depth=DEPTH, cross_attend_every=XATTN_EVERY, heads=HEADS, dim_head=DIM_HEAD,
        img_encoder=vit, image_dim=VIT_DIM, num_img_queries=QUERIES,
    )


def make_step(model: torch.nn.Module) -> tuple[Callable[[], None], float]:
    """One AdamW training step on a fixed batch, and the step's matmul FLOPs."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same for every model
    text = torch.randint(1, VOCAB, (BATCH, SEQ + 1))
    images = torch.randn(BATCH, 3, IMAGE, IMAGE)

    def step() -> None:
        loss = model(text=text, images=images, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        loss = model(text=text, images=images, return_loss=True)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return step, counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile every model: ours per block (as `mammut train` "
                   "with compile: true), mammut-pytorch whole; compilation happens in the warm-up")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builds = [
        ("mammut (paper defaults)", lambda: ours(False)),
        ("mammut (seed-compatible: causal, CLS, attn pool 256, kv_heads=1)", lambda: ours(True)),
        ("mammut-pytorch 0.0.7", anchor),
    ]
    steps: dict[str, tuple[Callable[[], None], float]] = {"matmul 2048x2048 fp32 (yardstick)": matmul_step()}
    for name, build in builds:
        model = build()
        if model is None:
            print(f"{name}: not installed, skipped")
            continue
        if args.compile:
            if name.startswith("mammut ("):
                from mammut.train.distributed import apply_compile

                apply_compile(model)
            else:
                model.compile()
            name += " + compile"
        steps[name] = make_step(model)
    # interleaved rounds: every model (and the yardstick) runs once per round, so a load
    # change on a shared machine moves every figure alike and the ratios stay fair
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.steps):
        for name, (step, _) in steps.items():
            t = time.perf_counter()
            step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    sec = {name: statistics.median(ts) for name, ts in times.items()}
    yard = next(iter(steps))
    peak = steps[yard][1] / sec[yard] / 1e9
    print(f"threads {args.threads}; {yard}: {peak:.1f} GFLOP/s; median of {args.steps} interleaved rounds after {args.warmup} warm-up")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'model':66s} {'ms/step':>8s} {'samples/s':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'MFU':>5s}")
    for name, (_, flops) in list(steps.items())[1:]:
        gflops = flops / sec[name] / 1e9
        print(f"{name:66s} {sec[name] * 1e3:8.1f} {BATCH / sec[name]:9.1f} {flops / 1e9:10.1f} {gflops:8.1f} {gflops / peak:5.2f}")
    print(f"peak RSS (whole process): {rss:.0f} MiB")
    suffix = " + compile" if args.compile else ""
    seed = "mammut-pytorch 0.0.7" + suffix
    if seed in sec:
        for name, _ in builds[:2]:
            print(f"speed-up vs mammut-pytorch, {name + suffix}: {sec[seed] / sec[name + suffix]:.2f}x")


if __name__ == "__main__":
    main()
