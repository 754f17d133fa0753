"""Training loop: the loss falls, NaN is caught before it is trained on, exact resume after
SIGKILL, checkpoint on SIGTERM, optimiser groups, schedule, checkpoint files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mammut.train.checkpointing import latest_checkpoint, load_weights, save_weights
from mammut.train.config import ConfigError, OptimConfig, load_config
from mammut.train.loop import NonFiniteLossError, Trainer
from mammut.train.monitor import read_metrics
from mammut.train.optim import lr_at, param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"  # the packaged preset


def tiny(tmp_path: Path, *extra: str):
    base = ["--train.out_dir", str(tmp_path / "run"), "--train.progress", "false", "--train.threads", "1"]
    return load_config(TINY, base + list(extra))


def test_loss_falls(tmp_path):
    trainer = Trainer(tiny(tmp_path, "--train.steps", "25"))
    result = trainer.fit()
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert result.step == 25 and len(result.losses) == 25
    assert last < first - 1.0, (first, last)
    # a checkpoint and a metrics log were written
    assert latest_checkpoint(tmp_path / "run").name == "step_00000025"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 25 and {"loss", "lr", "samples_per_s", "caption", "contrastive"} <= set(records[-1])


def test_nan_loss_stops_before_the_step(tmp_path):
    trainer = Trainer(tiny(tmp_path, "--train.steps", "10"))
    original = trainer.model.compute_losses
    calls = {"n": 0}
    snapshot = {}

    def poisoned(text, images, **kw):
        calls["n"] += 1
        out = original(text, images, **kw)
        if calls["n"] == 3:  # the third step
            snapshot.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
            return out._replace(total=out.total * float("nan"), caption=out.caption * float("nan"))
        return out

    trainer.model.compute_losses = poisoned
    with pytest.raises(NonFiniteLossError, match="step 3") as info:
        trainer.fit()
    assert info.value.step == 3 and trainer.step == 2
    # the poisoned step was not applied
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_grad_accumulation_matches_whole_batch_for_token_mean(tmp_path):
    # caption loss only: accumulation over micro-batches gives the token mean of the whole batch
    args = ("--train.steps", "4", "--train.log_every", "1", "--model.contrastive_loss_weight", "0")
    full = Trainer(tiny(tmp_path / "a", *args)).fit().losses
    accum = Trainer(tiny(tmp_path / "b", *args, "--train.grad_accum", "2")).fit().losses
    torch.testing.assert_close(torch.tensor(accum), torch.tensor(full), rtol=1e-4, atol=1e-5)


_HAS_CXX = bool(shutil.which("g++") or shutil.which("clang++"))


@pytest.mark.parametrize("option, rtol, atol", [
    ("activation_checkpointing", 1e-5, 1e-6),  # recompute each block in backward
    # torch.compile per block, as ``benchmarks/train_step.py --compile``
    pytest.param("compile", 1e-4, 1e-5, marks=[pytest.mark.slow, pytest.mark.skipif(
        not _HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")]),
])
def test_block_wrappers_keep_the_losses(tmp_path, option, rtol, atol):
    """``train.activation_checkpointing`` / ``train.compile``: same parameter names, same losses."""
    args = ("--train.steps", "3", "--train.log_every", "1", "--train.precision", "fp32")  # compared closely
    plain = Trainer(tiny(tmp_path / "a", *args))
    wrapped = Trainer(tiny(tmp_path / "b", *args, f"--train.{option}", "true"))
    assert sorted(plain.model.state_dict()) == sorted(wrapped.model.state_dict())  # names unchanged
    torch.testing.assert_close(torch.tensor(wrapped.fit().losses), torch.tensor(plain.fit().losses), rtol=rtol, atol=atol)


def test_existing_run_needs_resume(tmp_path):
    Trainer(tiny(tmp_path, "--train.steps", "2")).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny(tmp_path, "--train.steps", "2"))
    with pytest.raises(ConfigError, match="model.dim: --resume needs the model of"):
        Trainer(tiny(tmp_path, "--train.steps", "4", "--model.dim", "32"), resume=True)
    resumed = Trainer(tiny(tmp_path, "--train.steps", "4"), resume=True)
    assert resumed.step == 2 and resumed.fit().step == 4


def test_param_groups_skip_norms_biases_embeddings():
    from mammut.train.build import build_model

    model = build_model({"name": "mammut", "dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "num_tokens": 50,
                         "vit": {"image_size": 16, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2, "dim_head": 16}})
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "token_emb.weight" in skipped and "img_encoder.pos_emb" in skipped
    assert any("log_scale" in n for n in skipped)
    assert all(not n.endswith(("norm.weight", ".bias")) for n in decayed)
    assert "text_to_latents.weight" in decayed and any(n.startswith("layers.0.block.attn") for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_safetensors_weights_store_tied_tensors_once(tmp_path):
    shared = torch.randn(4, 3)
    state = {"emb.weight": shared, "out.weight": shared, "bias": torch.zeros(3)}
    save_weights(state, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert set(loaded) == set(state)
    assert torch.equal(loaded["out.weight"], shared) and loaded["out.weight"] is loaded["emb.weight"]


# --------------------------------------------------------------------------- subprocess runs


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mammut.cli", "train", "--config", str(TINY), "--train.out_dir", str(run_dir),
            "--train.log_every", "1", "--train.report", "false", "--train.threads", "1", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    args = ("--train.steps", "24", "--train.save_every", "4", "--train.keep_checkpoints", "0")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(ref_dir, *args), env=_env(), check=True, capture_output=True, timeout=300)
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, 25))

    proc = subprocess.Popen(_cli(run_dir, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_00000008").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        if time.time() > deadline:  # a hang guard, not a speed check
            proc.kill()
            pytest.fail("no checkpoint at step 8 after 240 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert 8 <= killed_at < 24

    subprocess.run(_cli(run_dir, *args, "--resume"), env=_env(), check=True, capture_output=True, timeout=300)
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 25))
    assert [resumed[s] for s in range(1, 25)] == [reference[s] for s in range(1, 25)]  # bitwise
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == 24 and state["samples_seen"] == 24 * 16


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, "--train.steps", "5000", "--train.save_every", "0"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_losses(run_dir)) < 3:
        assert proc.poll() is None, proc.stderr.read()
        if time.time() > deadline:  # a hang guard, not a speed check
            proc.kill()
            pytest.fail("fewer than 3 logged steps after 240 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a hang: make the child dump every thread's stack (faulthandler)
        proc.send_signal(signal.SIGABRT)
        stderr = proc.communicate(timeout=60)[1]
        pytest.fail(f"no exit 120 s after SIGTERM; the child's stderr:\n{stderr[-6000:]}")
    assert code == 143, proc.stderr.read()
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    step = int(ckpt.name.split("_")[1])
    assert 3 <= step < 5000 and max(_losses(run_dir)) == step
