"""Evaluation metrics that torchmetrics does not provide."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1): ``1 - C(n - c, k) / C(n, k)``.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), round(pass_at_k(10, 3, 1), 3)
    (0.0, 1.0, 0.3)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def eval_tag(task: str, metric: str) -> str:
    """The logged name of a task's metric: ``eval/<task>/<metric>``, the same during training
    (`esft.callbacks.TaskEvaluation`) and in ``esft eval``, so runs and evaluations line up."""
    return f"eval/{task}/{metric}"


def summarize(scores: Sequence[float], num_samples: int, ks: Sequence[int], metric: str) -> dict[str, float]:
    """The mean score under the name `metric` (the task's `Task.metric`), the record count ``n``
    and ``pass@k`` (k <= `num_samples`) from per-sample scores, laid out `num_samples` per record;
    a sample is correct when it scores 1.0."""
    n_records = len(scores) // num_samples
    correct = [sum(s == 1.0 for s in scores[i * num_samples : (i + 1) * num_samples]) for i in range(n_records)]
    out = {metric: sum(scores) / len(scores), "n": float(n_records)}
    for k in ks:
        if k <= num_samples:
            out[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in correct) / n_records
    return out
