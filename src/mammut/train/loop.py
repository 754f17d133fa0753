"""The training loop: ``Trainer(cfg).fit()`` (what ``mammut train`` runs, one per rank).

The Trainer knows no objective: the run's task (``train.task``, :mod:`mammut.tasks`, found by
name in the registry :mod:`mammut.train.task`) gives the micro-batches (dicts), sets each one's token share (``task.prepare_step``) and computes the
named losses (``task.loss(model, batch)``, minimising ``"loss"``); the model's registry spec
names the blocks that activation checkpointing, compile and FSDP2 wrap.

Per optimiser step: the micro-batches of this rank go forward under autocast and backward
(gradient sync only on the last one); the step's named losses are averaged over ranks together
with a "stop" flag (SIGTERM) and checked for NaN/inf *before* the optimiser steps; then clip,
step, log, checkpoint.

SIGTERM: the handler only sets ``_signal_received`` (never cleared). Every step all-reduces
that flag into ``_stop_agreed`` and the loop stops *only* on the agreed value, so all ranks
stop after the same step and save the same checkpoint together, whenever the signal arrives
on whichever ranks (a flag read locally could change between the all-reduce and the check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .build import build_model, resolve_model_config
from .checkpointing import (
    CheckpointCorrupt,
    _select_checkpoint,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, config_to_dict
from .data import build_tokenizer
from .distributed import (
    DistInfo,
    LossModule,
    apply_activation_checkpointing,
    apply_compile,
    barrier,
    broadcast_int,
    collective,
    init_distributed,
    sync_replicated_grads,
    to_device,
    wrap_parallel,
)
from ..io.runlock import FolderLock
from ..models import get_model_spec
from ..precision import autocast, resolve_precision
from .monitor import Monitor
from .optim import build_optimizer, lr_at, set_lr
from .init import InitSource, _image_encoder_model_section, init_source  # noqa: F401  (InitSource: its old home)
from .task import FINE_TUNE_KEYS, get_task  # noqa: F401  (FINE_TUNE_KEYS: its old home)

log = logging.getLogger(__name__)

# train.time_budget_s: steps timed to decide how many fit (after the first, slower ones)
_BUDGET_WARM_STEP, _BUDGET_PROBE_STEP = 5, 25

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "RunExistsError"]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the step was not applied."""

    def __init__(self, step: int, what: str, values: dict[str, float]) -> None:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(f"non-finite {what} at step {step} ({parts}); the step was not applied. "
                         f"Try a lower optim.lr, optim.grad_clip > 0 or train.precision=fp32.")
        self.step = step


class RunExistsError(FileExistsError):
    pass


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]  # total loss of every step run by this process
    samples_per_s: float
    train_time_s: float
    interrupted: bool = False


class Trainer:
    """Builds everything from a :class:`RunConfig` and trains. ``resume=True`` continues from
    the run folder's latest checkpoint exactly (weights, optimiser, RNG, data position).
    ``train.init_from`` starts the whole model (and tokenizer) from another run;
    ``train.image_encoder_from`` only its built-in ViT (``model.vit`` and ``img_encoder.*``),
    never again on resume."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        t = cfg.train
        self.info: DistInfo = init_distributed(t.device, timeout_s=t.dist_timeout)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.run_dir = Path(t.out_dir)
        # one writer per run folder (rank 0 writes): a second `mammut train` into it stops here,
        # naming this process; released at the end of fit() (the CLI holds it through the report)
        self._lock = FolderLock(self.run_dir, what="train.out_dir") if self.info.is_main else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: RunConfig, resume: bool) -> None:
        t = cfg.train
        self.precision = resolve_precision(t.precision, self.info.device)
        log.info("precision %s (%s)", self.precision.name, self.precision.reason)
        cfg = self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, precision=self.precision.name))
        if list_checkpoints(self.run_dir) and not resume:
            raise RunExistsError(f"train.out_dir: {self.run_dir} already holds checkpoints; "
                                 f"pass --resume to continue it or choose another --train.out_dir")
        ckpt = self._resume_checkpoint() if resume else None
        if ckpt is not None and t.time_budget_s:  # decided before the checkpoint: the run's config.yaml says how
            saved_train = self._saved_config().get("train") or {}
            if not saved_train.get("time_budget_s") and isinstance(saved_train.get("steps"), int):
                t = dataclasses.replace(t, steps=saved_train["steps"], time_budget_s=0)
                cfg = self.cfg = dataclasses.replace(cfg, train=t)
        encoder = None  # train.image_encoder_from: where the built-in ViT's weights come from
        if t.image_encoder_from and ckpt is None:
            encoder = init_source(t.image_encoder_from, key="train.image_encoder_from")
            cfg = self.cfg = dataclasses.replace(cfg, model=_image_encoder_model_section(cfg, encoder.model_cfg))
        elif t.image_encoder_from:  # resuming: the ViT this run saved (its weights come from the checkpoint)
            saved = self.run_dir / "config.yaml"
            saved_model = ((yaml.safe_load(saved.read_text()) or {}).get("model") or {}) if saved.is_file() else {}
            vit, video = saved_model.get("vit"), saved_model.get("encoder")
            if isinstance(vit, dict):
                cfg = self.cfg = dataclasses.replace(cfg, model=dict(cfg.model, vit=vit))
            elif isinstance(video, dict) and video.get("type") == "video_tube":  # the video encoder around the source's ViT
                cfg = self.cfg = dataclasses.replace(cfg, model=dict(cfg.model, encoder=video))
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()

        self._seed(t.seed)
        init = init_source(t.init_from) if t.init_from else None
        task_class = get_task(t.task)
        if ckpt is None and (t.epochs or cfg.optim.warmup_epochs):  # resuming: config.yaml holds the steps decided
            cfg = self.cfg = _steps_from_epochs(cfg)
            t = cfg.train
        elif ckpt is not None and (t.epochs or cfg.optim.warmup_epochs):
            saved = self._saved_config()
            steps, warmup = (saved.get("train") or {}).get("steps"), (saved.get("optim") or {}).get("warmup_steps")
            if isinstance(steps, int) and isinstance(warmup, int):
                cfg = self.cfg = dataclasses.replace(
                    cfg, train=dataclasses.replace(cfg.train, steps=steps, epochs=0.0),
                    optim=dataclasses.replace(cfg.optim, warmup_steps=warmup, warmup_epochs=0.0))
                t = cfg.train
        if init is not None:  # fine-tuning: the source's model (as the task adapts it) and tokenizer
            cfg = self.cfg = dataclasses.replace(cfg, model=task_class.init_model_section(cfg, cfg.model, init.model_cfg),
                                                 data=dataclasses.replace(cfg.data, tokenizer=str(init.tokenizer)))
        self.task = task_class(cfg)
        if self.info.is_main:
            self.tokenizer = build_tokenizer(cfg.data, self.run_dir, self.task.tokenizer_corpus(), self.task.special_tokens)
        barrier()
        if not self.info.is_main:
            self.tokenizer = build_tokenizer(cfg.data, self.run_dir, self.task.tokenizer_corpus(), self.task.special_tokens)
        self.model_cfg = resolve_model_config(cfg, self.tokenizer)
        if resume and ckpt is not None:
            self._check_same_model()
        self.model = build_model(self.model_cfg)
        if init is not None and ckpt is None:
            init.load_into(self.model, adapt=self.task.adapt_init_state)
        if encoder is not None:
            encoder.load_image_encoder_into(self.model)
        self.model.to(self.info.device)
        self.model.train()
        self.spec = get_model_spec(self.model_cfg["name"])
        if self.info.is_main:
            resolved = config_to_dict(dataclasses.replace(cfg, model=self.model_cfg))
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model %s: %.2fM parameters", self.model_cfg["name"], n_params / 1e6)

        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model, self.spec.block_types)
        if t.compile:
            apply_compile(self.model, self.spec.block_types)
        mode = t.parallel if t.parallel != "auto" else ("ddp" if self.info.distributed else "none")
        if mode == "none" and self.info.distributed:
            raise ConfigError(f"train.parallel: expected 'ddp', 'fsdp' or 'auto' with {self.info.world_size} ranks, got 'none'")
        self.parallel = mode if self.info.distributed else "none"
        self.module = wrap_parallel(LossModule(self.model, self.task), self.parallel, self.info, self.spec.block_types)
        self.optimizer = build_optimizer(self.model, cfg.optim)

        self.step = 0
        self.train_time = 0.0
        if resume and ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.info, verify=False)  # verified above
            self.step, self.train_time = int(state["step"]), float(state.get("train_time_s", 0.0))
        self._signal_received = False  # set by the SIGTERM handler on this rank, never cleared
        self._stop_agreed = False  # the all-reduced flag: the only thing the loop stops on
        self._time_at_warm_step = 0.0
        self.losses: list[float] = []
        self.best: dict[str, Any] | None = None  # train.keep_best: {"step", "metric", "value"} of RUN/best
        if t.keep_best and resume and (self.run_dir / "best" / "best.json").is_file():
            self.best = json.loads((self.run_dir / "best" / "best.json").read_text())

    def close(self) -> None:
        """Release the run folder's lock (``fit`` does at its end; idempotent)."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ helpers
    def _resume_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies, chosen on rank 0 and broadcast (every rank
        resumes from the same one). Newer ones that fail are moved aside to
        ``checkpoints/corrupt-step_*`` (kept for inspection, out of the way of pruning and of
        the next resume), each with a warning naming its bad file."""
        NONE, NONE_VALID = -1, -2
        step, problems = NONE, ""
        if self.info.is_main:
            chosen, skipped = _select_checkpoint(self.run_dir)
            step = int(chosen.name.split("_")[1]) if chosen is not None else (NONE_VALID if skipped else NONE)
            if chosen is not None:
                for bad, exc in skipped:
                    aside = bad.with_name(f"corrupt-{bad.name}")
                    n = 1
                    while aside.exists():
                        aside, n = bad.with_name(f"corrupt-{bad.name}.{n}"), n + 1
                    os.replace(bad, aside)
                    log.warning("--resume: checkpoint %s failed verification (%s); moved it to %s and resuming "
                                "from %s", bad, exc, aside.name, chosen.name)
            elif skipped:
                problems = "; ".join(str(exc) for _, exc in skipped)
            for partial in (self.run_dir / "checkpoints").glob(".tmp-step_*"):  # saves cut short by a kill
                shutil.rmtree(partial, ignore_errors=True)
        step = broadcast_int(step, "choosing the checkpoint to resume from")
        if step == NONE:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
            return None
        if step == NONE_VALID:
            detail = problems if self.info.is_main else "see rank 0's log"
            raise CheckpointCorrupt(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'} passes verification "
                                    f"({detail}); restore one or start a new run in another train.out_dir")
        return self.run_dir / "checkpoints" / f"step_{step:08d}"

    def _saved_config(self) -> dict[str, Any]:
        path = self.run_dir / "config.yaml"
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def _check_same_model(self) -> None:
        saved_path = self.run_dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved = (yaml.safe_load(saved_path.read_text()) or {}).get("model", {})
        now = config_to_dict(dataclasses.replace(self.cfg, model=self.model_cfg))["model"]
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"model.{changed[0]}: --resume needs the model of {saved_path}, "
                              f"got a different value ({saved.get(changed[0])!r} -> {now.get(changed[0])!r})")

    def _seed(self, seed: int) -> None:
        # the same seed on every rank: identical initial weights and pass order, as in one process
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # only a flag: the handler interrupts the main thread anywhere, possibly inside a
        # write to the same log stream, so the loop does the logging at the step boundary.
        # Never cleared, and never read by the loop directly: it goes into the next step's
        # all-reduce, and the loop stops on the agreed value only (see the module docstring).
        self._signal_received = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.info.device)

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        if last or self.parallel == "none":
            if self.parallel == "fsdp":
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.parallel == "ddp":
            return self.module.no_sync()
        self.module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def save(self) -> Path:
        state = {"samples_seen": self.step * self.cfg.train.batch_size, "train_time_s": self.train_time,
                 "data_position": {"kind": self.cfg.data.kind, "next_sample": self.step * self.cfg.train.batch_size}}
        meta = {"model": self.model_cfg["name"], "step": str(self.step)}
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.info,
                               keep=self.cfg.train.keep_checkpoints, metadata=meta)

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """Forward/backward over the micro-batches (dicts of tensors, nested lists / tuples of
        tensors allowed, see ``mammut.models.contract.Batch``), checks, clip and optimiser step;
        returns the step's named losses, lr and grad norm."""
        cfg, dev = self.cfg, self.info.device
        n_micro = len(micro_batches)
        self.task.prepare_step(micro_batches, self.model_cfg.get("pad_id"))
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, dev)  # nested dicts / lists / tuples of tensors
            with self._no_sync(i == n_micro - 1):
                with self._autocast():
                    out = self.module(batch)
                (out["loss"].float() / n_micro).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float().cpu() / n_micro

        # named losses averaged over ranks, plus the stop flag: one small collective per step
        names = sorted(sums)
        packed = torch.stack([sums[k].reshape(()) for k in names] + [torch.tensor(float(self._signal_received))])
        if self.info.distributed:
            torch.distributed.all_reduce(packed)
            packed[:-1] /= self.info.world_size
        values = {k: float(v) for k, v in zip(names, packed[:-1])}
        self._stop_agreed = self._stop_agreed or bool(packed[-1] > 0)
        if not all(math.isfinite(v) for v in values.values()):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "loss", values)

        if self.parallel == "fsdp":
            sync_replicated_grads(self.module)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "gradient norm", {**values, "grad_norm": grad_norm})
        lr = lr_at(self.step, cfg.train.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**values, "lr": lr, "grad_norm": grad_norm}

    # ------------------------------------------------------------------ the loop
    def fit(self, *, eval_fn: Any = None) -> TrainResult:
        """Train to ``train.steps``. Every ``train.eval_every`` steps rank 0 logs ``eval_fn(model,
        tokenizer, step) -> dict`` (default: the task's ``quick_eval``; eval mode, no grad; plain
        or DDP only).

        On SIGTERM (any rank) every rank stops after the same step, saves a checkpoint and
        returns ``interrupted=True``; SIGTERM is then left ignored (``SIG_IGN``) as the process
        is expected to exit, so a repeated signal cannot kill it half-way through its shutdown.
        Otherwise the previous SIGTERM handler is restored."""
        t, info = self.cfg.train, self.info
        monitor = Monitor(self.run_dir, total_steps=t.steps, start_step=self.step, enabled=info.is_main,
                          tensorboard=t.tensorboard, progress=t.progress, log_every=t.log_every,
                          batch_size=t.batch_size)
        old_handler = None
        with contextlib.suppress(ValueError):  # not in the main thread: no handler
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        batches = self.task.train_batches(self.tokenizer, rank=info.rank, world_size=info.world_size,
                                          start_step=self.step)
        window_t, window_n, rate = 0.0, 0, 0.0
        start_step = self.step
        stopped_by_signal = False
        monitor.write({"step": self.step, **self.precision.as_dict(), "device": str(info.device),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}, prefix="run")
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                micro = next(batches)
                with collective(f"training step {self.step + 1}"):
                    stats = self.train_step(micro)
                dt = time.perf_counter() - t0
                self.train_time += dt
                if self.step == _BUDGET_WARM_STEP:
                    self._time_at_warm_step = self.train_time
                window_t, window_n = window_t + dt, window_n + t.batch_size
                self.losses.append(stats["loss"])
                if self.step % t.log_every == 0 or self.step == t.steps or self.step == start_step + 1:
                    rate = window_n / max(window_t, 1e-9)
                    monitor.write({"step": self.step, **stats, "samples_per_s": rate,
                                   "samples": self.step * t.batch_size, "train_time_s": self.train_time})
                    window_t, window_n = 0.0, 0
                if t.time_budget_s and self.step == _BUDGET_PROBE_STEP:
                    t = self._fit_time_budget(monitor)
                monitor.progress(self.step, {"loss": stats["loss"], "lr": stats["lr"], "samples/s": rate})
                if t.eval_every and self.step % t.eval_every == 0 and self.parallel != "fsdp":
                    self._run_eval(eval_fn, monitor)
                if self._stop_agreed:  # the all-reduced flag: every rank decides alike
                    stopped_by_signal = True
                    log.warning("SIGTERM: saving a checkpoint after step %d, then stopping", self.step)
                    self._save_once()
                    log.warning("stopped by SIGTERM at step %d; resume with --resume", self.step)
                    return self._result(interrupted=True)
                if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                    self.save()
            self._save_once()
            return self._result()
        finally:
            monitor.close()
            self.close()
            if stopped_by_signal:
                # the process is about to exit: a further SIGTERM (e.g. sent to every rank at
                # slightly different moments) must not kill it half-way through its shutdown
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
            elif old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

    def _fit_time_budget(self, monitor: Monitor) -> Any:
        """``train.time_budget_s``: after step :data:`_BUDGET_PROBE_STEP`, keep as many of
        ``train.steps`` as this machine trains in the budget, from the time of the steps since
        :data:`_BUDGET_WARM_STEP`. Decided once, on rank 0, broadcast; written to ``config.yaml``
        (``train.steps`` decided, ``time_budget_s: 0``) and ``metrics.jsonl``. The probe ends before
        any preset's warm-up does, and the warm-up does not depend on the total, so the run is the
        one a config with the decided ``train.steps`` gives, step for step (only where the decision
        falls depends on the machine)."""
        t = self.cfg.train
        per_step = (self.train_time - self._time_at_warm_step) / (_BUDGET_PROBE_STEP - _BUDGET_WARM_STEP)
        fits = int((t.time_budget_s - self.train_time) / max(per_step, 1e-9)) + self.step
        steps = broadcast_int(max(self.step, min(t.steps, fits)) if self.info.is_main else 0, "the time budget")
        if steps < t.steps:
            log.warning("train.time_budget_s %d: at %.2f s per step this machine trains %d of the %d steps in the "
                        "budget; running %d (a faster machine, bf16 where native, or a smaller train.steps gets "
                        "the rest)", t.time_budget_s, per_step, steps, t.steps, steps)
        else:
            log.info("train.time_budget_s %d: all %d steps fit (%.2f s per step)", t.time_budget_s, t.steps, per_step)
        monitor.write({"step": self.step, "budget_s": t.time_budget_s, "s_per_step": per_step,
                       "steps_requested": t.steps, "steps_decided": steps}, prefix="budget")
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, steps=steps, time_budget_s=0))
        monitor.set_total_steps(steps)
        if self.info.is_main:
            resolved = config_to_dict(dataclasses.replace(self.cfg, model=self.model_cfg))
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        return self.cfg.train

    def _save_once(self) -> None:
        """Save unless the newest checkpoint already is this step (e.g. a periodic save)."""
        if not (self.run_dir / "checkpoints" / f"step_{self.step:08d}").is_dir():
            self.save()

    def _run_eval(self, eval_fn: Any, monitor: Monitor) -> None:
        # every rank comes here (the barrier); rank 0 evaluates if it was given an eval_fn
        if self.info.is_main:
            rng = torch.get_rng_state()
            self.model.eval()
            with torch.no_grad():
                if eval_fn is not None:
                    metrics = eval_fn(self.model, self.tokenizer, self.step)
                else:
                    metrics = self.task.quick_eval(self.model, self.tokenizer)
            self.model.train()
            torch.set_rng_state(rng)
            if metrics:
                monitor.write({"step": self.step, **metrics}, prefix="eval")
                if self.cfg.train.keep_best:
                    self._keep_best(metrics, monitor)
        barrier()

    def _keep_best(self, metrics: dict[str, Any], monitor: Monitor) -> None:
        """``train.keep_best``: when ``train.best_metric`` beats the best so far (ties keep the
        earlier), this step's weights go to ``RUN/best/model.safetensors`` with ``best.json``
        (step, metric, value); ``mammut eval RUN --checkpoint RUN/best`` evaluates them."""
        key = self.cfg.train.best_metric
        if key not in metrics:
            raise ConfigError(f"train.best_metric: expected a key of the task's quick evaluation "
                              f"{sorted(metrics)}, got {key!r}")
        value = float(metrics[key])
        if self.best is not None and not value > float(self.best["value"]):
            return
        from .checkpointing import save_weights

        best = self.run_dir / "best"
        tmp = self.run_dir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_weights(state, tmp / "model.safetensors", metadata={"model": self.model_cfg["name"], "step": str(self.step)})
        self.best = {"step": self.step, "metric": key, "value": value}
        (tmp / "best.json").write_text(json.dumps(self.best, indent=1) + "\n")
        old = self.run_dir / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            best.rename(old)
        tmp.rename(best)
        shutil.rmtree(old, ignore_errors=True)
        monitor.write({"step": self.step, "value": value, "metric": key}, prefix="best")
        log.info("train.keep_best: %s %.4f at step %d, kept in %s", key, value, self.step, best)

    def _result(self, interrupted: bool = False) -> TrainResult:
        done = max(self.step, 1)
        rate = done * self.cfg.train.batch_size / max(self.train_time, 1e-9)
        return TrainResult(self.run_dir, self.step, self.losses, rate, self.train_time, interrupted)


def _steps_from_epochs(cfg: RunConfig) -> RunConfig:
    """``train.epochs`` / ``optim.warmup_epochs`` as steps: ``ceil(epochs * samples / batch_size)``
    and ``round(warmup_epochs * samples / batch_size)``, with ``samples`` the size of one pass
    over the data as its data kind counts it (``DataKind.size``). The decided values replace
    ``train.steps`` / ``optim.warmup_steps`` (written to the run's config.yaml), so the cosine
    decay ends with the last epoch."""
    from .data import get_data_kind

    kind = get_data_kind(cfg.data.kind)
    key = "train.epochs" if cfg.train.epochs else "optim.warmup_epochs"
    if kind.size is None:
        raise ConfigError(f"{key}: expected a data.kind whose size is known (csv), got data.kind={cfg.data.kind!r}; "
                          f"set train.steps / optim.warmup_steps instead")
    n = kind.size(cfg.data)
    per_epoch = n / cfg.train.batch_size
    train, optim = cfg.train, cfg.optim
    if train.epochs:
        train = dataclasses.replace(train, steps=max(1, math.ceil(train.epochs * per_epoch)), epochs=0.0)
    if optim.warmup_epochs:
        optim = dataclasses.replace(optim, warmup_steps=max(1, round(optim.warmup_epochs * per_epoch)), warmup_epochs=0.0)
    log.info("%d samples a pass, %.1f steps an epoch of %d: train.steps %d, optim.warmup_steps %d", n, per_epoch,
             cfg.train.batch_size, train.steps, optim.warmup_steps)
    return dataclasses.replace(cfg, train=train, optim=optim)
