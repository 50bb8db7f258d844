"""Greedy evaluation of a reasoning model: pass@1 (the accuracy reward), format rate, length.

Shared by `GRPOModule`'s validation, `esft pipeline`'s after-stage evaluation and the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esft.data.prompts import prompt_messages
from esft.evaluation import rollout
from esft.evaluation.episodes import all_episodes, episode_rollout, policy_tokens
from esft.rewards.rules import Sample, accuracy, think_format


def reasoning_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Means over `samples` of accuracy (``pass@1``), format, completion tokens and truncation."""
    n = max(len(samples), 1)
    return {
        "pass@1": sum(accuracy(s) == 1.0 for s in samples) / n,
        "format": sum(think_format(s) for s in samples) / n,
        "length": sum(s.num_tokens for s in samples) / n,
        "truncated": sum(s.truncated for s in samples) / n,
    }


def evaluate_reasoning(model, tokenizer, records: Sequence[dict[str, Any]], max_new_tokens: int = 64,
                       batch_size: int = 100, max_turns: int | None = None) -> dict[str, float]:
    """Greedy completions of `records`' prompts (played as episodes of at most `max_turns` policy
    turns for multi-turn tasks), scored by `reasoning_metrics` (plus ``n``)."""
    if all_episodes(records):
        outs = episode_rollout(model, tokenizer, records, max_new_tokens, batch_size, max_turns=max_turns)
    else:
        outs = rollout(model, tokenizer, [prompt_messages(r) for r in records], max_new_tokens, batch_size)
    samples = [Sample(r, o.text, policy_tokens(o), o.truncated) for r, o in zip(records, outs)]
    return {**reasoning_metrics(samples), "n": float(len(records))}
