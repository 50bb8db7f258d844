"""Built-in verifiable tasks: deterministic generators and verifiers (the embedded default data).

`TASKS` maps a task name to its class (`EpisodeTask` ones, e.g. ``calculator``, are played over
several turns with an environment), `DOMAINS` a domain (math, code, intent, translation,
summarization, legal, general) to its task names; `get_task(name, **kwargs)` builds one.
Write tasks to JSONL with ``esft export --tasks math_word verdict --out data/``.
"""

from __future__ import annotations

from typing import Any

from esft.data.tasks.arithmetic import Arithmetic
from esft.data.tasks.base import Split, Task, split_of
from esft.data.tasks.calculator import Calculator
from esft.data.tasks.code import ListOps
from esft.data.tasks.episode import EpisodeTask
from esft.data.tasks.extract import ExtractFields
from esft.data.tasks.general import General
from esft.data.tasks.intent import IntentJSON
from esft.data.tasks.legal import Verdict
from esft.data.tasks.lexicon import Lexicon
from esft.data.tasks.math import MathWord
from esft.data.tasks.translate import Translate
from esft.data.tasks.words import ReverseWords, SortWords

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (Arithmetic, ReverseWords, SortWords, MathWord, ListOps, IntentJSON, Translate, ExtractFields,
                Verdict, General, Calculator, Lexicon)
}
DOMAINS: dict[str, list[str]] = {}
for _name, _cls in TASKS.items():
    DOMAINS.setdefault(_cls.domain, []).append(_name)


TaskSpec = str | dict[str, Any]
"""A task name, or ``{"name": ..., **constructor options}`` (e.g. ``{name: math_word, think: true}``)."""


def build_task(spec: TaskSpec) -> Task:
    """Instantiate a task from its `TaskSpec`."""
    if isinstance(spec, str):
        return get_task(spec)
    options = dict(spec)
    if "name" not in options:
        raise KeyError(f"a task given as a mapping needs a 'name': {spec}")
    return get_task(options.pop("name"), **options)


def get_task(name: str, **kwargs) -> Task:
    """Instantiate a built-in task by name."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["DOMAINS", "TASKS", "EpisodeTask", "Split", "Task", "TaskSpec", "build_task", "get_task", "split_of"]
