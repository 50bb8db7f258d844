"""Per-token log-probabilities (and entropies) of next-token targets from final hidden states.

The numerics behind every objective that needs the log-probability of given tokens rather than
a summed cross-entropy: policy-gradient losses (GRPO's ratio and KL), and sequence- or
token-level distillation. Like `esft.losses.ce.chunked_cross_entropy`, only positions with a
target are projected to the vocabulary, `chunk_size` positions at a time, each chunk
checkpointed, so peak extra memory is one ``[chunk_size, vocab]`` fp32 logits block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from esft.losses.ce import IGNORE_INDEX


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden if weight is None else F.linear(hidden, weight, bias)).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():  # entropy is a diagnostic: no gradient through it
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(hidden @ weight.T (+ bias)) / temperature)[target]`` at every position with a target.

    Args:
        hidden: final hidden states ``[..., H]``.
        weight: LM-head weight ``[V, H]``, or None when `hidden` already holds the logits;
            bias ``[V]`` or None.
        targets: next-token ids ``[...]`` matching `hidden`'s leading dims; -100 = no target.
        chunk_size: positions per chunk; ``<= 0`` computes all logits at once.
        temperature: the logits are divided by it (the sampling temperature of the rollouts, so
            the ratio compares the distributions the tokens were drawn from).

    Returns:
        ``(logp, entropy)``, both shaped like `targets` in fp32 with 0 where there is no target;
        `logp` carries gradients, `entropy` (of the tempered distribution) does not.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    h, t = flat_hidden[keep], flat_targets[keep]
    n = t.numel()
    if n == 0:
        parts = [(h.sum() * 0.0).expand(0), h.new_zeros(0, dtype=torch.float32)]
    elif chunk_size <= 0 or n <= chunk_size:
        parts = list(_chunk_logprobs(h, weight, bias, t, temperature))
    else:
        chunks = [
            checkpoint(_chunk_logprobs, h[lo : lo + chunk_size], weight, bias, t[lo : lo + chunk_size], temperature,
                       use_reentrant=False)
            for lo in range(0, n, chunk_size)
        ]
        parts = [torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])]
    logp = flat_hidden.new_zeros(flat_targets.shape, dtype=torch.float32).index_put((keep,), parts[0].float())
    entropy = torch.zeros_like(logp).index_put((keep,), parts[1].detach())
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over each document of a packed batch: ``[D]`` for the ``D + 1`` boundaries
    `cu_seqlens` (flat token offsets, as `esft.data.packing.collate_packed` gives them for either
    layout: rows are laid end to end). Differentiable; a zero-length document (the repeated last
    offset of fixed-shape batches) sums to 0.

    With `values` the per-token log-probs of `token_logprobs` (0 where there is no target) this is
    the log-probability of every document's trained tokens, and with ``targets != -100`` their count.
    """
    flat = values.reshape(-1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[-1]) != flat.numel():
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, the batch holds {flat.numel()} tokens")
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths.to(flat.device))
    return flat.new_zeros(lengths.numel()).index_add(0, segment, flat)
