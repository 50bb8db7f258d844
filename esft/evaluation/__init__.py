"""Generation-based evaluation on verifiable tasks."""

from esft.evaluation.generate import evaluate_tasks, generate

__all__ = ["evaluate_tasks", "generate"]
