"""Group Relative Policy Optimization losses (DeepSeekMath, arXiv 2402.03300, eq. 3), as pure functions.

* `group_advantages`: the outcome reward of each of the G samples of a prompt, minus the group
  mean, divided by a standard deviation (``scale="group"``: the group's, as in the paper;
  ``"batch"``: the whole batch's; ``"none"``: not scaled, Dr. GRPO, arXiv 2503.20783).
* `kl_k3`: Schulman's unbiased, non-negative k3 estimator of KL(pi || pi_ref) per token,
  ``exp(ref - logp) - (ref - logp) - 1``.
* `grpo_loss`: the PPO-style clipped surrogate per token with clip range ``[1 - eps, 1 + eps_high]``
  (``eps_high`` > ``eps`` is DAPO's clip-higher, arXiv 2503.14476), plus ``beta * k3`` when a
  reference is given, aggregated four ways:

  - ``grpo``: mean over each sequence's tokens, then over sequences (the paper's 1/|o_i|);
  - ``dr_grpo``: sum over all tokens divided by a constant, ``num_sequences * max_completion_length``
    (Dr. GRPO: no length bias);
  - ``dapo``: sum over tokens divided by the number of completion tokens of an optimizer step's
    batch over all ranks (DAPO's token-level loss; the caller passes that count as ``num_tokens``);
  - ``bnpo``: the same formula with this rank's tokens only (TRL's ``bnpo``).

``num_sequences`` and ``num_tokens`` name the batch a call is part of. The caller may drop rows
that add nothing (advantage 0 without a KL term) and keep the normalisers of the full batch: the
loss and its gradient are then unchanged.

Departures: the standard deviation is the unbiased one (as TRL's GRPOTrainer) with ``eps`` added;
sequences and tokens are given as a right-padded ``[B, T]`` grid with a mask.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: ``[P * G]`` rewards, the G samples of a prompt consecutive.
        group_size: G.
        scale: ``group`` divides by each group's std, ``batch`` by the std of all rewards,
            ``none`` does not divide.
        eps: added to the std (a group whose samples all score the same gets advantage 0).

    Returns:
        ``[P * G]`` advantages.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros((), dtype=torch.float32)
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centred.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (same shape)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps: float = 0.2,
    eps_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with an optional k3 KL penalty.

    Args:
        logp: ``[B, T]`` log-probs of the sampled completion tokens under the current policy.
        old_logp: ``[B, T]`` the same under the policy that sampled them (no gradient).
        advantages: ``[B]`` one advantage per sequence.
        mask: ``[B, T]`` 1 on completion tokens that count, 0 elsewhere.
        ref_logp: ``[B, T]`` log-probs under the reference policy; needed when ``beta > 0``.
        beta: KL coefficient.
        eps, eps_high: clip range ``[1 - eps, 1 + eps_high]`` (``eps_high`` defaults to ``eps``).
        loss_type: aggregation over tokens: ``grpo``, ``dr_grpo``, ``dapo`` or ``bnpo`` (module docstring).
        max_completion_length: the ``dr_grpo`` normaliser per sequence (default: ``T``).
        num_sequences: sequences of the batch (``grpo``, ``dr_grpo``; default: ``B``).
        num_tokens: completion tokens of the batch (``dapo``, ``bnpo``; default: ``mask.sum()``).

    Returns:
        ``(loss, stats)`` where stats holds detached ``kl`` (mean per token, 0 without a
        reference), ``clip_fraction`` (tokens whose clipped term is the active one) and
        ``ratio`` (mean per token).
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    mask = mask.to(logp.dtype)
    high = eps if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp.detach())
        if beta > 0:
            per_token = per_token + beta * kl
    tokens = mask.sum()
    sequences = num_sequences or logp.shape[0]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / sequences
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (sequences * (max_completion_length or logp.shape[1]))
    elif loss_type in ("dapo", "bnpo"):
        loss = (per_token * mask).sum() / (tokens if num_tokens is None else torch.as_tensor(num_tokens)).clamp(min=1)
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo, dapo or bnpo, got {loss_type!r}")
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
        denom = tokens.clamp(min=1)
        stats = {
            "kl": (kl * mask).sum() / denom,
            "clip_fraction": (is_clipped.to(mask.dtype) * mask).sum() / denom,
            "ratio": (ratio * mask).sum() / denom,
        }
    return loss, stats
