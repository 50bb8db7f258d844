"""Callbacks of `esft tune`: Optuna pruning and Lightning's learning-rate range test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateFinder

from esft.runconfig import atomic_write


class OptunaPruning(L.Callback):
    """Reports `monitor` to the active Optuna trial after every validation and raises
    `optuna.TrialPruned` when the study's pruner says so. Added to each trial by `esft tune`."""

    trial = None  # the Optuna trial this process runs (set by `esft tune` around each fit)

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        import optuna

        trial = OptunaPruning.trial
        if trial is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = trainer.global_step
        trial.report(float(value), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={float(value):.4g}")


class LRFinder(LearningRateFinder):
    """Lightning's LR range test at the start of `fit`; writes ``lr_find.json`` and ``lr_find.png``
    to `output` and stops the run (it only measures)."""

    def __init__(self, output: str, min_lr: float = 1e-6, max_lr: float = 1.0, num_training_steps: int = 100) -> None:
        super().__init__(min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training_steps, update_attr=False)
        self.output = Path(output)
        self.result: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        finder = self.optimal_lr
        suggestion = finder.suggestion() if finder is not None else None
        self.result = {"suggestion": suggestion, "lr": [float(x) for x in finder.results.get("lr", [])],
                       "loss": [float(x) for x in finder.results.get("loss", [])]}
        self.output.mkdir(parents=True, exist_ok=True)
        atomic_write(self.output / "lr_find.json", json.dumps(self.result, indent=2) + "\n")
        try:
            fig = finder.plot(suggest=suggestion is not None)
            fig.savefig(self.output / "lr_find.png", dpi=100)
        except Exception as e:  # a plot is a nicety; the JSON is the result
            print(f"tune: warning: no lr_find.png ({e})", file=sys.stderr)
        trainer.should_stop = True
