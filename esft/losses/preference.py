"""Preference losses on sequence log-probabilities: DPO, IPO, SimPO, ORPO and KTO.

Every function takes per-sequence log-probabilities (the sum, or for SimPO / ORPO the per-token
mean, of a completion's token log-probs; `esft.losses.logprobs.segment_sums` reduces packed
batches to them) and returns per-example losses ``[N]`` plus the implicit rewards that the
trainer logs. No reduction over the batch: the objective divides by the pairs of an optimizer
step (`esft.objectives.PreferenceModule`).

Papers and where this departs from them:

- DPO, Rafailov et al. 2023, arXiv 2305.18290: ``-log sigmoid(beta * (log-ratio chosen - log-ratio
  rejected))``. With ``label_smoothing = eps`` the labels are flipped with probability eps
  (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"; TRL's ``sigmoid`` with
  ``label_smoothing``).
- IPO, Azar et al. 2023, arXiv 2310.12036, eq. 17: ``(h - 1 / (2 tau))^2`` with ``h`` the
  difference of the log-ratios of sequence sums (TRL divides by the lengths first; the paper does not).
- SimPO, Meng et al. 2024, arXiv 2405.14734: reference-free, length-normalised rewards
  ``beta * mean token log-prob`` and a target margin ``gamma``: ``-log sigmoid(r_c - r_r - gamma)``.
- ORPO, Hong et al. 2024, arXiv 2403.07691: ``lambda * -log sigmoid(log odds(chosen) - log odds
  (rejected))`` on mean token log-probs; the SFT term (NLL of the chosen) is added by the objective.
- KTO, Ethayarajh et al. 2024, arXiv 2402.01306: unpaired examples, value ``w_d (1 - sigmoid(beta
  (r - z0)))`` for desirable and ``w_u (1 - sigmoid(beta (z0 - r)))`` for undesirable ones, with
  ``r`` the log-ratio and the reference point ``z0`` a detached, non-negative KL estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (sigmoid) loss per pair, with conservative label smoothing.

    Args:
        chosen, rejected: policy sequence log-probs (sums over completion tokens) ``[N]``.
        ref_chosen, ref_rejected: the reference's ``[N]`` (no gradient needed).
        beta: KL strength; the implicit reward is ``beta * (logp - ref_logp)``.
        label_smoothing: probability ``eps`` in [0, 0.5) that a label is flipped.

    Returns:
        ``(loss [N], chosen_reward [N], rejected_reward [N])``, the rewards detached.
    """
    _check(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def ipo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO loss per pair: ``(h - 1 / (2 beta))^2``, `beta` being the paper's tau. Shapes as `dpo_loss`;
    the minimum sits at a log-ratio margin of exactly ``1 / (2 beta)`` (no saturation)."""
    _check(beta)
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (logits - 1 / (2 * beta)) ** 2, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO loss per pair on mean token log-probs ``[N]`` (reference-free): rewards ``beta * mean``,
    loss ``-log sigmoid(r_c - r_r - gamma)`` (label-smoothed like `dpo_loss`). Returns as `dpo_loss`."""
    _check(beta)
    logits = beta * (chosen_mean - rejected_mean) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(mean_logp)``, stable for ``mean_logp`` near 0."""
    return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-1e-6)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair, ``beta * -log sigmoid(log odds_c - log odds_r)`` (`beta` is the
    paper's lambda), on mean token log-probs ``[N]``; rewards ``beta * mean`` (TRL's). Returns as `dpo_loss`."""
    _check(beta)
    loss = -beta * F.logsigmoid(log_odds(chosen_mean) - log_odds(rejected_mean))
    return loss, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float = 0.1,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO loss per example.

    Args:
        logps, ref_logps: sequence log-probs of the policy and the reference ``[N]``.
        desirable: bool ``[N]``, True for a desirable completion.
        kl: the reference point ``z0`` (a scalar estimate of KL(policy || reference), e.g. the
            mean log-ratio on mismatched prompt/completion pairs); detached and clamped at 0.
        beta: as in DPO; desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U``.

    Returns:
        ``(loss [N], reward [N])``, the reward ``beta * (logps - ref_logps)`` detached.
    """
    _check(beta)
    ratio = logps - ref_logps
    z0 = kl.detach().clamp(min=0)
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    return loss, beta * ratio.detach()
