"""Stop (or skip) on a non-finite loss or gradient, or on a loss spike, naming the step and the
last good checkpoint; never write a checkpoint of non-finite weights.

Every `esft fit` run has a guard: the CLI adds ``NonFiniteGuard()`` (stop) unless the config
lists one of its own, e.g.::

    trainer:
      callbacks:
        - class_path: esft.callbacks.NonFiniteGuard
          init_args: {action: skip, spike_factor: 5.0}   # drop bad steps; a loss > 5x its median is bad too

The check runs after the backward pass (gradients all-reduced under DDP; under FSDP/ZeRO each
rank checks its shard and the ranks agree through the strategy), before the optimizer step, so a
bad step never reaches the weights. ``skip`` clears the gradients, so the optimizer leaves every
parameter and its state untouched for that step (the schedule still advances); after
`max_skips` skips in a row it stops anyway. Under ``16-mixed`` the loss scaler already skips
steps whose gradients overflow, so only the loss is checked there. A checkpoint whose weights
are not all finite is refused, so the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient, or a loss spike."""


def non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor of `state` holding a NaN or an infinity (each
    rank's own shard of a sharded tensor), or None."""
    for name, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if torch.is_tensor(local) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


class NonFiniteGuard(L.Callback):
    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        max_skips: int = 10,
        spike_factor: float | None = None,
        spike_window: int = 50,
    ) -> None:
        """
        Args:
            action: ``stop`` raises with the step and the last checkpoint to resume from;
                ``skip`` drops the step's update and continues.
            max_skips: consecutive skipped steps after which ``skip`` stops too.
            spike_factor: also treat a step whose loss exceeds this many times the median of the
                last `spike_window` good steps as bad (off by default).
            spike_window: good steps in the running median; spikes are checked once it is full.
        """
        if spike_factor is not None and spike_factor <= 1:
            raise ValueError(f"NonFiniteGuard.spike_factor must be > 1, got {spike_factor}")
        self.action = action
        self.max_skips = max_skips
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.history: deque[float] = deque(maxlen=spike_window)
        self._loss_finite = True
        self._step_loss = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.skipped_total:
            pl_module.log("guard/skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False, batch_size=1)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss).all())
        self._step_loss = self._step_loss + loss.float().sum()

    def _spike(self, trainer) -> float | None:
        """The step's loss (micro-batch losses summed, averaged over ranks) when it is a spike."""
        if self.spike_factor is None or not torch.is_tensor(self._step_loss):
            return None
        value = float(trainer.strategy.reduce(self._step_loss, reduce_op="mean"))
        if len(self.history) == self.spike_window and value > self.spike_factor * statistics.median(self.history):
            return value
        self.history.append(value)
        return None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16 loss scaling: inf gradients are overflow, and the scaler skips those steps itself
        local_ok = self._loss_finite and all(bool(torch.isfinite(g).all()) for g in grads)
        ok = trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        spike = self._spike(trainer) if ok else None
        loss_finite, self._loss_finite, self._step_loss = self._loss_finite, True, 0.0
        if ok and spike is None:
            self.skipped_in_a_row = 0
            return
        step = trainer.global_step + 1
        if spike is not None:
            what = f"loss spike ({spike:.4g} > {self.spike_factor} x the median {statistics.median(self.history):.4g} of the last {self.spike_window} steps)"
        else:  # every rank is here (`ok` is agreed): which of loss or gradient, agreed too, only on this path
            loss_finite = trainer.strategy.reduce_boolean_decision(loss_finite, all=True)
            what = "non-finite " + ("gradient" if loss_finite else "loss")
        if self.action == "skip" and self.skipped_in_a_row < self.max_skips:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            rank_zero_warn(f"[guard] {what} at step {step}: update skipped ({self.skipped_total} so far)")
            optimizer.zero_grad(set_to_none=True)
            return
        raise NonFiniteError(f"{what} at step {step}{self._in_a_row()}; last good checkpoint: {self._last_checkpoint(trainer)}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteError(f"non-finite weights ({bad}) at step {trainer.global_step}: checkpoint not written; "
                                 f"last good checkpoint: {self._last_checkpoint(trainer)}")

    def _in_a_row(self) -> str:
        return f" after {self.skipped_in_a_row} skipped steps in a row" if self.skipped_in_a_row else ""

    @staticmethod
    def _last_checkpoint(trainer) -> str:
        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") if callback else ""
        return f"{path} (resume with --ckpt_path {path})" if path else "none saved yet"

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.history.extend(state_dict.get("history", []))
