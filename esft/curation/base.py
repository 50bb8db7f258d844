"""Shared pieces of curation: record text views, content hashing, the on-disk cache of scores and
embeddings, token lengths, and budgets.

Every part of a curation pipeline sees records in the project's schema
(``{"messages": [...], "task"?, "answer"?, ...}``, see `esft.data.records`):

- a Filter maps records to a keep mask (``Filter(records) -> mask``),
- a Scorer maps records to one float each (``Scorer(records) -> scores``),
- an Embedder maps records to unit vectors (``Embedder(records) -> vectors``),
- a Selector maps scores, vectors and a `Budget` to indices (``Selector(scores, vectors, budget)``).

Scorers and embedders are cached on disk, keyed by a hash of the records' content and of the
part's configuration, so a second pipeline that only changes its selector does not rescore.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "ESFT_CACHE"


# ---- text views of a record -----------------------------------------------------------------
def prompt_text(record: dict[str, Any]) -> str:
    """Every non-assistant turn up to the last assistant turn, joined by newlines."""
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "\n".join(m["content"] for m in messages[:last] if m["role"] != "assistant")


def response_text(record: dict[str, Any]) -> str:
    """The last assistant turn (the response that is trained on and verified)."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")


def record_text(record: dict[str, Any]) -> str:
    """The whole conversation as plain text (one turn per line)."""
    return "\n".join(m["content"] for m in record["messages"])


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the text dedup and decontamination compare. Punctuation
    stays: in math and code it carries meaning (``6 + 2`` is not ``6 - 2``)."""
    return " ".join(text.lower().split())


def field_text(record: dict[str, Any], field: str) -> str:
    """``prompt``, ``response`` or ``all`` (the whole conversation)."""
    if field == "prompt":
        return prompt_text(record)
    if field == "response":
        return response_text(record)
    if field == "all":
        return record_text(record)
    raise ValueError(f"unknown text field {field!r}; expected prompt, response or all")


# ---- hashing and the cache --------------------------------------------------------------------
def records_hash(records: list[dict[str, Any]]) -> str:
    """A content hash of the records (messages, task and answer; ids and sources do not count)."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(json.dumps([r["messages"], r.get("task"), r.get("answer")], sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def cache_dir(path: str | None = None) -> Path:
    """`path`, else ``$ESFT_CACHE/curation``, else ``~/.cache/esft/curation``."""
    if path:
        return Path(path).expanduser()
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() / "curation" if root else Path.home() / ".cache" / "esft" / "curation"


class Cached:
    """Base of scorers and embedders: ``part(records)`` computes `compute(records)` once per
    (records content, configuration) and keeps the tensor under `cache_dir`.

    Subclasses set `name`, implement `compute` and `config` (what changes the output; the cache
    key). ``cache: false`` turns the cache off; `calls` counts real computations (tests use it).
    """

    name: str = ""

    def __init__(self, cache: bool = True, cache_dir: str | None = None) -> None:
        self.cache = cache
        self.cache_dir = cache_dir
        self.calls = 0

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def compute(self, records: list[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError

    def cache_path(self, records: list[dict[str, Any]]) -> Path:
        key = f"{self.name}-{config_hash({'name': self.name, **self.config()})}-{records_hash(records)}.pt"
        return cache_dir(self.cache_dir) / key

    def __call__(self, records: list[dict[str, Any]]) -> torch.Tensor:
        path = self.cache_path(records) if self.cache else None
        if path is not None and path.exists():
            return torch.load(path)
        self.calls += 1
        out = self.compute(records)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(out, tmp)
            os.replace(tmp, path)
        return out


def build_part(registry: dict[str, type], spec: dict[str, Any] | str, what: str) -> Any:
    """``registry[name](**options)`` from a spec ``{"name": ..., **options}`` (or just a name)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(registry)}")
    return registry[name](**spec)


# ---- token lengths and budgets ----------------------------------------------------------------
def token_lengths(records: list[dict[str, Any]], tokenizer: Any, batch_size: int = 2000) -> torch.Tensor:
    """Tokens of each record rendered with the tokenizer's chat template (what packing counts)."""
    out: list[int] = []
    for lo in range(0, len(records), batch_size):
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records[lo : lo + batch_size]]
        out.extend(len(ids) for ids in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    return torch.tensor(out, dtype=torch.long)


@dataclass
class Budget:
    """How much a selector may keep: `examples` and/or `tokens` (None: no limit on that axis);
    `lengths` are the candidates' token counts (needed for a token budget)."""

    examples: int | None = None
    tokens: int | None = None
    lengths: torch.Tensor | None = None

    def take(self, order: torch.Tensor | list[int]) -> torch.Tensor:
        """The longest run of `order` (a priority ranking) that fits: candidates are taken in
        order; one that would overflow the token budget is skipped and later, shorter ones may
        still fit; stops at the example budget."""
        order = torch.as_tensor(order, dtype=torch.long)
        if self.tokens is not None:
            if self.lengths is None:
                raise ValueError("a token budget needs the candidates' token lengths")
            lengths = self.lengths[order]
            if int(lengths.sum()) > self.tokens:
                keep, used = [], 0
                for i, n in zip(order.tolist(), lengths.tolist()):
                    if used + n <= self.tokens:
                        keep.append(i)
                        used += n
                        if self.examples is not None and len(keep) >= self.examples:
                            break
                order = torch.tensor(keep, dtype=torch.long)
        if self.examples is not None:
            order = order[: self.examples]
        return order

    def target(self, pool: int) -> int:
        """An upper bound on how many candidates the selector needs to rank."""
        return pool if self.examples is None or self.tokens is not None else min(pool, self.examples)


def resolve_amount(value: float | int | None, total: int, what: str) -> int | None:
    """A budget given as a fraction (a float in (0, 1]) of `total` or an absolute count (an int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{what} must be a positive count or a fraction in (0, 1], got {value!r}")
    if isinstance(value, float):
        if value > 1:
            raise ValueError(f"{what}={value}: a float budget is a fraction in (0, 1]; give a count as an int")
        return max(1, round(value * total))
    return int(value)
