"""The task interface and registry, and the token weighting every decoder objective shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..constants import IGNORE_INDEX
from ..models.contract import Batch

__all__ = ["Task", "register_task", "get_task", "list_tasks", "token_shares"]

_TASKS: dict[str, type["Task"]] = {}


class Task:
    """Base class of a task. Subclasses set ``name`` and implement ``loss``, ``train_batches``
    and ``evaluate``; ``prepare_step`` defaults to token shares over the batch's targets.

    ``data_kinds``: the ``data.kind`` values it reads, each registered by its reader
    (``mammut.train.data.register_data_kind``); the config checker refuses any other and lists
    these. ``options``: a dataclass of the task's own settings, read from the run config's
    ``task_options:`` section (checked by the config's typed coercion, errors naming
    ``task_options.<key>``) and given to the task as ``cfg.task_options``; None: no section.

    Micro-batches are nested dicts / lists / tuples of tensors (e.g. a list of boxes per image);
    the Trainer moves them to the device whole (``mammut.train.distributed.to_device``)."""

    name: ClassVar[str]
    data_kinds: ClassVar[tuple[str, ...]] = ("emoji",)  # the data.kind values it reads
    options: ClassVar[type | None] = None  # dataclass of its task_options: section (None: none)
    special_tokens: tuple[str, ...] = ()  # tokens its texts need as one id each (e.g. "<image>")
    unused_parameters: bool = False  # its loss leaves some parameters without a gradient (DDP must know)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the RunConfig

    # ---------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Named losses of one micro-batch; ``"loss"`` is minimised."""
        raise NotImplementedError

    def prepare_step(self, micro_batches: list[Batch], pad_id: int | None) -> None:
        """Set ``batch["token_share"]`` on every micro-batch (see :func:`token_shares`)."""
        for batch, share in zip(micro_batches, token_shares(micro_batches, pad_id)):
            batch["token_share"] = share

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Iterator[list[Batch]]:
        """For steps ``start_step ..``, this rank's ``grad_accum`` micro-batches."""
        raise NotImplementedError

    def tokenizer_corpus(self) -> list[str] | None:
        """Texts to train the run's BPE on when ``data.tokenizer`` is null (None: the data's captions)."""
        return None

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        """Held-out metrics and the run report's parts: ``(metrics, mammut.eval.report.RunReport)``
        (the markdown sections, figures and extra files the task wants in ``mammut eval RUN``'s
        report; the report itself adds the summary and the loss curves)."""
        raise NotImplementedError

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float] | None:
        """A few held-out figures every ``train.eval_every`` steps (None: none)."""
        return None


def register_task(cls: type[Task]) -> type[Task]:
    if getattr(cls, "name", None) in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib
    import pkgutil

    from .. import tasks

    for info in pkgutil.iter_modules(tasks.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{tasks.__name__}.{info.name}")


def list_tasks() -> list[str]:
    _load_all()
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    _load_all()
    if name not in _TASKS:
        raise ValueError(f"train.task: expected one of {sorted(_TASKS)}, got {name!r}")
    return _TASKS[name]


def _targets(batch: Batch, pad_id: int | None) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:  # next-token prediction over the text
        labels = batch["text"][:, 1:]
    keep = labels != IGNORE_INDEX
    if pad_id is not None:
        keep &= labels != pad_id
    return keep.sum()


def token_shares(micro_batches: list[Batch], pad_id: int | None) -> list[torch.Tensor]:
    """Each micro-batch's share of the step's target tokens, scaled so that averaging the
    share-weighted token means over micro-batches and ranks gives the token mean of the whole
    step: ``count_i * world * n_micro / total``, ``total`` summed over every rank (one small
    all-reduce). Targets: ``labels`` other than ``-100`` / pad, else ``text[:, 1:]`` other than pad."""
    counts = torch.stack([_targets(b, pad_id) for b in micro_batches]).to(torch.float64)
    total = counts.sum()
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        total = total.clone()
        dist.all_reduce(total)
    scale = world * len(micro_batches) / total.clamp(min=1.0)
    return [(c * scale).to(torch.float32) for c in counts]
