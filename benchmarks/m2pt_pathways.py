"""M2PT on something small and real: does a pathway from a transformer trained on another
modality help a tiny ViT?

- target task: classify synthetic shapes (8 classes: disc, ring, square, frame, triangle, plus,
  X, bar; random size, position, tint, a few clutter blobs and pixel noise) in 32x32 images,
  from only 1,000 training images, so that what the weights bring matters;
- auxiliary task, another modality: classify 1-D audio-like signals (8 waveform families: sine,
  square, sawtooth, triangle, chirp up/down, amplitude-modulated sine, noise bursts; random
  frequency, phase, amplitude, noise), with a transformer whose blocks have exactly the ViT's
  shapes (a Conv1d patch stem instead of the Conv2d one, 16 tokens each);
- target runs with the same seed, same initial weights, same batches, same steps:
  ``alone`` (plain ViT); ``+pathway`` (M2PT: every block's qkv/out/FFN linears compute with
  ``W + lambda * W_aux`` from the trained signal model, lambda learnable from 0); and
  ``+random pathway`` (the same reparameterisation with the auxiliary before its training:
  separates what the other modality's weights bring from what the extra parameters do).
  The pathway arms are run for each lambda learning-rate multiplier in ``--lambda-lr-mults``
  (default 1, the paper's single optimizer setting, and 20).
After training each pathway model is merged (``merge_pathways``) and evaluated as a plain ViT.

Run: ``.venv/bin/python benchmarks/m2pt_pathways.py`` (1 thread, one seed: about 1.5-2 minutes;
``--seeds 0 1 2`` for three). Prints held-out accuracies per seed and their mean.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from mammut import ViT
from mammut.layers import TransformerBlock, make_norm
from mammut.transforms.m2pt import add_pathways, merge_pathways, pathway_scales

NUM_CLASSES = 8
NOISE = 0.35


# ---------------------------------------------------------------- data
def make_shapes(n: int, gen: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` in about [-1, 1] and labels ``(n,)``."""
    labels = torch.randint(NUM_CLASSES, (n,), generator=gen)
    r = torch.empty(n, 1, 1).uniform_(0.3, 0.6, generator=gen)  # half-size, in image units [-1, 1]
    cx = torch.empty(n, 1, 1).uniform_(-1, 1, generator=gen) * (0.95 - r)
    cy = torch.empty(n, 1, 1).uniform_(-1, 1, generator=gen) * (0.95 - r)
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    dx, dy = (xx - cx) / r, (yy - cy) / r  # object coordinates, the shape spans [-1, 1]
    t = 0.28  # stroke width in object units
    dist = (dx**2 + dy**2).sqrt()
    cheb = torch.maximum(dx.abs(), dy.abs())
    masks = torch.stack([
        dist <= 1,  # disc
        (dist <= 1) & (dist >= 1 - t),  # ring
        cheb <= 0.85,  # square
        (cheb <= 0.9) & (cheb >= 0.9 - t),  # frame
        (dy <= 0.8) & (dy >= 1.6 * dx.abs() - 0.8),  # triangle
        ((dx.abs() <= t / 2) | (dy.abs() <= t / 2)) & (cheb <= 1),  # plus
        (((dx - dy).abs() <= t / 1.4) | ((dx + dy).abs() <= t / 1.4)) & (cheb <= 0.9),  # X
        (dy.abs() <= t / 1.5) & (dx.abs() <= 1),  # bar
    ], dim=1)  # n, 8, H, W
    mask = masks[torch.arange(n), labels].float()
    # light shape on a darker background, both with a random tint
    fg = torch.empty(n, 1, 1, 1).uniform_(0.3, 1.0, generator=gen) + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
    bg = torch.empty(n, 1, 1, 1).uniform_(-1.0, -0.2, generator=gen) + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
    img = bg + (fg - bg) * mask.unsqueeze(1)
    # clutter: a few random small blobs of other colours, then pixel noise
    for _ in range(3):
        bx, by = torch.rand(n, 1, 1, generator=gen) * 2 - 1, torch.rand(n, 1, 1, generator=gen) * 2 - 1
        blob = (((xx - bx) ** 2 + (yy - by) ** 2) <= 0.012).float().unsqueeze(1)
        img = img + blob * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    img = img + NOISE * torch.randn(img.shape, generator=gen)
    return img.clamp(-2, 2), labels


def make_signals(n: int, gen: torch.Generator, length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals ``(n, 1, length)`` and labels ``(n,)``."""
    labels = torch.randint(NUM_CLASSES, (n,), generator=gen)
    t = torch.linspace(0, 1, length).unsqueeze(0)
    f = torch.empty(n, 1).uniform_(3, 20, generator=gen)
    ph = torch.rand(n, 1, generator=gen)
    cyc = f * t + ph  # cycles
    frac = cyc - cyc.floor()
    sine = torch.sin(2 * math.pi * cyc)
    chirp_up = torch.sin(2 * math.pi * (f * 0.3 * t + f * 1.2 * t**2 + ph))
    chirp_down = torch.sin(2 * math.pi * (f * 1.5 * t - f * 0.6 * t**2 + ph))
    am = torch.sin(2 * math.pi * cyc * 2) * (0.5 + 0.5 * torch.sin(2 * math.pi * (f / 6) * t))
    bursts = torch.randn(n, length, generator=gen) * (torch.sin(2 * math.pi * (f / 4) * t + 2 * math.pi * ph) > 0.3).float()
    waves = torch.stack([
        sine, torch.sign(sine), 2 * frac - 1, 4 * (frac - 0.5).abs() - 1, chirp_up, chirp_down, am, bursts,
    ], dim=1)  # n, 8, L
    x = waves[torch.arange(n), labels] * torch.empty(n, 1).uniform_(0.5, 1.5, generator=gen)
    x = x + 0.4 * torch.randn(x.shape, generator=gen)
    return x.unsqueeze(1), labels


# ---------------------------------------------------------------- models
class ImageClassifier(nn.Module):
    """Our ViT, mean-pooled tokens, a linear head."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 8) -> None:
        super().__init__()
        self.encoder = ViT(image_size=32, patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class SignalClassifier(nn.Module):
    """1-D patches (16 samples) -> 16 tokens, learned positions, the ViT's block shapes."""

    def __init__(self, dim: int, depth: int, heads: int, length: int = 256, patch: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, dim, patch, stride=patch)
        self.pos_emb = nn.Parameter(torch.randn(1, length // patch, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads=heads, dim_head=dim // heads, ff_mult=4.0, activation="gelu") for _ in range(depth)
        )
        self.norm = make_norm("layernorm", dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).transpose(1, 2) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------- training
def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int, lambda_lr_mult: float = 1.0
) -> float:
    """AdamW with warmup + cosine; no weight decay on vectors / scalars (biases, norms,
    lambda); the lambdas' learning rate is ``lr * lambda_lr_mult``. Returns seconds per step."""
    lambdas = [p for n, p in model.named_parameters() if n.endswith("cross_modal_scale")]
    ids = {id(p) for p in lambdas}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.05},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    if lambdas:
        groups.append({"params": lambdas, "weight_decay": 0.0, "lr": lr * lambda_lr_mult})
    opt = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512)))
    return correct / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300, help="target training steps (every arm)")
    p.add_argument("--aux-steps", type=int, default=300)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--lambda-lr-mults", type=float, nargs="+", default=[1.0, 20.0],
        help="learning rate of the lambdas / lr, one pair of pathway arms each (the paper: 1)",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    arch = dict(dim=args.dim, depth=args.depth, heads=args.heads)

    gen = torch.Generator().manual_seed(1234)
    xs, ys = make_shapes(args.train_images, gen)
    xs_test, ys_test = make_shapes(args.test_images, gen)
    xa, ya = make_signals(8000, gen)
    xa_test, ya_test = make_signals(2000, gen)
    print(f"target: {args.train_images} training / {args.test_images} test shape images (8 classes, chance 0.125); "
          f"ViT dim {args.dim} x {args.depth} blocks; {args.steps} steps of {args.batch}; lr {args.lr}")

    results: dict[str, list[float]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(10_000 + seed)
        aux = SignalClassifier(**arch)
        random_aux = copy.deepcopy(aux)  # the same auxiliary before training
        sps = train(aux, xa, ya, args.aux_steps, args.batch, args.lr, seed=10_000 + seed)
        print(f"seed {seed}: auxiliary (1-D signals) test accuracy {accuracy(aux, xa_test, ya_test):.3f} "
              f"after {args.aux_steps} steps ({sps * 1000:.0f} ms/step)")

        torch.manual_seed(seed)
        initial = ImageClassifier(**arch)
        arms = [("alone", None, 1.0)]
        for mult in args.lambda_lr_mults:
            arms += [(f"+pathway, lambda lr x{mult:g}", aux, mult), (f"+random pathway, lambda lr x{mult:g}", random_aux, mult)]
        for arm, source, mult in arms:
            model = copy.deepcopy(initial)
            if source is not None:
                # pair the ViT's blocks with the signal model's, in order (different module names)
                add_pathways(model.encoder, source, pair_by="order")
            sps = train(model, xs, ys, args.steps, args.batch, args.lr, seed=seed, lambda_lr_mult=mult)
            extra = ""
            if source is not None:
                lams = [abs(v) for v in pathway_scales(model).values()]
                model.eval()
                with torch.no_grad():
                    unmerged = model(xs_test[:256])
                    merge_pathways(model)  # a plain ViT again: no inference cost
                    diff = (model(xs_test[:256]) - unmerged).abs().max().item()
                extra = f"  |lambda| mean {sum(lams) / len(lams):.3f} max {max(lams):.3f}; merged vs unmerged max diff {diff:.1e}"
            acc = accuracy(model, xs_test, ys_test)
            results.setdefault(arm, []).append(acc)
            print(f"seed {seed}: {arm:<34} test accuracy {acc:.3f}  ({sps * 1000:.0f} ms/step){extra}")

    print(f"test accuracy, mean over seeds {args.seeds} ({time.perf_counter() - start:.0f} s):")
    for arm, accs in results.items():
        print(f"  {arm:<34} {sum(accs) / len(accs):.3f}   (per seed: {', '.join(f'{a:.3f}' for a in accs)})")


if __name__ == "__main__":
    main()
