"""Generation-based evaluation on verifiable tasks, pass@k, and perplexity."""

from esft.evaluation.generate import Rollout, evaluate, evaluate_tasks, generate, rollout
from esft.evaluation.metrics import pass_at_k
from esft.evaluation.perplexity import perplexity

__all__ = ["Rollout", "rollout", "evaluate", "evaluate_tasks", "generate", "pass_at_k", "perplexity"]
