"""Stop (or skip) on a non-finite loss or gradient, naming the step and the last good checkpoint.

    trainer:
      callbacks:
        - class_path: esft.callbacks.NonFiniteGuard
          init_args: {action: stop}      # or skip: drop that optimizer step and go on

The check runs after the backward pass (gradients all-reduced under DDP; under FSDP/ZeRO each
rank checks its shard and the ranks agree through the strategy), before the optimizer step, so a
bad step never reaches the weights. ``skip`` clears the gradients, so the optimizer leaves every
parameter and its state untouched for that step (the schedule still advances); after
`max_skips` skips in a row it stops anyway. Under ``16-mixed`` the loss scaler already skips
steps whose gradients overflow, so only the loss is checked there.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        """
        Args:
            action: ``stop`` raises with the step and the last checkpoint to resume from;
                ``skip`` drops the step's update and continues.
            max_skips: consecutive skipped steps after which ``skip`` stops too.
        """
        self.action = action
        self.max_skips = max_skips
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._loss_finite = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.skipped_total:
            pl_module.log("guard/skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False, batch_size=1)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16 loss scaling: inf gradients are overflow, and the scaler skips those steps itself
        local_ok = self._loss_finite and all(bool(torch.isfinite(g).all()) for g in grads)
        ok = trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        if ok:
            self.skipped_in_a_row = 0
            return
        step = trainer.global_step + 1
        what = "loss" if not self._loss_finite else "gradient"
        if self.action == "skip" and self.skipped_in_a_row < self.max_skips:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            rank_zero_warn(f"[guard] non-finite {what} at step {step}: update skipped ({self.skipped_total} so far)")
            optimizer.zero_grad(set_to_none=True)
            return
        raise NonFiniteError(f"non-finite {what} at step {step}{self._in_a_row()}; last good checkpoint: {self._last_checkpoint(trainer)}")

    def _in_a_row(self) -> str:
        return f" after {self.skipped_in_a_row} skipped steps in a row" if self.skipped_in_a_row else ""

    @staticmethod
    def _last_checkpoint(trainer) -> str:
        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") if callback else ""
        return f"{path} (resume with --ckpt_path {path})" if path else "none saved yet"

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
