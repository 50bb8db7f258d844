"""A curation pipeline: an ordered list of filter and select stages, built from YAML.

    curation:
      - filter: degenerate
      - filter: exact_dedup
      - filter: minhash_dedup
        threshold: 0.8
      - select: deita                 # a selector name (see esft.curation.selectors)
        score: {name: ifd, model_name_or_path: runs/scorer/hf}
        embed: {name: minilm}
        budget: 0.1                   # examples: a fraction (float) of the pipeline's input, or a count (int)
        budget_tokens: null           # tokens: a fraction of the input's tokens, or a count

A ``filter`` stage takes the filter's options (`esft.curation.filters`). A ``select`` stage
takes the selector's options plus ``score`` (a scorer spec), ``embed`` (an embedder spec),
``budget`` / ``budget_tokens`` and ``tokenizer`` (for token budgets, default ``builtin``).
Every stage may carry a ``name`` for the report. `Pipeline.run` returns the kept records (in
input order) and a `Report`: what each stage removed, examples of removed records, and the
scores it saw. Stages whose constructor takes a ``seed`` get the pipeline's seed unless they set one.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from esft.curation.base import Budget, resolve_amount, token_lengths
from esft.curation.embedders import build_embedder
from esft.curation.filters import FILTERS, Filter
from esft.curation.scorers import build_scorer
from esft.curation.selectors import SELECTORS, RelevanceSelector, Selector

SELECT_KEYS = ("score", "embed", "budget", "budget_tokens", "tokenizer")


@dataclass
class StageReport:
    name: str
    before: int
    kept: int
    seconds: float
    removed_examples: list[dict[str, Any]] = field(default_factory=list)
    scores: torch.Tensor | None = None  # scores of the stage's candidates (selectors / score filters)
    kept_mask: torch.Tensor | None = None  # over the candidates

    @property
    def removed(self) -> int:
        return self.before - self.kept


@dataclass
class Report:
    input: int
    stages: list[StageReport] = field(default_factory=list)

    @property
    def output(self) -> int:
        return self.stages[-1].kept if self.stages else self.input

    def lines(self) -> list[str]:
        out = [f"[curation] {self.input} records in"]
        for s in self.stages:
            out.append(f"[curation] {s.name}: removed {s.removed} of {s.before} ({s.removed / max(s.before, 1):.1%}), "
                       f"{s.kept} kept, {s.seconds:.1f}s")
        out.append(f"[curation] {self.output} records out ({self.output / max(self.input, 1):.1%})")
        return out


def _split(spec: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a curation stage is a mapping with a 'filter' or 'select' key, got {spec!r}")
    kinds = [k for k in ("filter", "select") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"{where}: a curation stage needs exactly one of 'filter' or 'select', got keys {sorted(spec)}")
    options = dict(spec)
    kind = kinds[0]
    part = options.pop(kind)
    return kind, part, options


def _construct(cls: type, options: dict[str, Any], seed: int | None, where: str):
    params = inspect.signature(cls.__init__).parameters
    if seed is not None and "seed" in params and "seed" not in options:
        options = {**options, "seed": seed}
    try:
        return cls(**options)
    except TypeError as e:
        allowed = [p for p in params if p != "self"]
        raise ValueError(f"{where}: bad options {sorted(options)} for {cls.__name__} (it takes {allowed}): {e}") from None


@dataclass
class Stage:
    name: str
    part: Filter | Selector
    score: Any = None
    embed: Any = None
    budget: float | int | None = None
    budget_tokens: float | int | None = None
    tokenizer: str = "builtin"


def build_stage(spec: dict[str, Any], index: int, seed: int | None = None) -> Stage:
    where = f"curation stage {index}"
    kind, part, options = _split(spec, where)
    name = options.pop("name", None) or f"{index}:{part}"
    if kind == "filter":
        if part not in FILTERS:
            raise ValueError(f"{where}: unknown filter {part!r}; expected one of {', '.join(FILTERS)}")
        return Stage(name, _construct(FILTERS[part], options, seed, where))
    if part not in SELECTORS:
        raise ValueError(f"{where}: unknown selector {part!r}; expected one of {', '.join(SELECTORS)}")
    extra = {k: options.pop(k) for k in SELECT_KEYS if k in options}
    if extra.get("budget") is None and extra.get("budget_tokens") is None:
        raise ValueError(f"{where}: a select stage needs a `budget` (examples) and/or `budget_tokens`")
    stage = Stage(name, _construct(SELECTORS[part], options, seed, where),
                  score=build_scorer(extra["score"]) if extra.get("score") else None,
                  embed=build_embedder(extra["embed"]) if extra.get("embed") else None,
                  budget=extra.get("budget"), budget_tokens=extra.get("budget_tokens"),
                  tokenizer=extra.get("tokenizer", "builtin"))
    if stage.part.needs_scores and stage.score is None:
        raise ValueError(f"{where}: selector {part!r} ranks by a score: add `score: {{name: ...}}`")
    if stage.part.needs_vectors and stage.embed is None:
        raise ValueError(f"{where}: selector {part!r} needs embeddings: add `embed: {{name: minilm}}`")
    return stage


class Pipeline:
    def __init__(self, stages: list[dict[str, Any]], seed: int | None = None, removed_examples: int = 5) -> None:
        """
        Args:
            stages: stage specs (see the module docstring).
            seed: default ``seed`` of every stage that takes one and does not set it.
            removed_examples: removed records kept per stage for the report.
        """
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"curation: expected a non-empty list of stages, got {stages!r}")
        self.stages = [build_stage(s, i, seed) for i, s in enumerate(stages)]
        self.removed_examples = removed_examples

    def run(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Report]:
        report = Report(len(records))
        idx = torch.arange(len(records))
        lengths: torch.Tensor | None = None
        for stage in self.stages:
            start = time.perf_counter()
            current = [records[i] for i in idx.tolist()]
            scores = None
            if isinstance(stage.part, Filter):
                keep = stage.part(current)
                if len(keep) != len(current):
                    raise RuntimeError(f"{stage.name}: filter returned {len(keep)} flags for {len(current)} records")
                scorer = getattr(stage.part, "scorer", None)
                scores = scorer(current) if scorer is not None else None  # cached: no second computation
            else:
                if stage.budget_tokens is not None and lengths is None:
                    from esft.models.tokenizer import load_tokenizer

                    lengths = token_lengths(records, load_tokenizer(stage.tokenizer))
                budget = Budget(
                    examples=resolve_amount(stage.budget, len(records), f"{stage.name}: budget"),
                    tokens=resolve_amount(stage.budget_tokens, int(lengths.sum()) if lengths is not None else 0,
                                          f"{stage.name}: budget_tokens"),
                    lengths=lengths[idx] if lengths is not None else None,
                )
                scores = stage.score(current) if stage.score is not None else None
                vectors = stage.embed(current) if stage.embed is not None else None
                if isinstance(stage.part, RelevanceSelector) and stage.part.target_vectors is None:
                    stage.part.target_vectors = stage.embed(stage.part.target_records())
                chosen = stage.part(scores, vectors, budget, current)
                keep = torch.zeros(len(current), dtype=torch.bool)
                keep[chosen] = True
            removed = (~keep).nonzero().flatten()[: self.removed_examples].tolist()
            report.stages.append(StageReport(
                stage.name, len(current), int(keep.sum()), time.perf_counter() - start,
                removed_examples=[current[i] for i in removed], scores=scores, kept_mask=keep,
            ))
            idx = idx[keep]
        return [records[i] for i in idx.tolist()], report


def curate(records: list[dict[str, Any]], stages: list[dict[str, Any]], seed: int | None = None,
           log: bool = True) -> tuple[list[dict[str, Any]], Report]:
    """Run a pipeline built from `stages` on `records`; print its report when `log`."""
    kept, report = Pipeline(stages, seed).run(records)
    if log:
        for line in report.lines():
            rank_zero_info(line)
    if not kept:
        raise ValueError("curation removed every record (see the report above)")
    return kept, report
