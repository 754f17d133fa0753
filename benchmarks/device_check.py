"""One GPU check in one call: training step (bf16, MFU), decoding (greedy / beam, eager vs
compiled with CUDA graphs, bf16 token agreement), image embedding throughput and FSDP2 on one
GPU, printed as one table. ``benchmarks/device_check.sh`` runs the CUDA-marked tests first.

    python benchmarks/device_check.py                 # on a CUDA machine: ViT-B/16-size MaMMUT
    python benchmarks/device_check.py --dry-run       # anywhere: tiny sizes on the CPU (the test suite runs this)

Sizes (not --dry-run): ViT-B/16 image tower (224 px, patch 16, width 768, depth 12, 12 heads)
and a text decoder of width 768, depth 12, 12 heads, vocab 32,000, cross-attention every 2
layers; training batch 64 x 64 tokens; decoding batch 8, 32 new tokens; embedding batch 256.
MFU = matmul FLOPs counted by torch's FlopCounterMode / step time / peak, against both the
bf16 peak measured in the same run (an 8192^3 matmul) and the nominal dense bf16 peak given by
--peak-tflops (H200/H100 SXM: 989).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(image=224, patch=16, vit_dim=768, vit_depth=12, heads=12, dim_head=64, dim=768, depth=12, vocab=32000,
            seq=64, train_batch=64, gen_batch=8, new_tokens=32, beams=4, embed_batch=256, yard=8192)
TINY = dict(image=32, patch=8, vit_dim=64, vit_depth=2, heads=2, dim_head=32, dim=64, depth=2, vocab=512,
            seq=16, train_batch=4, gen_batch=2, new_tokens=6, beams=2, embed_batch=8, yard=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(s: dict, device: torch.device) -> torch.nn.Module:
    from mammut import MaMMUT

    torch.manual_seed(0)
    return MaMMUT(
        dim=s["dim"], num_tokens=s["vocab"], depth=s["depth"], cross_attend_every=2, heads=s["heads"],
        dim_head=s["dim_head"], bos_id=1, eos_id=2, pad_id=0, contrastive_loss="softmax",
        vit=dict(image_size=s["image"], patch_size=s["patch"], dim=s["vit_dim"], depth=s["vit_depth"],
                 heads=s["heads"], dim_head=s["dim_head"]),
    ).to(device)


def yardstick(s: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = s["yard"]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / sec


def train_step(s: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(seconds per AdamW step under autocast, matmul FLOPs per step)."""
    model = build(s, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    text = torch.randint(3, s["vocab"], (s["train_batch"], s["seq"] + 1), device=device)
    images = torch.randn(s["train_batch"], 3, s["image"], s["image"], device=device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(text=text, images=images, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = model(text=text, images=images, return_loss=True)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return timed(step, device, repeats, warmup=2), counter.get_total_flops()


def decoding(s: dict, device: torch.device, repeats: int) -> tuple[list[tuple[str, float, str]], dict]:
    """Rows (name, tokens/s, note) for greedy and beam, eager and compiled; bf16 agreement."""
    model = build(s, device).eval()
    images = torch.randn(s["gen_batch"], 3, s["image"], s["image"], device=device)
    n = s["new_tokens"]
    kw = dict(max_new_tokens=n, min_new_tokens=n)  # every row decodes n tokens
    rows, info = [], {}
    with torch.inference_mode():
        for strategy, extra in (("greedy", {}), ("beam", {"num_beams": s["beams"]})):
            ref = model.generate(images, strategy=strategy, **kw, **extra)
            for compiled in (False, True):
                fn = lambda: model.generate(images, strategy=strategy, compile=compiled, **kw, **extra)  # noqa: E731
                t0 = time.perf_counter()
                out = fn()  # the first compiled call traces, compiles and captures the graph
                sync(device)
                first = time.perf_counter() - t0
                sec = timed(fn, device, repeats, warmup=0)
                same = torch.equal(out, ref)
                label = f"{strategy}{' x' + str(s['beams']) if strategy == 'beam' else ''}, " + \
                        ("compile=True" + (" (CUDA graphs)" if device.type == "cuda" else "") if compiled else "eager")
                rows.append((label, s["gen_batch"] * n / sec, f"{sec * 1e3:.1f} ms/batch; same tokens as eager: {same}"
                             + (f"; first call {first:.1f} s" if compiled else "")))
                info[label] = same
        # bf16 weights: token agreement with fp32 greedy
        ref = model.generate(images, **kw)
        half = build(s, device).to(torch.bfloat16).eval()
        half.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        out = half.generate(images.to(torch.bfloat16), **kw)
        agree = (out == ref).float().mean().item()
        sec = timed(lambda: half.generate(images.to(torch.bfloat16), **kw), device, repeats, warmup=0)
        rows.append(("greedy, bf16 weights", s["gen_batch"] * n / sec, f"token agreement with fp32: {agree:.3f}"))
        info["bf16_agreement"] = agree
    return rows, info


def embedding(s: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    model = build(s, device).eval()
    images = torch.randn(s["embed_batch"], 3, s["image"], s["image"], device=device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run() -> None:
        with torch.inference_mode(), autocast:
            model.embed_image(images)

    return s["embed_batch"] / timed(run, device, repeats, warmup=2)


def fsdp_one_gpu(device: torch.device, tmp: Path) -> str:
    """``mammut train`` under torchrun with FSDP2 on one process (the tiny preset)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "mammut.cli",
           "train", "--config", "tiny", "--train.parallel", "fsdp", "--train.device", device.type,
           "--train.out_dir", str(tmp / "fsdp"), "--train.steps", "4", "--train.report", "false",
           "--train.progress", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)
    if proc.returncode != 0:
        return f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
    ckpt = sorted((tmp / "fsdp" / "checkpoints").glob("step_*"))
    return f"ok: 4 steps, checkpoint {ckpt[-1].name if ckpt else 'MISSING'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="nominal dense bf16 peak of the GPU")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train,decode,embed,fsdp")
    args = p.parse_args()
    if args.dry_run:
        device, s, dtype, repeats = torch.device("cpu"), TINY, torch.bfloat16, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("device_check: error: no CUDA device (use --dry-run to check the script on the CPU)")
        device, s, dtype, repeats = torch.device("cuda"), FULL, torch.bfloat16, args.repeats
        torch.backends.cuda.matmul.allow_tf32 = True
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, object] = {"device": name, "torch": torch.__version__, "sizes": s}

    peak = yardstick(s, device, dtype, repeats)
    rows.append((f"bf16 matmul {s['yard']}^3 (yardstick)", f"{peak / 1e12:.1f} TFLOP/s",
                 f"{peak / 1e12 / args.peak_tflops:.2f} of nominal {args.peak_tflops:.0f}" if device.type == "cuda" else ""))
    figures["yardstick_tflops"] = peak / 1e12
    if "train" not in skip:
        sec, flops = train_step(s, device, dtype, repeats)
        achieved = flops / sec
        rows.append((f"train step, bf16 autocast, batch {s['train_batch']}", f"{s['train_batch'] / sec:.1f} samples/s",
                     f"{sec * 1e3:.1f} ms; {flops / 1e12:.2f} TFLOP/step; {achieved / 1e12:.1f} TFLOP/s; MFU "
                     f"{achieved / peak:.2f} of measured, {achieved / 1e12 / args.peak_tflops:.2f} of nominal"))
        figures.update(train_ms=sec * 1e3, train_tflops=achieved / 1e12, mfu_measured=achieved / peak,
                       mfu_nominal=achieved / 1e12 / args.peak_tflops)
    if "decode" not in skip:
        dec, info = decoding(s, device, repeats)
        rows += [(label, f"{tps:.0f} tokens/s", note) for label, tps, note in dec]
        figures["decode"] = {label: tps for label, tps, _ in dec}
        figures["decode_checks"] = info
    if "embed" not in skip:
        ips = embedding(s, device, dtype, repeats)
        rows.append((f"embed_image, bf16 autocast, batch {s['embed_batch']}", f"{ips:.0f} images/s", ""))
        figures["embed_images_per_s"] = ips
    if "fsdp" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = fsdp_one_gpu(device, Path(tmp))
        rows.append(("FSDP2, torchrun 1 process, tiny preset", "", result))
        figures["fsdp"] = result

    print(f"device: {name}; torch {torch.__version__}; medians of {repeats}")
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:{width}s}  {value:>18s}  {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
