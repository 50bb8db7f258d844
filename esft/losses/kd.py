"""Knowledge-distillation losses: token-level divergences between a student's and a teacher's
next-token distributions, computed in chunks over trained tokens.

Divergences (per token, over the vocabulary; ``S`` the student, ``T`` the teacher):

- ``forward_kl``: KL(T || S), the classic logit KD of Hinton et al. 2015 (arXiv 1503.02531);
  mode-covering.
- ``reverse_kl``: KL(S || T), mode-seeking, as in MiniLLM (Gu et al. 2023, arXiv 2306.08543).
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023,
  arXiv 2306.13649) with TRL's convention: ``M = beta * T + (1 - beta) * S`` and
  ``JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)``. Both ends are special-cased as
  TRL does: ``beta = 0`` *is* forward KL and ``beta = 1`` *is* reverse KL. (The mixture formula
  itself vanishes at both ends; ``JSD_beta / beta -> KL(T || S)`` as beta -> 0 and
  ``JSD_beta / (1 - beta) -> KL(S || T)`` as beta -> 1, so the special cases are its limits up to
  that scale.)
- ``tv``: total variation, ``0.5 * sum |S - T|``, one of the f-divergences studied for
  distillation by Wen et al. 2023 (f-DISTILL, arXiv 2307.15190); bounded by 1 per token.

Temperature ``tau`` divides both models' logits before the softmax. Following GKD/TRL the loss is
not rescaled by ``tau**2`` (Hinton et al. do rescale; multiply by ``tau**2`` yourself to match).

`chunked_kd_loss` takes final hidden states and LM-head weights of both models, keeps the trained
positions (`esft.losses.ce.trained_positions`), and projects them to logits ``chunk_size`` tokens
at a time inside a checkpoint, so peak extra memory is one chunk of ``[chunk_size, vocab]`` fp32
logits per model (recomputed in the backward pass), never the batch's. It also returns the
hard-label cross-entropy of the same chunks, for the ``alpha`` mix with the SFT loss, and with
``return_correct`` the student's correct argmax predictions (token accuracy) from the same logits.

`topk_kd_divergence` is the loss on a cached teacher (`esft.data.teacher_cache`): the teacher's top-k
log-probabilities per token. Tail mass: both distributions are coarsened to k + 1 buckets, the k
cached token ids plus one "rest of the vocabulary" bucket holding ``1 - sum(top-k)`` of each
model's mass, and the divergence is taken between the coarsened distributions. This never
renormalises the teacher's top-k (which would overstate its confidence), it is a lower bound of
the full divergence (data-processing inequality), and with k = vocabulary the rest bucket is
dropped and it equals the full loss exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from esft.losses.ce import IGNORE_INDEX, correct_predictions, cross_entropy_sum, trained_positions

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tv"]


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; terms with p = 0 count 0 (also where q = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence_from_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, divergence: Divergence = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """Per-token divergence ``[N]`` between two normalised log-prob tensors ``[N, V]`` (module doc)."""
    s, t = student_logprobs, teacher_logprobs
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(t, s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(s, t)
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs beta in [0, 1], got {beta}")
        m = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if divergence == "tv":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; expected forward_kl, reverse_kl, jsd or tv")


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence ``[N]`` between student and teacher logits ``[N, V]`` at `temperature`
    (computed in fp32)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ: {student_logits.shape[-1]} vs {teacher_logits.shape[-1]} logits")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return divergence_from_logprobs(s, t, divergence, beta)


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logprobs)))`` over the last dim, ``[N, 1]``, floored at the smallest float."""
    rest = -torch.expm1(torch.logsumexp(logprobs, dim=-1, keepdim=True))
    return rest.clamp(min=torch.finfo(rest.dtype).tiny).log()


def topk_kd_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence ``[N]`` against a cached teacher: its top-k token ids ``[N, k]`` and
    log-probs ``[N, k]`` (already at `temperature`); student logits ``[N, V]``. The remaining mass
    of both models forms one extra bucket unless k = V (module doc)."""
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    if k > vocab:
        raise ValueError(f"the teacher cache has k={k} ids per token but the student has only {vocab} logits")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    t = teacher_logprobs.float()
    if k < vocab:
        s = torch.cat([s, _log_rest(s)], dim=-1)
        t = torch.cat([t, _log_rest(t)], dim=-1)
    return divergence_from_logprobs(s, t, divergence, beta)


# ---- chunked over trained tokens -------------------------------------------------------------
def _chunk_sums(kd: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, return_correct: bool) -> torch.Tensor:
    """``[kd, ce]`` of a chunk, and its correct predictions as a third entry when asked (computed
    last: a checkpoint's recomputation stops before it)."""
    sums = [kd, cross_entropy_sum(logits, targets)]
    if return_correct:
        sums.append(correct_predictions(logits, targets).float())
    return torch.stack(sums)


def _online_chunk(hidden, t_hidden, targets, weight, bias, t_weight, t_bias, divergence, beta, temperature, return_correct):
    logits = F.linear(hidden, weight, bias)
    with torch.no_grad():
        t_logits = F.linear(t_hidden, t_weight, t_bias)
    return _chunk_sums(kd_divergence(logits, t_logits, divergence, beta, temperature).sum(), logits, targets, return_correct)


def _cached_chunk(hidden, ids, logprobs, targets, weight, bias, divergence, beta, temperature, return_correct):
    logits = F.linear(hidden, weight, bias)
    return _chunk_sums(topk_kd_divergence(logits, ids, logprobs, divergence, beta, temperature).sum(), logits, targets,
                       return_correct)


def _chunked_sums(fn, sliced: list[torch.Tensor], fixed: tuple, n: int, chunk_size: int) -> torch.Tensor:
    """``sum over chunks of fn(*sliced[chunk], *fixed)``, each chunk checkpointed (logits recomputed
    in backward); `sliced` tensors are cut along dim 0 into `chunk_size` rows."""
    if chunk_size <= 0 or n <= chunk_size:
        return fn(*sliced, *fixed)
    total = None
    for lo in range(0, n, chunk_size):
        part = checkpoint(fn, *(x[lo : lo + chunk_size] for x in sliced), *fixed, use_reentrant=False)
        total = part if total is None else total + part
    return total


def _kd_result(sums: torch.Tensor | None, hidden: torch.Tensor, count: torch.Tensor, return_correct: bool) -> tuple[torch.Tensor, ...]:
    """``(kd_sum, ce_sum, num_tokens)`` from `_chunked_sums`' result, ``num_correct`` (int64) after
    them when asked; `sums` None (no trained token) gives zeros still connected to `hidden`'s graph."""
    if sums is None:
        sums = (hidden.sum() * 0.0).repeat(3)
    out = (sums[0], sums[1], count)
    return (*out, sums[2].detach().round().long()) if return_correct else out


def chunked_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_correct: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Summed divergence and summed hard-label cross-entropy over trained tokens, and their count.

    Args:
        hidden: student final hidden states ``[..., H]``; weight ``[V, H]``, bias ``[V]`` or None.
        teacher_hidden: teacher final hidden states ``[..., H_t]`` at the same positions (no
            gradient flows into it); teacher_weight ``[V, H_t]``, teacher_bias ``[V]`` or None.
        targets: next-token ids ``[...]`` (-100: not trained), e.g. from `next_token_targets`.
        divergence, beta, temperature: see the module docstring.
        chunk_size: trained tokens per chunk; ``<= 0`` computes all at once.
        return_correct: also count the trained tokens whose student argmax is the target
            (`esft.losses.ce.correct_predictions`, from the same chunks of logits).

    Returns:
        ``(kd_sum, ce_sum, num_tokens)``, with ``return_correct`` ``(..., num_correct)``; divide
        by ``num_tokens`` for per-token means.
    """
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: LM heads of {weight.shape[0]} and {teacher_weight.shape[0]} rows")
    keep = targets.reshape(-1) != IGNORE_INDEX
    hidden, flat_targets, count = trained_positions(hidden, targets)
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()
    sums = None if count == 0 else _chunked_sums(
        _online_chunk, [hidden, teacher_hidden, flat_targets],
        (weight, bias, teacher_weight, teacher_bias, divergence, beta, temperature, return_correct), len(flat_targets), chunk_size)
    return _kd_result(sums, hidden, count, return_correct)


def chunked_topk_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_correct: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`chunked_kd_loss` against a cached teacher.

    Args:
        hidden: student final hidden states ``[..., H]``; weight ``[V, H]``, bias ``[V]`` or None.
        teacher_ids, teacher_logprobs: ``[N, k]``, one row per trained token of `targets`, in
            the order `trained_positions` keeps them (row-major over the batch).
        targets: next-token ids ``[...]`` (-100: not trained).
        return_correct: as in `chunked_kd_loss`.

    Returns:
        ``(kd_sum, ce_sum, num_tokens)``, with ``return_correct`` ``(..., num_correct)``.
    """
    hidden, flat_targets, count = trained_positions(hidden, targets)
    if teacher_ids.shape[0] != flat_targets.numel() or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"the teacher cache gives {teacher_ids.shape[0]} rows (logprobs {tuple(teacher_logprobs.shape)}) for "
            f"{flat_targets.numel()} trained tokens in the batch: the cache does not match this data"
        )
    sums = None if count == 0 else _chunked_sums(
        _cached_chunk, [hidden, teacher_ids, teacher_logprobs, flat_targets],
        (weight, bias, divergence, beta, temperature, return_correct), len(flat_targets), chunk_size)
    return _kd_result(sums, hidden, count, return_correct)
