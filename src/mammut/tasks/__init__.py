"""Tasks: what a run trains a model to do. One file per task, each registering a :class:`Task`.

A task owns its data (micro-batches as dicts), its objective (which contract method of the
model it calls) and its held-out evaluation. The Trainer knows none of them: it asks the task
for batches, calls ``task.prepare_step`` (token shares across micro-batches and ranks) and
minimises ``task.loss(model, batch)["loss"]``.

- ``pretrain``: image-text pretraining, the model's own two-sided objective (contrastive +
  captioning) on emoji scenes, CSV or WebDataset pairs (MaMMUT, CoCa).
- ``vqa``: prompted captioning / VQA fine-tuning, loss on answer tokens only (MaMMUT, CoCa,
  FlamingoPaLM).
- ``interleaved``: Flamingo-style interleaved image-text sequences (FlamingoPaLM).
"""

from __future__ import annotations

from .base import Task, get_task, list_tasks, register_task, token_shares

__all__ = ["Task", "get_task", "list_tasks", "register_task", "token_shares"]
