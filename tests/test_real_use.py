"""Real use outside the checkout: presets, self-contained run folders, honest held-out
evaluation, several captions per image, and one-line CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mammut.cli import main
from mammut.data.tokenizer import train_bpe
from mammut.eval.metrics import retrieval_recall
from mammut.train.config import ConfigError, list_presets, load_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("square", "disc")


def _draw(path: Path, colour: str, shape: str) -> None:
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    px = img.load()
    for y in range(32):
        for x in range(32):
            inside = (8 <= x < 24 and 8 <= y < 24) if shape == "square" else (x - 16) ** 2 + (y - 16) ** 2 < 64
            if inside:
                px[x, y] = COLOURS[colour]
    img.save(path)


def _csv(folder: Path, name: str, items: list[tuple[str, str]], captions_per_image: int = 1) -> Path:
    """A CSV of drawn images (relative paths) with ``captions_per_image`` captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for colour, shape in items:
        file = f"{name}-{colour}-{shape}.png"
        _draw(folder / file, colour, shape)
        for k in range(captions_per_image):
            rows.append(f"{file},{['a', 'one', 'the'][k]} {colour} {shape}")
    path = folder / f"{name}.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    items = [(c, s) for c in COLOURS for s in SHAPES]
    _csv(root, "train", items)
    _csv(root, "val", items[::2], captions_per_image=3)
    texts = [f"{w} {c} {s}" for w in ("a", "one", "the") for c in COLOURS for s in SHAPES]
    train_bpe(texts, vocab_size=300, path=root / "tok.json", min_frequency=1)
    return root


def _train_args(out: str, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--train.out_dir", out, "--train.steps", "4", "--train.batch_size", "8",
            "--train.threads", "1", "--train.progress", "false", "--eval.n", "8", "--eval.max_new_tokens", "4", *extra]


def test_presets_ship_with_the_package(tmp_path, monkeypatch):
    assert {"tiny", "demo"} <= set(list_presets())
    monkeypatch.chdir(tmp_path)  # nowhere near the checkout
    assert load_config("tiny").train.steps == 30 and load_config("demo").train.steps == 2400
    with pytest.raises(FileNotFoundError, match=r"one of the presets \[.*'tiny'.*\], got 'tinny'"):
        load_config("tinny")


def test_version(capsys):
    from mammut import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (lambda d: (d / "bad.yaml").write_text("model: {name: mammut\n"), ["train", "--config", "{d}/bad.yaml"],
         "is not valid YAML"),
        (lambda d: (d / "bin.yaml").write_bytes(b"model:\n  name: \xff\xfe\n"), ["train", "--config", "{d}/bin.yaml"],
         "is not UTF-8 text"),
        (None, ["train", "--config", "tiny", "--model.contrastive_loss", "focall"],
         "model.contrastive_loss: expected one of ('focal', 'softmax'), got 'focall'"),
        (None, ["train", "--config", "tiny", "--model.name", "flamingo_palm"],
         "model.name: expected a model that trains on train.task='pretrain' (coca, mammut), got 'flamingo_palm'"),
        (None, ["config", "--config", "tiny", "--model.name", "flamingo_palm"], "model.name: expected a model"),
        (lambda d: (d / "x.png").write_text("not an image"), ["caption", "{d}/x.png", "--run", "{d}/run"],
         "images: expected an image file, got"),
    ],
)
def test_user_errors_are_one_line_before_any_work(make, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if make is not None:
        make(tmp_path)
    if argv[0] == "caption":  # a real run to caption with
        assert main(_train_args(str(tmp_path / "run"), "--train.report", "false")) == 0
        capsys.readouterr()
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--train.out_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mammut {argv[0]}: error: ") and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing was built or written: no tokenizer trained


def test_run_folder_works_from_anywhere_after_a_move(csv_data, tmp_path, monkeypatch, capsys):
    # train from the data folder with relative paths, as a user would
    work = tmp_path / "work"
    shutil.copytree(csv_data, work)
    monkeypatch.chdir(work)
    args = _train_args("runs/byod", "--data.kind", "csv", "--data.path", "train.csv", "--data.val_path", "val.csv",
                       "--data.tokenizer", "tok.json", "--data.image_size", "32", "--train.eval_every", "2")
    assert main(args) == 0
    records = [json.loads(line) for line in (work / "runs/byod/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]  # held-out retrieval from val.csv
    assert all(0 <= r["i2t_R@1"] <= 1 for r in records if r["kind"] == "eval")
    saved = load_config(work / "runs/byod/config.yaml")
    assert Path(saved.data.path).is_absolute() and Path(saved.data.val_path).is_absolute()
    assert (work / "runs/byod/tokenizer.json").is_file()

    # move the run away, delete the tokenizer it was trained with, run from somewhere else
    moved = tmp_path / "elsewhere" / "byod"
    shutil.move(str(work / "runs/byod"), moved)
    (work / "tok.json").unlink()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["caption", str(work / "train-red-disc.png"), "--run", str(moved)]) == 0
    assert capsys.readouterr().out.startswith(str(work / "train-red-disc.png") + "\t")
    assert main(["eval", str(moved), "--out", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["eval_split"]["held_out"] is True and metrics["eval_split"]["source"].endswith("val.csv")
    assert metrics["retrieval"]["gallery_size"] == 6 and metrics["retrieval"]["n_texts"] == 18
    assert main(["embed", "--run", str(moved), "--texts", "a red disc", "--out", str(tmp_path / "e.npy")]) == 0


def test_training_rows_are_never_called_heldout(csv_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(csv_data)
    run = tmp_path / "run"
    args = _train_args(str(run), "--data.kind", "csv", "--data.path", "train.csv", "--data.tokenizer", "tok.json",
                       "--data.image_size", "32")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "NOT held-out" in out and "training-row retrieval" in out and "held-out retrieval" not in out
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["eval_split"] == {**metrics["eval_split"], "name": "train", "held_out": False}
    report = (run / "report" / "report.md").read_text()
    assert "**Not held-out.**" in report and "Held-out" not in report

    # the same run scored on a held-out file
    assert main(["eval", str(run), "--data", str(csv_data / "val.csv"), "--out", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["eval_split"]["held_out"] is True and metrics["caption"]["references_per_image"] == 3
    assert "Held-out retrieval, gallery of 6 images, 18 captions" in (tmp_path / "rep" / "report.md").read_text()


def test_retrieval_counts_any_caption_of_the_image():
    # 2 images, 3 captions: image 0 owns captions 0 and 1, image 1 owns caption 2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.1], [0.0, 1.0]])  # caption 0 looks like image 1
    r = retrieval_recall(img, txt, ks=(1,), text_to_image=[0, 0, 1])
    # i2t: image 0's best caption (1) is ranked first -> hit; image 1: caption 0 ties caption 2
    # (similarity 1.0 both), and ties count against -> miss
    assert r["i2t_R@1"] == pytest.approx(0.5)
    # t2i: caption 0 retrieves image 1 (wrong), caption 1 image 0, caption 2 image 1
    assert r["t2i_R@1"] == pytest.approx(2 / 3)


def test_identical_caption_texts_are_one_answer():
    # two images share the caption "a cat": with the texts given, either image answers it
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    texts = ["a cat", "a cat", "a dog"]
    strict = retrieval_recall(img, txt, ks=(1,), text_to_image=[0, 1, 2])
    same = retrieval_recall(img, txt, ks=(1,), text_to_image=[0, 1, 2], texts=texts)
    assert strict["t2i_R@1"] == pytest.approx(2 / 3)  # caption 1 retrieves image 0: a miss by index
    assert same["t2i_R@1"] == pytest.approx(1.0)  # ... but image 0 also has the text "a cat"
    assert strict["i2t_R@1"] == pytest.approx(1 / 3) and same["i2t_R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="texts: expected one string per text embedding"):
        retrieval_recall(img, txt, texts=["a"])


def test_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["--data.kind", "csv", "--data.path", "d/train.csv", "--data.val_path",
                               "shards-{000..003}.tar", "--data.tokenizer", "~/tok.json"])
    assert cfg.data.path == str(tmp_path / "d/train.csv")
    assert cfg.data.val_path == str(tmp_path / "shards-{000..003}.tar")
    assert cfg.data.tokenizer == str(Path("~/tok.json").expanduser())
    with pytest.raises(ConfigError, match=r"data\.path: expected a file or shard pattern"):
        load_config("tiny", ["--data.kind", "csv"])
