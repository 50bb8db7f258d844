"""`MetricsFile`: every run's metrics in one small JSON file, whatever logger the user chose.

`esft fit` adds it beside the configured loggers (TensorBoard, CSV, W&B, MLflow or none), so that
``<run dir>/metrics.json`` always holds the last value of every metric the run logged::

    {"step": 500, "metrics": {"train/loss": 1.73, "val/loss": 1.91, "eval/arithmetic": 0.42, ...}}

It is what `esft sweep`, `esft tune` and `esft pipeline` read (`esft.runconfig.read_metrics`),
instead of parsing one logger's event files. Everything logged through the trainer's loggers
reaches it: ``self.log`` in modules and callbacks, and ``logger.log_metrics`` calls that loop
over ``trainer.loggers``. The file is rewritten atomically at most every `every_s` seconds while
the run logs, and at the end of fit / validate / test (also after a failure), on global rank 0.
A resumed run (``--ckpt_path``) keeps the values of the file it finds; a new run starts it anew.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from esft.runconfig import atomic_write, read_json

FILE_NAME = "metrics.json"


class MetricsFile(Logger):
    """Last value of every logged metric in ``<save_dir>/metrics.json``."""

    def __init__(self, save_dir: str | os.PathLike, every_s: float = 10.0) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self.every_s = every_s
        self.resume = False  # set by `esft fit` before the run starts: keep the values on file
        self._metrics: dict[str, float] | None = None
        self._step = 0
        self._written = 0.0

    @property
    def name(self) -> str:
        return ""  # no subdirectory: the run directory itself (checkpoints/ beside it, as without a logger)

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def path(self) -> Path:
        return Path(self._save_dir) / FILE_NAME

    def _load(self) -> dict[str, float]:
        if self._metrics is None:
            self._metrics = {}
            saved = read_json(self.path) if self.resume else None
            if saved is not None and isinstance(saved.get("metrics"), dict):
                self._metrics, self._step = dict(saved["metrics"]), int(saved.get("step", 0))
        return self._metrics

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        values = self._load()
        for name, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            values[name] = value if math.isfinite(value) else None  # JSON has no nan/inf
        if step is not None:
            self._step = max(self._step, int(step))
        if time.monotonic() - self._written >= self.every_s:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # hyperparameters are in the run's config.yaml

    @rank_zero_only
    def save(self) -> None:
        if self._metrics is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"step": self._step, "metrics": self._metrics}, indent=1, sort_keys=True) + "\n")
        self._written = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def log_to_all(trainer, metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step` to every logger of `trainer` (None: none), ``metrics.json`` included:
    for values logged outside ``self.log``, which reaches them all by itself."""
    for logger in trainer.loggers if trainer is not None else []:
        logger.log_metrics(metrics, step=step)
