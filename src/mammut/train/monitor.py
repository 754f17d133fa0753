"""Run metrics: a JSONL log, TensorBoard scalars and a tqdm progress bar (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Monitor", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run) the last wins."""
    p = Path(path)
    if not p.is_file():
        return []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        by_key[(rec.get("kind", "train"), int(rec.get("step", -1)))] = rec
    return sorted(by_key.values(), key=lambda r: (r.get("step", -1), r.get("kind", "train")))


class Monitor:
    """Writes ``metrics.jsonl`` (one JSON object per record) and TensorBoard events under
    ``<run>/tb``; shows a progress bar. Does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool, progress: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._bar = None
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

    def _truncate(self, step: int) -> None:
        """Drop records after ``step`` (written by a run that was killed after its checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, ValueError):
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)

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
