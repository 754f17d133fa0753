"""Video speed: clips/s of video encoding and training samples/s of the video MaMMUT (VideoTubeViT:
tubes + the ViT's 2D patches every ``frame_stride``-th frame) beside the image model at the same
frame count (every frame encoded as an independent image, all their tokens to the decoder), and
the "no tubes" ablation (the 2D patches of the strided frames only), with peak memory.

    .venv/bin/python benchmarks/video_speed.py [--threads 2] [--batch 8] [--repeats 5] [--frames 8]
                                               [--decode-seconds 120]

Model: the ``video`` preset's (ViT 128 x 3 layers at 64 px, patch 8; decoder 128 x 3; 8 frames,
2D patches of frames 0 and 4, tubes of 16 + 32 tokens); text 32 tokens. Timings are medians of
interleaved rounds (one call of each model per round, so a busy machine slows all alike) and are
printed as ratios against the image model measured in the same run. Peak memory: the peak resident
memory two calls add to the model and data already built (activations; for training also gradients
and AdamW state), each model in a fresh process, sampled by a thread (CPU only).

Last, the cost of reading clips from files: ``read_clip`` (8 frames by seeking) on a long H.264 file
written on the fly, against decoding every frame of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402

SIZE, PATCH, VIT_DIM, VIT_DEPTH, HEADS, DIM_HEAD = 64, 8, 128, 3, 2, 64
DIM, DEPTH, VOCAB, SEQ = 128, 3, 2048, 32
TUBES = (((8, 8, 8), (8, 16, 16), (0, 4, 4)), ((4, 16, 16), (4, 16, 16), (0, 0, 0)))
KINDS = ("frames", "tubes", "no-tubes")
LABELS = {"frames": "image model, every frame an independent image",
          "tubes": "video model (VideoTubeViT: strided 2D patches + tubes)",
          "no-tubes": "video model without tubes (strided 2D patches only)"}


class IndependentFrames(nn.Module):
    """The image model on a clip: each of the ``t`` frames through the ViT as an independent image;
    tokens ``(b, t * n, d)`` (every frame's) go to the decoder."""

    def __init__(self, vit: nn.Module, frames: int) -> None:
        super().__init__()
        self.vit, self.frames, self.dim = vit, frames, vit.dim

    def check_images(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != self.frames:
            raise ValueError(f"images: expected (b, {self.frames}, 3, H, W), got {tuple(video.shape)}")

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        tokens = self.vit(video.flatten(0, 1))  # (b t) n d
        return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])


def build(kind: str, frames: int) -> tuple[nn.Module, int]:
    """A MaMMUT with the ``kind`` encoder, and its image tokens per clip."""
    from mammut import MaMMUT, VideoTubeConfig, VideoTubeViT, ViT

    torch.manual_seed(0)
    vit = ViT(image_size=SIZE, patch_size=PATCH, dim=VIT_DIM, depth=VIT_DEPTH, heads=HEADS, dim_head=DIM_HEAD)
    if kind == "frames":
        enc: nn.Module = IndependentFrames(vit, frames)
        tokens = frames * (SIZE // PATCH) ** 2 + (frames if getattr(vit.config, "class_token", False) else 0)
    else:
        enc = VideoTubeViT(vit, VideoTubeConfig(frames=frames, frame_stride=4, tubes=TUBES,
                                                use_tubes=kind == "tubes"))
        tokens = enc.num_tokens()
    model = MaMMUT(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, cross_attend_every=2,
                   img_encoder=enc, image_dim=VIT_DIM, contrastive_loss="softmax")
    return model, tokens


def steps(model: nn.Module, batch: int, frames: int) -> dict[str, Callable[[], object]]:
    """``encode``: embed a batch of clips (no grad, eval); ``train``: a loss, backward and AdamW step."""
    video = torch.rand(batch, frames, 3, SIZE, SIZE)
    text = torch.randint(5, VOCAB, (batch, SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def encode() -> object:
        model.eval()
        with torch.no_grad():
            return model.embed_image(video)

    def train() -> object:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = model(text, video, return_loss=True)
        loss.backward()
        opt.step()
        return loss

    return {"encode": encode, "train": train}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(kind: str, mode: str, batch: int, frames: int) -> None:
    """Print the peak resident memory (MiB) that two ``mode`` calls of a fresh ``kind`` model add to
    the model and data already built (activations, and for training gradients and optimizer state),
    sampled every 0.2 ms by a thread while the calls run (torch releases the GIL in its kernels)."""
    import threading
    import time

    model, _ = build(kind, frames)
    fn = steps(model, batch, frames)[mode]
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    fn()
    done.set()
    thread.join()
    print(json.dumps({"peak_growth_mb": peak[0] - base, "base_mb": base}))


def decoding(seconds: float, repeats: int) -> None:
    """Clips/s of :func:`mammut.data.video_files.read_clip` (8 frames, uniform, by seeking) on a
    ``seconds``-long 320x240 25 fps H.264 file (keyframes at least every 2 s) written here, against decoding
    every frame of it once (what reading without seeking costs)."""
    import tempfile

    import numpy as np

    from mammut.data.video_files import import_av, read_clip_with_stats, write_video

    av = import_av()
    n = int(seconds * 25)
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (n // 25 + 1, 240, 320, 3), dtype=np.uint8), 25, axis=0)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / "long.mp4", frames, fps=25, codec="libx264", gop=50)
        stats: dict[str, object] = {}

        def clip() -> None:
            stats.update(read_clip_with_stats(path, frames=8, image_size=64)[1])

        def whole() -> None:
            with av.open(str(path)) as c:
                for _ in c.decode(video=0):
                    pass

        t = interleaved({"clip": clip, "whole": whole}, repeats)
        mb = path.stat().st_size / 2**20
    print(f"decoding a {seconds:.0f} s 320x240 H.264 file ({n} frames, {mb:.1f} MiB): read_clip of 8 frames "
          f"{1 / t['clip']:.1f} clips/s ({stats['decoded']} frames decoded), every frame decoded once "
          f"{1 / t['whole']:.2f} files/s: x{t['whole'] / t['clip']:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-seconds", type=float, default=120.0,
                   help="length of the file of the decoding comparison (0: skip it)")
    p.add_argument("--memory-child", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.frames)
        return
    models = {k: build(k, args.frames) for k in KINDS}
    fns = {f"{k}/{m}": f for k in KINDS for m, f in steps(models[k][0], args.batch, args.frames).items()}
    seconds = interleaved(fns, args.repeats)
    memory: dict[str, float] = {}
    for k in KINDS:
        for m in ("encode", "train"):
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--batch", str(args.batch),
                                  "--frames", str(args.frames), "--memory-child", k, m],
                                 capture_output=True, text=True, check=True).stdout
            memory[f"{k}/{m}"] = json.loads(out.strip().splitlines()[-1])["peak_growth_mb"]
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} clips of {args.frames} frames at "
          f"{SIZE} px, fp32, {args.repeats} interleaved rounds (medians)")
    head = f"{'encoder':<58} {'tokens':>6} {'encode clips/s':>15} {'x':>6} {'train samples/s':>16} {'x':>6} " \
           f"{'peak MiB enc':>12} {'peak MiB train':>14}"
    print(head)
    print("-" * len(head))
    base_enc, base_train = seconds["frames/encode"], seconds["frames/train"]
    for k in KINDS:
        enc, train = seconds[f"{k}/encode"], seconds[f"{k}/train"]
        print(f"{LABELS[k]:<58} {models[k][1]:>6} {args.batch / enc:>15.1f} {base_enc / enc:>6.2f} "
              f"{args.batch / train:>16.1f} {base_train / train:>6.2f} {memory[f'{k}/encode']:>12.0f} "
              f"{memory[f'{k}/train']:>14.0f}")
    tubes, none = seconds["tubes/train"], seconds["no-tubes/train"]
    print(f"tubes cost over the strided frames alone: training step x{tubes / none:.2f}, encoding "
          f"x{seconds['tubes/encode'] / seconds['no-tubes/encode']:.2f} (time; x columns: speed against the image "
          f"model's)")
    if args.decode_seconds > 0:
        decoding(args.decode_seconds, args.repeats)


if __name__ == "__main__":
    main()
