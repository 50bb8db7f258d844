"""Plain text without task structure, for pretraining a base: lines of random words.

A pretrained model has met every word of its vocabulary in general text before it is fine-tuned
on a task. A base pretrained only on a few built-in tasks has not: the tokens that only other
tasks use keep their initial embeddings, and a later fine-tune on those tasks starts from noise
there. `Lexicon` fills that gap: each record is two runs of words drawn uniformly, with
replacement, from the distinct words of every other built-in task's training problems (letter
runs, single digits, punctuation runs, each with its leading space, and line breaks, as the
built-in tokenizer's pre-tokenizer splits text) plus every ASCII punctuation character. It carries the tasks' words but
no order of them: no prompt, no answer, no word n-gram of a task beyond chance (the
decontamination filter of `esft base` checks this). Its score (exact match of the second line)
stays near 0: there is nothing to learn but the words.

Example:
    >>> from esft.data.tasks import get_task
    >>> rec = get_task("lexicon").generate(1, seed=0)[0]
    >>> len(rec["messages"][0]["content"].split()) > 3
    True
"""

from __future__ import annotations

import functools
import random
import re
import string

from esft.data.tasks.base import Task, exact_match

WORD = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?(?:[^\w\s]|_)+|\n")
"""GPT-2's pre-tokenizer pattern with single digits and line breaks, as the built-in tokenizer
splits text (``\\p{L}`` written as ``[^\\W\\d_]``)."""


@functools.lru_cache(maxsize=8)
def inventory(sources: tuple[str, ...], num_source: int) -> tuple[str, ...]:
    """The distinct words (`WORD`) of `num_source` training problems (seed 0) of each task in
    `sources`, and each ASCII punctuation character, sorted."""
    from esft.data.tasks import get_task

    words = set(string.punctuation)
    for name in sources:
        for record in get_task(name).generate(num_source, seed=0, split="train"):
            for message in record["messages"]:
                words.update(WORD.findall(message["content"]))
    return tuple(sorted(words))


class Lexicon(Task):
    """Two runs of `min_words`..`max_words` random words each from the words of the built-in
    tasks `sources` (all others by default), `num_source` training problems per task."""

    name = "lexicon"
    domain = "general"
    metric = "exact_match"
    learning_note = "random words: vocabulary for pretraining a base, not a skill (its score stays near 0)"

    def __init__(self, sources: tuple[str, ...] | list[str] | None = None, min_words: int = 8, max_words: int = 24,
                 num_source: int = 2000) -> None:
        from esft.data.tasks import TASKS

        self.sources = tuple(sorted(sources if sources is not None else set(TASKS) - {self.name}))
        unknown = sorted(set(self.sources) - set(TASKS) | ({self.name} & set(self.sources)))
        if unknown:
            others = ", ".join(sorted(set(TASKS) - {self.name}))
            raise ValueError(f"lexicon: cannot draw words from {unknown}; built-in tasks: {others}")
        if not 1 <= min_words <= max_words:
            raise ValueError(f"lexicon: need 1 <= min_words <= max_words, got {min_words} and {max_words}")
        self.min_words, self.max_words, self.num_source = min_words, max_words, num_source

    def _line(self, rng: random.Random) -> str:
        words = inventory(self.sources, self.num_source)
        return "".join(rng.choices(words, k=rng.randint(self.min_words, self.max_words))).strip()

    def sample(self, rng: random.Random) -> tuple[str, str]:
        return self._line(rng), self._line(rng)

    def score(self, record: dict, completion: str) -> float:
        return exact_match(completion, record["answer"])
