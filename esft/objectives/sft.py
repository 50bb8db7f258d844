"""Supervised fine-tuning: masked next-token cross-entropy on packed batches.

    esft fit --config configs/sft/quickstart.yaml

Logs ``train/loss`` and ``train/token_acc`` per optimizer step, ``val/loss`` and ``val/token_acc``
(and ``val/<source>/...`` per source of a mixture) per validation. Token accuracy is the share of
trained tokens whose argmax prediction is the label, counted on the logits the loss computes
(`esft.losses.ce.correct_predictions`); it is not logged with ``loss_impl: liger``, whose fused
kernel forms no logits.

With ``router_aux_loss_coef`` > 0 (MoE models) the training loss adds that multiple of the routers'
load-balancing loss (`esft.models.moe.RouterBalance`, DeepSeek-V2's expert-level balance loss,
mean over the sparse layers; 1.0 = uniform routing), logged as ``train/router_balance``;
``train/loss`` stays the cross-entropy alone, comparable with ``val/loss``. Without it a small MoE
trained from scratch can route almost every token to one expert per layer.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from esft.models.moe import RouterBalance
from esft.objectives.base import CausalLMModule


def token_accuracy(name: str, correct: torch.Tensor | None, denominator: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: correct / denominator}``, or nothing where the loss formed no logits (`correct` None)."""
    return {} if correct is None else {name: correct / denominator}


class SFTModule(CausalLMModule):
    """SFT: the loss of an optimizer step is the mean over all of its trained (non-masked)
    tokens, across gradient-accumulation micro-batches and ranks (`step_denominator`); token
    accuracy is weighted the same way (all correct tokens / all trained tokens of the step)."""

    def __init__(self, router_aux_loss_coef: float = 0.0, **kwargs: Any) -> None:
        """
        Args:
            router_aux_loss_coef: weight of the MoE routers' load-balancing loss (0: off; the
                Switch Transformer used 1e-2, DeepSeek-V2 3e-3 for its expert-level term).
        """
        super().__init__(**kwargs)
        if router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {router_aux_loss_coef}")
        # the routers' hooks record only inside `capture`, i.e. in training steps
        self.router_balance = None
        if router_aux_loss_coef > 0:
            try:
                self.router_balance = RouterBalance(self.model)
            except ValueError as e:
                raise ValueError(f"model option router_aux_loss_coef needs an MoE model: {e}") from None

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        balance = self.router_balance
        with balance.capture(batch.get("attention_mask")) if balance else nullcontext():
            loss_sum, count, correct = self.token_loss(batch, return_correct=True)
        n = self.step_denominator(batch, count)
        loss = loss_sum / n
        values = {"train/loss": loss, **token_accuracy("train/token_acc", correct, n)}
        if balance is not None:
            values["train/router_balance"] = balance.loss()
            loss = loss + self.hparams.router_aux_loss_coef * values["train/router_balance"]
        self.log_step(**values)
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
