"""Weighted data mixtures: how many of each source's examples one epoch trains on.

    esft fit --config configs/sft/mixture.yaml

`data.sources` lists the sources of a mixture (`Source`: a path or hub id with its own format,
split, validation split, cap and weight). Each source is prepared and cached alone
(`esft.data.store`); `mix` then picks the examples of each for the training set:

- with ``weight``s, source ``s`` gets the share ``w_s / sum(w)`` of the mixture's trained tokens
  (``mix_by: tokens``, the default) or of its examples (``mix_by: examples``); the mixture is as
  large as the sources together, so a source above its share is subsampled and one below it is
  repeated;
- with ``epochs`` instead (the default is 1 for every source), source ``s`` contributes that many
  passes over its examples (``0.5``: half of them, ``2``: each twice).

A source's amount is made of whole passes over its examples plus, for the fraction left, a seeded
random subset whose amount is the closest to the target, so the realised share is off by at most
one example's amount. The choice is made once from the seed: every epoch trains on the same
examples (reshuffled), and a resumed run rebuilds the same mixture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

MixBy = Literal["tokens", "examples"]


@dataclass
class Source:
    """One source of a mixture (an entry of ``data.sources``)."""

    path: str
    """A .jsonl/.json/.parquet/.csv file, a directory of them, or a HF dataset id."""
    label: str = ""
    """Its name in the report and in ``val/<label>/loss`` (default: from the path)."""
    weight: float | None = None
    """Its share of the mixture (relative to the other sources' weights)."""
    epochs: float | None = None
    """Passes over its examples when no source has a weight (default 1)."""
    max_examples: int | None = None
    """Use at most this many of its training examples (a seeded random subset) before mixing."""
    format: str = "auto"
    name: str | None = None
    split: str = "train"
    val_path: str | None = None
    val_split: str | None = None
    val_fraction: float | None = None
    """Hold out this fraction of its records for validation (default: ``data.val_fraction``)."""

    @classmethod
    def parse(cls, spec: Any, index: int) -> "Source":
        where = f"data.sources[{index}]"
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict) or "path" not in spec:
            raise ValueError(f"{where}: a source is a path or a mapping with a 'path', got {spec!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a source has {sorted(known)}")
        source = cls(**spec)
        if source.weight is not None and source.weight <= 0:
            raise ValueError(f"{where}: weight must be > 0, got {source.weight}")
        if source.epochs is not None and source.epochs <= 0:
            raise ValueError(f"{where}: epochs must be > 0, got {source.epochs}")
        if source.max_examples is not None and source.max_examples < 1:
            raise ValueError(f"{where}: max_examples must be >= 1, got {source.max_examples}")
        if source.val_fraction is not None and not 0.0 <= source.val_fraction < 1.0:
            raise ValueError(f"{where}: val_fraction must be in [0, 1), got {source.val_fraction}")
        if not source.label:
            stem = re.sub(r"\.(jsonl|json|parquet|csv)$", "", source.path.rstrip("/").rsplit("/", 1)[-1])
            source.label = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or f"source{index}"
        return source


def parse_sources(specs: list[Any]) -> list[Source]:
    """`Source`s from ``data.sources``; weights and epochs are not mixed, labels are unique."""
    sources = [Source.parse(spec, i) for i, spec in enumerate(specs)]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        missing = [s.label for s, w in zip(sources, weighted) if not w]
        raise ValueError(f"data.sources: either every source has a weight or none does (no weight: {missing})")
    if any(weighted) and any(s.epochs is not None for s in sources):
        raise ValueError("data.sources: give sources weights or epochs, not both")
    labels = [s.label for s in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"data.sources: labels must be unique, {duplicates} repeat (set 'label')")
    return sources


def _take(amount: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into `amount`: whole passes, then a random subset, summing closest to `target`."""
    total = float(amount.sum())
    if total <= 0:
        return np.zeros(0, np.int64)
    passes = int(target // total)
    rest = target - passes * total
    order = rng.permutation(len(amount))
    cumulative = np.cumsum(amount[order])
    k = int(np.searchsorted(cumulative, rest)) if rest > 0 else 0  # cumulative[k]: the first prefix sum reaching `rest`
    if 0 < rest and k < len(order):
        below = cumulative[k - 1] if k else 0.0
        k += int(cumulative[k] - rest <= rest - below)  # the closer of the two prefixes
    return np.concatenate([np.tile(np.arange(len(amount)), passes), np.sort(order[:k])]).astype(np.int64)


def mix(amounts: list[np.ndarray], sources: list[Source], seed: int) -> list[np.ndarray]:
    """For every source, the indices of its examples in the mixture (see the module docstring);
    `amounts[s]` is what each example of source ``s`` counts for (trained tokens, or ones)."""
    if all(s.weight is not None for s in sources):
        budget = float(sum(a.sum() for a in amounts))
        norm = sum(s.weight for s in sources)
        targets = [budget * s.weight / norm for s in sources]
    else:
        targets = [float(a.sum()) * (s.epochs if s.epochs is not None else 1.0) for a, s in zip(amounts, sources)]
    rng = np.random.default_rng(seed)
    return [_take(a, t, rng) for a, t in zip(amounts, targets)]
