"""The `Task` interface: a deterministic generator of records plus a verifier.

Train and held-out splits are disjoint by construction: every problem is assigned to a split by
a hash of its prompt, so the same problem can never land in both, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from typing import Literal

Split = Literal["train", "heldout"]
HELDOUT_BUCKETS = 10  # one hash bucket in ten is held out


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to (stable across runs, machines and Python versions)."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return "heldout" if bucket % HELDOUT_BUCKETS == 0 else "train"


class Task(ABC):
    """A verifiable task. Subclasses implement `sample` and `score`.

    `generate(n, seed, split)` draws problems with a `random.Random(seed)` and keeps only those
    whose prompt hashes into `split`, so the splits are disjoint and each call is reproducible.
    """

    name: str = ""
    domain: str = "general"  # the task family it stands for (math, code, intent, ...), see `DOMAINS`
    metric: str = ""
    """The name of what `score` measures (``exact_match``, ``accuracy``, ``chrf``, ``rouge_l``, ...):
    evaluation reports a task's mean score under it, as ``eval/<task>/<metric>``."""
    learning_note: str | None = None
    """Why a model may still score low on this task after a short run (one line, printed under the
    evaluation table by `esft.callbacks.TaskEvaluation`); None for a general reason."""

    @abstractmethod
    def sample(self, rng: random.Random) -> tuple[str, str]:
        """Draw one problem: (prompt, reference answer)."""

    @abstractmethod
    def score(self, record: dict, completion: str) -> float:
        """Score a model completion for `record` in [0, 1]."""

    def generate(self, n: int, seed: int = 0, split: Split = "train") -> list[dict]:
        rng = random.Random(f"{self.name}:{seed}:{split}")
        records: list[dict] = []
        seen: set[str] = set()
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise RuntimeError(
                    f"task {self.name!r}: could only draw {len(records)} distinct {split} problems of "
                    f"the {n} asked for; raise the task's difficulty or ask for fewer"
                )
            prompt, answer = self.sample(rng)
            if prompt in seen or split_of(prompt) != split:
                continue
            seen.add(prompt)
            records.append(
                {
                    "messages": self.messages(prompt, answer),
                    "task": self.name,
                    "answer": answer,
                    "id": f"{self.name}-{split}-{seed}-{len(records)}",
                    "source": f"builtin:{self.name}",
                }
            )
        return records

    def messages(self, prompt: str, answer: str) -> list[dict[str, str]]:
        """The record's conversation: the prompt and the reference answer (a multi-turn task
        writes its whole reference episode, `esft.data.tasks.episode.EpisodeTask`)."""
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the stripped, whitespace-normalised strings are equal."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))
