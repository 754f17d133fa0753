"""Tasks: what a run trains a model to do (``train.task``). One file per task, each registering a
:class:`Task`. (Not to be confused with the benchmarks of ``mammut eval BENCHMARK``,
:mod:`mammut.eval.benchmarks`, which score any model on standard data.)

A task owns its data (micro-batches as dicts, possibly nested: lists / tuples of tensors), its
objective (which contract method of the model it calls) and its held-out evaluation with the
sections and figures of its run report. The Trainer knows none of them: it asks the task for
batches, calls ``task.prepare_step`` (token shares across micro-batches and ranks), moves each
micro-batch to the device and minimises ``task.loss(model, batch)["loss"]``.

A new task: one file here (a :class:`Task` subclass with ``name``, ``data_kinds``, optionally an
``options`` dataclass for its ``task_options:`` config section), its entry point in
pyproject.toml (``[project.entry-points."mammut.tasks"]``: ``name = "mammut.tasks.<file>:<Class>"``;
another package declares its tasks the same way in its own pyproject), and the task's name in the
registry spec of each model that trains on it (``register_model(..., tasks=...)``). The
:class:`Task` base class and the registry live in :mod:`mammut.train.task` (the Trainer and the
evaluation look tasks up there, without importing this package) and are re-exported here. A new data
kind: ``mammut.train.data.register_data_kind(name, reader)`` where it is read, and its name in
the ``data_kinds`` of the tasks that read it.

- ``pretrain``: image-text pretraining, the model's own two-sided objective (contrastive +
  captioning) on emoji scenes, CSV or WebDataset pairs (MaMMUT, CoCa).
- ``vqa``: prompted captioning / VQA fine-tuning, loss on answer tokens only (MaMMUT, CoCa,
  FlamingoPaLM).
- ``interleaved``: Flamingo-style interleaved image-text sequences (FlamingoPaLM).
"""

from __future__ import annotations

from .base import Task, get_task, list_tasks, register_task, token_shares

__all__ = ["Task", "get_task", "list_tasks", "register_task", "token_shares"]
