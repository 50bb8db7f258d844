"""Load-balancing loss of a top-k MoE router.

The expert-level balance loss of DeepSeek-V2 (arXiv 2405.04434, eq. 21-23), the Switch
Transformer's auxiliary loss (Fedus et al. 2021, arXiv 2101.03961, eq. 4) generalised to top-k:

    f_i = E / (K T) * #{tokens that selected expert i}      (fraction of dispatches, x E/K)
    P_i = 1 / T * sum_t s_{i,t}                              (mean router probability)
    loss = sum_i f_i * P_i

with E routed experts, K experts per token and T tokens. It is 1 when routing is uniform (f_i = 1,
P_i = 1/E) and grows to E/K when every token goes to the same K experts with certainty. Only P
carries a gradient (the top-k choice is not differentiable): it pushes probability mass away
from the experts that receive the most tokens. Tensors in, a scalar out.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i f_i P_i`` of one router over its tokens.

    Args:
        probs: router probabilities ``[T, E]`` (softmax of the logits; each row sums to 1).
        indices: the experts each token was dispatched to, ``[T, K]``.
        num_experts: E.
        mask: ``[T]`` booleans, the tokens to count (padding left out); None: all.
    """
    if probs.dim() != 2 or indices.dim() != 2 or probs.shape[0] != indices.shape[0] or probs.shape[1] != num_experts:
        raise ValueError(f"load_balancing_loss: probs must be [T, {num_experts}] and indices [T, K], "
                         f"got {tuple(probs.shape)} and {tuple(indices.shape)}")
    probs = probs.float()
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    tokens, top_k = indices.shape
    if tokens == 0:
        return probs.sum() * 0.0
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    f = counts * (num_experts / (top_k * tokens))
    return (f * probs.mean(0)).sum()
