"""Multi-digit arithmetic: add or subtract two integers.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("arithmetic")
    >>> rec = task.generate(1, seed=0)[0]
    >>> rec["messages"][0]["content"]  # doctest: +SKIP
    'What is 482 + 37?'
    >>> task.score(rec, rec["answer"])
    1.0

With ``think=True`` the reference is column arithmetic in the DeepSeek-R1 reasoning form,
``<think>steps</think>\nanswer``, and the verifier reads the answer after ``</think>``:

    >>> Arithmetic(think=True).sample(random.Random(3))
    ('What is 9 - 133?', '<think>9-133=-(133-9) 3-9+10=4 3-1-0=2 1-0=1</think>\\n-124')
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task, exact_match


def column_steps(a: int, b: int, op: str) -> list[str]:
    """Column-by-column working of ``a op b`` for non-negative `a`, `b`, units first, one step
    per column: ``7+8=15`` then ``4+3+1=8`` (the carry added); for subtraction ``5-8+10=7`` (a
    borrow) then ``8-1-5=2`` (the borrow repaid). A negative difference is worked as
    ``a-b=-(b-a)`` followed by the columns of ``b - a``."""
    if op == "-" and a < b:
        return [f"{a}-{b}=-({b}-{a})", *column_steps(b, a, "-")]
    steps, carry, col = [], 0, 0
    while a or b or carry or col == 0:
        x, y = a % 10, b % 10
        pre = f"{x}{op}{y}" if col == 0 or carry == 0 else (f"{x}+{y}+{carry}" if op == "+" else f"{x}-{carry}-{y}")
        value = x + y + carry if op == "+" else x - y - carry
        if op == "-" and value < 0:
            steps.append(f"{pre}+10={value + 10}")
            carry = 1
        else:
            steps.append(f"{pre}={value}")
            carry = value // 10 if op == "+" else 0
        a, b, col = a // 10, b // 10, col + 1
        if a == 0 and b == 0 and carry == 0:
            break
    return steps


def final_answer(text: str) -> str:
    """The text after the last ``</think>`` (the whole text when there is none)."""
    return str(text).rsplit("</think>", 1)[-1]


class Arithmetic(Task):
    """`a op b` with operands of 1..`max_digits` digits and op in `ops`; the answer is the number,
    preceded with `think` by the column working in ``<think>...</think>`` (see `column_steps`)."""

    name = "arithmetic"
    domain = "math"
    metric = "exact_match"  # the final answer (after any <think> block) equals the reference
    learning_note = ("exact match needs every digit, written most significant first, so the model must resolve "
                     "all carries and borrows before its first digit; a model trained from scratch learns this "
                     "much later than copying words: train longer (--trainer.max_steps)")

    def __init__(self, max_digits: int = 3, ops: str = "+-", think: bool = False) -> None:
        self.max_digits = max_digits
        self.ops = ops
        self.think = think

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, self.max_digits) - 1)
        op = rng.choice(self.ops)
        value = a + b if op == "+" else a - b
        if self.think:
            return f"What is {a} {op} {b}?", f"<think>{' '.join(column_steps(a, b, op))}</think>\n{value}"
        return f"What is {a} {op} {b}?", str(value)

    def score(self, record: dict, completion: str) -> float:
        """Exact match of the final answers (the text after ``</think>`` on both sides), so a
        reasoning completion is scored against a plain reference and the other way round."""
        return exact_match(final_answer(completion), final_answer(record["answer"]))
