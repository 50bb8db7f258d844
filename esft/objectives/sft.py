"""Supervised fine-tuning: masked next-token cross-entropy on packed batches.

    esft fit --config configs/sft/quickstart.yaml

Logs ``train/loss`` and ``train/token_acc`` per optimizer step, ``val/loss`` and ``val/token_acc``
(and ``val/<source>/...`` per source of a mixture) per validation. Token accuracy is the share of
trained tokens whose argmax prediction is the label, counted on the logits the loss computes
(`esft.losses.ce.correct_predictions`); it is not logged with ``loss_impl: liger``, whose fused
kernel forms no logits.
"""

from __future__ import annotations

from typing import Any

import torch

from esft.objectives.base import CausalLMModule


def token_accuracy(name: str, correct: torch.Tensor | None, denominator: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: correct / denominator}``, or nothing where the loss formed no logits (`correct` None)."""
    return {} if correct is None else {name: correct / denominator}


class SFTModule(CausalLMModule):
    """SFT: the loss of an optimizer step is the mean over all of its trained (non-masked)
    tokens, across gradient-accumulation micro-batches and ranks (`step_denominator`); token
    accuracy is weighted the same way (all correct tokens / all trained tokens of the step)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss_sum, count, correct = self.token_loss(batch, return_correct=True)
        n = self.step_denominator(batch, count)
        loss = loss_sum / n
        self.log_step(**{"train/loss": loss, **token_accuracy("train/token_acc", correct, n)})
        return loss

    def _eval_loss(self, batch: dict[str, Any], split: str) -> None:
        loss_sum, count, correct = self.token_loss(batch, return_correct=True)
        n = count.clamp(min=1)
        values = {"loss": loss_sum / n, **token_accuracy("token_acc", correct, n)}
        # a mixture's validation batches hold one source each: also <split>/<source>/<metric>
        prefixes = [split] + ([f"{split}/{batch['source']}"] if "source" in batch else [])
        for prefix in prefixes:
            for metric, value in values.items():
                # weighting by the token count makes the epoch value the exact mean over the split's tokens
                self.log(f"{prefix}/{metric}", value, prog_bar=prefix == split and metric == "loss",
                         batch_size=int(count), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, "test")
