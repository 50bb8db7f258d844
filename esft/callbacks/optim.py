"""Optimizer measurements for ablations: optimizer-state memory and steps to a target loss.

    trainer:
      callbacks:
        - class_path: esft.callbacks.OptimizerStateSize
        - class_path: esft.callbacks.StepsToLoss
          init_args: {target: 1.2}

Both log to the run's loggers (and so to ``metrics.json``), so `esft sweep` tables them like any other metric.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from esft.loggers import log_to_all
from esft.optim import optimizer_state_bytes


class OptimizerStateSize(L.Callback):
    """Logs ``optim/state_mib``: MiB held by the optimizer's state tensors after the first step
    (the state is allocated lazily by the first ``step``; its size does not change after)."""

    def __init__(self) -> None:
        self.state_mib: float | None = None

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.state_mib is not None or trainer.global_step < 1:
            return
        self.state_mib = sum(optimizer_state_bytes(o) for o in trainer.optimizers) / 2**20
        log_to_all(trainer, {"optim/state_mib": self.state_mib}, trainer.global_step)


class StepsToLoss(L.Callback):
    """Logs ``optim/steps_to_target``: the first optimizer step at which an exponential moving
    average of the monitored training loss is at or below `target`.

    Logged at the end of training; a run that never reaches the target logs `max_steps + 1` (so
    means over seeds stay finite and such runs rank last) and ``optim/reached_target`` 0.
    """

    def __init__(self, target: float, monitor: str = "train/loss", smoothing: float = 0.9) -> None:
        """
        Args:
            target: the loss to reach.
            monitor: the logged training metric to follow.
            smoothing: EMA weight of the past (0: the raw per-step value).
        """
        if not 0 <= smoothing < 1:
            raise ValueError(f"StepsToLoss.smoothing must be in [0, 1), got {smoothing}")
        self.target, self.monitor, self.smoothing = target, monitor, smoothing
        self.ema: float | None = None
        self.reached_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or self.reached_at is not None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        self.ema = value if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * value
        if self.ema <= self.target:
            self.reached_at = trainer.global_step

    def state_dict(self) -> dict:
        return {"ema": self.ema, "reached_at": self.reached_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema, self.reached_at = state_dict.get("ema"), state_dict.get("reached_at")

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        reached = self.reached_at is not None
        steps = self.reached_at if reached else (trainer.max_steps if trainer.max_steps > 0 else trainer.global_step) + 1
        log_to_all(trainer, {"optim/steps_to_target": float(steps), "optim/reached_target": float(reached)},
                   trainer.global_step)
