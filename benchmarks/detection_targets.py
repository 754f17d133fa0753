"""Issue 25's targets: open-vocabulary detection on held-out emoji scenes after at most 10
minutes of CPU detection training started from a pretraining run, beside two baselines trained
and measured the same way. Prints one markdown table.

    .venv/bin/python benchmarks/detection_targets.py --cpe-run RUN_CPE --plain-run RUN [--budget 420]
        [--out runs/detection-targets] [--threads 2] [--n 512] [--build]

Variants (each ``load_config("detection")`` with ``train.time_budget_s = --budget``: after 25
steps the run keeps the steps this machine trains in that many seconds; same seed, data and
settings):
- ``open vocabulary (CPE)``: the text-query head fine-tuned from ``--cpe-run``, a ``demo``
  pretraining with Cropped Positional Embedding (``--model.vit.cropped_pos_emb true``);
- ``closed vocabulary (CPE)``: the same from the same run, but ``model.num_classes`` = the 240
  base classes: learned class embeddings, never a text query. It cannot score a novel class,
  so its novel AP is 0 by construction;
- ``open vocabulary, no CPE``: the text-query head fine-tuned from ``--plain-run``, the plain
  ``demo`` pretraining (the same steps without CPE).
Optional (``--only 4``): the first variant with ``task_options.novel_in_train: absent`` (novel
emoji left out of training images instead of appearing unlabelled); (``--only 5``) the first
variant with ``task_options.loss_softmax: 0.5`` (a softmax cross-entropy over the queries for each
matched token, and its scores at evaluation: docs/detection.md). ``--build`` first pretrains
the two runs with the ``demo`` preset (``train.time_budget_s 0``: all 2,400 steps each) where
they do not exist. Scored on the first ``--n`` held-out detection scenes with pycocotools'
COCOeval after per-class NMS at IoU 0.5 (``mammut.tasks.detection``; novel AP50 is the headline).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def pretrain(out: Path, cpe: bool, threads: int) -> None:
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    if (out / "checkpoints").is_dir():
        return
    overrides = ["--train.out_dir", str(out), "--train.time_budget_s", "0", "--train.progress", "false",
                 "--train.threads", str(threads), "--model.vit.cropped_pos_emb", "true" if cpe else "false"]
    Trainer(load_config("demo", overrides)).fit()


def variant(name: str, source: Path, out: Path, budget: int, threads: int, n: int, extra: list[str],
            steps: int | None = None) -> dict:
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    overrides = ["--train.init_from", str(source), "--train.out_dir", str(out), "--train.progress", "false",
                 "--train.threads", str(threads), "--train.save_every", "0", *extra]
    if steps:  # a fixed number of steps (the AP does not depend on the machine's load)
        overrides += ["--train.steps", str(steps), "--train.time_budget_s", "0"]
    else:
        overrides += ["--train.time_budget_s", str(budget)]
    start = time.perf_counter()
    result = Trainer(load_config("detection", overrides)).fit()
    wall = time.perf_counter() - start
    row = {"variant": name, "source": str(source), "run": str(out), "steps": result.step,
           "train_s": result.train_time_s, "wall_s": wall, "samples_per_s": result.samples_per_s}
    return {**row, **scores(out, n)}


def scores(run: Path, n: int) -> dict:
    """The held-out figures of a detection run (``mammut eval RUN``'s, report in RUN/report)."""
    from mammut.eval.evaluate import evaluate_run

    metrics, _ = evaluate_run(run, n=n, out_dir=run / "report")
    ap = metrics["detection"]
    recall = (ap.get("novel_top_box_recall") or {}).get("recall")
    return {"novel_top_box_recall": recall, **{f"{g}_{k}": ap[g][k] for g in ("all", "base", "novel")
                                                for k in ("AP", "AP50", "AP75")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpe-run", required=True, help="a demo pretraining run with cropped_pos_emb true")
    p.add_argument("--plain-run", required=True, help="the demo pretraining run without CPE")
    p.add_argument("--budget", type=int, default=420, help="detection training seconds per variant (default 420)")
    p.add_argument("--out", default="runs/detection-targets")
    p.add_argument("--steps", type=int, default=None,
                   help="a fixed number of steps instead of --budget (the AP then does not depend on the load; "
                        "time the steps apart, alone on the machine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=512, help="held-out scenes scored")
    p.add_argument("--build", action="store_true", help="pretrain the two source runs first where missing")
    p.add_argument("--only", default=None, help="comma-separated variant numbers to run (default 1,2,3; 4: the "
                                                "main variant with novel emoji absent from training images; 5: "
                                                "with the softmax classification term)")
    p.add_argument("--collect", nargs="*", default=None, metavar="OUT",
                   help="print the table of the results.json of these --out folders (runs made apart) and exit")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.collect is not None:  # evaluated again with this code (the same held-out scenes)
        rows = [r for d in args.collect for r in json.loads((Path(d) / "results.json").read_text())]
        print_table([{**r, **scores(_run_of(r, args.collect), args.n)} for r in rows])
        return
    if not 0 < args.budget <= 600:
        p.error(f"--budget: expected 1..600 seconds (the issue's 10 minutes), got {args.budget}")
    cpe, plain, out = Path(args.cpe_run), Path(args.plain_run), Path(args.out)
    if args.build:
        pretrain(cpe, True, args.threads)
        pretrain(plain, False, args.threads)
    variants = [("open vocabulary (CPE)", cpe, []),
                ("closed vocabulary (CPE)", cpe, ["--model.num_classes", "240"]),
                ("open vocabulary, no CPE", plain, []),
                ("open vocabulary (CPE), novel emoji absent from training images", cpe,
                 ["--task_options.novel_in_train", "absent"]),
                ("open vocabulary (CPE), softmax classification term", cpe, ["--task_options.loss_softmax", "0.5"])]
    chosen = {int(v) for v in args.only.split(",")} if args.only else {1, 2, 3}  # 4: --only 4
    rows = []
    for i, (name, source, extra) in enumerate(variants, 1):
        if i in chosen:
            rows.append(variant(name, source, out / f"v{i}", args.budget, args.threads, args.n, extra, args.steps))
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    print_table(rows)


def _run_of(row: dict, folders: list[str]) -> Path:
    if row.get("run"):
        return Path(row["run"])
    for d in folders:  # rows written before "run" was recorded: the one v* folder of its --out
        found = sorted(Path(d).glob("v[0-9]"))
        if len(found) == 1 and json.loads((Path(d) / "results.json").read_text())[0]["variant"] == row["variant"]:
            return found[0]
    raise SystemExit(f"--collect: no run folder for {row['variant']!r}")


def print_table(rows: list[dict]) -> None:
    def f(v: object) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    header = ("| variant | steps | train s | samples/s | AP | AP50 | base AP50 | novel AP50 | novel AP | "
              "novel top-box recall |")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['train_s']:.0f} | {r['samples_per_s']:.1f} | {f(r['all_AP'])} | "
              f"{f(r['all_AP50'])} | {f(r['base_AP50'])} | {f(r['novel_AP50'])} | {f(r['novel_AP'])} | "
              f"{f(r.get('novel_top_box_recall'))} |")


if __name__ == "__main__":
    main()
