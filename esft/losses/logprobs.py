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
