"""Does FlamingoPaLM learn from its context? The naming game and few-shot captioning at k = 0, 1, 2, 4.

Trains the ``flamingo-naming`` preset (``train.task: interleaved``, ``data.kind: naming_game``)
from a pretraining run's ViT (``train.image_encoder_from``, default ``runs/demo``, what ``make demo`` writes: the
demo preset's MaMMUT, 64 px emoji scenes, 300 emoji), in two recipes inside one CPU budget:

1. **unfrozen** (stage 1): the whole model (LM included) trains, ``--steps`` steps;
2. **frozen LM** (stage 2, the paper's recipe): starts from stage 1 (``train.init_from``: its
   trained LM, tokenizer and encoder) with ``model.freeze_lm: true``: only the perceiver and the
   gated cross-attention blocks train, ``--frozen-steps`` more steps. The frozen LM is a trained
   one, as in the paper; here it was trained on these sequences (stage 1) rather than on text.

Each run is scored on held-out sequences (held-out made-up names, held-out emoji) by its task's
evaluation (``mammut eval RUN``): naming-game accuracy (the query caption's made-up names exactly
right) against chance (guessing among the names the examples define; 0 at k = 0: the names are
unseen words) and few-shot captioning CIDEr-D of held-out emoji scenes after k random held-out
scenes with their true captions. Prints a markdown table, the wall time and samples/s.

Run (fixed step counts; the figures in docs/fewshot.md):
``python benchmarks/flamingo_fewshot.py --encoder runs/demo --out runs/fewshot --steps 1600 --frozen-steps 400 --threads 1``
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mammut.cli import main as mammut


def train(out: Path, steps: int, n: int, *extra: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    code = mammut(["train", "--config", "flamingo-naming", "--train.out_dir", str(out), "--train.steps", str(steps),
                   "--train.time_budget_s", "0", "--train.progress", "false", "--train.save_every", "0",
                   "--eval.n", str(n), *extra])
    if code != 0:
        raise SystemExit(f"training {out} failed with exit code {code}")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    metrics["bench_wall_s"] = time.perf_counter() - t0
    return metrics


def row(name: str, m: dict) -> str:
    naming, cap = m["naming_game"]["by_shots"], m["fewshot_caption"]["by_shots"]
    ks = sorted(naming, key=int)
    acc = " / ".join(f"{naming[k]['accuracy']:.3f}" for k in ks)
    chance = " / ".join(f"{naming[k]['chance']:.3f}" for k in ks)
    seen = " / ".join(f"{naming[k]['accuracy_training_names']:.3f}" for k in ks)
    cider = " / ".join(f"{cap[k]['cider_d']:.3f}" for k in ks)
    return f"| {name} | {m['steps']} | {acc} | {chance} | {seen} | {cider} | {m.get('samples_per_s', 0):.0f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="runs/demo", help="run whose ViT is frozen in (train.image_encoder_from)")
    p.add_argument("--out", default="runs/flamingo-fewshot", help="folder of the two runs")
    p.add_argument("--steps", type=int, default=1600, help="stage 1 (unfrozen) steps")
    p.add_argument("--frozen-steps", type=int, default=400, help="stage 2 (frozen LM) steps, from stage 1")
    p.add_argument("--n", type=int, default=200, help="held-out sequences per k")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    common = ["--train.threads", str(args.threads)]
    t0 = time.perf_counter()
    unfrozen = train(out / "unfrozen", args.steps, args.n, "--train.image_encoder_from", args.encoder, *common)
    frozen = train(out / "frozen-lm", args.frozen_steps, args.n, "--train.init_from", str(out / "unfrozen"),
                   "--model.freeze_lm", "true", *common)
    wall = time.perf_counter() - t0
    train_s = unfrozen["train_time_s"] + frozen["train_time_s"]
    print()
    print("| recipe | steps | naming accuracy, k = 0 / 1 / 2 / 4 | chance | training names (diagnostic) "
          "| captioning CIDEr-D, k = 0 / 1 / 2 / 4 | samples/s |")
    print("|---|---|---|---|---|---|---|")
    print(row("unfrozen (stage 1, from the demo run's ViT)", unfrozen))
    print(row(f"frozen LM (stage 2: + {args.frozen_steps} steps from stage 1)", frozen))
    print()
    print(f"training time {train_s:.0f} s (stage 1 {unfrozen['train_time_s']:.0f} s, stage 2 "
          f"{frozen['train_time_s']:.0f} s); wall time with evaluation {wall:.0f} s; "
          f"{args.n} held-out sequences per k")


if __name__ == "__main__":
    main()
