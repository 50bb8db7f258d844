"""General ability: a mixture of small instruction-following skills, to measure what a fine-tune keeps.

Each sample is one of: copy the words, reverse them, sort them, count them, say which of two
numbers is larger, give the first or the last word. Score: exact match.

Example:
    >>> from esft.data.tasks import get_task
    >>> task = get_task("general")
    >>> rec = task.generate(1, seed=0)[0]
    >>> rec["messages"][0]["content"], rec["answer"]  # doctest: +SKIP
    ('How many words: lemon tiger zebra', '3')
    >>> task.score(rec, rec["answer"]), task.score(rec, "")
    (1.0, 0.0)
    >>> General(skills=("compare",)).sample(random.Random(0))  # doctest: +SKIP
    ('Which is larger: 49 or 97?', '97')

Run ``esft export --tasks general --n 1000 --out data/`` to write a file.
"""

from __future__ import annotations

import random

from esft.data.tasks.base import Task, exact_match
from esft.data.tasks.words import LEXICON

SKILLS = {
    "copy": ("Copy the words: {}", lambda w: " ".join(w)),
    "reverse": ("Write the words backwards: {}", lambda w: " ".join(reversed(w))),
    "sort": ("Put in alphabetical order: {}", lambda w: " ".join(sorted(w))),
    "count": ("How many words: {}", lambda w: str(len(w))),
    "first": ("First word of: {}", lambda w: w[0]),
    "last": ("Last word of: {}", lambda w: w[-1]),
}


class General(Task):
    """One of `skills` (all by default: copy, reverse, sort, count, compare, first, last) over
    `min_words`..`max_words` words, or two numbers below `max_number` for compare."""

    name = "general"
    domain = "general"
    metric = "exact_match"

    def __init__(self, skills: tuple[str, ...] | None = None, min_words: int = 2, max_words: int = 6,
                 max_number: int = 1000) -> None:
        self.skills = tuple(skills or (*SKILLS, "compare"))
        unknown = set(self.skills) - {*SKILLS, "compare"}
        if unknown:
            raise ValueError(f"unknown skills {sorted(unknown)}; known: {', '.join([*SKILLS, 'compare'])}")
        self.min_words = min_words
        self.max_words = max_words
        self.max_number = max_number

    def sample(self, rng: random.Random) -> tuple[str, str]:
        skill = rng.choice(self.skills)
        if skill == "compare":
            a, b = rng.sample(range(self.max_number), 2)
            return f"Which is larger: {a} or {b}?", str(max(a, b))
        words = rng.sample(LEXICON, rng.randint(self.min_words, self.max_words))
        template, solve = SKILLS[skill]
        return template.format(" ".join(words)), solve(words)

    def score(self, record: dict, completion: str) -> float:
        return exact_match(completion, record["answer"])
