"""PromptDataModule: prompts (with what their rewards need) for RL, from built-in tasks or a file.

A batch is a list of records; the trained model completes ``record["messages"]`` minus a final
assistant turn (the reference, kept for the verifier). Held-out records of built-in tasks make
the validation set, on which `esft.objectives.GRPOModule` reports greedy pass@1 and format rate.

    esft fit --config configs/grpo/arithmetic_tiny.yaml --data.init_args.path prompts.jsonl
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from esft.data.records import Format, load_records
from esft.data.tasks import TaskSpec, build_task
from esft.models.tokenizer import BUILTIN


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation to complete: the record's messages without a trailing assistant turn."""
    messages = record["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def _identity(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str = BUILTIN,
        format: Format = "auto",
        tasks: list[TaskSpec] | None = None,
        num_train_per_task: int = 2000,
        num_val_per_task: int = 100,
        val_path: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int = 100,
        tokenizer_name: str | None = None,
    ) -> None:
        """
        Args:
            path: a prompt file (any format of `esft.data.records`; rows keep their ``task`` and
                ``answer`` for the accuracy reward) or ``builtin`` for the built-in tasks.
            format: record format of `path`; ``auto`` detects it per row.
            tasks: built-in tasks when ``path: builtin``: names, or mappings of a ``name`` and
                options (``{name: arithmetic, think: true}``).
            num_train_per_task: built-in training prompts per task.
            num_val_per_task: built-in held-out prompts per task (0: no validation).
            val_path: a held-out prompt file (instead of built-in held-out prompts).
            seed: seeds the built-in prompts and the shuffle of every epoch.
            batch_size: prompts per training step (each sampled ``num_generations`` times).
            val_batch_size: prompts generated together in validation.
            tokenizer_name: unused; accepted so the CLI's tokenizer link applies to every DataModule.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tasks = tasks if tasks is not None else [{"name": "arithmetic", "think": True}]
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        hp = self.hparams
        if hp.path == BUILTIN:
            tasks = [build_task(spec) for spec in self.tasks]
            self.train_records = [r for t in tasks for r in t.generate(hp.num_train_per_task, hp.seed, "train")]
            if hp.num_val_per_task > 0 and hp.val_path is None:
                self.val_records = [r for t in tasks for r in t.generate(hp.num_val_per_task, hp.seed, "heldout")]
        else:
            self.train_records = load_records(hp.path, hp.format)[0]
        if hp.val_path is not None:
            self.val_records = load_records(hp.val_path, hp.format)[0]
        random.Random(hp.seed).shuffle(self.train_records)

    def train_dataloader(self) -> DataLoader:
        import torch

        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_records, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          collate_fn=_identity, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_records:
            return []
        return DataLoader(self.val_records, batch_size=self.hparams.val_batch_size, collate_fn=_identity)
