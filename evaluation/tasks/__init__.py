"""Evaluation tasks: the :class:`Task` interface and the registered tasks (``TASKS``).

The built-in tasks are declared in :mod:`pumer_plug.catalog` and imported on first use. Build one
with :func:`get_task`.
"""
from __future__ import annotations

from pumer_plug.registry import TASKS

from .base import (Batch, Predictions, Reiterable, Task, TaskOptions, attach_method, check_methods_fit,
                   classification_accuracy, load_config, on_device)


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """Builds the registered task ``name`` with ``options``.

    Raises:
        UserError: an unknown task (listing the registered ones) or an option the task does not take.
    """
    return TASKS.get(name)(options)


__all__ = ["TASKS", "Batch", "Predictions", "Reiterable", "Task", "TaskOptions", "attach_method", "check_methods_fit", "classification_accuracy",
           "get_task", "load_config", "on_device"]
