"""Math word problems (GSM8K style) and a math answer verifier for GSM8K and MATH answer styles.

The task `math_word` draws 2-3 step word problems over small numbers; the reference is a short
chain of thought ending in the GSM8K answer line ``#### N`` (or, with ``think=True``, the
DeepSeek-R1 form ``<think>steps</think>\\n#### N``). The verifier helpers also score real data:
``score_rows(rows, completions)`` reads each row's reference from a GSM8K ``answer`` (``#### N``)
or a MATH ``solution`` (``\\boxed{...}``) / ``answer`` field.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("math_word")
    >>> rec = task.generate(1, seed=0)[0]
    >>> rec["messages"][0]["content"]  # doctest: +SKIP
    'Ada buys 3 bags of pears with 4 pears in each bag. She gives away 5 pears. How many pears ...'
    >>> rec["answer"]  # doctest: +SKIP
    '3 * 4 = 12\\n12 - 5 = 7\\n#### 7'
    >>> task.score(rec, rec["answer"])
    1.0
    >>> extract_answer("so the total is 1,234.\\n#### 1,234"), extract_answer(r"we get $\\boxed{\\frac{1}{2}}$")
    ('1,234', '\\\\frac{1}{2}')
    >>> math_equal("$5.00", "5"), math_equal(extract_answer("<think>7?</think> #### 8"), "8")
    (True, True)
    >>> score_rows([{"answer": "2 + 2 = 4\\n#### 4"}, {"solution": r"It is $\\boxed{3}$."}], ["#### 4", "3"])
    [1.0, 1.0]

Run ``esft export --tasks math_word --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from fractions import Fraction

from esft.data.tasks.base import Task

NAMES = (("Ada", "She"), ("Ben", "He"), ("Cleo", "She"), ("Dan", "He"), ("Eva", "She"), ("Finn", "He"),
         ("Gia", "She"), ("Hugo", "He"))
ITEMS = (("apples", "bag"), ("pears", "bag"), ("pencils", "box"), ("stickers", "sheet"), ("eggs", "carton"),
         ("cookies", "tin"), ("marbles", "jar"), ("cards", "pack"))
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _render(steps: list[str], answer: int, think: bool) -> str:
    return f"<think>{chr(10).join(steps)}</think>\n#### {answer}" if think else "\n".join([*steps, f"#### {answer}"])


class MathWord(Task):
    """Word problems of 2-3 arithmetic steps; operands up to `max_number`, at most `max_steps` steps.

    >>> task = MathWord(max_number=5, think=True)
    >>> prompt, answer = task.sample(random.Random(1))
    >>> answer.startswith("<think>") and "</think>\\n#### " in answer
    True
    """

    name = "math_word"
    domain = "math"
    metric = "accuracy"  # the final answer is mathematically equal to the reference

    def __init__(self, max_number: int = 10, max_steps: int = 3, think: bool = False) -> None:
        if max_number < 2 or max_steps < 2:
            raise ValueError("math_word needs max_number >= 2 and max_steps >= 2")
        self.max_number = max_number
        self.max_steps = max_steps
        self.think = think

    def sample(self, rng: random.Random) -> tuple[str, str]:
        n = self.max_number
        (who, pron), (item, unit) = rng.choice(NAMES), rng.choice(ITEMS)
        kind = rng.randrange(4 if self.max_steps >= 3 else 3)
        if kind == 0:  # bought in packs, some given away
            a, b = rng.randint(2, n), rng.randint(2, n)
            c = rng.randint(1, a * b - 1)
            prompt = (f"{who} buys {a} {unit}s of {item} with {b} {item} in each {unit}. {pron} gives away "
                      f"{c} {item}. How many {item} does {who} have left?")
            steps, answer = [f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"], a * b - c
        elif kind == 1:  # shared equally
            k, q = rng.randint(2, n), rng.randint(1, n)
            a = rng.randint(1, k * q - 1)
            b = k * q - a
            prompt = (f"{who} has {a} {item} and buys {b} more. {pron} shares them equally among {k} friends. "
                      f"How many {item} does each friend get?")
            steps, answer = [f"{a} + {b} = {k * q}", f"{k * q} / {k} = {q}"], q
        elif kind == 2:  # sold on two days at a price
            a, b, p = rng.randint(1, n), rng.randint(1, n), rng.randint(2, n)
            prompt = (f"{who} sells {a} {item} on Monday and {b} on Tuesday for ${p} each. "
                      f"How many dollars does {who} make?")
            steps, answer = [f"{a} + {b} = {a + b}", f"{a + b} * {p} = {(a + b) * p}"], (a + b) * p
        else:  # a shop: boxes, sales, a delivery
            a, b = rng.randint(2, n), rng.randint(2, n)
            c, d = rng.randint(1, a * b - 1), rng.randint(1, n)
            prompt = (f"A shop has {a} {unit}s of {item} with {b} in each {unit}. It sells {c} {item} and then "
                      f"gets {d} more. How many {item} does the shop have now?")
            x, y = a * b, a * b - c
            steps, answer = [f"{a} * {b} = {x}", f"{x} - {c} = {y}", f"{y} + {d} = {y + d}"], y + d
        return prompt, _render(steps, answer, self.think)

    def score(self, record: dict, completion: str) -> float:
        return float(math_equal(extract_answer(completion), reference_answer(record)))


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None  # unbalanced braces


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: text after ``</think>`` when present, then the ``#### N``
    line (GSM8K), else the last ``\\boxed{...}`` (MATH), else the last number; None when none,
    or when a ``<think>`` is never closed (the reasoning was cut off before an answer)."""
    if not isinstance(text, str):
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None
    if "####" in text:
        line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        return line or None
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1].rstrip(".") if numbers else None


def normalize_number(s: str) -> str:
    """Strip ``$``, thousands commas, spaces, a trailing period and a zero fraction (``5.00`` -> ``5``)."""
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", re.sub(r"[\s$]", "", str(s))).rstrip(".")
    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


def _as_number(s: str) -> Fraction | None:
    frac = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)", s)
    try:
        if frac:
            num, den = (g for g in frac.groups() if g is not None)
            return Fraction(int(num), int(den))
        return Fraction(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Numeric comparison when both sides parse as numbers (``1/2`` == ``\\frac{1}{2}`` == ``0.5``),
    else comparison of the normalised strings."""
    if pred is None or ref is None:
        return False
    p, r = normalize_number(pred), normalize_number(ref)
    pn, rn = _as_number(p), _as_number(r)
    if pn is not None and rn is not None:
        return pn == rn
    return _canonical(p) == _canonical(r)


def _canonical(s: str) -> str:
    """LaTeX spelled one way: ``\\dfrac``/``\\tfrac`` -> ``\\frac``, no ``\\left``/``\\right``/``\\!``."""
    return re.sub(r"\\[dt]frac", r"\\frac", re.sub(r"\\left|\\right|\\!", "", s))


def reference_answer(row: dict) -> str:
    """The reference answer of a GSM8K (``answer`` with ``#### N``) or MATH (``solution`` with
    ``\\boxed{}``, or a plain ``answer``) row; raises ValueError when the row has none."""
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return answer.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    solution = row.get("solution")
    if isinstance(solution, str) and _boxed(solution) is not None:
        return _boxed(solution)
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    raise ValueError(f"no reference answer in a row with fields {sorted(row)}: expected 'answer' or 'solution'")


def score_rows(rows: Sequence[dict], completions: Sequence[str]) -> list[float]:
    """Score completions against real-data rows in GSM8K or MATH answer style (1.0 right, 0.0 wrong)."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    return [float(math_equal(extract_answer(c), reference_answer(r))) for r, c in zip(rows, completions)]
