"""Greedy-generation evaluation on held-out splits of built-in tasks: before training, every N
optimizer steps, and after training.

Each task is scored in its own metric (`Task.metric`: ``exact_match``, ``accuracy``, ``chrf``,
``rouge_l``, ...). Logs ``eval/<task>/<metric>`` (the task's metric and its other text metrics,
e.g. ``eval/translate/bleu``) at the step it was measured, the names ``esft eval`` uses
(`esft.evaluation.metrics.eval_tag`); prints a results table; writes ``eval.json`` to the run's
log directory::

    {"num_examples": 100, "steps": 300,
     "metrics": {"translate": "chrf", "arithmetic": "exact_match"},        # task -> its metric
     "before": {"translate": 0.12, "arithmetic": 0.0},                     # task -> score in that metric
     "after": {"translate": 0.81, "arithmetic": 0.35},
     "scalars": {"before": {"eval/translate/chrf": 0.12, "eval/translate/bleu": 0.0, ...},
                 "after": {...}}}                                          # exactly what was logged

Under the table, a task that still scores below ``low_score`` after training gets one line saying
why (the task's own `Task.learning_note`, or a general reason), so a low number does not read as
a broken run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from esft.data.tasks import TaskSpec, build_task
from esft.evaluation import evaluate
from esft.evaluation.metrics import eval_tag
from esft.loggers import log_to_all
from esft.models.sharding import is_sharded

GENERAL_REASON = "the model has not learned it yet at this budget: train longer (--trainer.max_steps) or start from a pretrained model"


class TaskEvaluation(L.Callback):
    def __init__(
        self,
        tasks: list[TaskSpec],
        num_examples: int = 100,
        seed: int = 0,
        max_new_tokens: int = 32,
        batch_size: int = 100,
        before_fit: bool = True,
        every_n_steps: int | None = None,
        output: str | None = None,
        low_score: float = 0.5,
    ) -> None:
        """
        Args:
            tasks: built-in tasks: names, or mappings of a ``name`` and constructor options.
            num_examples: held-out records per task.
            seed: generation seed of the held-out records.
            max_new_tokens: generation limit per completion.
            batch_size: prompts generated together.
            before_fit: also evaluate the model before training (the "before" column).
            every_n_steps: also evaluate every this many optimizer steps (logged, not tabled).
            output: JSON results path (default ``<log_dir>/eval.json``).
            low_score: a task scoring below this after training gets a one-line explanation under the table.
        """
        self.tasks = tasks
        self.num_examples = num_examples
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.before_fit = before_fit
        self.every_n_steps = every_n_steps
        self.output = output
        self.low_score = low_score
        self.metrics = {task.name: task.metric for task in map(build_task, tasks)}  # task -> its metric's name
        self.results: dict[str, dict[str, float]] = {}  # "before" / "after" -> task -> score in its metric
        self.scalars: dict[str, dict[str, float]] = {}  # "before" / "after" -> logged name -> value
        self._records = None
        self._last_step = -1

    def _evaluate(self, pl_module) -> dict[str, dict[str, float]]:
        """Per task, the row of `esft.evaluation.evaluate` (greedy, one sample per record)."""
        if self._records is None:
            tasks = [build_task(spec) for spec in self.tasks]
            self._records = {t.name: t.generate(self.num_examples, self.seed, "heldout") for t in tasks}
        return evaluate(pl_module.model, pl_module.tokenizer, self._records, self.max_new_tokens, self.batch_size)

    @staticmethod
    def logged_values(rows: dict[str, dict[str, float]]) -> dict[str, float]:
        """``eval/<task>/<metric>`` -> value for every metric of `rows` but the record count and
        pass@k (greedy pass@1 only restates the share of perfect scores)."""
        return {eval_tag(task, metric): value for task, row in rows.items() for metric, value in row.items()
                if metric != "n" and not metric.startswith("pass@")}

    @staticmethod
    def _runs_here(trainer, pl_module) -> bool:
        """Rank 0 generates alone, unless the model is sharded (FSDP2, ZeRO-3): then every rank takes part
        in the parameter gathers of each forward pass, and rank 0 keeps the result."""
        return trainer.is_global_zero or is_sharded(pl_module.model)

    def _log(self, trainer, rows: dict[str, dict[str, float]], when: str | None = None) -> None:
        """Log one evaluation at the current step; `when` ("before", "after") also keeps it for
        ``eval.json`` and the table."""
        values = self.logged_values(rows)
        if when is not None:
            self.results[when] = {task: row[self.metrics[task]] for task, row in rows.items()}
            self.scalars[when] = values
        if trainer.is_global_zero:
            log_to_all(trainer, values, trainer.global_step)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before_fit and self._runs_here(trainer, pl_module):
            self._log(trainer, self._evaluate(pl_module), "before")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step and self._runs_here(trainer, pl_module):
            self._last_step = step  # with gradient accumulation a step spans several batches
            self._log(trainer, self._evaluate(pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._runs_here(trainer, pl_module):
            return
        self._log(trainer, self._evaluate(pl_module), "after")
        if not trainer.is_global_zero:
            return
        rank_zero_info(self.table())
        path = Path(self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "eval.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"num_examples": self.num_examples, "steps": trainer.global_step, "metrics": self.metrics,
                   **self.results, "scalars": self.scalars}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        rank_zero_info(f"[eval] results written to {path}")

    def table(self) -> str:
        cols = [c for c in ("before", "after") if c in self.results]
        lines = [f"| task | metric | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
        for t in self.results[cols[0]]:
            lines.append(f"| {t} | {self.metrics[t]} | " + " | ".join(f"{self.results[c][t]:.3f}" for c in cols) + " |")
        return (f"\nScore on {self.num_examples} held-out examples per task (greedy), in each task's metric:\n"
                + "\n".join(lines + self.low_score_notes()))

    def low_score_notes(self) -> list[str]:
        """One line per task whose score after training is below `low_score`: why it may still be low."""
        reasons = {task.name: task.learning_note for task in map(build_task, self.tasks)}
        return [f"{name} is still below {self.low_score:g}: {reasons.get(name) or GENERAL_REASON}"
                for name, score in self.results.get("after", {}).items() if score < self.low_score]
