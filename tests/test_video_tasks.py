"""The ``video`` and ``videoqa`` tasks: config-declared VideoTubeViT, init from an image run,
exact resume, answer-only loss, the video data kinds."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import mammut
from mammut.constants import IGNORE_INDEX
from mammut.data.moving_emoji import MovingEmoji
from mammut.encoders import VideoTubeViT
from mammut.train.checkpointing import load_weights
from mammut.train.config import ConfigError, load_config
from mammut.train.loop import Trainer

FAST = ("--train.progress", "false", "--train.threads", "1")


def cfg(preset: str, out: Path, *extra: str):
    return load_config(preset, ["--train.out_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 3-step ``tiny`` image run (its ViT moved away from the initialisation)."""
    run = tmp_path_factory.mktemp("img") / "tiny"
    Trainer(cfg("tiny", run, "--train.steps", "3")).fit(eval_fn=None)
    return run


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, image_run) -> tuple[Path, list[float]]:
    """A 24-step ``video-tiny`` run started from the image run."""
    run = tmp_path_factory.mktemp("vid") / "video"
    losses = Trainer(cfg("video-tiny", run, "--train.steps", "24", "--train.init_from", str(image_run))).fit(eval_fn=None).losses
    return run, losses


def test_a_video_run_starts_from_the_image_run_and_its_loss_falls(image_run, video_run):
    run, losses = video_run
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    saved = load_config(run / "config.yaml").model
    source = load_config(image_run / "config.yaml").model
    assert "vit" not in saved and saved["encoder"]["type"] == "video_tube"
    assert saved["encoder"]["vit"] == source["vit"] and saved["encoder"]["frames"] == 8
    assert saved["dim"] == source["dim"] and saved["num_tokens"] == source["num_tokens"]
    assert (run / "tokenizer.json").read_bytes() == (image_run / "tokenizer.json").read_bytes()


def test_init_from_puts_the_image_vit_inside_the_video_encoder(image_run, tmp_path):
    trainer = Trainer(cfg("video-tiny", tmp_path / "v", "--train.init_from", str(image_run)))
    src = load_weights(next((image_run / "checkpoints").iterdir()) / "model.safetensors")
    state = trainer.model.state_dict()
    assert isinstance(trainer.model.img_encoder, VideoTubeViT)
    for k, v in src.items():
        target = "img_encoder.vit." + k[len("img_encoder."):] if k.startswith("img_encoder.") else k
        assert torch.equal(v, state[target]), k
    assert trainer.model.img_encoder.fixed_gate.item() == 0.0  # gate closed: the image model's tokens at the start
    trainer.close()


def test_a_video_run_reloads_with_mammut_load(video_run):
    run, _ = video_run
    loaded = mammut.load(run)
    assert isinstance(loaded.model.img_encoder, VideoTubeViT)
    weights = load_weights(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors")
    state = loaded.model.state_dict()
    assert set(weights) == set(state) and all(torch.equal(v, state[k]) for k, v in weights.items())
    assert loaded.model.img_encoder.tubes[0].weight.abs().sum() > 0
    clips = torch.stack([MovingEmoji(32, 8, 20, split="heldout").clip(i).frames for i in range(3)])
    assert loaded.model.embed_image(clips).shape[0] == 3
    assert loaded.model.generate(clips, max_new_tokens=3).shape[0] == 3


def test_resume_is_exact(tmp_path):
    args = ("--train.steps", "6", "--train.save_every", "3", "--train.batch_size", "8", "--train.grad_accum", "2")
    full = Trainer(cfg("video-tiny", tmp_path / "a", *args)).fit(eval_fn=None).losses
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = Trainer(cfg("video-tiny", tmp_path / "b", *args), resume=True)
    assert resumed.step == 3 and resumed.fit(eval_fn=None).losses == full[3:]


def test_evaluation_reports_motion_retrieval_against_the_middle_frame(video_run):
    from mammut.eval.evaluate import evaluate_run

    run, _ = video_run
    metrics, _ = evaluate_run(run, n=32, out_dir=run / "eval")
    motion = metrics["motion_retrieval"]
    assert motion["video"]["n"] == motion["middle_frame"]["n"] > 0 and motion["video"]["chance"] == 0.25
    assert metrics["retrieval"]["gallery_size"] == 32
    assert "Motion retrieval" in (run / "eval" / "report.md").read_text()


def test_videoqa_trains_on_the_answer_tokens_only(video_run, tmp_path):
    from mammut.tasks.videoqa import VideoQaSource
    from mammut.tasks.vqa import VqaCollate

    run, _ = video_run
    trainer = Trainer(cfg("videoqa-tiny", tmp_path / "qa", "--train.init_from", str(run), "--train.steps", "4",
                          "--eval.n", "16"))
    task, tok = trainer.task, trainer.tokenizer
    source = VideoQaSource(trainer.cfg.data, 8, "train", 0, task._encoder(tok), task.types, twins=True)
    items = [source(i) for i in range(4)]
    batch = VqaCollate(tok.pad_id, False)([*items])
    assert batch["images"].shape == (4, 8, 3, 32, 32)
    for row, it in enumerate(items):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == it["answer_ids"]  # the answer and EOS, nothing of the question
    # twins: question 1 is question 0 about the clip played backwards, with the reversed answer
    assert items[1]["question"] == items[0]["question"] and items[1]["answer"] != items[0]["answer"]
    assert torch.equal(items[1]["image"], items[0]["image"].flip(0))
    trainer.fit(eval_fn=None)
    metrics, report = task.evaluate(trainer.model, tok)
    vqa = metrics["vqa"]
    assert set(vqa["per_type"]) == {"direction", "order", "event", "exists"} and vqa["n"] == 16
    assert "baseline_accuracy" in vqa and "text_only_accuracy" in vqa
    assert "middle frame" in report.sections[0]
    trainer.close()


def test_refuses_a_video_task_without_a_video_encoder_or_with_image_data(tmp_path):
    with pytest.raises(ConfigError, match="model.encoder"):
        Trainer(cfg("tiny", tmp_path / "a", "--train.task", "video", "--data.kind", "moving_emoji"))
    with pytest.raises(ConfigError, match="data.kind"):
        load_config("video-tiny", ["--data.kind", "emoji"])
    with pytest.raises(ConfigError, match="task_options.sampling"):
        load_config("video-tiny", ["--task_options.sampling", "random"])


# ----------------------------------------------------------------------------- video files


def _write_clips(folder: Path, n: int) -> list[tuple[Path, str]]:
    from mammut.data.video_files import write_video

    ds = MovingEmoji(32, 8, 20)
    out = []
    for i in range(n):
        clip = ds.clip(i)
        out.append((write_video(folder / f"clip{i}.mp4", clip.frames, fps=8), clip.caption))
    return out


def test_video_csv_data_trains_and_skips_corrupt_files(tmp_path, caplog):
    pytest.importorskip("av")
    rows = _write_clips(tmp_path, 3)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with (tmp_path / "clips.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for path, caption in rows:
            w.writerow([path.name, caption])
        w.writerow(["broken.mp4", "a broken clip"])
    trainer = Trainer(cfg("video-tiny", tmp_path / "run", "--data.kind", "video_csv", "--data.path",
                          str(tmp_path / "clips.csv"), "--train.steps", "2", "--train.batch_size", "4"))
    batches = list(trainer.task.train_batches(trainer.tokenizer, rank=0, world_size=1, start_step=0))
    assert len(batches) == 2 and batches[0][0]["images"].shape == (4, 8, 3, 32, 32)
    assert "broken.mp4" in caplog.text
    assert len(trainer.fit(eval_fn=None).losses) == 2


def test_video_webdataset_data_reads_mp4_members(tmp_path):
    pytest.importorskip("av")
    rows = _write_clips(tmp_path, 4)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, (path, caption) in enumerate(rows):
            for name, data in ((f"{i:04d}.mp4", path.read_bytes()), (f"{i:04d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    trainer = Trainer(cfg("video-tiny", tmp_path / "run", "--data.kind", "video_webdataset", "--data.path",
                          str(tmp_path / "shard-000.tar"), "--data.tokenizer",
                          str(_tokenizer(tmp_path)), "--train.steps", "3", "--train.batch_size", "2"))
    batches = list(trainer.task.train_batches(trainer.tokenizer, rank=0, world_size=1, start_step=1))
    assert len(batches) == 2 and batches[0][0]["images"].shape == (2, 8, 3, 32, 32)
    trainer.close()


def _tokenizer(folder: Path) -> Path:
    from mammut.data.moving_emoji import caption_texts
    from mammut.data.tokenizer import train_bpe

    path = folder / "tok.json"
    train_bpe(caption_texts(MovingEmoji(32, 8, 20).class_names(), n=200), vocab_size=500, path=path, min_frequency=1)
    return path
