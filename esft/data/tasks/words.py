"""Word-list tasks: reverse or sort a short list of words from a fixed lexicon.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("reverse_words")
    >>> rec = task.generate(1, seed=0)[0]
    >>> task.score(rec, rec["answer"])
    1.0
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task, exact_match

LEXICON = (
    "apple river stone cloud tiger maple ocean piano lemon candle garden silver rocket "
    "forest window butter planet violin mirror pepper castle dragon harbor jungle kettle "
    "ladder meadow needle orange parrot quartz saddle tunnel velvet walnut yellow zebra "
    "anchor bridge copper desert engine falcon glacier hammer island jacket"
).split()


class _WordListTask(Task):
    domain = "general"
    metric = "exact_match"

    def __init__(self, min_words: int = 3, max_words: int = 6) -> None:
        self.min_words = min_words
        self.max_words = max_words

    def _words(self, rng: random.Random) -> list[str]:
        return rng.sample(LEXICON, rng.randint(self.min_words, self.max_words))

    def score(self, record: dict, completion: str) -> float:
        return exact_match(completion, record["answer"])


class ReverseWords(_WordListTask):
    """Reverse the order of the given words."""

    name = "reverse_words"

    def sample(self, rng: random.Random) -> tuple[str, str]:
        words = self._words(rng)
        return f"Reverse: {' '.join(words)}", " ".join(reversed(words))


class SortWords(_WordListTask):
    """Sort the given words alphabetically."""

    name = "sort_words"

    def sample(self, rng: random.Random) -> tuple[str, str]:
        words = self._words(rng)
        return f"Sort: {' '.join(words)}", " ".join(sorted(words))
