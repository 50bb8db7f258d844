"""Pure loss functions: tensors in, tensors out, no module state."""

from esft.losses.ce import chunked_cross_entropy, cross_entropy_sum, next_token_targets
from esft.losses.grpo import group_advantages, grpo_loss, kl_k3
from esft.losses.logprobs import token_logprobs

__all__ = ["chunked_cross_entropy", "cross_entropy_sum", "next_token_targets", "group_advantages", "grpo_loss",
           "kl_k3", "token_logprobs"]
