"""Easy-to-hard ordering for `SFTDataModule(curriculum=...)`.

The records are sorted by a score (lowest first; ``descending: true`` reverses it), packed into
rows *in that order* (next fit: a row is closed when the next example does not fit), and the
training sampler takes the rows in order instead of shuffling them, so every epoch runs from the
easiest rows to the hardest. The order is a pure function of the data and the score, so a
resumed run skips exactly the micro-batches already trained on (`ResumableBatchSampler.resume`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from esft.curation.scorers import build_scorer
from esft.curation.selectors import by_score


def order_records(records: list[dict[str, Any]], spec: dict[str, Any]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """`records` sorted by the score of `spec` (a scorer spec plus optional ``descending``), stable,
    NaN scores last; and the sorted scores."""
    spec = dict(spec)
    descending = bool(spec.pop("descending", False))
    scores = build_scorer(spec)(records)
    order = by_score(scores, ascending=not descending)
    return [records[i] for i in order.tolist()], scores[order]


def ordered_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack item indices into rows of total length <= `capacity`, keeping their order (next fit)."""
    rows: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows
