"""The task interface and registry (moved to :mod:`mammut.train.task`, re-exported here so that
``from mammut.tasks.base import Task, register_task`` keeps working), and the token weighting
every decoder objective shares."""

from __future__ import annotations

from ..train.task import Task, get_task, list_tasks, register_task, token_shares

__all__ = ["Task", "register_task", "get_task", "list_tasks", "token_shares"]
