"""Selectors: ``Selector(scores, vectors, budget) -> indices`` into the candidate pool.

Each selector ranks candidates (`rank`); the `Budget` then takes the longest run of that ranking
that fits its example and/or token limits. Scores are "higher first" unless ``ascending``.

- `RandomSelector`: a seeded shuffle, optionally stratified by ``task`` or ``source`` so every
  prefix holds each stratum in proportion (always-on baseline).
- `TopKSelector`: highest (or lowest) scores first, e.g. longest responses ("Long Is More").
- `ThresholdSelector`: only candidates with a score in [min, max], best first.
- `KCenterSelector`: k-center greedy (Sener & Savarese 2018) on the vectors: each pick is the
  candidate farthest from everything picked so far.
- `KMeansSelector`: k-means on the vectors, then stratified sampling across clusters (best
  score first inside a cluster when scores are given, else random).
- `DeitaSelector`: DEITA's score-first diversity filter (Liu et al. 2024): candidates in score
  order, one is kept when its cosine similarity to every kept one is below ``threshold`` (0.9 in
  the paper).
- `RelevanceSelector`: cosine similarity to a target set (max or mean over the targets; RDS+,
  Ivison et al. 2025), most relevant first. The pipeline embeds the targets with the stage's
  embedder.

Vectors are unit-length (the embedders normalise), so cosine is a dot product.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch

from esft.curation.base import Budget


class Selector:
    name = ""
    needs_scores = False
    needs_vectors = False

    def rank(self, scores: torch.Tensor | None, vectors: torch.Tensor | None, budget: Budget,
             records: list[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor | None, vectors: torch.Tensor | None, budget: Budget,
                 records: list[dict[str, Any]] | None = None) -> torch.Tensor:
        n = len(scores) if scores is not None else len(vectors) if vectors is not None else len(records or [])
        if self.needs_scores and scores is None:
            raise ValueError(f"selector {self.name!r} needs scores: give the stage a `score`")
        if self.needs_vectors and vectors is None:
            raise ValueError(f"selector {self.name!r} needs vectors: give the stage an `embed`")
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        return budget.take(self.rank(scores, vectors, budget, records or [{}] * n))


def by_score(scores: torch.Tensor, ascending: bool = False) -> torch.Tensor:
    """Indices best first (NaN scores last), ties in input order."""
    key = scores.clone().float()
    key = key if ascending else -key
    key[key.isnan()] = float("inf")
    return torch.sort(key, stable=True).indices


def interleave(strata: list[int], within: list[list[int]], seed: int) -> torch.Tensor:
    """A ranking in which every prefix holds each stratum in proportion to its size: the i-th of
    a stratum of size m gets the key ``(i + u) / m`` (u uniform, seeded), and keys are sorted.
    `within[s]` is stratum s's members in their preferred order."""
    rng = random.Random(seed)
    keys, members = [], []
    for group in within:
        m = len(group)
        for i, idx in enumerate(group):
            keys.append((i + rng.random()) / m)
            members.append(idx)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return torch.tensor([members[i] for i in order], dtype=torch.long)


class RandomSelector(Selector):
    name = "random"

    def __init__(self, stratify_by: Literal["task", "source"] | None = None, seed: int = 0) -> None:
        """Args: stratify_by: keep strata in proportion (record field); seed: shuffle seed."""
        self.stratify_by, self.seed = stratify_by, seed

    def rank(self, scores, vectors, budget, records):
        n = len(records)
        if self.stratify_by is None:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(r.get(self.stratify_by), []).append(i)
        rng = random.Random(self.seed)
        within = [rng.sample(g, len(g)) for g in groups.values()]
        return interleave(list(groups), within, self.seed)


class TopKSelector(Selector):
    name = "top_k"
    needs_scores = True

    def __init__(self, ascending: bool = False) -> None:
        """Args: ascending: lowest scores first (e.g. lowest perplexity)."""
        self.ascending = ascending

    def rank(self, scores, vectors, budget, records):
        return by_score(scores, self.ascending)


class ThresholdSelector(Selector):
    name = "threshold"
    needs_scores = True

    def __init__(self, min: float | None = None, max: float | None = None, ascending: bool = False) -> None:
        """Args: min, max: inclusive score bounds; ascending: order of the survivors (lowest first)."""
        self.min, self.max, self.ascending = min, max, ascending

    def rank(self, scores, vectors, budget, records):
        order = by_score(scores, self.ascending)
        s = scores[order]
        ok = ~s.isnan()
        if self.min is not None:
            ok &= s >= self.min
        if self.max is not None:
            ok &= s <= self.max
        return order[ok]


def _stop(budget: Budget, count: int, tokens: int) -> bool:
    """Whether a greedy selector has picked enough (`Budget.take` trims the rest)."""
    if budget.examples is not None and count >= budget.examples:
        return True
    return budget.tokens is not None and tokens >= budget.tokens


def _length(budget: Budget, i: int) -> int:
    return int(budget.lengths[i]) if budget.lengths is not None else 0


class KCenterSelector(Selector):
    name = "kcenter"
    needs_vectors = True

    def __init__(self, seed: int = 0, start: Literal["random", "best"] = "random") -> None:
        """
        Args:
            seed: picks the first center when `start` is ``random``.
            start: first center: a seeded random candidate, or the best score (needs scores).
        Cost: one pass over the pool per pick, O(n k d).
        """
        self.seed, self.start = seed, start

    def rank(self, scores, vectors, budget, records):
        x = vectors.float()
        n = x.shape[0]
        if self.start == "best" and scores is not None:
            first = int(by_score(scores)[0])
        else:
            first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed)))
        sq = (x * x).sum(1)
        dist = torch.full((n,), float("inf"))
        picked: list[int] = []
        tokens = 0
        i = first
        while len(picked) < n:
            picked.append(i)
            tokens += _length(budget, i)
            if _stop(budget, len(picked), tokens):
                break
            torch.minimum(dist, sq - 2 * (x @ x[i]) + sq[i], out=dist)
            dist[i] = -1.0  # picked: never again (min keeps it at -1)
            i = int(dist.argmax())
            if dist[i] < 0:
                break
        return torch.tensor(picked, dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0,
           block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine) on unit vectors ``[N, D]``: ``(centroids [k, D], assignment [N])``.
    Initial centroids are k distinct seeded-random points; an emptied cluster keeps its centroid."""
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iterations):
        new = torch.cat([(x[lo : lo + block] @ centroids.T).argmax(1) for lo in range(0, x.shape[0], block)])
        sums = torch.zeros_like(centroids).index_add_(0, new, x)
        counts = torch.bincount(new, minlength=k)
        nonempty = counts > 0
        centroids[nonempty] = torch.nn.functional.normalize(sums[nonempty], dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


class KMeansSelector(Selector):
    name = "kmeans"
    needs_vectors = True

    def __init__(self, clusters: int = 100, iterations: int = 20, seed: int = 0) -> None:
        """Args: clusters: k (capped at the pool size); iterations: Lloyd iterations; seed: init and sampling seed."""
        self.clusters, self.iterations, self.seed = clusters, iterations, seed

    def rank(self, scores, vectors, budget, records):
        _, assign = kmeans(vectors, min(self.clusters, vectors.shape[0]), self.iterations, self.seed)
        if scores is not None:
            base = by_score(scores).tolist()
        else:
            base = torch.randperm(len(assign), generator=torch.Generator().manual_seed(self.seed)).tolist()
        within: dict[int, list[int]] = {}
        for i in base:
            within.setdefault(int(assign[i]), []).append(i)
        return interleave(list(within), list(within.values()), self.seed)


class DeitaSelector(Selector):
    name = "deita"
    needs_vectors = True

    def __init__(self, threshold: float = 0.9, block: int = 512) -> None:
        """
        Args:
            threshold: a candidate whose cosine to a kept one is >= this is skipped (paper: 0.9).
            block: candidates compared with the kept set per matrix product.
        Without scores, candidates are visited in input order. Returns fewer than the budget
        when the pool runs out of candidates different enough.
        """
        self.threshold, self.block = threshold, block

    def rank(self, scores, vectors, budget, records):
        x = vectors.float()
        order = by_score(scores) if scores is not None else torch.arange(x.shape[0])
        kept = torch.empty((0, x.shape[1]))
        picked: list[int] = []
        tokens = 0
        for lo in range(0, len(order), self.block):
            idx = order[lo : lo + self.block]
            v = x[idx]
            blocked = (v @ kept.T).amax(1) >= self.threshold if kept.shape[0] else torch.zeros(len(idx), dtype=torch.bool)
            sim = v @ v.T
            new = []
            for j in range(len(idx)):
                if blocked[j]:
                    continue
                new.append(j)
                picked.append(int(idx[j]))
                tokens += _length(budget, int(idx[j]))
                if _stop(budget, len(picked), tokens):
                    break
                blocked |= sim[j] >= self.threshold
            kept = torch.cat([kept, v[new]])
            if _stop(budget, len(picked), tokens):
                break
        return torch.tensor(picked, dtype=torch.long)


class RelevanceSelector(Selector):
    name = "relevance"
    needs_vectors = True

    def __init__(self, target: dict[str, Any], reduce: Literal["max", "mean"] = "max") -> None:
        """
        Args:
            target: the target examples: ``{tasks: [...], paths: [...], num_examples: 100,
                split: heldout, seed: 0}`` (built-in tasks and/or data files).
            reduce: a candidate's relevance is its ``max`` or ``mean`` cosine over the targets.
        """
        self.target, self.reduce = target, reduce
        self.target_vectors: torch.Tensor | None = None  # set by the pipeline

    def target_records(self) -> list[dict[str, Any]]:
        from esft.data.records import load_records
        from esft.data.tasks import build_task

        t = self.target
        records = [r for spec in t.get("tasks", []) for r in
                   build_task(spec).generate(t.get("num_examples", 100), t.get("seed", 0), t.get("split", "heldout"))]
        for path in t.get("paths", []):
            records += load_records(path)[0]
        if not records:
            raise ValueError("relevance selector: `target` names no tasks or paths")
        return records

    def rank(self, scores, vectors, budget, records):
        if self.target_vectors is None:
            raise ValueError("relevance selector: target vectors were not embedded (run it inside a pipeline)")
        sims = vectors.float() @ self.target_vectors.float().T
        relevance = sims.amax(1) if self.reduce == "max" else sims.mean(1)
        return by_score(relevance)


SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (RandomSelector, TopKSelector, ThresholdSelector, KCenterSelector, KMeansSelector,
                              DeitaSelector, RelevanceSelector)
}
