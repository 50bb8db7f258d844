"""Rule-based rewards on crafted strings, their composition, and the arithmetic reasoning format."""

import random

import pytest

from esft.data.tasks import get_task
from esft.data.tasks.arithmetic import column_steps
from esft.rewards import RewardSet, Sample, accuracy, language_consistency, overlong_penalty, think_format

ARITH = {"task": "arithmetic", "answer": "<think>7+8=15 4+3+1=8</think>\n85", "messages": []}


@pytest.mark.parametrize("text, fmt", [
    ("<think>7+8=15 4+3+1=8</think>\n85", 1.0),
    ("  <think>x</think>85", 1.0),
    ("85", 0.0),  # no reasoning
    ("<think></think>\n85", 0.0),  # empty reasoning
    ("<think>7+8=15</think>\n", 0.0),  # no answer
    ("<think>7+8=15", 0.0),  # never closed (cut off)
    ("<think>a</think><think>b</think>85", 0.0),  # two blocks
    ("<think>a <think> b</think>85", 0.0),  # nested
    ("<think>a</think>85</think>", 0.0),  # a stray closing tag
    ("pre <think>a</think>85", 0.0),  # text before the reasoning
])
def test_format(text, fmt):
    assert think_format(Sample(ARITH, text)) == fmt


def test_accuracy_uses_task_verifier_and_math_answers():
    assert accuracy(Sample(ARITH, "<think>wrong steps</think>\n85")) == 1.0
    assert accuracy(Sample(ARITH, "<think>7+8=15</think>\n86")) == 0.0
    assert accuracy(Sample(ARITH, "85")) == 1.0  # a plain answer is scored on its value
    assert accuracy(Sample(ARITH, "<think>85")) == 0.0  # cut off inside the reasoning: no answer
    gsm = {"answer": "3 * 4 = 12\n#### 12", "messages": []}
    assert accuracy(Sample(gsm, "<think>3*4</think>\n#### 12")) == 1.0
    assert accuracy(Sample(gsm, "<think>3*4</think>\n#### 13")) == 0.0
    math = {"solution": r"so $\boxed{\frac{1}{2}}$", "messages": []}
    assert accuracy(Sample(math, "the answer is 0.5")) == 1.0
    verdict = get_task("verdict", think=True).generate(1)[0]
    assert accuracy(Sample(verdict, verdict["answer"])) == 1.0
    with pytest.raises(ValueError, match="no built-in task"):
        accuracy(Sample({"id": "r7", "messages": []}, "5"))


def test_overlong_penalty_hand_values():
    f = lambda n, truncated=False: overlong_penalty(Sample(ARITH, "", n, truncated), max_tokens=20, cache=8)  # noqa: E731
    assert f(12) == 0.0 and f(16) == pytest.approx(-0.5) and f(20) == pytest.approx(-1.0)
    assert f(21) == -1.0 and f(5, truncated=True) == -1.0
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(Sample(ARITH, ""), max_tokens=4, cache=8)


def test_language_consistency():
    english = Sample(ARITH, "<think>the cat sees a dog</think>lo miro")
    assert language_consistency(english) == 1.0
    mixed = Sample(ARITH, "<think>the кошка sees собаку</think>x")
    assert language_consistency(mixed) == pytest.approx(2 / 4)
    assert language_consistency(mixed, script="CYRILLIC") == pytest.approx(2 / 4)
    assert language_consistency(Sample(ARITH, "<think>12+3=15</think>15")) == 1.0  # no words
    vensi = Sample(ARITH, "lo miro tava cat")
    assert language_consistency(vensi, vocabulary=["lo", "Miro", "tava"]) == pytest.approx(3 / 4)


def test_reward_set_weights_and_errors():
    rs = RewardSet({"accuracy": 1.0, "format": 0.5, "overlong": 1.0}, {"overlong": {"max_tokens": 10, "cache": 4}})
    samples = [Sample(ARITH, "<think>s</think>\n85", 5), Sample(ARITH, "85", 8), Sample(ARITH, "<think>s", 10, True)]
    total, parts = rs(samples)
    assert parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0], "overlong": [0.0, -0.5, -1.0]}
    assert total == pytest.approx([1.5, 0.5, -1.0])
    with pytest.raises(KeyError, match="unknown reward"):
        RewardSet({"accuracy": 1.0, "lenght": 1.0})


def test_arithmetic_reasoning_format():
    task = get_task("arithmetic", max_digits=3, think=True)
    records = task.generate(200, seed=1)
    for r in records:
        assert think_format(Sample(r, r["answer"])) == 1.0 and task.score(r, r["answer"]) == 1.0
    # the draw is the one of the plain task: only the answer text changes
    plain = get_task("arithmetic", max_digits=3).generate(200, seed=1)
    assert [r["messages"][0] for r in records] == [r["messages"][0] for r in plain]
    assert all(p["answer"] == r["answer"].rsplit("\n", 1)[1] for p, r in zip(plain, records))
    assert column_steps(47, 38, "+") == ["7+8=15", "4+3+1=8"]
    assert column_steps(95, 7, "+") == ["5+7=12", "9+0+1=10", "0+0+1=1"]  # one digit per step
    assert column_steps(52, 7, "-") == ["2-7+10=5", "5-1-0=4"]
    assert column_steps(3, 10, "-") == ["3-10=-(10-3)", "0-3+10=7", "1-1-0=0"]
    assert column_steps(0, 0, "+") == ["0+0=0"]
    # the steps read right to left spell the result (hundreds of random problems)
    rng = random.Random(0)
    for _ in range(300):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-")
        steps = column_steps(a, b, op)
        negative = steps[0].startswith(f"{a}-{b}=-(")
        digits = "".join(s.rsplit("=", 1)[1][-1] for s in reversed(steps[1 if negative else 0:]))
        assert (-1 if negative else 1) * int(digits) == (a + b if op == "+" else a - b)
