"""Built-in verifiable tasks: deterministic generators and verifiers (the embedded default data)."""

from __future__ import annotations

from esft.data.tasks.arithmetic import Arithmetic
from esft.data.tasks.base import Split, Task, split_of
from esft.data.tasks.words import ReverseWords, SortWords

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Arithmetic, ReverseWords, SortWords)}


def get_task(name: str, **kwargs) -> Task:
    """Instantiate a built-in task by name."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Split", "Task", "get_task", "split_of"]
