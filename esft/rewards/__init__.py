"""Rule-based rewards for RL after SFT, and their weighted composition.

    >>> from esft.rewards import RewardSet, Sample
    >>> rewards = RewardSet({"accuracy": 1.0, "format": 0.5})
    >>> record = {"task": "arithmetic", "answer": "<think>2+3=5</think>\\n5"}
    >>> total, parts = rewards([Sample(record, "<think>2+3=5</think>\\n5"), Sample(record, "5")])
    >>> total, parts["accuracy"], parts["format"]
    ([1.5, 1.0], [1.0, 1.0], [1.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from esft.rewards.rules import Sample, accuracy, language_consistency, overlong_penalty, think_format

REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "format": think_format,
    "overlong": overlong_penalty,
    "language": language_consistency,
}


class RewardSet:
    """Weighted sum of named rewards.

    Args:
        weights: reward name (`REWARDS`: accuracy, format, overlong, language) -> weight.
        options: reward name -> keyword options of that reward (e.g. ``{"overlong":
            {"max_tokens": 64, "cache": 16}}``, ``{"language": {"script": "LATIN"}}``).
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> None:
        options = options or {}
        unknown = sorted((set(weights) | set(options)) - set(REWARDS))
        if unknown:
            raise KeyError(f"unknown reward(s) {unknown}; available: {', '.join(REWARDS)}")
        if not weights:
            raise ValueError("a RewardSet needs at least one reward")
        self.weights = dict(weights)
        self.fns = {name: partial(REWARDS[name], **options.get(name, {})) for name in weights}

    def __call__(self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        """``(total per sample, {name: per-sample values before weighting})``."""
        parts = {name: [fn(s) for s in samples] for name, fn in self.fns.items()}
        total = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(samples))]
        return total, parts


__all__ = ["REWARDS", "RewardSet", "Sample", "accuracy", "language_consistency", "overlong_penalty", "think_format"]
