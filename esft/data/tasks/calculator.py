"""Multi-step arithmetic with a calculator tool: a multi-turn `EpisodeTask`.

The policy evaluates a chain such as ``23 + 45 - 17`` one operation at a time by calling the
calculator (``calc 23 + 45``, written as in the prompt; the environment replies ``68``), feeds each
result into the next call (``calc 68 - 17``), and ends with ``answer 51``. The verifier checks the final answer only: the tool makes the task a
matter of copying numbers into the right calls, which a tiny model learns in a few hundred steps,
where computing the chain in its head is beyond it (the single-turn `arithmetic` task).

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("calculator")
    >>> record = task.generate(1, seed=0)[0]
    >>> [m["content"] for m in record["messages"]]  # doctest: +SKIP
    ['Compute 23 + 45 - 17.', 'calc 23 + 45', '68', 'calc 68 - 17', '51', 'answer 51']
    >>> task.reply(record, "calc 12*3"), task.reply(record, "calc 1+"), task.reply(record, "answer 36")
    ('36', 'error', None)
    >>> task.score(record, "answer " + record["answer"])
    1.0
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

from esft.data.tasks.base import exact_match
from esft.data.tasks.episode import EpisodeTask

CALL = "calc"
ANSWER = "answer"
MAX_EXPRESSION = 64  # characters the calculator reads; longer input is an error
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_FINAL = re.compile(rf"(?:{ANSWER}\s+)?(-?\d+)")


def calculate(expression: str) -> int | None:
    """The value of an integer expression of ``+``, ``-``, ``*``, unary minus and parentheses;
    None for anything else (other operators, names, floats, text longer than `MAX_EXPRESSION`)."""
    if len(expression) > MAX_EXPRESSION:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = value(node.operand)
            return None if v is None else -v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = value(node.left), value(node.right)
            return None if a is None or b is None else _OPS[type(node.op)](a, b)
        return None

    return value(tree)


class Calculator(EpisodeTask):
    """Evaluate a chain of `num_operands` integers of 1..`max_digits` digits joined by `ops`,
    left to right, with the calculator: one ``calc a <op> b`` turn per operation, then
    ``answer <value>``. The environment answers a ``calc`` turn with the value (``error`` when
    the expression does not parse); any other turn ends the episode."""

    name = "calculator"
    domain = "math"
    metric = "exact_match"  # the episode's final answer equals the reference
    learning_note = "the answer is only reached through the tool: single-turn generation scores about 0"
    max_turns = 4  # the records do not keep `num_operands`: with more than 3, raise GRPOModule's max_turns

    def __init__(self, num_operands: int = 3, max_digits: int = 2, ops: str = "+-") -> None:
        if num_operands < 2 or max_digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"calculator: needs num_operands >= 2, max_digits >= 1 and ops from '+-*', got "
                             f"num_operands={num_operands}, max_digits={max_digits}, ops={ops!r}")
        self.num_operands = num_operands
        self.max_digits = max_digits
        self.ops = ops

    def sample(self, rng: random.Random) -> tuple[str, str]:
        numbers = [rng.randint(0, 10**self.max_digits - 1) for _ in range(self.num_operands)]
        ops = [rng.choice(self.ops) for _ in numbers[1:]]
        chain = " ".join([str(numbers[0])] + [f"{o} {n}" for o, n in zip(ops, numbers[1:])])
        prompt = f"Compute {chain}."
        return prompt, self.solve(prompt)[-1].split()[-1]

    def solve(self, prompt: str) -> list[str]:
        parts = prompt.removeprefix("Compute ").removesuffix(".").split()
        total, actions = int(parts[0]), []
        for op, number in zip(parts[1::2], parts[2::2]):
            actions.append(f"{CALL} {total} {op} {number}")
            total = calculate(f"{total} {op} {number}")
        return actions + [f"{ANSWER} {total}"]

    def reply(self, record: dict[str, Any], action: str) -> str | None:
        if not action.startswith(CALL):
            return None
        value = calculate(action[len(CALL):])
        return "error" if value is None else str(value)

    def score(self, record: dict, completion: str) -> float:
        """1.0 when the final turn is ``answer <the value>`` (or the bare value)."""
        match = _FINAL.fullmatch(completion.strip())
        return exact_match(match.group(1), record["answer"]) if match else 0.0
