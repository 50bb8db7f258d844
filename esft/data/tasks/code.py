"""Code tracing: predict what a tiny Python program over an integer list prints.

Programs are drawn as a list of operations (append, pop, reverse, sort, slice, then a print of
sum, len, an index, a sum of two indices or the list) and rendered to Python text; the reference
comes from the small interpreter `run_ops` over the same operations, never from `eval`/`exec`.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("list_ops")
    >>> rec = task.generate(1, seed=0)[0]
    >>> print(rec["messages"][0]["content"])  # doctest: +SKIP
    What does this print?
    x = [3, 1, 4]
    x.append(5)
    x.reverse()
    print(x[0] + x[1])
    >>> task.score(rec, rec["answer"])
    1.0
    >>> ops = [("init", [3, 1, 4]), ("append", 5), ("reverse",), ("print_add", 0, 1)]
    >>> run_ops(ops), render_ops(ops).splitlines()[-1]
    ('9', 'print(x[0] + x[1])')

Run ``esft export --tasks list_ops --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random
import re

from esft.data.tasks.base import Task

Op = tuple


def render_ops(ops: list[Op]) -> str:
    """The Python text of an op list."""
    lines = []
    for op, *args in ops:
        if op == "init":
            lines.append(f"x = {args[0]}")
        elif op == "append":
            lines.append(f"x.append({args[0]})")
        elif op in ("pop", "reverse", "sort"):
            lines.append(f"x.{op}()")
        elif op == "slice":
            lines.append(f"x = x[{args[0]}:{args[1]}]")
        elif op in ("print_sum", "print_len"):
            lines.append(f"print({op[6:]}(x))")
        elif op == "print_index":
            lines.append(f"print(x[{args[0]}])")
        elif op == "print_add":
            lines.append(f"print(x[{args[0]}] + x[{args[1]}])")
        elif op == "print_list":
            lines.append("print(x)")
        else:
            raise ValueError(f"unknown op {op!r}")
    return "\n".join(lines)


def run_ops(ops: list[Op]) -> str:
    """Interpret an op list and return what its final print writes."""
    x: list[int] = []
    out = ""
    for op, *args in ops:
        if op == "init":
            x = list(args[0])
        elif op == "append":
            x.append(args[0])
        elif op == "pop":
            x.pop()
        elif op == "reverse":
            x.reverse()
        elif op == "sort":
            x.sort()
        elif op == "slice":
            x = x[args[0]:args[1]]
        elif op == "print_sum":
            out = str(sum(x))
        elif op == "print_len":
            out = str(len(x))
        elif op == "print_index":
            out = str(x[args[0]])
        elif op == "print_add":
            out = str(x[args[0]] + x[args[1]])
        elif op == "print_list":
            out = str(x)
        else:
            raise ValueError(f"unknown op {op!r}")
    return out


def normalize_output(text: str) -> str:
    """Collapse whitespace and drop it around brackets and commas (``[1,2]`` == ``[1, 2]``)."""
    return re.sub(r"\s*([\[\],])\s*", r"\1", " ".join(str(text).split()))


class ListOps(Task):
    """A list of `list_len` digits, `num_ops` mutating operations, then one print.

    >>> prompt, answer = ListOps(num_ops=3, list_len=4).sample(random.Random(0))
    >>> len(prompt.splitlines())  # the question, init, 3 ops, print
    6
    """

    name = "list_ops"
    domain = "code"
    metric = "exact_match"  # the printed output, whitespace-normalised

    def __init__(self, num_ops: int = 2, list_len: int = 3, max_value: int = 9) -> None:
        if list_len < 1 or num_ops < 0:
            raise ValueError("list_ops needs list_len >= 1 and num_ops >= 0")
        self.num_ops = num_ops
        self.list_len = list_len
        self.max_value = max_value

    def _random_op(self, rng: random.Random, size: int) -> tuple[Op, int]:
        choices = ["append", "reverse", "sort"] + (["pop", "slice"] if size > 1 else [])
        op = rng.choice(choices)
        if op == "append":
            return ("append", rng.randint(0, self.max_value)), size + 1
        if op == "pop":
            return ("pop",), size - 1
        if op == "slice":
            i = rng.randint(0, size - 1)
            j = rng.randint(i + 1, size)
            return ("slice", i, j), j - i
        return (op,), size

    def sample(self, rng: random.Random) -> tuple[str, str]:
        ops: list[Op] = [("init", [rng.randint(0, self.max_value) for _ in range(self.list_len)])]
        size = self.list_len
        for _ in range(self.num_ops):
            op, size = self._random_op(rng, size)
            ops.append(op)
        kind = rng.choice(["print_sum", "print_len", "print_index", "print_list"] + (["print_add"] if size > 1 else []))
        if kind == "print_index":
            ops.append((kind, rng.randint(-1, size - 1)))
        elif kind == "print_add":
            i, j = rng.sample(range(size), 2)
            ops.append((kind, i, j))
        else:
            ops.append((kind,))
        return f"What does this print?\n{render_ops(ops)}", run_ops(ops)

    def score(self, record: dict, completion: str) -> float:
        return float(normalize_output(completion) == normalize_output(record["answer"]))
