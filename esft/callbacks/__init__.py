"""Lightning callbacks: throughput/memory, task evaluation, HF export, optimizer measurements."""

from esft.callbacks.evaluation import TaskEvaluation
from esft.callbacks.export import ExportHF
from esft.callbacks.optim import OptimizerStateSize, StepsToLoss
from esft.callbacks.predictions import JSONLPredictionWriter
from esft.callbacks.throughput import TokenThroughput

__all__ = ["ExportHF", "JSONLPredictionWriter", "TaskEvaluation", "TokenThroughput"]
__all__ += ["OptimizerStateSize", "StepsToLoss"]
