"""Tasks as objects, chosen by name: each one module, registered here.

    from bbox_sft.tasks import get_task
    task = get_task("refer")
    task.instruction("the small blue star at the top")

The pipeline asks the task (:class:`~bbox_sft.tasks.base.Task`) what it decides: its question, the
records it builds, the answer text, the parser, the grammar, the metrics, the prior, the pictures.
"""

from __future__ import annotations

from .base import Annotation, BoxTask, Example, ListTask, Prior, Task

TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make the task known by its ``name``."""
    TASKS[cls.name] = cls()
    return cls


def get_task(task: str | Task) -> Task:
    """The task object for a name (or the object itself)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return TASKS[task]


from . import objects, phrase, refer, subject  # noqa: E402,F401  (each registers itself)

__all__ = ["TASKS", "Annotation", "BoxTask", "Example", "ListTask", "Prior", "Task", "get_task", "register"]
