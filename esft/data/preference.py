"""PreferenceDataModule: prompt + chosen + rejected rows -> tokenized pairs -> packed micro-batches.

    esft fit --config configs/preference/dpo_tiny.yaml

Rows (``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / hub id, read by `esft.data.records`):

- ``prompt`` (a string, or a list of ``{"role", "content"}`` turns: a conversation's shared
  history), ``chosen`` and ``rejected`` (strings: one assistant reply each; or turn lists);
  optional ``system``.
- The layout of the public binarised feedback sets: ``chosen`` / ``rejected`` are whole
  conversations that repeat the prompt (with or without a ``prompt`` field): the turns the two
  share form the history, the rest are the completions.
- KTO's unpaired rows (``loss_type: kto``): ``prompt``, ``completion`` (string or turns) and
  ``label`` (true: desirable, false: undesirable). One data set holds one kind of row. Each
  example becomes a pair whose second document is its prompt with the next example's completion
  (`kl_pairs`): the mismatched document of KTO's KL reference point. Departure: the paper draws the
  mismatched completions within the micro-batch; here they are fixed once, from the data order.

A bad row is an error naming its ``file:line`` and the field (or, under ``on_bad_record: skip``, a
counted skip). Built-in pairs (``path: builtin``): for every task record the verified reference
answer is chosen and a perturbed one that the task's verifier scores wrong is rejected
(`perturb`: ``num_edits`` characters of the final answer changed, digits to other digits; one edit
is the hardest pair).

Each pair becomes two documents, chosen then rejected, each the full prompt + completion (the
prompt is repeated, not shared: packing keeps the documents apart), trained on the completion's
tokens only. A pair never straddles micro-batches: pairs are packed best-fit into rows of
``2 * max_length`` tokens (``max_length`` bounds each document), ``max_tokens // (2 * max_length)``
rows to a micro-batch. Every batch carries ``doc_index`` (the ``cu_seqlens`` segment of each
document, chosen and rejected alternating) and ``step_tokens`` counts the *pairs* of the optimizer
step (the preference loss is a mean over pairs).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from esft.data.datamodule import SFTDataModule
from esft.data.packing import Collate, Layout, best_fit_decreasing, collate_packed, collate_padded, with_step_tokens
from esft.data.records import ROLES, DataFormatError, LoadStats, Record, _text, _turns, read_rows
from esft.data.tasks import build_task

_ROLE_MAP = {r: r for r in ROLES}
KINDS = {False: "preference", True: "kto"}


def _side(row: dict[str, Any], key: str, where: str) -> list[dict[str, str]]:
    value = row.get(key)
    if isinstance(value, str) or value is None:
        return [{"role": "assistant", "content": _text(row, key, where)}]
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: field {key!r} must be a string or a list of turns, got {type(value).__name__}")
    return _turns(row, key, "role", "content", _ROLE_MAP, where)


def _history(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The ``prompt`` field as turns (a string is one user turn); ``[]`` when absent."""
    prompt = row.get("prompt")
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": _text(row, "prompt", where)}]
    return _turns(row, "prompt", "role", "content", _ROLE_MAP, where)


def _with_system(row: dict[str, Any], history: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not any(m["role"] == "user" for m in history):
        raise DataFormatError(f"{where}: field 'prompt' is missing or has no user turn")
    system = _text(row, "system", where, required=False)
    if system.strip() and history[0]["role"] != "system":
        history.insert(0, {"role": "system", "content": system})
    return history


def to_pair(row: Any, where: str = "<row>") -> dict[str, Any]:
    """One preference row as ``{"history", "chosen", "rejected"}`` message lists (the completions
    start with an assistant turn), or a `DataFormatError` naming `where` and the field."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataFormatError(f"{where}: field {key!r} is missing (a preference row has prompt, chosen, rejected)")
    history = _history(row, where)
    chosen, rejected = _side(row, "chosen", where), _side(row, "rejected", where)
    for side in (chosen, rejected):  # whole conversations that repeat the prompt
        if history and side[: len(history)] == history:
            del side[: len(history)]
    if not history:  # no prompt field: the shared turns are the history
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        history, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    history = _with_system(row, history, where)
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0]["role"] != "assistant":
            raise DataFormatError(f"{where}: field {key!r} must continue the prompt with an assistant turn")
    return {"history": history, "chosen": chosen, "rejected": rejected}


def is_unpaired(row: Any) -> bool:
    """A KTO row: ``completion`` / ``label`` rather than ``chosen`` + ``rejected``."""
    return isinstance(row, dict) and ("label" in row or "completion" in row) and not {"chosen", "rejected"} & set(row)


def to_unpaired(row: Any, where: str = "<row>") -> dict[str, Any]:
    """One KTO row (``prompt``, ``completion``: a string or turns, ``label``: true for a desirable
    completion) as ``{"history", "completion", "desirable"}``, or a `DataFormatError`."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(row).__name__}")
    if "completion" not in row:
        raise DataFormatError(f"{where}: field 'completion' is missing (a KTO row has prompt, completion, label)")
    label = row.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataFormatError(f"{where}: field 'label' must be true (desirable) or false, got {label!r}")
    history, completion = _history(row, where), _side(row, "completion", where)
    if history and completion[: len(history)] == history:
        del completion[: len(history)]
    history = _with_system(row, history, where)
    if not completion or completion[0]["role"] != "assistant":
        raise DataFormatError(f"{where}: field 'completion' must continue the prompt with an assistant turn")
    return {"history": history, "completion": completion, "desirable": bool(label)}


def kl_pairs(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO examples as pairs for the pair machinery: the example itself, then its prompt with the
    next example's completion (a mismatched document, for KTO's KL reference point)."""
    if len(examples) < 2:
        raise DataFormatError("KTO needs at least 2 examples (the KL estimate pairs a prompt with another completion)")
    return [Record({"history": e["history"], "chosen": e["completion"], "desirable": e["desirable"],
                    "rejected": examples[(i + 1) % len(examples)]["completion"]}, origin=getattr(e, "origin", None))
            for i, e in enumerate(examples)]


def perturb(text: str, rng: random.Random, num_edits: int = 1) -> str:
    """`text` with `num_edits` characters of its final answer (after the last ``</think>``) changed:
    digits to other digits where it has digits, else letters to other letters."""
    head, sep, answer = text.rpartition("</think>")
    pool = "0123456789" if any(c.isdigit() for c in answer) else "abcdefghijklmnopqrstuvwxyz"
    spots = [i for i, c in enumerate(answer) if c in pool]
    if not spots:
        return text + pool[rng.randrange(len(pool))]
    chars = list(answer)
    for i in rng.sample(spots, min(num_edits, len(spots))):
        chars[i] = rng.choice([c for c in pool if c != chars[i]])
    return head + sep + "".join(chars)


def task_pairs(spec, n: int, seed: int, split: str, num_edits: int = 1) -> list[dict[str, Any]]:
    """`n` built-in pairs of a task: the reference answer chosen, a perturbed one the verifier
    scores below 1 rejected."""
    task, rng = build_task(spec), random.Random(f"pairs:{seed}:{split}")
    pairs = []
    for record in task.generate(n, seed, split):
        answer = record["messages"][-1]["content"]
        for _ in range(20):
            wrong = perturb(answer, rng, num_edits)
            if task.score(record, wrong) < 1.0:
                break
        pairs.append({"history": record["messages"][:-1], "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": wrong}], "task": task.name})
    return pairs


def pair_documents(rows: list[list[dict[str, Any]]], batch: dict[str, Any], layout: Layout | None) -> torch.Tensor:
    """The document index (``cu_seqlens`` segment, or row of a padded batch) of every example of
    `rows`, in order: fillers are skipped."""
    if "cu_seqlens" not in batch or "attention_mask" in batch:
        return torch.arange(sum(len(r) for r in rows))
    width, starts, offset = batch["input_ids"].shape[1], [], 0
    for r, row in enumerate(rows):
        offset = r * width if layout == "rows" else offset
        for e in row:
            starts.append(offset)
            offset += e["length"]
    cu = batch["cu_seqlens"]
    return torch.searchsorted(cu[:-1].contiguous(), torch.tensor(starts, dtype=cu.dtype))


def collate_pairs(rows, collate, layout: Layout | None) -> dict[str, Any]:
    """`collate` plus ``doc_index`` and, where every example holds one (a precomputed reference,
    `esft.objectives.PreferenceModule`), ``ref_logps`` ``[documents]`` in the same order."""
    batch = with_step_tokens(rows, collate)
    batch["doc_index"] = pair_documents(rows, batch, layout)
    examples = [e for row in rows for e in row]
    if all("ref_logp" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logp"] for e in examples], dtype=torch.float32)
    if examples and "desirable" in examples[0]:  # KTO: the label of each pair's first document
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples[::2]])
    return batch


class PreferenceDataModule(SFTDataModule):
    """`SFTDataModule`'s stages over pairs: records are pairs (`task_records`, `read_records`),
    examples their documents (`to_examples`), units whole pairs (`units`, `unit_counts`,
    `row_length`, `collate`)."""

    def __init__(self, num_edits: int = 1, **kwargs: Any) -> None:
        """
        Args:
            num_edits: built-in pairs: characters of the rejected answer changed (1: hardest).
            **kwargs: `SFTDataModule`'s options; `max_length` bounds each document of a pair, and
                `max_tokens` must hold at least one pair row (``2 * max_length``). Curation,
                curricula and fixed-shape batches (``pad_to_budget``) do not apply to pairs.
        """
        super().__init__(**kwargs)
        if self.hp.packing and self.hp.max_tokens < 2 * self.hp.max_length:
            raise ValueError(f"max_tokens ({self.hp.max_tokens}) must hold a pair: at least 2 * max_length "
                             f"({2 * self.hp.max_length})")
        if self.hp.curation or self.hp.curriculum or self.hp.pad_to_budget:
            raise ValueError("PreferenceDataModule does not take curation, curriculum or pad_to_budget")
        self.num_edits = num_edits
        self.unpaired: bool | None = None  # KTO rows (completion + label); known once a file is read

    def task_records(self, split: str, n: int) -> list[dict[str, Any]]:
        """`n` built-in pairs of every task (`task_pairs`)."""
        return [p for spec in self.tasks for p in task_pairs(spec, n, self.hp.seed, split, self.num_edits)]

    def read_records(self, source: str, split: str) -> list[dict[str, Any]]:
        """The pairs of one source (KTO rows become `kl_pairs`); a bad row raises or is counted."""
        stats, pairs = LoadStats(), []
        for where, row in read_rows(source, split=split, name=self.hp.name):
            stats.read += 1
            try:
                unpaired = is_unpaired(row)
                if self.unpaired is not None and unpaired != self.unpaired:
                    raise DataFormatError(f"{where}: a {KINDS[unpaired]} row among {KINDS[self.unpaired]} rows "
                                          "(the data holds one kind)")
                self.unpaired = unpaired
                pairs.append(Record((to_unpaired if unpaired else to_pair)(row, where), origin=where))
            except DataFormatError as e:
                if self.hp.on_bad_record == "error":
                    raise
                stats.skip(e)
        stats.formats[KINDS[bool(self.unpaired)]] = len(pairs)
        self.report_load(source, stats)
        if not pairs:
            raise DataFormatError(f"{source}: no usable preference rows ({stats.read} read, {stats.num_skipped} skipped)")
        return kl_pairs(pairs) if self.unpaired else pairs

    def to_examples(self, pairs: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        """Chosen and rejected documents alternating; a pair that lost either is dropped whole."""
        records = [Record({"messages": p["history"] + p[side], "train_from_turn": len(p["history"]), "pair": i},
                          origin=getattr(p, "origin", None))
                   for i, p in enumerate(pairs) for side in ("chosen", "rejected")]
        examples = super().to_examples(records, label)
        by_pair: dict[int, list[dict[str, Any]]] = {}
        for e in examples:
            by_pair.setdefault(e["pair"], []).append(e)
            if "desirable" in pairs[e["pair"]]:
                e["desirable"] = pairs[e["pair"]]["desirable"]
        return [e for i in sorted(by_pair) if len(by_pair[i]) == 2 for e in by_pair[i]]

    def units(self, examples: Sequence[dict[str, Any]]) -> tuple[list[list[int]], int]:
        """Whole pairs: packed best-fit into rows of `row_length`, or `batch_size` pairs unpacked."""
        pairs = len(examples) // 2
        if not self.hp.packing:
            return [[2 * i, 2 * i + 1] for i in range(pairs)], self.hp.batch_size
        lengths = [examples[2 * i]["length"] + examples[2 * i + 1]["length"] for i in range(pairs)]
        rows = best_fit_decreasing(lengths, self.row_length())
        return [[j for i in row for j in (2 * i, 2 * i + 1)] for row in rows], self.hp.max_tokens // self.row_length()

    def row_length(self) -> int:
        return 2 * self.hp.max_length  # a row holds whole pairs

    def unit_counts(self, examples: Sequence[dict[str, Any]], units: list[list[int]]) -> list[int]:
        return [len(unit) // 2 for unit in units]  # pairs: the loss is a mean over an optimizer step's pairs

    def collate(self, units: list[list[int]], per_batch: int) -> Collate:
        """Packed or padded pairs with ``doc_index`` (`collate_pairs`); never fixed shapes."""
        if not self.hp.packing:
            return partial(collate_pairs, collate=partial(collate_padded, pad_token_id=self.tokenizer.pad_token_id),
                           layout=None)
        layout = self.batch_layout()
        return partial(collate_pairs, collate=partial(collate_packed, layout=layout), layout=layout)

    def predict_dataloader(self):
        raise ValueError("esft predict generates for SFT records (messages); "
                         "PreferenceDataModule holds preference pairs")
