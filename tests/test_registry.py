"""Every registered model, driven by its registry spec (``ModelSpec``): the tiny config builds,
runs forward, learns, round-trips through ``save_pretrained``, decodes, trains through the
Trainer on each of its tasks, and keeps its losses under activation checkpointing and under
FSDP2 with 2 gloo ranks (the blocks named by the spec are the ones wrapped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mammut.models import get_model_spec, list_models
from mammut.train.distributed import apply_activation_checkpointing, transformer_blocks
from mammut.train.monitor import read_metrics

MODELS = list_models()
TRAIN_ONLY_FIELDS = ("num_tokens", "pad_id", "bos_id", "eos_id", "media_token_id")  # filled from the run's tokenizer


def inputs(name: str, b: int = 3, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, images) for a tiny model: media models take (b, 1, c, h, w) and a media token first."""
    spec = get_model_spec(name)
    cfg = spec.config_class(**spec.tiny)
    size = cfg.vit["image_size"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, cfg.num_tokens, (b, n), generator=g)
    images = torch.rand(b, 3, size, size, generator=g)
    if spec.media:
        text[:, 0] = cfg.media_token_id
        images = images.unsqueeze(1)
    return text, images


@pytest.mark.parametrize("name", MODELS)
def test_spec_is_complete_and_tiny(name):
    spec = get_model_spec(name)
    model = spec.build_tiny()
    assert type(model) is spec.cls and spec.tasks and spec.block_types
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # every block type the spec names occurs in the model, and every occurrence gets wrapped
    found = {type(m) for m in transformer_blocks(model, spec.block_types)}
    assert found, f"{name}: no block of {spec.block_types}"


@pytest.mark.parametrize("name", MODELS)
def test_forward_gives_logits_and_a_loss(name):
    model = get_model_spec(name).build_tiny().eval()
    text, images = inputs(name)
    logits = model(text, images)
    assert logits.shape == (*text.shape, model.config.num_tokens) and torch.isfinite(logits).all()
    loss = model(text, images, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", MODELS)
def test_caption_loss_falls(name):
    model = get_model_spec(name).build_tiny().train()
    text, images = inputs(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.caption_loss(text, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_gives_the_same_outputs(name, tmp_path):
    spec = get_model_spec(name)
    model = spec.build_tiny().eval()
    text, images = inputs(name)
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / name))
    with torch.no_grad():
        torch.testing.assert_close(loaded.caption_loss(text, images), model.caption_loss(text, images), rtol=0, atol=0)
    assert loaded.config == model.config


@pytest.mark.parametrize("name", MODELS)
def test_generation(name):
    spec = get_model_spec(name)
    model = spec.build_tiny().eval()
    _, images = inputs(name, b=2)
    prompt = [[model.config.media_token_id]] * 2 if spec.media else None
    out = model.generate(images, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    assert out.shape == (2, 5) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < model.config.num_tokens


@pytest.mark.parametrize("name", MODELS)
def test_activation_checkpointing_keeps_losses_and_gradients(name):
    spec = get_model_spec(name)
    plain, wrapped = spec.build_tiny().train(), spec.build_tiny().train()
    wrapped.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(wrapped, spec.block_types) == len(transformer_blocks(plain, spec.block_types))
    text, images = inputs(name)
    a, b = plain.caption_loss(text, images), wrapped.caption_loss(text, images)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (k, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------ the Trainer


def _config(tmp: Path, name: str, task: str) -> Path:
    """A run config for the model's tiny spec on ``task`` (emoji scenes, seconds to train)."""
    spec = get_model_spec(name)
    model = {"name": name, **{k: v for k, v in spec.tiny.items() if k not in TRAIN_ONLY_FIELDS}}
    cfg = {
        "model": model,
        "data": {"kind": "emoji", "image_size": spec.tiny["vit"]["image_size"], "num_emoji": 20, "vocab_size": 600,
                 "max_len": 24},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"task": task, "steps": 6, "batch_size": 8, "log_every": 1, "report": False, "progress": False,
                  "tensorboard": False, "threads": 1, "save_every": 0, "precision": "fp32"},  # compared closely
        "eval": {"n": 16, "max_new_tokens": 8},
    }
    path = tmp / f"{name}-{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"])


PAIRS = [(name, task) for name in MODELS for task in get_model_spec(name).tasks]


@pytest.mark.parametrize(("name", "task"), PAIRS)
def test_trainer_runs_every_model_on_every_task(name, task, tmp_path):
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    cfg = load_config(_config(tmp_path, name, task), ["--train.out_dir", str(tmp_path / "run"), "--train.steps", "3"])
    result = Trainer(cfg).fit()
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


PARALLEL = [(name, get_model_spec(name).tasks[0], "fsdp") for name in MODELS] + [("mammut", "vqa", "ddp")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "task", "parallel"), PARALLEL)
def test_two_ranks_equal_one_process(name, task, parallel, tmp_path):
    """FSDP2 for every model; DDP where the task leaves parameters without gradient (VQA on a
    contrastive captioner: DDP must be told)."""
    config = _config(tmp_path, name, task)
    one, two = tmp_path / "one", tmp_path / "two"
    _train([sys.executable, "-m", "mammut.cli", "train", "--config", str(config), "--train.out_dir", str(one)])
    _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mammut.cli",
            "train", "--config", str(config), "--train.out_dir", str(two), "--train.parallel", parallel])
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
