"""Proof that the video model learns motion (issue 24, point 6), on held-out moving-emoji clips.

From an image run (default: the demo run), for the full video encoder and each of the paper's
ablations (no gate, no fixed 3D embeddings, no tubes), it trains

1. a ``video`` run (contrastive + captioning on clips, ``--video-steps``) from the image run, then
2. a ``videoqa`` run (answer-only loss, ``--qa-steps``) from that video run,

with the same steps, batch and seed for every variant, and prints one table:

- **motion QA**: accuracy on held-out ``direction`` questions ("which way does the cat move?",
  left / right / up / down, chance 0.25) answered greedily by the videoqa model;
- **motion retrieval**: held-out clips, the video model's contrastive similarity ranking the
  caption against its three variants that differ only in the direction (chance 0.25);
- **linear probe**: whether the direction is in the videoqa model's encoder tokens at all: a ridge
  probe on the flattened output tokens of 800 one-emoji "move" training clips, scored on 400
  held-out ones (chance 0.25); not the model's own answer, a measure of what it could read;
- for the full model also (b): the same two models given only the middle frame of each clip
  (frame ``t // 2``, repeated to ``t`` frames: the encoder takes ``t`` frames, and a still clip is
  what one image looks like to it), so (a) - (b) is what motion adds.

Held-out clips: emoji pairs and two-event motion combinations never trained on, a fixed seed.

    python benchmarks/video_motion.py --from runs/demo --out runs/video-motion
    python benchmarks/video_motion.py --from runs/demo --variants full        # (a) and (b) only

The runs are ordinary run folders under ``--out`` (``mammut eval`` works on them). Training
times are the runs' own (``metrics.jsonl``), the wall time of the whole script is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name -> model.encoder overrides (VideoTubeConfig options)
    "full": [],
    "gate_open": ["--model.encoder.gate_init", "1.0"],
    "no_gate": ["--model.encoder.gate", "false"],
    "no_fixed": ["--model.encoder.fixed_embeddings", "false"],
    "no_tubes": ["--model.encoder.use_tubes", "false"],
}
LABELS = {"full": "(a) video model", "gate_open": "(a') video model, gate starting at 1", "no_gate": "(c) ablation: no gate",
          "no_fixed": "(c) ablation: no fixed 3D embeddings", "no_tubes": "(c) ablation: no tubes (frames only)"}


def train(args: argparse.Namespace, preset: str, init_from: Path, out: Path, steps: int, extra: list[str]) -> float:
    """Train one run with the ``mammut`` CLI (skipped when ``out`` already finished); its training seconds."""
    if not (out / "checkpoints").is_dir() or not any((out / "checkpoints").glob("step_*")):
        cmd = [str(Path(sys.executable).with_name("mammut")), "train", "--config", preset,
               "--train.init_from", str(init_from), "--train.out_dir", str(out), "--train.steps", str(steps),
               "--train.time_budget_s", "0", "--train.report", "false", "--train.save_every", "0",
               "--train.progress", "false", "--train.log_every", "50", "--train.batch_size", str(args.batch_size), *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(float(r.get("train_time_s", 0.0)) for r in records)


@torch.no_grad()
def motion_qa(run_dir: Path, n: int, single_frame: bool) -> float:
    """Accuracy on the first ``n`` held-out direction questions (greedy answers)."""
    from mammut.data.video_questions import heldout_questions
    from mammut.data.vqa import VqaEncoder
    from mammut.eval.vqa import vqa_accuracy
    from mammut.inference import load_run
    from mammut.tasks.video_eval import middle_frame

    run = load_run(run_dir)
    cfg, model, tok = run.config, run.model.eval(), run.tokenizer
    frames = cfg.model["encoder"]["frames"]
    qs = heldout_questions(n, frames=frames, image_size=cfg.data.image_size, num_emoji=cfg.data.num_emoji,
                           vocab_seed=cfg.data.vocab_seed, types=("direction",))
    enc = VqaEncoder(tok)
    clips = torch.stack([q.frames for q in qs])
    if single_frame:
        clips = middle_frame(clips)
    answers: list[str] = []
    for s in range(0, n, 128):
        ids = model.generate(clips[s:s + 128], prompt=[enc.prompt(q.question) for q in qs[s:s + 128]],
                             max_new_tokens=4, strategy="greedy")
        answers += tok.decode(ids)
    return sum(vqa_accuracy(a, q.answer) for a, q in zip(answers, qs)) / n


def motion_retrieval(run_dir: Path, n: int, single_frame: bool) -> tuple[float, int]:
    from mammut.data.moving_emoji import heldout_clips
    from mammut.inference import load_run
    from mammut.tasks.video_eval import motion_retrieval as retrieve

    run = load_run(run_dir)
    cfg = run.config
    clips = heldout_clips(n, frames=cfg.model["encoder"]["frames"], image_size=cfg.data.image_size,
                          num_emoji=cfg.data.num_emoji, vocab_seed=cfg.data.vocab_seed)
    r = retrieve(run.model.eval(), run.tokenizer, clips, max_len=cfg.data.max_len, single_frame=single_frame)
    return r["accuracy"], r["n"]


@torch.no_grad()
def token_probe(run_dir: Path, single_frame: bool, n_train: int = 800, n_test: int = 400) -> float:
    """Is the direction in the video encoder's tokens at all? A ridge-regression probe on the
    flattened output tokens of one-emoji "move" clips (train split) scored on held-out ones."""
    from mammut.data.moving_emoji import DIRECTIONS, MovingEmoji
    from mammut.inference import load_run
    from mammut.tasks.video_eval import middle_frame

    run = load_run(run_dir)
    cfg, enc = run.config, run.model.img_encoder.eval()
    frames = cfg.model["encoder"]["frames"]

    def data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = MovingEmoji(cfg.data.image_size, frames, cfg.data.num_emoji, split, 7, kinds=("move",),
                         vocab_seed=cfg.data.vocab_seed)
        clips = [ds.clip(i) for i in range(n)]
        x = torch.stack([c.frames for c in clips])
        x = middle_frame(x) if single_frame else x
        feats = torch.cat([enc(x[s:s + 100]).flatten(1).float() for s in range(0, n, 100)])
        return feats, torch.tensor([DIRECTIONS.index(c.events[0].direction) for c in clips])

    (a, ya), (b, yb) = data("train", n_train), data("heldout", n_test)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    targets = torch.nn.functional.one_hot(ya, 4).float()
    w = a.T @ torch.linalg.solve(a @ a.T + 10.0 * torch.eye(len(a)), targets)  # ridge, dual form
    return float(((b @ w).argmax(1) == yb).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", default="runs/demo", help="image run to start from (default runs/demo)")
    p.add_argument("--out", default="runs/video-motion", help="folder of the runs")
    p.add_argument("--variants", default="full,no_gate,no_fixed,no_tubes", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--video-steps", type=int, default=500)
    p.add_argument("--qa-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--qa-types", default="[direction,order,event,exists,direction]",
                   help="task_options.types of the videoqa runs (default: direction questions twice as often)")
    p.add_argument("--n", type=int, default=400, help="held-out questions / clips")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: expected names from {list(VARIANTS)}, got {bad}")
    source, out = Path(args.source), Path(args.out)
    if not (source / "config.yaml").is_file():
        p.error(f"--from: expected an image run folder (config.yaml), got {source}")
    t0 = time.perf_counter()
    rows = []
    for v in variants:
        video_dir, qa_dir = out / f"video-{v}", out / f"videoqa-{v}"
        t_video = train(args, "video", source, video_dir, args.video_steps, VARIANTS[v])
        t_qa = train(args, "videoqa", video_dir, qa_dir, args.qa_steps, ["--task_options.types", args.qa_types])
        single = [("(b) same models, middle frame only", True)] if v == "full" else []
        single = single or ([("(b') same models, middle frame only", True)] if v == "gate_open" else [])
        inputs = [(LABELS[v], False)] + single
        for label, single in inputs:
            qa = motion_qa(qa_dir, args.n, single)
            ret, n_ret = motion_retrieval(video_dir, args.n, single)
            probe = token_probe(qa_dir, single)
            rows.append((label, qa, ret, n_ret, probe, t_video + t_qa))
            print(f"{label}: motion QA {qa:.3f}, motion retrieval {ret:.3f} ({n_ret} clips), token probe {probe:.3f}, "
                  f"training {t_video + t_qa:.0f} s", flush=True)
    print(f"\nHeld-out moving-emoji clips; {args.video_steps} video + {args.qa_steps} videoqa steps of "
          f"{args.batch_size} from {source}; chance 0.25 in both columns\n")
    print(f"| model | motion QA (direction, n={args.n}) | motion retrieval | linear probe on the encoder tokens "
          f"| training (s) |")
    print("|---|---|---|---|---|")
    for label, qa, ret, n_ret, probe, secs in rows:
        print(f"| {label} | {qa:.3f} | {ret:.3f} (n={n_ret}) | {probe:.3f} | {secs:.0f} |")
    for a, b in (("(a)", "(b)"), ("(a')", "(b')")):
        full = [r for r in rows if r[0].startswith(a)]
        single = [r for r in rows if r[0].startswith(b)]
        if full and single:
            print(f"\n{a} - {b} on motion questions: {full[0][1] - single[0][1]:+.3f} (target >= +0.30)")
    print(f"wall time {time.perf_counter() - t0:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
