"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (never on biases and norms)."""
    decay_embeddings: bool = False
    """Also decay the embedding and LM-head matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps (wins over `warmup_ratio`)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps, when `warmup_steps` is 0."""
    min_lr_ratio: float = 0.1
    """The cosine decays to `lr * min_lr_ratio` at the last step."""
    fused: bool | None = None
    """Fused AdamW kernel; None uses it where the parameters' device supports it."""


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases / norms (1-D) / optionally embeddings.

    Only parameters with ``requires_grad`` are included, so frozen ones get no optimizer state.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeddings.add(id(head.weight))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (id(p) in embeddings and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, cfg.weight_decay, cfg.decay_embeddings) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    fused = _fused_supported(params) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
