"""Multi-digit arithmetic: add or subtract two integers.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("arithmetic")
    >>> rec = task.generate(1, seed=0)[0]
    >>> rec["messages"][0]["content"]  # doctest: +SKIP
    'What is 482 + 37?'
    >>> task.score(rec, rec["answer"])
    1.0
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task, exact_match


class Arithmetic(Task):
    """`a op b` with operands of 1..`max_digits` digits and op in `ops`; the answer is the number."""

    name = "arithmetic"
    domain = "math"

    def __init__(self, max_digits: int = 3, ops: str = "+-") -> None:
        self.max_digits = max_digits
        self.ops = ops

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        op = rng.choice(self.ops)
        value = a + b if op == "+" else a - b
        return f"What is {a} {op} {b}?", str(value)

    def score(self, record: dict, completion: str) -> float:
        return exact_match(completion, record["answer"])
