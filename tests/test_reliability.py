"""Reliability of the training stack: no pickle code execution on --resume, SIGTERM under DDP,
atomic rewrites of run files, checksummed checkpoints with fallback, clear full-disk errors,
the collective timeout (train.dist_timeout), progress lines when stderr is not a terminal."""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import mammut.train.checkpointing as checkpointing
import mammut.train.loop as loop
from mammut.train.checkpointing import (
    CheckpointCorrupt,
    CheckpointWriteError,
    UnsafeCheckpointError,
    atomic_write_text,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from mammut.train.config import load_config
from mammut.train.distributed import DistInfo, DistTimeoutError, init_distributed
from mammut.train.loop import Trainer
from mammut.train.monitor import Monitor, format_duration, read_metrics

TINY = "tiny"  # the packaged preset


def tiny(out: Path, *extra: str):
    base = ["--train.out_dir", str(out), "--train.progress", "false", "--train.threads", "1"]
    return load_config(TINY, base + list(extra))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


class _Evil:
    """Unpickling this creates ``marker`` (a folder): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _small_checkpoint(run: Path, step: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer, Path]:
    """A Linear model with optimiser state, saved as checkpoint ``step`` of ``run``."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = save_checkpoint(run, step, model, opt, {"samples_seen": step}, DistInfo(), keep=0)
    return model, opt, path


def _rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who edits files would also do: make the manifest match again."""
    if not (ckpt / "manifest.json").is_file():
        return
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 7 if offset is None else offset  # inside the tensor data, past the header
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ============================================================================ 1. no pickle


def test_rng_state_is_json_and_round_trips(tmp_path):
    model, opt, ckpt = _small_checkpoint(tmp_path / "run")
    assert (ckpt / "rng_rank0.json").is_file() and not (ckpt / "rng_rank0.pt").exists()
    saved = json.loads((ckpt / "rng_rank0.json").read_text())
    assert {"torch", "numpy", "python"} <= set(saved)
    expected = (torch.rand(3), np.random.rand(3), random.random())  # the draws right after the save
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    load_checkpoint(ckpt, model, opt, DistInfo())
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_malicious_optimizer_file_is_refused_without_running_it(tmp_path):
    model, opt, ckpt = _small_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": _Evil(marker)}, ckpt / "optimizer.pt")
    _rewrite_manifest(ckpt)  # checksums match: only the loader stands between the file and the code
    verify_checkpoint(ckpt)
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt: refused to load.*arbitrary code"):
        load_checkpoint(ckpt, model, opt, DistInfo())
    assert not marker.exists()


def test_malicious_legacy_rng_file_is_refused_without_running_it(tmp_path):
    model, opt, ckpt = _small_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    (ckpt / "rng_rank0.json").unlink()  # an older checkpoint layout: rng_rank0.pt, no manifest
    (ckpt / "manifest.json").unlink()
    torch.save({"torch": torch.get_rng_state(), "numpy": _Evil(marker), "python": random.getstate()}, ckpt / "rng_rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"rng_rank0\.pt: refused to load"):
        load_checkpoint(ckpt, model, opt, DistInfo())
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny(run, "--train.steps", "2")).fit()
    ckpt = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save({"payload": _Evil(marker)}, ckpt / "optimizer.pt")
    _rewrite_manifest(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="optimizer.pt"):
        Trainer(tiny(run, "--train.steps", "4"), resume=True)
    assert not marker.exists()


def test_legacy_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, caplog):
    model, opt, ckpt = _small_checkpoint(tmp_path / "run")
    # the layout before this change: RNG pickled with torch.save, no manifest
    (ckpt / "manifest.json").unlink()
    (ckpt / "rng_rank0.json").unlink()
    torch.save(checkpointing.rng_state(), ckpt / "rng_rank0.pt")
    expected = torch.rand(3)
    with caplog.at_level(logging.WARNING, logger="mammut.train.checkpointing"):
        load_checkpoint(ckpt, model, opt, DistInfo())  # loaded with weights_only=True
    assert torch.equal(torch.rand(3), expected)
    assert "no manifest.json" in caplog.text and str(ckpt) in caplog.text


# ============================================================================ 2. SIGTERM


def test_stop_is_decided_only_by_the_agreed_flag(tmp_path):
    """A signal that lands after a step's all-reduce must not stop that step locally (other
    ranks would run on): the loop stops one step later, when every rank has agreed."""
    trainer = Trainer(tiny(tmp_path / "run", "--train.steps", "8", "--train.log_every", "1"))
    original_step = trainer.optimizer.step

    def step_then_signal(*args, **kwargs):
        out = original_step(*args, **kwargs)
        if trainer.step == 2:  # inside step 3, after its all-reduce
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.optimizer.step = step_then_signal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = trainer.fit()
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted and result.step == 4 and trainer._signal_received
    assert after == signal.SIG_IGN  # stopping: a second SIGTERM cannot kill the shutdown half-way
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert ckpt.name == "step_00000004"
    verify_checkpoint(ckpt)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # the process ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def _train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"}


def _torchrun(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mammut.cli", "train", "--config", TINY, "--train.out_dir", str(run), "--train.log_every", "1",
            "--train.report", "false", "--train.threads", "1", "--train.tensorboard", "false",
            "--train.save_every", "0", "--train.dist_timeout", "60", *extra]


def _fail_hung(proc: subprocess.Popen, log_path: Path, what: str) -> None:
    for kid in _children(proc.pid):  # every rank dumps its threads' stacks (PYTHONFAULTHANDLER)
        try:
            os.kill(kid, signal.SIGABRT)
        except ProcessLookupError:
            pass
    time.sleep(2)
    proc.kill()
    proc.wait(timeout=60)
    pytest.fail(f"{what}; the ranks' output:\n{log_path.read_text()[-8000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the ranks through /proc (Linux)")
def test_sigterm_under_ddp_stops_every_rank_together(tmp_path):
    """10 trials on one 2-rank gloo run: SIGTERM to each rank at its own random moment; both
    ranks stop after the same step within a few steps, exit 143 with a complete checkpoint, and
    the resumed runs reproduce the uninterrupted run's losses exactly."""
    steps, trials = 100, 10
    args = ("--train.steps", str(steps))
    ref = tmp_path / "ref"
    done = subprocess.run(_torchrun(ref, *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = _train_losses(ref)
    assert sorted(reference) == list(range(1, steps + 1))

    run, rng = tmp_path / "run", random.Random(20240611)
    start = 0
    for trial in range(trials):
        log_path = tmp_path / f"trial{trial}.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(_torchrun(run, *args, *(["--resume"] if trial else [])), env=_env(),
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # each rank gets SIGTERM at its own moment: after a random number of new steps,
            # plus a random fraction of a step
            moments = sorted((start + rng.randint(1, 3), rng.uniform(0.0, 0.03), which) for which in (0, 1))
            deadline = time.monotonic() + 240  # hang guards only, never a speed check
            first_seen: int | None = None
            for target, delay, which in moments:
                while max(_train_losses(run), default=0) < target and proc.poll() is None:
                    if time.monotonic() > deadline:
                        _fail_hung(proc, log_path, f"trial {trial}: step {target} not reached after 240 s")
                    time.sleep(0.005)
                if proc.poll() is not None:  # stopped by the first signal before the second moment
                    assert first_seen is not None, f"trial {trial}: the run ended before SIGTERM:\n{log_path.read_text()[-4000:]}"
                    break
                time.sleep(delay)
                ranks = _children(proc.pid)
                assert len(ranks) == 2 or first_seen is not None, f"trial {trial}: expected 2 ranks, found {ranks}"
                if which < len(ranks):  # else: that rank already exited after the first signal
                    try:
                        os.kill(ranks[which], signal.SIGTERM)
                    except ProcessLookupError:  # exited meanwhile
                        pass
                if first_seen is None:
                    first_seen = max(_train_losses(run), default=0)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                _fail_hung(proc, log_path, f"trial {trial}: no exit 120 s after SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
        out = log_path.read_text()
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", out)]
        assert codes and set(codes) == {143}, f"trial {trial}: rank exit codes {codes}:\n{out[-4000:]}"
        stopped = {int(r): int(s) for r, s in re.findall(r"\[rank (\d)\] WARNING \S+: stopped by SIGTERM at step (\d+)", out)}
        assert set(stopped) == {0, 1} and len(set(stopped.values())) == 1, f"trial {trial}: {stopped}\n{out[-4000:]}"
        assert not re.search(r"CheckpointWriteError|DistTimeoutError|CheckpointCorrupt", out), out[-4000:]
        stop = stopped[0]
        # the signal lands at most 2 steps before the agreed stop; the log may lag one step
        # behind, and rank 1 may lead rank 0's log by one: a few steps
        assert start < stop <= first_seen + 4 < steps, (trial, start, first_seen, stop)
        ckpt = list_checkpoints(run)[-1]
        assert ckpt.name == f"step_{stop:08d}"
        verify_checkpoint(ckpt)  # complete: every file of both ranks, checksums match
        assert {"rng_rank0.json", "rng_rank1.json"} <= {p.name for p in ckpt.iterdir()}
        assert max(_train_losses(run)) == stop
        start = stop

    # the newest checkpoint goes bad: both ranks fall back to the one before, together
    previous, newest = list_checkpoints(run)[-2:]
    _flip_byte(newest / "model.safetensors")
    final = subprocess.run(_torchrun(run, *args, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-4000:]
    assert f"{newest / 'model.safetensors'}: corrupt" in final.stderr and f"resumed from {previous}" in final.stderr
    resumed = _train_losses(run)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert [resumed[s] for s in resumed] == [reference[s] for s in resumed]  # bitwise, across 10 interruptions


# ============================================================================ 3. atomic rewrites


class _HalfWriter:
    """A file that writes half of what it is given, then fails like a full disk (a kill
    mid-write leaves the same state)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_writes_midway(monkeypatch, under: Path) -> None:
    """From now on, every file opened for writing under ``under`` (or by descriptor: the
    temporary files) fails half-way through its first write."""
    real_open = io.open

    def flaky_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and (isinstance(file, int) or str(file).startswith(str(under))):
            return _HalfWriter(f)
        return f

    monkeypatch.setattr(io, "open", flaky_open)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_write_text_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old\n")
    with pytest.MonkeyPatch.context() as mp:
        _fail_writes_midway(mp, target)
        with pytest.raises(OSError, match="No space left"):
            atomic_write_text(target, "new " * 1000)
    assert target.read_text() == "old\n" and _siblings(target) == ["state.json"]

    def killed(fd):  # interrupted after the data, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and _siblings(target) == ["state.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _siblings(target) == ["state.json"]


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    old = "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11))
    (run / "metrics.jsonl").write_text(old)
    _fail_writes_midway(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="No space left"):
        Monitor(run, total_steps=20, start_step=5, enabled=True, tensorboard=False, progress=False)
    assert (run / "metrics.jsonl").read_text() == old  # a cut log would have lost records
    assert _siblings(run / "metrics.jsonl") == ["metrics.jsonl"]


def test_metrics_rewrite_keeps_steps_up_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"kind": "train", "step": s}) for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # cut by a kill
    Monitor(run, total_steps=20, start_step=5, enabled=True, tensorboard=False, progress=False).close()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_config_yaml_rewrite_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny(run, "--train.steps", "1")).fit()
    before = (run / "config.yaml").read_text()
    _fail_writes_midway(monkeypatch, run / "config.yaml")
    with pytest.raises(OSError, match="No space left"):
        Trainer(tiny(run, "--train.steps", "2"), resume=True)
    monkeypatch.undo()
    assert (run / "config.yaml").read_text() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".config.yaml")]


# ============================================================================ 4. checksums, fallback


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A 4-step run with checkpoints at steps 2 and 4, and its losses (the reference)."""
    run = tmp_path_factory.mktemp("base") / "run"
    Trainer(tiny(run, "--train.steps", "4", "--train.save_every", "2", "--train.keep_checkpoints", "0",
                 "--train.log_every", "1")).fit()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    return run, _train_losses(run)


def _copy_run(two_checkpoints, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run)
    return run


def test_checkpoint_has_a_manifest_of_every_file(two_checkpoints):
    ckpt = list_checkpoints(two_checkpoints[0])[-1]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert manifest["step"] == 4 and all(len(v["sha256"]) == 64 for v in manifest["files"].values())
    verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage, file, match", [
    ("flip", "model.safetensors", r"model\.safetensors: corrupt: sha256 differs"),
    ("truncate", "model.safetensors", r"model\.safetensors: truncated or overwritten: \d+ bytes, manifest\.json records \d+"),
    ("truncate", "optimizer.pt", r"optimizer\.pt: truncated"),
    ("delete", "rng_rank0.json", r"rng_rank0\.json: missing \(listed in manifest\.json\)"),
    ("delete", "state.json", r"state\.json: missing"),
    ("truncate", "manifest.json", r"manifest\.json: corrupt manifest"),
])
def test_verify_checkpoint_names_the_bad_file(two_checkpoints, tmp_path, damage, file, match):
    ckpt = list_checkpoints(_copy_run(two_checkpoints, tmp_path))[-1]
    {"flip": _flip_byte, "truncate": _truncate, "delete": Path.unlink}[damage](ckpt / file)
    with pytest.raises(CheckpointCorrupt, match=match) as info:
        verify_checkpoint(ckpt)
    assert isinstance(info.value, ValueError) and str(ckpt) in str(info.value)


def test_latest_valid_checkpoint_skips_a_corrupt_one_with_a_warning(two_checkpoints, tmp_path, caplog):
    run = _copy_run(two_checkpoints, tmp_path)
    _flip_byte(run / "checkpoints" / "step_00000004" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="mammut.train.checkpointing"):
        assert latest_valid_checkpoint(run) == run / "checkpoints" / "step_00000002"
    assert "step_00000004/model.safetensors: corrupt" in caplog.text
    assert latest_valid_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage, file", [
    ("flip", "model.safetensors"),  # loaded silently into resume and eval before checksums
    ("truncate", "model.safetensors"),
    ("truncate", "optimizer.pt"),
    ("evil", "optimizer.pt"),  # a swapped file is caught by its checksum before anything is unpickled
])
def test_resume_falls_back_to_the_newest_complete_checkpoint(two_checkpoints, tmp_path, caplog, damage, file):
    run, reference = _copy_run(two_checkpoints, tmp_path), two_checkpoints[1]
    bad = run / "checkpoints" / "step_00000004" / file
    marker = tmp_path / "pwned"
    if damage == "evil":
        torch.save({"payload": _Evil(marker)}, bad)
    else:
        {"flip": _flip_byte, "truncate": _truncate}[damage](bad)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny(run, "--train.steps", "4", "--train.save_every", "2", "--train.keep_checkpoints", "1",
                               "--train.log_every", "1"), resume=True)
    assert trainer.step == 2
    assert str(bad) in caplog.text and "step_00000002" in caplog.text
    assert (run / "checkpoints" / "corrupt-step_00000004").is_dir()  # kept aside, out of the way
    result = trainer.fit()
    assert result.losses == [reference[3], reference[4]]  # bitwise: an exact resume from step 2
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    verify_checkpoint(run / "checkpoints" / "step_00000004")
    assert sorted(_train_losses(run)) == [1, 2, 3, 4] and not marker.exists()


def test_resume_with_no_valid_checkpoint_is_a_clear_error(two_checkpoints, tmp_path):
    run = _copy_run(two_checkpoints, tmp_path)
    for ckpt in list_checkpoints(run):
        _truncate(ckpt / "model.safetensors")
    with pytest.raises(CheckpointCorrupt, match=r"--resume: no checkpoint under .* passes verification .*model\.safetensors"):
        Trainer(tiny(run, "--train.steps", "4"), resume=True)
    assert len(list_checkpoints(run)) == 2  # nothing moved or deleted


# ============================================================================ 5. full disk


def _enospc_in_safetensors(monkeypatch):
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    return "model.safetensors"


def _enospc_in_torch_save(monkeypatch):
    # the real failure: the file's write() hits ENOSPC, torch.save turns it into
    # "RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos"
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _HalfWriter(f) if "w" in mode and str(file).endswith("optimizer.pt") else f

    monkeypatch.setattr(checkpointing, "open", full_disk_open, raising=False)
    return "optimizer.pt"


def _enospc_lost_by_torch_save(monkeypatch):
    # torch.save given a path (or an older torch) reports only "unexpected pos": the free space tells
    def save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    return "optimizer.pt"


def _enospc_in_json(monkeypatch):
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith("rng_rank"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return "rng_rank0.json"


@pytest.mark.parametrize("fail", [_enospc_in_safetensors, _enospc_in_torch_save, _enospc_lost_by_torch_save,
                                  _enospc_in_json])
def test_full_disk_during_a_save_is_a_clear_error(tmp_path, monkeypatch, fail):
    run = tmp_path / "run"
    model, opt, first = _small_checkpoint(run, step=1)
    name = fail(monkeypatch)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(run, 2, model, opt, {}, DistInfo(), keep=1)
    err = info.value
    tmp = run / "checkpoints" / ".tmp-step_00000002"
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.path == str(tmp / name)
    assert str(err) == f"no space left on device while writing {tmp / name}"
    assert not tmp.exists()  # the partial folder is gone
    assert list_checkpoints(run) == [first]
    verify_checkpoint(first)
    monkeypatch.undo()
    save_checkpoint(run, 2, model, opt, {}, DistInfo(), keep=1)  # space again: saving works
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]


def test_other_save_failures_are_named_and_cleaned_up(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model, opt, first = _small_checkpoint(run, step=1)
    tmp = run / "checkpoints" / ".tmp-step_00000002"

    def lost_io_error(obj, f, *args, **kwargs):  # torch lost the OSError; the disk is not full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", lost_io_error)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(run, 2, model, opt, {}, DistInfo())
    assert info.value.errno == errno.EIO and not tmp.exists()
    assert str(info.value) == (f"write failed ([enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598) "
                               f"while writing {tmp / 'optimizer.pt'}")

    def not_io(obj, f, *args, **kwargs):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", not_io)
    with pytest.raises(TypeError, match="cannot pickle"):  # not an I/O error: passed on unchanged
        save_checkpoint(run, 2, model, opt, {}, DistInfo())
    assert not tmp.exists() and list_checkpoints(run) == [first]


def test_full_disk_during_training_stops_with_the_write_error(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny(run, "--train.steps", "4", "--train.save_every", "2"))
    _enospc_in_safetensors(monkeypatch)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device while writing .*\.tmp-step_00000002/model\.safetensors$"):
        trainer.fit()
    assert not list((run / "checkpoints").iterdir())


# ============================================================================ 6. dist_timeout


def test_init_distributed_passes_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    info = init_distributed("cpu", timeout_s=7)
    assert info.world_size == 2 and seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}
    with pytest.raises(ValueError, match="train.dist_timeout: expected a positive number of seconds, got 0"):
        init_distributed("cpu", timeout_s=0)


def test_trainer_passes_train_dist_timeout(tmp_path, monkeypatch):
    seen = {}

    def fake_init(device, timeout_s=None):
        seen.update(device=device, timeout_s=timeout_s)
        return DistInfo()

    monkeypatch.setattr(loop, "init_distributed", fake_init)
    Trainer(tiny(tmp_path / "run", "--train.steps", "1", "--train.dist_timeout", "42"))
    assert seen == {"device": "auto", "timeout_s": 42}


_HUNG_RANK = """
import os, sys, time
from mammut.train.distributed import barrier, init_distributed
info = init_distributed("cpu", timeout_s=3)
if info.rank == 1:
    time.sleep(120)  # hung: never reaches the barrier
    sys.exit(0)
barrier("the test barrier")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two interpreters importing torch: ~8 s
def test_a_hung_rank_fails_the_job_within_dist_timeout(tmp_path):
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _HUNG_RANK], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        try:
            _, err = procs[0].communicate(timeout=90)  # a hang guard: the limit under test is 3 s
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waits 90 s after train.dist_timeout=3 s")
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
    assert procs[0].returncode != 0
    last = re.sub(r"^\[rank\d+\]:\s*", "", err.strip().splitlines()[-1])  # torch prefixes a rank's traceback
    assert last.startswith("mammut.train.distributed.DistTimeoutError: rank 0: the test barrier did not complete "
                           "within train.dist_timeout=3 s"), err[-3000:]
    assert "raise train.dist_timeout" in last
    assert issubclass(DistTimeoutError, OSError)  # the CLI reports OSErrors in one line


# ============================================================================ 7. progress lines


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 192, 3600 + 5 * 60 + 7, float("inf"))] == ["0s", "45s", "3m12s", "1h05m", "?"]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # nohup / SLURM: not a TTY
    cfg = tiny(tmp_path / "run", "--train.steps", "6", "--train.log_every", "2", "--train.progress", "true")
    with caplog.at_level(logging.INFO, logger="mammut.train.monitor"):
        Trainer(cfg).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "mammut.train.monitor"]
    pattern = r"step (\d+)/6 \((\d+)%\) loss \d+\.\d{3} lr \d\.\de[-+]\d\d \d+\.\d samples/s ETA (\d+s|\d+m\d\ds)"
    assert len(lines) == 3 and all(re.fullmatch(pattern, line) for line in lines), lines
    assert [re.match(pattern, line).group(1, 2) for line in lines] == [("2", "33"), ("4", "66"), ("6", "100")]
    assert lines[-1].endswith("ETA 0s")


def test_no_progress_lines_with_a_bar_on_a_terminal(tmp_path, monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with caplog.at_level(logging.INFO, logger="mammut.train.monitor"):
        monitor = Monitor(tmp_path, total_steps=4, start_step=0, enabled=True, tensorboard=False, progress=True,
                          log_every=1, batch_size=8)
        for step in range(1, 5):
            monitor.progress(step, {"loss": 1.0, "lr": 1e-3, "samples/s": 10.0})
        monitor.close()
    assert not [r for r in caplog.records if r.name == "mammut.train.monitor"]
    assert "train" in sys.stderr.getvalue()  # the bar drew
