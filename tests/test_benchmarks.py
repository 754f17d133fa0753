"""``mammut eval BENCHMARK``: benchmarks come from a registry (:mod:`mammut.eval.benchmarks`). A
toy benchmark registered here, in the test, runs through ``mammut eval toy SOURCE ...`` with
its own option, its pre-check before the model loads, and the sections and figure (boxes) it
returns; a run report holds only the parts its task returned."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

import mammut.eval.benchmarks as benchmarks
from mammut.cli import main
from mammut.eval.benchmarks import Benchmark, get_benchmark, list_benchmarks, register_benchmark
from mammut.eval.report import Figure, RunReport, write_report


def draw_boxes(path, boxes):
    img = Image.new("RGB", (48, 48), (128, 128, 128))
    for box in boxes:
        ImageDraw.Draw(img).rectangle(box, outline=(220, 20, 20), width=2)
    img.save(path)
    return path


class Toy(Benchmark):
    name = "toy"
    help = "a toy benchmark: draws boxes"
    title = "Toy boxes"
    summary_keys = ("score",)

    def add_arguments(self, parser):
        parser.add_argument("--boxes", type=int, default=2, help="boxes to draw (at most 5)")

    def check(self, args):
        if args.boxes > 5:
            raise ValueError(f"--boxes: expected at most 5, got {args.boxes}")

    def data(self, args):
        return f"{args.boxes} boxes"

    def run(self, em, args, out):
        out.mkdir(parents=True, exist_ok=True)
        boxes = [(4 + 8 * i, 4 + 8 * i, 20 + 8 * i, 20 + 8 * i) for i in range(args.boxes)]
        png = draw_boxes(out / "boxes.png", boxes)
        metrics = {"score": 0.5, "n_images": 1, "model_seen": em.name}
        return metrics, [f"## Toy\n\n{args.boxes} boxes drawn\n"], [("Boxes", png)]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(benchmarks, "_BENCHMARKS", dict(benchmarks._BENCHMARKS))
    register_benchmark(Toy)
    return get_benchmark("toy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mammut") / "run"
    assert main(["train", "--config", "tiny", "--train.out_dir", str(out), "--train.steps", "1", "--train.threads", "1",
                 "--train.progress", "false", "--train.report", "false"]) == 0
    return out


def test_the_builtin_benchmarks_are_registered():
    assert set(list_benchmarks()) >= {"zeroshot", "retrieval", "caption", "vqa"}
    assert get_benchmark("vqa").unit == "questions" and get_benchmark("caption").batch_size == 32
    with pytest.raises(ValueError, match=r"benchmark: expected one of \[.*'zeroshot'\], got 'nope'"):
        get_benchmark("nope")
    with pytest.raises(ValueError, match="benchmark name 'vqa' is already registered"):
        register_benchmark(type("Other", (Benchmark,), {"name": "vqa", "help": "", "title": ""}))


def test_a_registered_benchmark_runs_through_mammut_eval(toy, run, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["eval", "toy", str(run), "--boxes", "3", "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "toy" and metrics["score"] == 0.5 and metrics["data"] == "3 boxes"
    assert metrics["model_seen"] == "MaMMUT" and metrics["model_class"] == "MaMMUT"
    report = (out / "report.md").read_text()
    assert report.startswith("# Toy boxes: run\n") and "## Toy\n\n3 boxes drawn" in report
    assert "Boxes:\n\n![Boxes](boxes.png)" in report
    assert sorted(p.name for p in out.iterdir()) == ["boxes.png", "metrics.json", "report.md"]
    assert "toy: score 0.5000 on 1 images" in capsys.readouterr().out


def test_a_benchmarks_check_runs_before_the_model_loads(toy, tmp_path, capsys):
    code = main(["eval", "toy", str(tmp_path / "no-such-model"), "--boxes", "9", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mammut eval: error: --boxes: expected at most 5, got 9"]
    with pytest.raises(SystemExit) as exc:  # its own option, parsed by argparse
        main(["eval", "toy", str(tmp_path), "--boxes", "many"])
    assert exc.value.code == 2 and "argument --boxes: invalid int value: 'many'" in capsys.readouterr().err


def test_a_run_report_holds_only_what_the_task_returned(tmp_path):
    parts = RunReport(sections=["## Only this"], figures=[
        Figure("boxes.png", lambda path: draw_boxes(path, [(4, 4, 30, 30)]), caption="Boxes", alt="boxes"),
        Figure("nothing.png", lambda path: None, caption="never drawn")])
    out = write_report(tmp_path / "rep", {"steps": 3, "eval_split": {"held_out": True, "source": "toy"}}, (), parts)
    assert sorted(p.name for p in out.iterdir()) == ["boxes.png", "metrics.json", "report.md"]
    report = (out / "report.md").read_text()
    assert "## Only this\n\n" in report and "Boxes:\n\n![boxes](boxes.png)" in report
    assert "never drawn" not in report and "retrieval" not in report.lower() and "scenes" not in report
