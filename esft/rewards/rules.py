"""Rule-based rewards of DeepSeek-R1 (arXiv 2501.12948, section 2.2.2 and 2.3.2): accuracy checked
by a verifier, format (reasoning in ``<think>...</think>`` followed by an answer), language
consistency of the reasoning; plus DAPO's soft overlong penalty (arXiv 2503.14476, eq. 13).

Each reward takes one `Sample` and returns a float; `esft.rewards.RewardSet` weights and sums them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from esft.data.tasks import TASKS, get_task
from esft.data.tasks.math import extract_answer, math_equal, reference_answer

_FORMAT = re.compile(r"\s*<think>(?P<think>(?:(?!<think>|</think>).)+)</think>\s*(?P<answer>\S(?:(?!<think>|</think>).)*)", re.DOTALL)


@dataclass
class Sample:
    """One completion to reward."""

    record: dict[str, Any]  # the prompt's record: its ``task`` and ``answer`` (or ``solution``)
    text: str  # the completion, decoded
    num_tokens: int = 0  # completion length in tokens
    truncated: bool = False  # stopped by the length limit before an end-of-turn token


def accuracy(sample: Sample) -> float:
    """The record's task verifier (built-in tasks), else the GSM8K/MATH answer checker on the
    record's ``answer``/``solution``; in [0, 1]. A record with neither is an error."""
    record = sample.record
    task = record.get("task")
    if task in TASKS:
        return float(get_task(task).score(record, sample.text))
    try:
        reference = reference_answer(record)
    except ValueError as e:
        raise ValueError(f"accuracy reward: record {record.get('id', '?')!r} has no built-in task and {e}") from None
    return float(math_equal(extract_answer(sample.text), reference))


def think_format(sample: Sample) -> float:
    """1.0 when the completion is exactly one non-empty ``<think>...</think>`` block followed by
    a non-empty answer (no further think tags), else 0.0."""
    return float(_FORMAT.fullmatch(sample.text) is not None)


def overlong_penalty(sample: Sample, max_tokens: int, cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - cache`` tokens, then falling
    linearly to -1 at `max_tokens`; -1 beyond it (and for a truncated completion)."""
    if cache < 0 or cache > max_tokens:
        raise ValueError(f"overlong_penalty: cache must be in [0, max_tokens={max_tokens}], got {cache}")
    if sample.truncated or sample.num_tokens > max_tokens:
        return -1.0
    start = max_tokens - cache
    if sample.num_tokens <= start:
        return 0.0
    return (start - sample.num_tokens) / cache


SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "DEVANAGARI")
_WORD = re.compile(r"[^\W\d_]+")


def _script(word: str) -> str | None:
    name = unicodedata.name(word[0], "")
    return next((s for s in SCRIPTS if name.startswith(s)), None)


def language_consistency(sample: Sample, script: str = "LATIN", vocabulary: Collection[str] | None = None) -> float:
    """R1's language-consistency reward: the fraction of words in the reasoning (the ``<think>``
    block when there is one, else the whole completion) that belong to the target language —
    words written in `script` (a Unicode script name prefix, e.g. ``LATIN``, ``CYRILLIC``,
    ``CJK``), or, when `vocabulary` is given, words in it (case-insensitive). 1.0 when there are no
    words."""
    match = re.search(r"<think>(.*?)(?:</think>|$)", sample.text, re.DOTALL)
    text = match.group(1) if match else sample.text
    words = _WORD.findall(text)
    if not words:
        return 1.0
    if vocabulary is not None:
        known = {v.lower() for v in vocabulary}
        hits = sum(w.lower() in known for w in words)
    else:
        hits = sum(_script(w) == script.upper() for w in words)
    return hits / len(words)
