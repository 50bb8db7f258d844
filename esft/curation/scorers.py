"""Scorers: ``Scorer(records) -> scores`` (a float tensor ``[N]``), cached on disk (`Cached`).

- `LengthScorer`: length of the response (or prompt / whole record) in characters, words or tokens;
  top-k by it is the "Long Is More" baseline (Zhao et al. 2024).
- `PerplexityScorer`: perplexity of the response under a reference causal LM.
- `IFDScorer`: Instruction-Following Difficulty (Li et al. 2023, "From Quantity to Quality",
  Cherry LLM; Superfiltering, Li et al. 2024, computes it with a small model):
  ``IFD = L(A | Q) / L(A)``, where ``L`` is the **mean per-token cross-entropy** of the answer
  tokens (the conditioned loss with the instruction in the prompt, the unconditioned loss with
  an empty user turn). The ratio of mean losses is the papers' definition; a ratio of
  perplexities, ``exp(L(A|Q)) / exp(L(A))``, would be ``exp(L(A|Q) - L(A))``: a function of the
  loss *difference*, which does not normalise away how predictable the answer is on its own
  (a short, generic answer and a long, specific one with the same absolute gain get the same
  score), so it ranks differently. IFD near or above 1 means the instruction does not help
  predict the answer (the papers drop IFD > 1 as misaligned pairs). Departure: a multi-turn
  record is scored on its last assistant turn, with every earlier turn as the instruction.
- `VerifierScorer`: the built-in task's verifier on the record's response, for records that
  carry a ``task`` (and the reference ``answer`` the verifier compares with).

Build one from a spec: ``build_scorer({"name": "ifd", "model_name_or_path": "runs/x/hf"})``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from esft.curation.base import Cached, build_part, field_text, prompt_text, response_text, token_lengths
from esft.curation.lm import LMPart


class Scorer(Cached):
    """Higher is "more" of what the name says (longer, more perplexing, harder, more correct)."""


class LengthScorer(Scorer):
    name = "length"

    def __init__(self, field: Literal["prompt", "response", "all"] = "response",
                 unit: Literal["chars", "words", "tokens"] = "chars", tokenizer: str = "builtin", **cache: Any) -> None:
        """
        Args:
            field: which text is measured.
            unit: ``chars``, ``words`` (whitespace-separated) or ``tokens`` (the whole record under
                `tokenizer`'s chat template, whatever `field` says).
            tokenizer: tokenizer for ``unit: tokens``.
        """
        super().__init__(**cache)
        self.field, self.unit, self.tokenizer = field, unit, tokenizer

    def config(self):
        return {"field": self.field, "unit": self.unit, "tokenizer": self.tokenizer if self.unit == "tokens" else None}

    def compute(self, records):
        if self.unit == "tokens":
            from esft.models.tokenizer import load_tokenizer

            return token_lengths(records, load_tokenizer(self.tokenizer)).float()
        texts = [field_text(r, self.field) for r in records]
        return torch.tensor([float(len(t) if self.unit == "chars" else len(t.split())) for t in texts])


def single_turn(record: dict[str, Any], instruction: bool = True) -> dict[str, Any]:
    """The record as one user turn (every turn before the last assistant one, or empty when
    `instruction` is False) and its last assistant turn."""
    return {"messages": [{"role": "user", "content": prompt_text(record) if instruction else ""},
                         {"role": "assistant", "content": response_text(record)}]}


class PerplexityScorer(LMPart, Scorer):
    name = "perplexity"

    def compute(self, records):
        return self.run([single_turn(r) for r in records], "loss", desc="perplexity").exp()


class IFDScorer(LMPart, Scorer):
    name = "ifd"

    def compute(self, records):
        conditioned = self.run([single_turn(r) for r in records], "loss", desc="ifd: L(A|Q)")
        alone = self.run([single_turn(r, instruction=False) for r in records], "loss", desc="ifd: L(A)")
        return conditioned / alone


class VerifierScorer(Scorer):
    name = "verifier"

    def __init__(self, task_options: dict[str, dict[str, Any]] | None = None, missing: float | None = None,
                 **cache: Any) -> None:
        """
        Args:
            task_options: constructor options per built-in task name (if its verifier needs them).
            missing: score of a record without a known ``task``; None makes such a record an error.
        """
        super().__init__(**cache)
        self.task_options, self.missing = task_options or {}, missing

    def config(self):
        return {"task_options": self.task_options, "missing": self.missing}

    def compute(self, records):
        from esft.data.tasks import TASKS, get_task

        tasks: dict[str, Any] = {}
        out = []
        for i, r in enumerate(records):
            name = r.get("task")
            if name not in TASKS:
                if self.missing is None:
                    raise ValueError(f"verifier scorer: record {r.get('id', i)} has task {name!r}, not a built-in task "
                                     f"({', '.join(sorted(TASKS))}); set `missing` to score such records")
                out.append(float(self.missing))
                continue
            if name not in tasks:
                tasks[name] = get_task(name, **self.task_options.get(name, {}))
            out.append(float(tasks[name].score(r, response_text(r))))
        return torch.tensor(out)


SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (LengthScorer, PerplexityScorer, IFDScorer, VerifierScorer)}


def build_scorer(spec: dict[str, Any] | str) -> Scorer:
    """A scorer from ``{"name": ..., **options}`` (or just its name)."""
    return build_part(SCORERS, spec, "scorer")
