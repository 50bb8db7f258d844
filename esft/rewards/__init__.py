"""Rewards for RL after SFT (rule-based, a trained reward model, your own), and their weighted sum.

    >>> from esft.rewards import RewardSet, Sample
    >>> rewards = RewardSet({"accuracy": 1.0, "format": 0.5})
    >>> record = {"task": "arithmetic", "answer": "<think>2+3=5</think>\\n5"}
    >>> total, parts = rewards([Sample(record, "<think>2+3=5</think>\\n5"), Sample(record, "5")])
    >>> total, parts["accuracy"], parts["format"]
    ([1.5, 1.0], [1.0, 1.0], [1.0, 0.0])

A reward is named by a key of `REWARDS` (per-sample functions ``fn(sample, **options) -> float``),
``model`` (`esft.rewards.model.ModelReward`: a batched reward-model score), or ``module:function``
(an importable per-sample function of your own, e.g. ``my_rewards:unit_tests``).

With ``workers > 0`` the per-sample rewards run in a process pool (`esft.rewards.workers`) with a
``timeout`` per call: a call that raises or runs out of time scores 0 and is counted in
`RewardSet.last_stats` (GRPO logs ``train/reward_failures``). Without workers a failing reward
raises, as any error would. The ``model`` reward always runs in this process (on its device).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from esft.rewards.model import ModelReward
from esft.rewards.rules import Sample, accuracy, language_consistency, overlong_penalty, think_format
from esft.rewards.workers import PoolStats, RewardPool, StartMethod

log = logging.getLogger(__name__)

REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "format": think_format,
    "overlong": overlong_penalty,
    "language": language_consistency,
}
BATCHED: dict[str, Callable[..., Callable[[Sequence[Sample]], list[float]]]] = {"model": ModelReward}


def resolve_reward(name: str) -> Callable[..., Any]:
    """The reward function (or batched reward class) of `name`; an unknown name is a `KeyError`."""
    if name in REWARDS:
        return REWARDS[name]
    if name in BATCHED:
        return BATCHED[name]
    module, sep, attr = name.partition(":")
    if sep and module and attr:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {name!r}: cannot import {attr!r} from module {module!r} ({e})") from None
    raise KeyError(f"unknown reward {name!r}; available: {', '.join([*REWARDS, *BATCHED])}, or module:function")


class RewardSet:
    """Weighted sum of named rewards.

    Args:
        weights: reward name (`REWARDS`: accuracy, format, overlong, language; ``model``; or
            ``module:function``) -> weight.
        options: reward name -> keyword options of that reward (e.g. ``{"overlong":
            {"max_tokens": 64, "cache": 16}}``, ``{"model": {"path": "runs/reward_tiny/hf"}}``).
        workers: run the per-sample rewards in this many worker processes (0: in this process).
        timeout: with workers, seconds one reward call on one sample may take.
        start_method: how workers start (`esft.rewards.workers`).
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None, workers: int = 0,
                 timeout: float | None = None, start_method: StartMethod | None = None) -> None:
        options = options or {}
        extra = sorted(set(options) - set(weights))
        if extra:
            raise KeyError(f"reward options for {extra} without a weight; rewards: {sorted(weights)}")
        if not weights:
            raise ValueError("a RewardSet needs at least one reward")
        if timeout is not None and workers < 1:
            raise ValueError("a reward timeout needs reward workers >= 1 (a call in this process cannot be cut off)")
        self.weights = dict(weights)
        self.batched = {n: resolve_reward(n)(**options.get(n, {})) for n in weights if n in BATCHED}
        self.fns = {n: partial(resolve_reward(n), **options.get(n, {})) for n in weights if n not in BATCHED}
        self.pool = RewardPool(workers, timeout, start_method) if workers > 0 else None
        self.last_stats = PoolStats()

    def __call__(self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        """``(total per sample, {name: per-sample values before weighting})``; the failures of
        this call (with workers) are in `last_stats`."""
        if self.pool is None:
            parts = {name: [fn(s) for s in samples] for name, fn in self.fns.items()}
            self.last_stats = PoolStats()
        else:
            calls = [(name, fn, s) for name, fn in self.fns.items() for s in samples]
            values, self.last_stats = self.pool.map(calls)
            parts = {name: values[i * len(samples) : (i + 1) * len(samples)] for i, name in enumerate(self.fns)}
            for name, message in self.last_stats.messages.items():
                log.warning("reward %r failed on %d of %d samples (scored 0); first error: %s", name,
                            self.last_stats.errors[name], len(samples), message)
            for name, n in self.last_stats.timeouts.items():
                log.warning("reward %r timed out on %d of %d samples (scored 0)", name, n, len(samples))
        parts.update({name: list(fn(samples)) for name, fn in self.batched.items()})
        parts = {name: parts[name] for name in self.weights}  # the configured order
        total = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(samples))]
        return total, parts

    def close(self) -> None:
        """End the reward workers, if any."""
        if self.pool is not None:
            self.pool.close()


__all__ = ["BATCHED", "REWARDS", "ModelReward", "RewardSet", "Sample", "accuracy", "language_consistency",
           "overlong_penalty", "resolve_reward", "think_format"]
