"""Run metrics: a JSONL log, TensorBoard scalars and progress (rank 0 only).

Progress is a tqdm bar when stderr is a terminal; otherwise (nohup, SLURM, CI: tqdm disables
itself) a line is logged every ``log_every`` steps::

    step 120/1000 (12%) loss 2.345 lr 1.0e-03 312.4 samples/s ETA 3m12s
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..runs import read_metrics  # the run-folder reader (library); the Monitor writes what it reads
from .checkpointing import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["Monitor", "read_metrics", "format_duration"]


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Monitor:
    """Writes ``metrics.jsonl`` (one JSON object per record) and TensorBoard events under
    ``<run>/tb``; shows progress (``progress=True``): a bar on a terminal, else a logged line
    every ``log_every`` steps. Does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool, progress: bool, log_every: int = 10, batch_size: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.log_every = max(int(log_every), 1)
        self.batch_size = batch_size
        self._tb = None
        self._bar = None
        self._lines = False  # progress as logged lines (the bar is disabled: stderr is not a TTY)
        if not enabled:
            return
        self._truncate(start_step)  # a fresh run starts an empty log
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError as exc:  # pragma: no cover - tensorboard is a train dependency
                log.warning("TensorBoard disabled: %s", exc)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr, disable=None)
            if self._bar.disable:  # not a terminal: tqdm prints nothing, so log lines instead
                self._bar.close()
                self._bar = None
                self._lines = True

    def _truncate(self, step: int) -> None:
        """Drop records after ``step`` (written by a run that was killed after its checkpoint)
        and lines cut by a kill. The file is replaced atomically (:func:`atomic_write_text`):
        a kill during the rewrite leaves the old log, never a partial one."""
        if not self.path.is_file():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
                continue
        if len(keep) == len(lines) and (not text or text.endswith("\n")):
            return  # nothing to drop: leave the file alone
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        """Show progress after ``step``; ``postfix`` holds ``loss``, ``lr`` and ``samples/s``."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
        elif self._lines and (step % self.log_every == 0 or step == self.total_steps):
            log.info("%s", self.progress_line(step, postfix))

    def progress_line(self, step: int, postfix: dict[str, float]) -> str:
        """``step 120/1000 (12%) loss 2.345 lr 1.0e-03 312.4 samples/s ETA 3m12s``."""
        total = max(self.total_steps, 1)
        parts = [f"step {step}/{self.total_steps} ({100 * step // total}%)"]
        if "loss" in postfix:
            parts.append(f"loss {postfix['loss']:.3f}")
        if "lr" in postfix:
            parts.append(f"lr {postfix['lr']:.1e}")
        rate = float(postfix.get("samples/s", 0.0))
        if rate > 0:
            parts.append(f"{rate:.1f} samples/s")
            if self.batch_size > 0:
                parts.append(f"ETA {format_duration((self.total_steps - step) * self.batch_size / rate)}")
        return " ".join(parts)

    def set_total_steps(self, steps: int) -> None:
        """A new total (``train.time_budget_s`` decided it): the bar, the ETA and the log lines follow."""
        self.total_steps = steps
        if self._bar is not None:
            self._bar.total = steps
            self._bar.refresh()

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"kind": prefix, **rec}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
