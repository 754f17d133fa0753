"""Training samples/s of a preset in fp32 and in bf16 autocast on this machine, side by side,
and the precision ``train.precision: auto`` picks here (with its reason).

    .venv/bin/python benchmarks/precision.py [--config demo] [--steps 30] [--rounds 2] [--threads 2]

Each round trains the preset from scratch for ``--steps`` steps once in each precision
(alternated, so both see the same minutes of a shared machine) through the real ``Trainer``
(data, forward, backward, optimiser); the figure is samples/s over the steps after the first
five (warm-up), best of the rounds. On a CPU without native bf16 (AVX2; AVX-512 without BF16)
bf16 autocast is emulated and ~20x slower; on AVX512-BF16/AMX CPUs and on Ampere+ GPUs it is
faster. Emulate an AVX2 machine on a newer CPU with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (``auto`` then picks fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def samples_per_s(config: str, precision: str, steps: int, threads: int) -> float:
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, ["--train.steps", str(steps), "--train.precision", precision, "--train.out_dir", tmp,
                                   "--train.log_every", "1", "--train.save_every", "0", "--train.report", "false",
                                   "--train.progress", "false", "--train.tensorboard", "false",
                                   "--train.threads", str(threads)])
        Trainer(cfg).fit()
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    warm = [r for r in train if r["step"] == 5][0]
    last = train[-1]
    return (last["samples"] - warm["samples"]) / (last["train_time_s"] - warm["train_time_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from mammut.precision import resolve_precision

    auto = resolve_precision("auto", "cpu")
    print(f"CPU: {cpu_name()}; ATen capability {torch.backends.cpu.get_cpu_capability()}; "
          f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; torch {torch.__version__}; "
          f"{args.threads} threads")
    best = {"fp32": 0.0, "bf16": 0.0}
    for r in range(args.rounds):
        for precision in ("fp32", "bf16"):
            rate = samples_per_s(args.config, precision, args.steps, args.threads)
            best[precision] = max(best[precision], rate)
            print(f"round {r + 1}: {precision}: {rate:.1f} samples/s")
    print(f"preset {args.config}: fp32 {best['fp32']:.1f} samples/s, bf16 {best['bf16']:.1f} samples/s, "
          f"bf16/fp32 {best['bf16'] / best['fp32']:.2f}x")
    print(f"auto picks {auto.name} ({auto.reason})")


if __name__ == "__main__":
    main()
