"""The task interface and the task registry: what a run trains (``train.task``), found by name.

It lives in the training layer so that the Trainer (:mod:`mammut.train.loop`), the config
checks (:mod:`mammut.train.config`) and the run evaluation (:mod:`mammut.eval.evaluate`) look a
task up without importing :mod:`mammut.tasks`, which builds on them (batching, reports, metrics).

Tasks are plugins, found through the standard Python entry points of the group
``mammut.tasks``: on the first :func:`get_task` / :func:`list_tasks`, every entry point of the
group is loaded (``importlib.metadata.entry_points(group="mammut.tasks")``) and the
:class:`Task` subclass it names is registered under the entry point's name, which must be the
task's ``name``. The built-in tasks are declared so in mammut-vl's own ``pyproject.toml``::

    [project.entry-points."mammut.tasks"]
    pretrain = "mammut.tasks.pretrain:Pretrain"

and a third-party package adds a task the same way, with a line in its own
``[project.entry-points."mammut.tasks"]`` (no change to mammut). :func:`register_task` (also a
class decorator) registers a task directly, e.g. one defined in a script or a test.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..constants import IGNORE_INDEX
from ..models.contract import Batch

__all__ = ["Task", "register_task", "get_task", "list_tasks", "token_shares", "ENTRY_POINT_GROUP", "FINE_TUNE_KEYS",
           "fine_tune_model_section"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mammut.tasks"  # the entry point group tasks are declared in

_TASKS: dict[str, type["Task"]] = {}
_entry_points_loaded = False

# the model: keys a run may set apart from its train.init_from source by default (they change no tensor)
FINE_TUNE_KEYS = frozenset({"dropout", "caption_loss_weight", "contrastive_loss_weight", "freeze_lm", "shuffle_passes"})


def fine_tune_model_section(model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The model of a fine-tuning run: the ``train.init_from`` source's architecture
    (``source``, its saved ``model:`` section), with this run's values (``model``) only for
    :data:`FINE_TUNE_KEYS`; other differing keys of this run's section are ignored (logged)."""
    if model.get("name") != source.get("name"):
        from .config import ConfigError

        raise ConfigError(f"model.name: train.init_from holds a {source.get('name')!r} model, got {model.get('name')!r}")
    out = dict(source)
    ignored = []
    for k, v in model.items():
        if k in FINE_TUNE_KEYS:
            out[k] = v
        elif k in source and source[k] != v:
            ignored.append(k)
    if ignored:
        log.info("train.init_from: the source's model.%s kept (this config's values ignored)", ", model.".join(sorted(ignored)))
    return out


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

    # ---------------------------------------------------------------- starting from another run
    @classmethod
    def init_model_section(cls, cfg: Any, model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """The ``model:`` section of a run of this task started from ``train.init_from``, whose
        saved ``model:`` section is ``source``; ``model`` is this run's own section and ``cfg``
        the whole RunConfig. Default (:func:`fine_tune_model_section`): the source's
        architecture with this run's :data:`FINE_TUNE_KEYS`. A task that changes the
        architecture (a video encoder around the source's ViT, a detection head, a higher
        resolution) returns the new section and maps the tensors in :meth:`adapt_init_state`."""
        return fine_tune_model_section(model, source)

    def adapt_init_state(self, state: dict[str, torch.Tensor],
                         model: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        """The ``train.init_from`` source's tensors renamed / resized for this run's ``model``
        (built from :meth:`init_model_section`'s section), and the parameter-name prefixes
        ``model`` may lack in them: new parameters, kept at their initialisation (logged).
        Loading is strict otherwise: an unexpected tensor, another missing one or a shape
        mismatch stops the run naming ``train.init_from``. Default: ``(state, ())``."""
        return state, ()

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
    """Register a :class:`Task` subclass under its ``name`` (usable as a class decorator)."""
    if getattr(cls, "name", None) in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


class TaskEntryPointError(RuntimeError):
    """An entry point of the ``mammut.tasks`` group that does not load a task."""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_entry_points() -> None:
    """Load and register every task declared as an entry point of ``mammut.tasks`` (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # set first: a task module may look a task up while it is imported
    try:
        for ep in _entry_points():
            where = f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r})"
            try:
                cls = ep.load()
            except Exception as e:
                raise TaskEntryPointError(f"task {ep.name!r}: {where} failed to load: {type(e).__name__}: {e}") from e
            if not (isinstance(cls, type) and issubclass(cls, Task)):
                raise TaskEntryPointError(f"task {ep.name!r}: {where} gives {cls!r}, not a Task subclass")
            if getattr(cls, "name", None) != ep.name:
                raise TaskEntryPointError(f"task {ep.name!r}: {where} gives a task named "
                                          f"{getattr(cls, 'name', None)!r}; the entry point's name must be the task's name")
            register_task(cls)
    except BaseException:
        _entry_points_loaded = False  # the next look-up tries (and reports) again
        raise


def list_tasks() -> list[str]:
    """The names of the registered tasks (entry points loaded first)."""
    _load_entry_points()
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    """The task registered as ``name`` (entry points loaded first); ValueError listing the
    registered names if there is none."""
    _load_entry_points()
    if name not in _TASKS:
        hint = "" if _TASKS else (f" (no task is registered: none declares an entry point of the group "
                                  f"{ENTRY_POINT_GROUP!r}; is mammut-vl installed, e.g. `pip install -e .`?)")
        raise ValueError(f"train.task: expected one of {sorted(_TASKS)}, got {name!r}{hint}")
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
