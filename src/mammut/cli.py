"""The ``mammut`` command: train, eval, caption, embed, demo, config.

    mammut train --config tiny [--resume] [--train.steps 200 --optim.lr 3e-4 ...]
    torchrun --nproc_per_node 2 -m mammut.cli train --config tiny --train.parallel ddp
    mammut eval RUN_DIR [--checkpoint DIR] [--n 512]
    mammut eval BENCHMARK SOURCE ...   # a registered benchmark (listed below and by mammut eval
                                       # --help; mammut eval BENCHMARK --help: its options)
    mammut caption IMAGE_OR_VIDEO... --run RUN_DIR   # a video (.mp4, .webm, ...): a run with a video encoder
    mammut embed --run RUN_DIR (--images IMAGE... | --videos VIDEO... | --texts TEXT...) --out emb.npy
    mammut demo [--train.steps 600 ...]
    mammut config [--config FILE] [--key value ...]      # print the full resolved config

Any ``--section.key value`` after the flags overrides the config file (sections: model, data,
optim, train, eval). Exit codes: 0 done, 2 bad config or arguments, 3 NaN/inf loss,
143 stopped by SIGTERM (a checkpoint was saved; continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("mammut.cli")

EXIT_CONFIG, EXIT_NONFINITE, EXIT_SIGTERM = 2, 3, 143


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the CPU/GPU runs bf16 natively, else fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")


def _video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampling", choices=("uniform", "stride"), default="uniform",
                   help="videos: frames uniform over the clip (default) or --stride frames apart, centred")
    p.add_argument("--stride", type=int, default=None, help="videos, with --sampling stride: frames between samples")


def _run_clips(run: Any, paths: list[str], args: argparse.Namespace) -> Any:
    """Video files -> clips ``(n, t, 3, H, W)`` as the run's model takes them (its frame count, the
    run's image preprocessing); a model without a video encoder is a ``ValueError`` saying so."""
    import torch

    from .data.video_files import model_clip_shape, read_clip
    from .inference import run_preprocess

    shape = model_clip_shape(run.model)
    if shape is None:
        encoder = type(getattr(run.model, "img_encoder", None)).__name__
        raise ValueError(f"{paths[0]}: the run {args.run} has a model that takes only images "
                         f"({type(run.model).__name__}, image encoder {encoder}); caption or embed videos with a "
                         "run whose model has a video encoder (model.encoder: {type: video_tube, ...}, e.g. "
                         "train.task: video)")
    frames, size = shape
    pre = run_preprocess(size, run.config.data.normalize)
    return torch.stack([read_clip(p, frames=frames, image_size=size, sampling=args.sampling, stride=args.stride,
                                  preprocess=pre) for p in paths])


def _run_precision(args: argparse.Namespace) -> Any:
    """The resolved precision of ``caption``/``embed`` (the model runs on the CPU), logged."""
    from .precision import resolve_precision

    chosen = resolve_precision(args.precision, "cpu")
    log.info("precision %s (%s)", chosen.name, chosen.reason)
    return chosen


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .eval.benchmarks import list_benchmarks

    names = list_benchmarks()  # the registry: a new benchmark file shows up in the help
    p = argparse.ArgumentParser(prog="mammut", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"mammut eval BENCHMARK: one of {', '.join(names)}")
    p.add_argument("--version", action="version", version=f"mammut {__version__} (distribution mammut-vl)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a config (add --section.key value overrides)")
    t.add_argument("--config", required=True, help="YAML config file, or a preset name (tiny, demo)")
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")

    d = sub.add_parser("demo", help="train the demo preset, evaluate on held-out scenes, write the report")
    d.add_argument("--config", default=None, help="default: the demo preset")

    c = sub.add_parser("config", help="print the resolved config (defaults + file + overrides) as YAML")
    c.add_argument("--config", default=None, help="YAML config file or preset name (default: the built-in defaults)")

    e = sub.add_parser("eval", help="evaluate a run folder and write its report, or run a benchmark "
                                    f"(mammut eval {{{','.join(names)}}} SOURCE ...)",
                       description="mammut eval RUN: a run folder on its own held-out data. mammut eval BENCHMARK "
                                   f"SOURCE ...: a benchmark ({', '.join(names)}) on standard data formats for any "
                                   "model mammut.load loads; see mammut eval BENCHMARK --help. (A run folder named "
                                   "like a benchmark: write it as ./NAME.)")
    e.add_argument("run", help=f"run folder (train.out_dir), or a benchmark: {', '.join(names)}")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the latest)")
    e.add_argument("--n", type=int, default=None, help="evaluation set size in images (default: eval.n of the run)")
    e.add_argument("--data", default=None,
                   help="held-out csv/tsv file or shard pattern (default: the run's data.val_path; emoji runs: "
                        "the built-in held-out split)")
    e.add_argument("--out", default=None, help="report folder (default: RUN/report)")

    k = sub.add_parser("caption", help="print greedy captions of image or video files")
    k.add_argument("images", nargs="+", metavar="FILE",
                   help="image files, or video files (.mp4, .webm, ...) for a run whose model has a video encoder")
    k.add_argument("--run", required=True, help="run folder")
    k.add_argument("--max-new-tokens", type=int, default=None)
    _video_args(k)
    _precision_arg(k)

    m = sub.add_parser("embed", help="write L2-normalised embeddings of images or texts (.npy or .safetensors)")
    m.add_argument("--run", required=True, help="run folder")
    group = m.add_mutually_exclusive_group(required=True)
    group.add_argument("--images", nargs="+", help="image files")
    group.add_argument("--videos", nargs="+", help="video files (a run whose model has a video encoder)")
    group.add_argument("--texts", nargs="+", help="texts")
    m.add_argument("--out", required=True, help="output file: .npy or .safetensors")
    _video_args(m)
    _precision_arg(m)

    from .apps import register_commands

    register_commands(sub)  # applications on top of the library (each sets its handler)
    return p


# --------------------------------------------------------------------------- commands


def _train(config_path: str | Path, overrides: list[str], resume: bool) -> int:
    from .io.runlock import FolderLock
    from .train.config import load_config

    started = time.perf_counter()
    cfg = load_config(config_path, overrides)
    # rank 0 holds the run folder for the whole command: training, export and report
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with FolderLock(cfg.train.out_dir, what="train.out_dir") if main_rank else contextlib.nullcontext():
        return _train_locked(cfg, resume, started)


def _train_locked(cfg: Any, resume: bool, started: float) -> int:
    from .train.distributed import shutdown_distributed
    from .train.loop import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg, resume=resume)
        result = trainer.fit()  # held-out figures every train.eval_every steps: the task's quick_eval
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        print(f"mammut: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        shutdown_distributed()
    if result.interrupted:
        return EXIT_SIGTERM
    if trainer.info.is_main:
        wall = time.perf_counter() - started
        _export(result.run_dir)
        if cfg.train.report:
            from .eval.evaluate import evaluate_run

            metrics, report = evaluate_run(result.run_dir, extra={"wall_time_s": wall,
                                                                  "world_size": trainer.info.world_size})
            _print_summary(metrics, report)
        else:
            print(f"run folder: {result.run_dir}")
    return 0


def _export(run_dir: Path) -> None:
    """``<run>/model``: the final weights as ``save_pretrained`` (config.json + safetensors) with
    the run's eval preprocessing and tokenizer, so ``mammut.load(RUN/model)`` returns all three
    (built from the last checkpoint, so it works whatever the parallel wrapping was)."""
    from .inference import load_run, run_preprocess

    target = run_dir / "model"
    try:
        run = load_run(run_dir)
        preprocess = run_preprocess(run.config.data.image_size, run.config.data.normalize)
        run.model.save_pretrained(target, preprocess=preprocess, tokenizer=run.tokenizer)
    except (ImportError, AttributeError, NotImplementedError, TypeError) as exc:
        log.warning("could not export %s with save_pretrained: %s", target, exc)


def _print_summary(metrics: dict, report: Path) -> None:
    r = metrics.get("retrieval", {})
    cap = metrics.get("caption", {})
    split = metrics.get("eval_split", {})
    files = sorted(f.name for f in Path(report).iterdir() if f.is_file()) if Path(report).is_dir() else []
    lines = [f"report: {Path(report).resolve()}  ({', '.join(files)})"]  # what the task's report holds
    if not split.get("held_out", True):
        lines.append(f"NOT held-out: scored on training rows of {split.get('source')} "
                     f"(set data.val_path or pass `mammut eval RUN --data FILE`)")
    if r:
        where = "held-out" if split.get("held_out", True) else "training-row"
        lines.append(f"{where} retrieval (gallery {r.get('gallery_size')}): i2t R@1 {r.get('i2t_R@1', 0):.3f}, "
                     f"t2i R@1 {r.get('t2i_R@1', 0):.3f} (chance {r['chance']['R@1']:.4f})")
    if cap.get("emoji_acc_single") is not None:
        lines.append(f"greedy captions naming the emoji: {cap['emoji_acc_single']:.3f} (1-emoji scenes), "
                     f"{cap.get('emoji_acc_pair') or 0:.3f} (2-emoji scenes); BLEU-4 {cap['bleu4']:.3f}, CIDEr-D {cap['cider_d']:.3f}")
    if metrics.get("samples_per_s"):
        wall = f", wall {metrics['wall_time_s']:.0f} s" if metrics.get("wall_time_s") else ""
        lines.append(f"{metrics['steps']} steps, {metrics['samples_per_s']:.1f} samples/s{wall}")
    print("\n".join(lines))


def _caption(args: argparse.Namespace) -> int:
    from .inference import generate_captions, load_image_files
    from .inference import load_run

    from .precision import autocast

    from .data.video_files import is_video_file, model_clip_shape

    precision = _run_precision(args)
    run = load_run(args.run)
    videos = [is_video_file(p) for p in args.images]
    if any(videos) and not all(videos):
        raise ValueError(f"FILE: expected all images or all videos, got both ({args.images[videos.index(False)]} and "
                         f"{args.images[videos.index(True)]}); caption them in two commands")
    if all(videos):
        images = _run_clips(run, args.images, args)
    elif model_clip_shape(run.model) is not None:
        raise ValueError(f"FILE: the run {args.run} has a video model: expected video files (.mp4, .webm, ...), "
                         f"got {args.images[0]}")
    else:
        images = load_image_files(args.images, run.config.data.image_size, run.config.data.normalize)
    n_tokens = args.max_new_tokens or run.config.eval.max_new_tokens
    with autocast(precision, "cpu"):
        captions = generate_captions(run.model, run.tokenizer, images, max_new_tokens=n_tokens)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .inference import embed_images, embed_texts, load_image_files
    from .inference import load_run

    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--out: expected a .npy or .safetensors file name, got {out}")
    import torch

    from .precision import autocast

    precision = _run_precision(args)
    run = load_run(args.run)
    with autocast(precision, "cpu"):
        if args.images:
            emb = embed_images(run.model, load_image_files(args.images, run.config.data.image_size, run.config.data.normalize))
        elif args.videos:
            from .embedder import Embedder

            emb = Embedder(run.model, batch_size=16).embed_images(_run_clips(run, args.videos, args))
        else:
            emb = embed_texts(run.model, run.tokenizer, args.texts, run.config.data.max_len, truncate=True)
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)  # unit norm in fp32 after a bf16 forward too
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, emb.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": emb.contiguous()}, str(out),
                  metadata={"inputs": "\n".join(args.images or args.videos or args.texts), "run": str(args.run)})
    print(f"wrote {tuple(emb.shape)} embeddings to {out}")
    return 0


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError from the system as ``<reason>: <file>`` (no errno)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror.lower()}: {exc.filename}"
    return " ".join(text.split()) or type(exc).__name__


def _eval_benchmark(argv: list[str]) -> int:
    """``mammut eval BENCHMARK SOURCE ...`` (``argv`` starts with the benchmark, one of
    ``mammut.eval.benchmarks``)."""
    from .eval.cli import benchmark_parser, run_benchmark, summary

    args = benchmark_parser().parse_args(argv)
    _setup_logging()
    try:
        metrics, out = run_benchmark(args)
    except (ValueError, OSError) as exc:  # bad input (a missing file, a wrong layout, an empty folder): one line
        if os.environ.get("MAMMUT_DEBUG"):
            raise
        print(f"mammut eval: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(metrics, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .eval.benchmarks import list_benchmarks

    if len(argv) >= 2 and argv[0] == "eval" and argv[1] in list_benchmarks():  # a benchmark, not a run folder
        return _eval_benchmark(argv[1:])
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "demo", "config"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _setup_logging()
    from .train.config import ConfigError

    try:
        if args.command == "train":
            return _train(args.config, rest, args.resume)
        if args.command == "demo":
            stamp = time.strftime("%Y%m%d-%H%M%S")
            overrides = ["--train.out_dir", f"runs/demo-{stamp}", *rest]
            return _train(args.config or "demo", overrides, resume=False)
        if args.command == "config":
            import yaml

            from .train.config import config_to_dict, load_config

            print(yaml.safe_dump(config_to_dict(load_config(args.config, rest)), sort_keys=False), end="")
            return 0
        if args.command == "eval":
            from .eval.evaluate import evaluate_run

            data = args.data
            if data is not None and "://" not in data and not data.startswith("pipe:"):
                data = str(Path(data).expanduser().absolute())
            metrics, report = evaluate_run(args.run, checkpoint=args.checkpoint, n=args.n, out_dir=args.out, data=data)
            _print_summary(metrics, report)
            return 0
        if args.command == "caption":
            return _caption(args)
        if args.command == "embed":
            return _embed(args)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args, lambda text: print(text, flush=True)))
    except (ConfigError, ValueError, OSError) as exc:  # user errors and the machine's (disk full): one line
        if os.environ.get("MAMMUT_DEBUG"):
            raise
        print(f"mammut {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
