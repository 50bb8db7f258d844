"""Masked next-token cross-entropy, shared by every objective.

`next_token_targets` turns position-aligned labels into next-token targets; in a packed row the
last token of a document must not predict the first token of the next one, so targets whose
position restarts at 0 are masked.

`chunked_cross_entropy` computes the loss from final hidden states and the LM-head weight
without a full-vocabulary fp32 logits tensor for the batch: only positions that are trained on
are kept, they are processed `chunk_size` at a time, and each chunk is checkpointed, so its
logits are recomputed in the backward pass instead of being stored. Peak extra memory is one
chunk of ``[chunk_size, vocab]`` fp32 logits. With ``return_correct`` it also counts the trained
tokens whose argmax prediction is the target (token accuracy), from the same chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Shift labels ``[B, T]`` left by one; the result's ``[b, t]`` is the target of position t.

    Where `position_ids` ``[B, T]`` restarts at 0 (a new packed document), the previous
    position's target is masked. The last position has no target.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        boundary = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(boundary, IGNORE_INDEX)
    return targets


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of token cross-entropies in fp32; logits ``[N, V]``, targets ``[N]`` (-100 ignored).

    `label_smoothing` ε (Szegedy et al. 2016) mixes the one-hot target with the uniform
    distribution: per token ``(1 - ε) * CE + ε * mean_v(-log p_v)``; 0 is the plain loss.
    """
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)


def trained_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten ``hidden [..., H]`` and ``targets [...]`` and keep the positions with a target:
    ``(hidden [N, H], targets [N], N)``. Losses then never compute logits for masked tokens."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep], keep.sum()


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many rows of `logits` ``[N, V]`` have their argmax at `targets` ``[N]``: the numerator of
    token accuracy (an int64 scalar, no gradient). A -100 target never counts (no argmax is
    negative); the denominator, the trained-token count, is the caller's."""
    return (logits.detach().argmax(-1) == targets).sum()


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                label_smoothing: float = 0.0, return_correct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk, and its correct predictions when asked. The argmax comes
    after the loss: a checkpointed chunk's recomputation stops once the loss's saved tensors are
    rebuilt (early stop), so the backward pass does not pay for it again."""
    logits = F.linear(hidden, weight, bias)
    loss = cross_entropy_sum(logits, targets, label_smoothing)
    return loss, correct_predictions(logits, targets) if return_correct else None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
    return_correct: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against `targets`, and the token count.

    Args:
        hidden: final hidden states ``[..., H]``.
        weight: LM-head weight ``[V, H]``; bias ``[V]`` or None.
        targets: next-token ids ``[...]`` matching `hidden`'s leading dims; -100 is ignored.
        chunk_size: trained positions per chunk; ``<= 0`` computes all logits at once.
        label_smoothing: ε of `cross_entropy_sum`; 0 (the default) is the plain cross-entropy.
        return_correct: also return how many trained tokens the argmax predicts
            (`correct_predictions` on each chunk's logits; no second pass over the vocabulary).

    Returns:
        ``(loss_sum, num_tokens)``, with ``return_correct`` ``(loss_sum, num_tokens, num_correct)``:
        divide by ``num_tokens`` to get the means over trained tokens.
    """
    hidden, targets, count = trained_positions(hidden, targets)
    if targets.numel() == 0:
        total, correct = hidden.sum() * 0.0, count.new_zeros(())  # keeps the graph connected
    elif chunk_size <= 0 or targets.numel() <= chunk_size:
        total, correct = _chunk_loss(hidden, weight, bias, targets, label_smoothing, return_correct)
    else:
        total, correct = hidden.new_zeros((), dtype=torch.float32), count.new_zeros(())
        for lo in range(0, targets.numel(), chunk_size):
            sl = slice(lo, lo + chunk_size)
            loss, hits = checkpoint(_chunk_loss, hidden[sl], weight, bias, targets[sl], label_smoothing, return_correct,
                                    use_reentrant=False)
            total = total + loss
            if return_correct:
                correct = correct + hits
    return (total, count, correct) if return_correct else (total, count)
