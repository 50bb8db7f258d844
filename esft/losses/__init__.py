"""Pure loss functions: tensors in, tensors out, no module state."""

from esft.losses.ce import chunked_cross_entropy, cross_entropy_sum, next_token_targets
from esft.losses.grpo import group_advantages, grpo_loss, kl_k3
from esft.losses.kd import chunked_kd_loss, chunked_topk_kd_loss, kd_divergence, topk_kd_divergence
from esft.losses.logprobs import segment_sums, token_logprobs
from esft.losses.preference import dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from esft.losses.reward import bradley_terry_loss
from esft.losses.router import load_balancing_loss

__all__ = ["chunked_cross_entropy", "cross_entropy_sum", "next_token_targets", "chunked_kd_loss", "chunked_topk_kd_loss",
           "kd_divergence", "topk_kd_divergence", "group_advantages", "grpo_loss", "kl_k3", "token_logprobs",
           "segment_sums", "bradley_terry_loss", "dpo_loss", "ipo_loss", "kto_loss", "orpo_loss", "simpo_loss",
           "load_balancing_loss"]
