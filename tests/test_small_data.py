"""The small-data recipe's parts, on generated csv data: ``data.augment`` (a flip swaps left and
right in the caption as it mirrors the pixels; transparency composited onto white or a random
colour, never onto the colour hidden in transparent pixels; crops; a random caption per image;
every draw a function of the run's seed and the sample), ``train.epochs`` /
``optim.warmup_epochs`` turned into steps, ``train.keep_best`` keeping the best evaluation's
weights in RUN/best, and the ViT's stochastic depth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mammut.data.augment import AugmentConfig, swap_left_right
from mammut.encoders import ViT
from mammut.train.checkpointing import load_weights
from mammut.train.config import ConfigError, load_config
from mammut.train.data import _IndexedSource
from mammut.train.loop import Trainer

QUIET = ["--train.threads", "1", "--train.progress", "false", "--train.report", "false", "--train.tensorboard", "false"]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _write_csv(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return path


def _halves(path: Path, left=RED, right=BLUE, size=32) -> None:
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2], a[:, size // 2:] = left, right
    Image.fromarray(a).save(path)


def _cfg(path: Path, *extra: str, out: Path | None = None):
    args = ["--data.kind", "csv", "--data.path", str(path), "--data.image_size", "32", *QUIET, *extra]
    if out is not None:
        args += ["--train.out_dir", str(out)]
    return load_config("tiny", args)


def test_swap_left_right_keeps_case_and_whole_words():
    assert swap_left_right("a cat left of a dog") == "a cat right of a dog"
    assert swap_left_right("Left arrow, RIGHT arrow, the leftmost cup") == "Right arrow, LEFT arrow, the rightmost cup"
    assert swap_left_right("bright copyright lefty") == "bright copyright lefty"
    assert swap_left_right("left-hand side, right.") == "right-hand side, left."


def test_a_flip_mirrors_the_pixels_and_swaps_the_words(tmp_path):
    _halves(tmp_path / "a.png")
    path = _write_csv(tmp_path, [("a.png", "red on the left, blue on the right")])
    plain = _IndexedSource(_cfg(path).data, seed=0, scenes=False)
    image, caption = plain(0)
    assert caption == "red on the left, blue on the right"
    assert image[0, :, :8].mean() > 0.9 and image[2, :, -8:].mean() > 0.9  # red left, blue right
    flipped = _IndexedSource(_cfg(path, "--data.augment.hflip", "1.0").data, seed=0, scenes=False)
    image, caption = flipped(0)
    assert caption == "red on the right, blue on the left"
    assert image[2, :, :8].mean() > 0.9 and image[0, :, -8:].mean() > 0.9  # blue left, red right
    assert torch.equal(image, plain(0)[0].flip(-1))


def test_transparency_goes_onto_white_or_a_random_colour_never_the_hidden_one(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black, as many icon files store it
    rgba[8:24, 8:24] = (0, 200, 0, 255)  # an opaque green square
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    path = _write_csv(tmp_path, [("icon.png", "a green square")] * 4)
    white = _IndexedSource(_cfg(path).data, seed=0, scenes=False)(0)[0]
    assert torch.allclose(white[:, 0, 0], torch.ones(3), atol=1e-3)  # corner: white, not the stored black
    assert white[1, 16, 16] > 0.7 and white[0, 16, 16] < 0.1  # the opaque square is untouched
    src = _IndexedSource(_cfg(path, "--data.augment.background", "random").data, seed=0, scenes=False)
    corners = [tuple(src(i)[0][:, 0, 0].tolist()) for i in range(4)]
    assert len(set(corners)) == 4  # a colour per sample
    assert tuple(src(2)[0][:, 0, 0].tolist()) == corners[2]  # ... and the same one whenever sample 2 is read
    again = _IndexedSource(_cfg(path, "--data.augment.background", "random").data, seed=1, scenes=False)
    assert tuple(again(2)[0][:, 0, 0].tolist()) != corners[2]  # another seed, other draws
    for i in range(4):
        assert src(i)[0][1, 16, 16] > 0.7


def test_crops_and_jitter_are_a_function_of_seed_and_sample(tmp_path):
    arr = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "noise.png")
    path = _write_csv(tmp_path, [("noise.png", "noise")] * 3)
    data = _cfg(path, "--data.augment.crop_scale", "[0.3, 0.6]", "--data.augment.color_jitter", "0.4").data
    src = _IndexedSource(data, seed=0, scenes=False)
    plain = _IndexedSource(_cfg(path).data, seed=0, scenes=False)
    a, b = src(0)[0], src(1)[0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b) and not torch.equal(a, plain(0)[0])
    assert torch.equal(_IndexedSource(data, seed=0, scenes=False)(1)[0], b)  # a fresh process: the same pixels
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_a_random_caption_per_image(tmp_path):
    for name in ("a", "b"):
        _halves(tmp_path / f"{name}.png")
    rows = [("a.png", "first"), ("b.png", "other"), ("a.png", "second"), ("a.png", "third")]
    path = _write_csv(tmp_path, rows)
    assert _IndexedSource(_cfg(path).data, seed=0, scenes=False).size() == 4
    src = _IndexedSource(_cfg(path, "--data.augment.caption", "random").data, seed=0, scenes=False)
    assert src.size() == 2  # one sample per image and pass
    epochs = [sorted(src(i)[1] for i in range(2 * e, 2 * e + 2)) for e in range(30)]
    assert all("other" in pair for pair in epochs)  # every pass sees each image once
    seen = {c for pair in epochs for c in pair}
    assert seen == {"first", "second", "third", "other"}
    assert [src(i)[1] for i in range(10)] == [_IndexedSource(src_cfg, seed=0, scenes=False)(i)[1] for i in range(10)
                                             for src_cfg in [_cfg(path, "--data.augment.caption", "random").data]]


def test_word_dropout_keeps_a_subset_in_order_and_never_an_empty_caption(tmp_path):
    _halves(tmp_path / "a.png")
    caption = "device icon: drive harddisk usb"
    path = _write_csv(tmp_path, [("a.png", caption)] * 200)
    src = _IndexedSource(_cfg(path, "--data.augment.word_dropout", "0.5").data, seed=0, scenes=False)
    words = caption.split()
    seen = [src(i)[1] for i in range(200)]
    for text in seen:
        kept = text.split()
        assert 1 <= len(kept) <= len(words)
        assert [w for w in words if w in kept] == kept  # a subsequence: order kept, nothing invented
    assert len(set(seen)) > 20 and caption in seen and any(len(t.split()) == 1 for t in seen)
    mean_kept = sum(len(t.split()) for t in seen) / len(seen)
    assert 2.0 < mean_kept < 3.5  # about half of the 6 words
    again = _IndexedSource(_cfg(path, "--data.augment.word_dropout", "0.5").data, seed=0, scenes=False)
    assert seen == [again(i)[1] for i in range(200)]  # a function of seed and sample
    assert _IndexedSource(_cfg(path).data, seed=0, scenes=False)(0)[1] == caption  # off by default
    with pytest.raises(ValueError, match="data.augment.word_dropout"):
        _cfg(path, "--data.augment.word_dropout", "1.0")


def test_augmentation_is_refused_for_a_kind_that_does_not_apply_it(tmp_path):
    from mammut.train.data import check_data

    cfg = load_config("tiny", ["--data.augment.hflip", "0.5"])
    with pytest.raises(ValueError, match=r"^data\.augment: data\.kind='emoji' is read without augmentation, got "
                                         r"data\.augment\.hflip \(kinds that augment: \['csv'\]\)"):
        check_data(cfg.data)
    with pytest.raises(ConfigError, match=r"^data\.augment\.crop_scale: expected 0 < low <= high <= 1, got \[0\.5, 2\.0\]"):
        load_config("tiny", ["--data.augment.crop_scale", "[0.5, 2.0]"])
    assert not AugmentConfig().active


def _pairs(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        _halves(folder / f"{i}.png", colour, colour[::-1])
        rows.append((f"{i}.png", f"colour {i % 5} and shade {i % 3}"))
    return _write_csv(folder, rows)


def test_epochs_become_steps_and_warmup_and_resume_keeps_them(tmp_path):
    path = _pairs(tmp_path, 40)
    run = tmp_path / "run"
    args = ("--train.epochs", "3", "--optim.warmup_epochs", "1", "--train.batch_size", "8", "--train.save_every", "8")
    trainer = Trainer(_cfg(path, *args, out=run))
    assert (trainer.cfg.train.steps, trainer.cfg.optim.warmup_steps) == (15, 5)  # 40 rows / 8 = 5 steps a pass
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["steps"], saved["optim"]["warmup_steps"]) == (15, 5)
    assert len(trainer.fit().losses) == 15
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected a data\.kind whose size is known \(csv\), "
                                          r"got data\.kind='emoji'"):
        Trainer(load_config("tiny", ["--train.epochs", "2", "--train.out_dir", str(tmp_path / "e"), *QUIET]))
    # with caption: random a pass is over images: 2 images, 4 rows
    assert _IndexedSource(_cfg(path, "--data.augment.caption", "random").data, 0, scenes=False).size() == 40


def test_keep_best_keeps_the_best_evaluations_weights(tmp_path):
    path = _pairs(tmp_path, 16)
    run = tmp_path / "run"
    scores = iter([0.2, 0.6, 0.4, 0.6])  # evaluations at steps 2, 4, 6, 8: the best is step 4 (a tie keeps it)
    states = {}

    def eval_fn(model, tokenizer, step):
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"R@1": next(scores)}

    args = ("--train.steps", "8", "--train.eval_every", "2", "--train.keep_best", "true", "--train.batch_size", "4")
    Trainer(_cfg(path, *args, out=run)).fit(eval_fn=eval_fn)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"step": 4, "metric": "R@1", "value": 0.6}
    weights = load_weights(run / "best" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in states[4].items())
    assert not all(torch.equal(weights[k], v) for k, v in states[8].items())
    from mammut.inference import load_run

    loaded = load_run(run, run / "best")
    assert loaded.step == 4 and all(torch.equal(loaded.model.state_dict()[k], v) for k, v in states[4].items())
    with pytest.raises(ConfigError, match=r"^train\.keep_best: expected train\.eval_every > 0"):
        _cfg(path, "--train.keep_best", "true")


def test_keep_best_on_the_held_out_csv_uses_the_mean_recall(tmp_path):
    path = _pairs(tmp_path, 16)
    run = tmp_path / "run"
    args = ("--train.steps", "4", "--train.eval_every", "2", "--train.keep_best", "true", "--train.batch_size", "4",
            "--data.val_path", str(path), "--eval.n", "8")
    Trainer(_cfg(path, *args, out=run)).fit()
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metric"] == "R@1" and best["step"] in (2, 4) and 0.0 <= best["value"] <= 1.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert best["value"] == max(r["R@1"] for r in evals)
    assert all(r["R@1"] == pytest.approx((r["i2t_R@1"] + r["t2i_R@1"]) / 2) for r in evals)
    assert [r for r in records if r["kind"] == "best"][0]["value"] == evals[0]["R@1"]  # the first is the best so far


def test_stochastic_depth_acts_only_in_training():
    torch.manual_seed(0)
    vit = ViT(image_size=16, patch_size=8, dim=32, depth=3, heads=2, dim_head=16, drop_path=0.5)
    ref = ViT(image_size=16, patch_size=8, dim=32, depth=3, heads=2, dim_head=16)
    ref.load_state_dict(vit.state_dict())
    x = torch.randn(1, 3, 16, 16).expand(64, -1, -1, -1)  # one image, 64 times
    vit.eval(), ref.eval()
    assert torch.equal(vit(x), ref(x))
    vit.train()
    out = vit(x).flatten(1)
    # blocks 1 and 2 are each kept or skipped per image (rates 0.25, 0.5; block 0 never): 4 possible outputs
    patterns = {tuple(row) for row in out.round(decimals=4).tolist()}
    assert 2 <= len(patterns) <= 4
    with pytest.raises(ValueError, match=r"drop_path: expected a value in \[0, 1\), got 1.0"):
        ViT(image_size=16, patch_size=8, dim=32, depth=1, heads=2, dim_head=16, drop_path=1.0)


def test_the_small_data_preset_trains_on_a_csv_with_word_dropout_and_epochs(tmp_path):
    path = _pairs(tmp_path, 24)
    with pytest.raises(ValueError, match="data.path"):
        from mammut.train.data import check_data

        check_data(load_config("small-data", QUIET).data)
    cfg = load_config("small-data", ["--data.path", str(path), "--train.epochs", "2", "--train.batch_size", "8",
                                     "--train.out_dir", str(tmp_path / "run"), *QUIET])
    assert cfg.data.kind == "csv" and cfg.data.augment.word_dropout == 0.5 and cfg.train.time_budget_s == 420
    trainer = Trainer(cfg)
    assert trainer.cfg.train.steps == 6  # 2 passes over 24 pairs in batches of 8
    assert len(trainer.fit().losses) == 6
