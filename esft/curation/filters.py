"""Filters: ``Filter(records) -> mask`` (True keeps the record). Dedup is a filter too.

- `LengthFilter`: bounds on characters and/or tokens of the prompt, response or whole record.
- `DegenerateFilter`: empty responses and repetitive ones (duplicate word n-gram fraction, as in
  Gopher's repetition filters, Rae et al. 2021; one character filling most of the response).
- `FormatFilter`: the response must match a regular expression and/or parse as JSON.
- `Decontaminate`: drop records sharing a word n-gram with evaluation data (built-in tasks'
  held-out splits and/or files), the n-gram overlap test of GPT-3's decontamination.
- `ExactDedup`: exact duplicates of the normalised text; the first occurrence stays.
- `MinHashDedup`: near duplicates by MinHash LSH (`datasketch`): shingles, permutations and the
  Jaccard threshold are options; candidates from LSH are confirmed by their MinHash Jaccard.
- `SemanticDedup`: SemDeDup (Abbas et al. 2023): k-means on embeddings, then within each
  cluster drop records whose cosine to a kept one exceeds ``1 - eps``. Departure: the paper keeps
  the duplicate least similar to its cluster centroid; here too (candidates are visited farthest
  from the centroid first), ties broken by input order.
- `ScoreFilter`: keep records whose score (any scorer, e.g. ``verifier``) lies in [min, max].
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from esft.curation.base import field_text, normalise, response_text, token_lengths
from esft.extras import require

Field = Literal["prompt", "response", "all"]


class Filter:
    name = ""

    def __call__(self, records: list[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError


class LengthFilter(Filter):
    name = "length"

    def __init__(self, field: Field = "all", min_chars: int | None = None, max_chars: int | None = None,
                 min_tokens: int | None = None, max_tokens: int | None = None, tokenizer: str = "builtin") -> None:
        """
        Args:
            field: which text the character bounds apply to; token bounds always count the whole
                rendered record (what training sees).
            min_chars, max_chars: bounds on characters (inclusive).
            min_tokens, max_tokens: bounds on tokens of the record under `tokenizer`'s chat template.
            tokenizer: tokenizer path / hub id / ``builtin``.
        """
        self.field, self.min_chars, self.max_chars = field, min_chars, max_chars
        self.min_tokens, self.max_tokens, self.tokenizer = min_tokens, max_tokens, tokenizer

    def __call__(self, records):
        keep = torch.ones(len(records), dtype=torch.bool)
        if self.min_chars is not None or self.max_chars is not None:
            chars = torch.tensor([len(field_text(r, self.field)) for r in records])
            keep &= _within(chars, self.min_chars, self.max_chars)
        if self.min_tokens is not None or self.max_tokens is not None:
            from esft.models.tokenizer import load_tokenizer

            keep &= _within(token_lengths(records, load_tokenizer(self.tokenizer)), self.min_tokens, self.max_tokens)
        return keep


def _within(values: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    keep = torch.ones_like(values, dtype=torch.bool)
    if lo is not None:
        keep &= values >= lo
    if hi is not None:
        keep &= values <= hi
    return keep


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Fraction of the word n-grams that repeat an earlier one (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


class DegenerateFilter(Filter):
    name = "degenerate"

    def __init__(self, ngram: int = 3, max_repeat_fraction: float = 0.3, max_char_fraction: float = 0.5,
                 min_chars_for_char_check: int = 20) -> None:
        """
        Args:
            ngram: word n-gram size for the repetition check.
            max_repeat_fraction: drop a response whose repeated n-grams exceed this fraction.
            max_char_fraction: drop a response at least `min_chars_for_char_check` long in which
                one non-space character makes up more than this fraction.
            min_chars_for_char_check: shorter responses skip the character check.
        Empty (whitespace-only) responses are always dropped.
        """
        self.ngram, self.max_repeat_fraction = ngram, max_repeat_fraction
        self.max_char_fraction, self.min_chars = max_char_fraction, min_chars_for_char_check

    def degenerate(self, text: str) -> bool:
        if not text.strip():
            return True
        if repeated_ngram_fraction(text.split(), self.ngram) > self.max_repeat_fraction:
            return True
        chars = text.replace(" ", "").replace("\n", "")
        if len(chars) >= self.min_chars:
            return Counter(chars).most_common(1)[0][1] / len(chars) > self.max_char_fraction
        return False

    def __call__(self, records):
        return torch.tensor([not self.degenerate(response_text(r)) for r in records], dtype=torch.bool)


class FormatFilter(Filter):
    name = "format"

    def __init__(self, pattern: str | None = None, json: bool = False, tasks: list[str] | None = None) -> None:
        """
        Args:
            pattern: a regular expression the whole response must match (``re.fullmatch``, DOTALL).
            json: the response must parse as JSON.
            tasks: check only records of these tasks (others pass); None checks every record.
        """
        if pattern is None and not json:
            raise ValueError("format filter: give a `pattern` and/or `json: true`")
        self.pattern = re.compile(pattern, re.DOTALL) if pattern else None
        self.json, self.tasks = json, set(tasks) if tasks else None

    def ok(self, text: str) -> bool:
        if self.pattern is not None and not self.pattern.fullmatch(text):
            return False
        if self.json:
            try:
                json.loads(text)
            except ValueError:
                return False
        return True

    def __call__(self, records):
        return torch.tensor(
            [(self.tasks is not None and r.get("task") not in self.tasks) or self.ok(response_text(r)) for r in records],
            dtype=torch.bool,
        )


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n is one n-gram (itself)."""
    words = normalise(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Decontaminate(Filter):
    name = "decontaminate"

    def __init__(self, tasks: list[Any] | None = None, paths: list[str] | None = None, ngram: int = 8,
                 num_examples: int = 1000, seed: int = 0, field: Field = "prompt") -> None:
        """
        Args:
            tasks: built-in tasks (names or option mappings) whose held-out records are evaluation data.
            paths: evaluation data files (any format `esft.data.records` reads).
            ngram: word n-gram size; a record sharing one n-gram of `field` with the evaluation
                data is dropped (texts shorter than n compare whole).
            num_examples: held-out records per task (match what evaluation uses).
            seed: generation seed of the held-out records.
            field: which text of both sides is compared.
        """
        if not tasks and not paths:
            raise ValueError("decontaminate: give evaluation `tasks` and/or `paths`")
        self.tasks, self.paths, self.ngram = tasks or [], paths or [], ngram
        self.num_examples, self.seed, self.field = num_examples, seed, field

    def reference(self) -> set[tuple[str, ...]]:
        from esft.data.records import load_records
        from esft.data.tasks import build_task

        records = [r for spec in self.tasks for r in build_task(spec).generate(self.num_examples, self.seed, "heldout")]
        for path in self.paths:
            records += load_records(path)[0]
        grams: set[tuple[str, ...]] = set()
        for r in records:
            grams |= word_ngrams(field_text(r, self.field), self.ngram)
        return grams

    def __call__(self, records):
        ref = self.reference()
        return torch.tensor([not (word_ngrams(field_text(r, self.field), self.ngram) & ref) for r in records], dtype=torch.bool)


class ExactDedup(Filter):
    name = "exact_dedup"

    def __init__(self, field: Field = "all") -> None:
        """Args: field: text compared after `normalise` (lower case, no punctuation, one space)."""
        self.field = field

    def __call__(self, records):
        seen: set[bytes] = set()
        keep = []
        for r in records:
            key = hashlib.blake2b(normalise(field_text(r, self.field)).encode(), digest_size=16).digest()
            keep.append(key not in seen)
            seen.add(key)
        return torch.tensor(keep, dtype=torch.bool)


def shingles(text: str, n: int, unit: Literal["word", "char"]) -> set[bytes]:
    """Word or character n-grams of the normalised text (a shorter text is one shingle)."""
    text = normalise(text)
    tokens: Any = text.split() if unit == "word" else text
    joiner = " " if unit == "word" else ""
    if len(tokens) <= n:
        return {joiner.join(tokens).encode()}
    return {joiner.join(tokens[i : i + n]).encode() for i in range(len(tokens) - n + 1)}


class MinHashDedup(Filter):
    name = "minhash_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 unit: Literal["word", "char"] = "char", field: Field = "all", seed: int = 1,
                 progress: bool = False) -> None:
        """
        Args:
            threshold: Jaccard similarity of shingle sets above which two records are duplicates.
            num_perm: MinHash permutations (more: a finer Jaccard estimate, slower).
            ngram: shingle size, in `unit`s.
            unit: ``char`` or ``word`` shingles.
            field: text compared.
            seed: MinHash permutation seed.
            progress: show a progress bar.
        The first record of each group of near duplicates stays.
        """
        if not 0 < threshold < 1:
            raise ValueError(f"minhash_dedup: threshold must be in (0, 1), got {threshold}")
        self.threshold, self.num_perm, self.ngram, self.unit = threshold, num_perm, ngram, unit
        self.field, self.seed, self.progress = field, seed, progress

    def __call__(self, records):
        datasketch = require("datasketch", "curation", "MinHash dedup")
        MinHash, MinHashLSH = datasketch.MinHash, datasketch.MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        kept: dict[int, Any] = {}
        keep = []
        chunk = 2000
        bar = tqdm(total=len(records), desc="minhash", unit="rec", disable=not self.progress, leave=False)
        for lo in range(0, len(records), chunk):
            batch = [shingles(field_text(r, self.field), self.ngram, self.unit) for r in records[lo : lo + chunk]]
            for j, m in enumerate(MinHash.bulk(batch, num_perm=self.num_perm, seed=self.seed)):
                dup = any(m.jaccard(kept[k]) >= self.threshold for k in lsh.query(m))
                keep.append(not dup)
                if not dup:
                    lsh.insert(lo + j, m)
                    kept[lo + j] = m
            bar.update(len(batch))
        bar.close()
        return torch.tensor(keep, dtype=torch.bool)


class SemanticDedup(Filter):
    name = "semantic_dedup"

    def __init__(self, embed: dict[str, Any] | None = None, clusters: int = 100, eps: float = 0.05,
                 iterations: int = 20, seed: int = 0) -> None:
        """
        Args:
            embed: embedder spec (default ``{name: minilm}``), see `esft.curation.embedders`.
            clusters: k-means clusters (capped at the number of records).
            eps: records with cosine similarity above ``1 - eps`` to a kept record of their
                cluster are duplicates.
            iterations: k-means iterations.
            seed: k-means initialisation seed.
        """
        from esft.curation.embedders import build_embedder

        self.embedder = build_embedder(embed or {"name": "minilm"})
        self.clusters, self.eps, self.iterations, self.seed = clusters, eps, iterations, seed

    def __call__(self, records):
        return semantic_duplicates(self.embedder(records), self.clusters, self.eps, self.iterations, self.seed)


def semantic_duplicates(x: torch.Tensor, clusters: int, eps: float, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """SemDeDup on unit vectors ``[N, D]``: the keep mask. Within each k-means cluster, members
    are visited least central first; each kept one removes the later members with cosine above
    ``1 - eps`` to it."""
    from esft.curation.selectors import kmeans

    centroids, assign = kmeans(x, min(clusters, x.shape[0]), iterations, seed)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    for c in range(centroids.shape[0]):
        members = (assign == c).nonzero().flatten()
        if len(members) < 2:
            continue
        members = members[torch.sort(x[members] @ centroids[c], stable=True).indices]  # least central first
        sim = x[members] @ x[members].T
        dup = torch.zeros(len(members), dtype=torch.bool)
        for i in range(len(members)):
            if not dup[i]:
                dup[i + 1 :] |= sim[i, i + 1 :] > 1 - eps
        keep[members[dup]] = False
    return keep


class ScoreFilter(Filter):
    name = "score"

    def __init__(self, score: dict[str, Any], min: float | None = None, max: float | None = None) -> None:
        """
        Args:
            score: scorer spec, e.g. ``{name: verifier}`` (see `esft.curation.scorers`).
            min, max: inclusive bounds on the score; NaN scores are dropped.
        """
        from esft.curation.scorers import build_scorer

        self.scorer = build_scorer(score)
        self.min, self.max = min, max

    def __call__(self, records):
        s = self.scorer(records)
        return _within(s, self.min, self.max) & ~s.isnan()


FILTERS: dict[str, type[Filter]] = {
    cls.name: cls for cls in (LengthFilter, DegenerateFilter, FormatFilter, Decontaminate, ExactDedup, MinHashDedup,
                              SemanticDedup, ScoreFilter)
}
