"""Bradley–Terry reward-model loss on pairs of scalar rewards.

The probability that the chosen completion is preferred is ``sigmoid(r_chosen - r_rejected)``
(Bradley & Terry 1952; the reward-model loss of Stiennon et al. 2020, arXiv 2009.01325, and
Ouyang et al. 2022, arXiv 2203.02155, eq. 1). Options from later work:

- ``margin``: Llama 2 (Touvron et al. 2023, arXiv 2307.09288, eq. 2) subtracts a per-pair margin
  that grows with how clearly the raters preferred the chosen answer: ``-log sigmoid(r_c - r_r - m)``.
- ``center_coef``: Eisenstein et al. 2023 (arXiv 2312.09244) add ``coef * (r_c + r_r)^2`` so the
  rewards stay centred at 0, which the loss alone leaves free (it sees only differences).

Tensors in, per-pair losses ``[N]`` out; no reduction (the objective divides by an optimizer
step's pairs, `esft.objectives.RewardModule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss ``-log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2``.

    Args:
        chosen, rejected: scalar rewards of the two completions of each pair, ``[N]``.
        margin: ``[N]`` (or a number) the difference must exceed; None: 0.
        center_coef: weight of the centring term; 0: off.

    Returns:
        ``[N]`` losses.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"bradley_terry_loss: chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
    if center_coef < 0:
        raise ValueError(f"bradley_terry_loss: center_coef must be >= 0, got {center_coef}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss
