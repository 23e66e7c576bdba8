"""Evaluation tasks: the :class:`Task` interface and the registered tasks (``TASKS``).

Importing this package registers the built-in tasks. Build one with :func:`get_task`.
"""
from __future__ import annotations

from pumer_plug.registry import TASKS

from . import builtin_llava_task as _builtin_llava_task  # noqa: F401  (registers "builtin-llava")
from . import builtin_task as _builtin_task  # noqa: F401  (registers "builtin")
from . import vqav2_task as _vqav2_task  # noqa: F401  (registers "vqav2")
from . import classification_tasks as _classification_tasks  # noqa: F401  (registers "nlvr2", "snli-ve")
from . import retrieval_task as _retrieval_task  # noqa: F401  (registers "flickr30k")
from . import custom_task as _custom_task  # noqa: F401  (registers "custom")
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
