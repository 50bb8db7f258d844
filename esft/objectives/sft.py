"""Supervised fine-tuning: masked next-token cross-entropy on packed batches.

    esft fit --config configs/sft/quickstart.yaml
"""

from __future__ import annotations

from typing import Any

from esft.objectives.base import CausalLMModule


class SFTModule(CausalLMModule):
    """SFT: the loss of an optimizer step is the mean over all of its trained (non-masked)
    tokens, across gradient-accumulation micro-batches and ranks (`step_denominator`)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss_sum, count = self.token_loss(batch)
        loss = loss_sum / self.step_denominator(batch, count)
        self.log_step(**{"train/loss": loss})
        return loss

    def _eval_loss(self, batch: dict[str, Any], name: str) -> None:
        loss_sum, count = self.token_loss(batch)
        loss = loss_sum / count.clamp(min=1)
        # weighting by the token count makes the epoch value the exact mean over the split's tokens
        self.log(name, loss, prog_bar=True, batch_size=int(count), sync_dist=True)
        if "source" in batch:  # a mixture's validation batches hold one source each: val/<source>/loss
            split, metric = name.split("/", 1)
            self.log(f"{split}/{batch['source']}/{metric}", loss, batch_size=int(count), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, "val/loss")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, "test/loss")
