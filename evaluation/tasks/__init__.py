"""Evaluation tasks: the :class:`Task` interface and the registered tasks (``TASKS``).

Importing this package registers the built-in tasks. Build one with :func:`get_task`.
"""
from __future__ import annotations

from pumer_plug.registry import TASKS

from . import builtin_llava_task as _builtin_llava_task  # noqa: F401  (registers "builtin-llava")
from . import builtin_task as _builtin_task  # noqa: F401  (registers "builtin")
from .base import Batch, Predictions, Reiterable, Task, TaskOptions, attach_method, classification_accuracy, load_config, on_device


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """Builds the registered task ``name`` with ``options``.

    Raises:
        UserError: an unknown task (listing the registered ones) or an option the task does not take.
    """
    return TASKS.get(name)(options)


__all__ = ["TASKS", "Batch", "Predictions", "Reiterable", "Task", "TaskOptions", "attach_method", "classification_accuracy",
           "get_task", "load_config", "on_device"]
