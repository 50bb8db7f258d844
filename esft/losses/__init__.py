"""Pure loss functions: tensors in, tensors out, no module state."""

from esft.losses.ce import chunked_cross_entropy, cross_entropy_sum, next_token_targets

__all__ = ["chunked_cross_entropy", "cross_entropy_sum", "next_token_targets"]
