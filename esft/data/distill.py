"""DistillDataModule: `SFTDataModule` plus what distillation needs from the data.

- ``teacher_cache``: a file from `esft distill-data topk` (`esft.data.teacher_cache`); training
  batches then carry the teacher's cached top-k log-probs for every trained token
  (``teacher_topk_ids`` / ``teacher_topk_logprobs``, ``[trained tokens, k]``), and
  `esft.objectives.DistillModule` trains without a teacher in memory.
- The prompt of every training document, for on-policy distillation: `packed_prompts` reads the
  prompts of a packed batch as token ids and `prompt_conversation` maps them back to the record's
  messages, which `esft.evaluation.rollout` completes with the student.

    esft fit --config configs/distill/cached.yaml
"""

from __future__ import annotations

from functools import partial
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from esft.data.datamodule import SFTDataModule
from esft.data.packing import Collate
from esft.data.teacher_cache import TeacherCache, collate_with_teacher_cache
from esft.losses.ce import IGNORE_INDEX


def first_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns before the first assistant turn (the prompt an on-policy rollout completes)."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return messages[:i]
    return messages


def packed_prompts(batch: dict[str, Any]) -> list[list[int]]:
    """Token ids before the first trained label of every document of a packed batch (documents
    start where ``position_ids`` is 0; filler documents, with no trained label, are skipped)."""
    ids, labels, positions = (batch[k].reshape(-1).tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    prompts = []
    for lo, hi in zip(starts, starts[1:]):
        trained = [j for j in range(lo, hi) if labels[j] != IGNORE_INDEX]
        if trained:
            prompts.append(ids[lo : trained[0]])
    return prompts


class DistillDataModule(SFTDataModule):
    """`SFTDataModule` that keeps the training records (`to_examples`: the prompts of on-policy
    distillation, hence in memory, not in the example cache) and attaches the teacher cache to
    every training batch (`collate`)."""

    def __init__(self, teacher_cache: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            teacher_cache: a teacher top-k cache built from this very data (``esft distill-data
                topk`` with the same data options); attached to every training batch.
            **kwargs: `SFTDataModule`'s options.
        """
        super().__init__(**kwargs)
        self.teacher_cache = teacher_cache
        self.cache: TeacherCache | None = None
        self._train_records: list[dict[str, Any]] = []
        self._prompts: dict[tuple[int, ...], list[dict[str, str]]] | None = None

    def to_examples(self, records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        if label == "train":
            self._train_records = records
        return super().to_examples(records, label)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.teacher_cache and self.cache is None:
            cache = TeacherCache(self.teacher_cache)
            cache.check(self.train_examples)
            for i, e in enumerate(self.train_examples):
                e["cache_index"] = i
            self.cache = cache
            rank_zero_info(f"[data] teacher cache {cache.path}: top-{cache.k} log-probs at temperature "
                           f"{cache.temperature} of {cache.teacher} for {len(cache.ids)} trained tokens")

    def collate(self, units: list[list[int]], per_batch: int) -> Collate:
        collate = super().collate(units, per_batch)
        return collate if self.cache is None else partial(collate_with_teacher_cache, collate=collate, cache=self.cache)

    def prompt_conversation(self, prompt_ids: list[int]) -> list[dict[str, str]]:
        """The training record's messages whose rendered prompt is `prompt_ids`."""
        if self._prompts is None:
            conversations = [first_prompt(r["messages"]) for r in self._train_records]
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            self._prompts = {tuple(ids): c for ids, c in zip(encoded, conversations)}
        conversation = self._prompts.get(tuple(prompt_ids))
        if conversation is None:
            raise KeyError(
                f"no training record renders to the prompt {prompt_ids[:12]}... ({len(prompt_ids)} tokens); on-policy "
                "distillation needs prompt-masked data (train_on: assistant) from this data module"
            )
        return conversation
