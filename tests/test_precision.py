"""Precision chosen for the hardware (train.precision auto) and one writer per run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import mammut.precision as precision_mod
from mammut.cli import main
from mammut.precision import native_bf16, resolve_precision
from mammut.train.config import ConfigError, load_config


def _cpu(monkeypatch, *, isa: bool, onednn: bool = True) -> None:
    """Pretend the CPU has (or lacks) AVX512-BF16/AMX, with oneDNN allowed to use them or not."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: isa, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: isa, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn, raising=False)
    monkeypatch.setattr(precision_mod, "_warned", set())


def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    _cpu(monkeypatch, isa=False)
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.requested) == ("fp32", "auto")
    assert "without native bf16" in p.reason and not p.bf16


def test_auto_is_bf16_on_a_cpu_with_amx(monkeypatch):
    _cpu(monkeypatch, isa=True)
    p = resolve_precision("auto", "cpu")
    assert p.name == "bf16" and "native bf16" in p.reason
    assert p.as_dict() == {"precision": "bf16", "precision_requested": "auto", "precision_reason": p.reason}


def test_auto_is_fp32_when_onednn_may_not_use_the_instructions(monkeypatch):
    _cpu(monkeypatch, isa=True, onednn=False)  # e.g. ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine
    assert resolve_precision("auto", "cpu").name == "fp32"


def test_onednn_isa_cap_makes_auto_fp32_in_a_fresh_process():
    code = "from mammut.precision import resolve_precision; print(resolve_precision('auto', 'cpu').name)"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


def test_explicit_bf16_on_a_slow_cpu_is_honoured_with_one_warning(monkeypatch):
    _cpu(monkeypatch, isa=False)
    with pytest.warns(RuntimeWarning, match="20x slower"):
        assert resolve_precision("bf16", "cpu").name == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert resolve_precision("bf16", "cpu").name == "bf16"


def test_fp32_and_bad_values(monkeypatch):
    _cpu(monkeypatch, isa=True)
    assert resolve_precision("fp32", "cpu").name == "fp32"
    with pytest.raises(ValueError, match=r"precision: expected one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_other_devices_are_fp32_under_auto():
    assert native_bf16("meta")[0] is False
    assert resolve_precision("auto", "meta").name == "fp32"


def test_config_default_and_check():
    assert load_config(None, []).train.precision == "auto"
    for preset in ("tiny", "demo", "vqa", "vqa-tiny", "flamingo", "flamingo-tiny"):
        assert load_config(preset, []).train.precision == "auto", preset
    with pytest.raises(ConfigError, match="train.precision"):
        load_config("tiny", ["--train.precision", "fp16"])


@pytest.mark.parametrize("isa, expected", [(False, "fp32"), (True, "bf16")])
def test_a_run_records_the_choice_and_why(monkeypatch, tmp_path, isa, expected, capsys):
    _cpu(monkeypatch, isa=isa)
    out = tmp_path / "run"
    rc = main(["train", "--config", "tiny", "--train.steps", "2", "--train.out_dir", str(out),
               "--train.report", "false", "--train.progress", "false"])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["precision"] == expected  # what ran, not "auto"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = [r for r in records if r["kind"] == "run"]
    assert len(run) == 1 and run[0]["precision"] == expected and run[0]["precision_requested"] == "auto"
    assert ("without native bf16" in run[0]["precision_reason"]) == (not isa)
    from mammut.eval.evaluate import evaluate_run

    metrics, _ = evaluate_run(out, n=16)
    assert metrics["precision"] == expected and metrics["precision_reason"] == run[0]["precision_reason"]


# ----------------------------------------------------------------------------- the run folder's lock

_HOLD = textwrap.dedent("""
    import sys, time
    from mammut.io.runlock import FolderLock
    lock = FolderLock(sys.argv[1], what="run").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    args = ["train", "--config", "tiny", "--train.steps", "2", "--train.out_dir", str(out),
            "--train.report", "false", "--train.progress", "false"]
    try:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mammut train: error: train.out_dir")
        assert f"PID {holder.pid}" in err[0]
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the kernel released the dead holder's lock
    assert (out / "checkpoints").is_dir()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from mammut.io.runlock import FolderLock, FolderLocked

    outer = FolderLock(tmp_path, what="run").acquire()
    with FolderLock(tmp_path, what="run"):
        pass
    assert outer.held
    code = "import sys; from mammut.io.runlock import FolderLock; FolderLock(sys.argv[1]).acquire()"
    busy = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert busy.returncode != 0 and "FolderLocked" in busy.stderr and f"PID {os.getpid()}" in busy.stderr
    outer.release()
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    with pytest.raises(FolderLocked):  # and the reverse: another process holds it
        holder = _holder(tmp_path)
        try:
            FolderLock(tmp_path).acquire()
        finally:
            holder.kill()
            holder.wait()


# ----------------------------------------------------------------------------- train.time_budget_s

def _fake_clock(monkeypatch, step_s: float) -> None:
    """The loop's clock advances ``step_s`` during each training step and stands still otherwise."""
    import mammut.train.loop as loop

    now = [0.0]
    step = loop.Trainer.train_step

    def timed_step(self, micro):
        now[0] += step_s
        return step(self, micro)

    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(loop.Trainer, "train_step", timed_step)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "model.safetensors"))


def test_a_time_budget_keeps_the_steps_that_fit_and_equals_a_run_of_that_many(monkeypatch, tmp_path):
    from mammut.train.loop import Trainer

    base = ["--train.precision", "fp32", "--train.report", "false", "--train.progress", "false",
            "--optim.warmup_steps", "30"]
    _fake_clock(monkeypatch, 0.5)  # 0.5 s a step: 12.5 s spent at step 25, 15 more steps fit in 20 s
    budget = load_config("tiny", [*base, "--train.steps", "60", "--train.time_budget_s", "20",
                                  "--train.out_dir", str(tmp_path / "budget")])
    result = Trainer(budget).fit()
    assert result.step == 40
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["time_budget_s"]) == (40, 0)
    records = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    decided = [r for r in records if r["kind"] == "budget"]
    assert len(decided) == 1 and decided[0]["steps_requested"] == 60 and decided[0]["steps_decided"] == 40

    plain = load_config("tiny", [*base, "--train.steps", "40", "--train.out_dir", str(tmp_path / "plain")])
    Trainer(plain).fit()
    a, b = _weights(tmp_path / "budget"), _weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, step for step

    again = Trainer(budget, resume=True)  # the original config on --resume: the decision stands
    assert again.cfg.train.steps == 40 and again.fit().step == 40


def test_a_budget_that_fits_changes_nothing(monkeypatch, tmp_path):
    from mammut.train.loop import Trainer

    _fake_clock(monkeypatch, 0.01)
    cfg = load_config("tiny", ["--train.steps", "30", "--train.time_budget_s", "600", "--train.report", "false",
                               "--train.progress", "false", "--train.out_dir", str(tmp_path)])
    assert Trainer(cfg).fit().step == 30
    with pytest.raises(ConfigError, match="train.time_budget_s"):
        load_config("tiny", ["--train.time_budget_s", "-1"])


def test_the_precision_benchmark_prints_both_and_the_choice():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "precision.py"), "--config", "tiny", "--steps", "8",
                          "--rounds", "1", "--threads", "1"], capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "ATen capability" in lines[0]
    summary = [line for line in lines if line.startswith("preset tiny: fp32 ")]
    assert len(summary) == 1 and " samples/s, bf16 " in summary[0] and summary[0].endswith("x")
    assert lines[-1].startswith("auto picks fp32 (") or lines[-1].startswith("auto picks bf16 (")
