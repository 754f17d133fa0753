"""Few-shot evaluation (``mammut eval caption SOURCE --shots K --support DATA``): example
selection (random: seeded, never the query itself; RICES: the nearest by image embedding, most
similar last), the prompt (``k = 0`` is the plain prompt), the CLI's errors (a model without media
sequences, a bad ``--support``) and a tiny end-to-end run with both selections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mammut.cli import main
from mammut.data.scenes import EmojiScenes
from mammut.eval.fewshot import build_prompt_ids, select_random, select_rices

QUIET = ["--workers", "0", "--no-progress"]


def _train(out: Path, config: str) -> Path:
    assert main(["train", "--config", config, "--train.out_dir", str(out), "--train.steps", "3", "--train.threads", "1",
                 "--train.progress", "false", "--train.report", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def flamingo_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("flamingo") / "run", "flamingo-naming-tiny")


@pytest.fixture(scope="module")
def mammut_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("mammut") / "run", "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Held-out emoji scenes as query CSV and training scenes as the support CSV (PNG files)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("scenes")
    for split, n in (("heldout", 6), ("train", 10)):
        ds = EmojiScenes(32, 20, 2, split=split)
        rows = ["filepath,title"]
        for i in range(n):
            s = ds.scene(i)
            name = f"{split}{i}.png"
            Image.fromarray((s.image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(root / name)
            rows.append(f"{name},{s.caption}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_rices_picks_the_nearest_never_the_query_and_puts_the_most_similar_last():
    support = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.0, 1.0]]), dim=1)
    keys = ["a", "b", "c", "d"]
    # query 0 is none of the support; query 1 is support item "c" itself
    assert select_rices(query, support, keys, ["x", "c"], 2) == [[1, 0], [1, 3]]
    assert select_rices(query, support, keys, ["x", "y"], 1) == [[0], [2]]


def test_random_selection_is_seeded_and_never_the_query():
    keys = list("abcdef")
    picks = select_random(6, keys, keys, 3, seed=1)
    assert picks == select_random(6, keys, keys, 3, seed=1) and picks != select_random(6, keys, keys, 3, seed=2)
    for i, row in enumerate(picks):
        assert len(set(row)) == 3 and i not in row
    with pytest.raises(ValueError, match="--support: expected at least 6 support images other than the query, got 5"):
        select_random(1, keys, ["a"], 6)


def test_zero_shots_is_the_plain_prompt(flamingo_run):
    from mammut.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(flamingo_run / "tokenizer.json")
    assert build_prompt_ids(tok, [], media_id=7, bos_id=1) == [1, 7]
    ids = build_prompt_ids(tok, ["a cat", "a dog"], media_id=7, bos_id=1)
    assert ids[:2] == [1, 7] and ids[-1] == 7 and ids.count(7) == 3
    assert tok.decode([ids[2:ids.index(7, 2)]])[0].strip() == "a cat"


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mammut eval: error: "), err
    return err[0]


def test_cli_errors(flamingo_run, mammut_run, data, tmp_path, capsys):
    base = ["--data", str(data / "heldout.csv"), "--out", str(tmp_path / "o"), *QUIET]
    err = _error(capsys, ["eval", "caption", str(mammut_run), *base, "--shots", "2"])
    assert "--shots: 2 in-context examples need a model that takes media sequences (FlamingoPaLM), got MaMMUT" in err
    err = _error(capsys, ["eval", "caption", str(flamingo_run), *base, "--shots", "2", "--support", str(data / "no.csv")])
    assert "--support: expected a captions file" in err and "no such file" in err
    err = _error(capsys, ["eval", "caption", str(flamingo_run), *base, "--shots", "2", "--selection", "rices"])
    assert "--selection: rices needs image embeddings: give --rices-run RUN" in err
    err = _error(capsys, ["eval", "caption", str(flamingo_run), *base, "--support", str(data / "train.csv")])
    assert "--support: only with --shots K > 0" in err
    err = _error(capsys, ["eval", "caption", str(flamingo_run), *base, "--shots", "20"])
    assert "--support: expected at least 20 support images other than the query, got 5" in err


@pytest.mark.parametrize("selection", ["random", "rices"])
def test_fewshot_captioning_end_to_end(flamingo_run, mammut_run, data, tmp_path, selection):
    out = tmp_path / selection
    extra = ["--rices-run", str(mammut_run)] if selection == "rices" else []
    assert main(["eval", "caption", str(flamingo_run), "--data", str(data / "heldout.csv"), "--shots", "2",
                 "--support", str(data / "train.csv"), "--selection", selection, *extra, "--max-new-tokens", "6",
                 "--tokenizer", "simple", "--out", str(out), *QUIET]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shots"] == 2 and metrics["selection"] == selection and metrics["n_images"] == 6
    assert metrics["support_size"] == 10 and "cider_d" in metrics and metrics["comparable_to_published"] is False
    assert (metrics["rices_embeddings"] or "").startswith("MaMMUT") == (selection == "rices")
    report = (out / "report.md").read_text()
    assert "2-shot captioning of 6 images" in report and (out / "fewshot_prompts.png").stat().st_size > 0


def test_fewshot_vqa_end_to_end(flamingo_run, data, tmp_path, capsys):
    from PIL import Image

    ds = EmojiScenes(32, 20, 1, split="heldout")
    (tmp_path / "img").mkdir()
    questions, annotations = [], []
    for i in range(5):
        s = ds.scene(i)
        Image.fromarray((s.image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "img" / f"{i}.jpg")
        questions.append({"question_id": i, "image_id": i, "question": "what is it?"})
        annotations.append({"question_id": i, "answers": [{"answer": s.names[0]}] * 10, "answer_type": "other",
                            "question_type": "what"})
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    out = tmp_path / "vqa"
    argv = ["eval", "vqa", str(flamingo_run), "--questions", str(tmp_path / "q.json"), "--annotations",
            str(tmp_path / "a.json"), "--images", str(tmp_path / "img"), "--out", str(out), *QUIET]
    assert main([*argv, "--shots", "2", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shots"] == 2 and metrics["n_questions"] == 5 and metrics["support_size"] == 5
    assert 0.0 <= metrics["accuracy"] <= 1.0 and (out / "fewshot_prompts.png").stat().st_size > 0
    assert "2-shot VQA accuracy on 5 questions" in (out / "report.md").read_text()
    err = _error(capsys, [*argv, "--shots", "5"])  # only 4 other images
    assert "--support: expected at least 5 support images other than the query, got 4" in err
    err = _error(capsys, [*argv, "--shots", "1", "--support", str(tmp_path / "q.json")])
    assert "--support-annotations: expected the support questions' annotations JSON with --support" in err
