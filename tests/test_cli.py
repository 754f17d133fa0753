"""The ``mammut`` command: help, clear config errors, and train -> eval -> caption -> embed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mammut.cli import main
from mammut.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"  # the packaged preset


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "caption", "embed", "demo", "config"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.stepz", "3"], "train.stepz: unknown key (did you mean 'steps'?)"),
        (["--train.steps", "many"], "train.steps: expected an integer, got 'many'"),
        (["--train.precision", "fp8"], "train.precision: expected one of ['auto', 'fp32', 'bf16'], got 'fp8'"),
        (["--model.dimm", "64"], "model.dimm: unknown key (did you mean 'dim'?)"),
        (["--model.dim", "[64]"], "model.dim: expected an integer"),
        (["--optim.betas", "[0.9]"], "optim.betas: expected a list of 2 values"),
        (["--model.name", "nope"], "model.name: expected one of"),
        (["--model.vit.patchsize", "4"], "model.vit.patchsize: unknown key (did you mean 'patch_size'?)"),
        (["--trian.steps", "3"], "trian: unknown key (did you mean 'train'?)"),
        (["--train.batch_size", "15", "--train.grad_accum", "2"], "train.batch_size: expected a multiple of"),
    ],
)
def test_bad_config_names_the_key(overrides, message, capsys, tmp_path):
    code = main(["train", "--config", TINY, "--train.out_dir", str(tmp_path / "run"), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was built


def test_bad_key_in_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: mammut\n  vit: {patch_size: 8}\ndata:\n  image_size: 32\n  num_emojis: 20\n")
    with pytest.raises(ConfigError, match=r"data\.num_emojis: unknown key \(did you mean 'num_emoji'\?\)"):
        load_config(bad)
    bad.write_text("train:\n  steps: 1.5\n")
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 1\.5"):
        load_config(bad)


def test_overrides_are_typed():
    cfg = load_config(TINY, ["--optim.lr", "3e-4", "--train.tensorboard", "false", "--model.vit.depth", "1",
                             "--eval.templates", "['a {}']", "--data.num_emoji=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.tensorboard is False
    assert cfg.model["vit"]["depth"] == 1 and cfg.model["vit"]["patch_size"] == 8
    assert cfg.eval.templates == ("a {}",) and cfg.data.num_emoji is None


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--config", TINY, "--train.steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "precision: auto" in out and "name: mammut" in out


def test_train_eval_caption_embed(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--config", TINY, "--train.out_dir", str(run), "--train.steps", "6", "--train.threads", "1",
                 "--train.progress", "false", "--train.tensorboard", "true", "--eval.n", "32"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"report: {run / 'report'}" in out
    for name in ("metrics.json", "loss_curves.png", "scenes.png", "retrieval.md", "report.md"):
        assert (run / "report" / name).is_file(), name
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["retrieval"]["gallery_size"] == 32
    assert metrics["retrieval"]["chance"]["R@1"] == pytest.approx(1 / 32)
    assert {"bleu4", "cider_d", "emoji_acc_single", "emoji_acc_pair"} <= set(metrics["caption"])
    assert metrics["num_emoji"] == 20 and metrics["samples_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert list((run / "tb").iterdir())  # TensorBoard events
    assert (run / "model" / "config.json").is_file()  # save_pretrained export

    # a second evaluation into another folder
    assert main(["eval", str(run), "--n", "16", "--out", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["retrieval"]["gallery_size"] == 16

    # caption and embed image files
    paths = []
    for i in range(2):
        img = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    capsys.readouterr()
    assert main(["caption", *map(str, paths), "--run", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(paths[0]) + "\t")

    assert main(["embed", "--run", str(run), "--images", *map(str, paths), "--out", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert main(["embed", "--run", str(run), "--texts", "a cat", "a dog", "--out", str(tmp_path / "t.safetensors")]) == 0
    from safetensors.torch import load_file

    assert load_file(tmp_path / "t.safetensors")["embeddings"].shape == (2, 64)

    # an existing run is not overwritten without --resume
    assert main(["train", "--config", TINY, "--train.out_dir", str(run), "--train.steps", "6"]) == 2
    assert "--resume" in capsys.readouterr().err
