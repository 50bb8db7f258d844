"""Lightning callbacks: throughput/memory, task evaluation, HF export, non-finite guard,
optimizer measurements."""

from esft.callbacks.evaluation import TaskEvaluation
from esft.callbacks.export import ExportHF
from esft.callbacks.guards import NonFiniteGuard
from esft.callbacks.optim import OptimizerStateSize, StepsToLoss
from esft.callbacks.predictions import JSONLPredictionWriter
from esft.callbacks.throughput import TokenThroughput

__all__ = ["ExportHF", "JSONLPredictionWriter", "NonFiniteGuard", "OptimizerStateSize", "StepsToLoss", "TaskEvaluation",
           "TokenThroughput"]
