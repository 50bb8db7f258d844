"""The training forward shared by every objective and by evaluation: packed or padded batch in,
summed next-token cross-entropy over trained tokens out."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from esft.losses import chunked_cross_entropy, cross_entropy_sum, next_token_targets
from esft.models.attention import VARLEN

# config fields that make the LM head more than a plain linear layer; the chunked loss would be wrong
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model: PreTrainedModel) -> bool:
    """True when logits are exactly ``hidden @ lm_head.weight.T (+ bias)``."""
    return not any(getattr(model.config, k, None) for k in _HEAD_TRANSFORMS)


def forward_kwargs(model: PreTrainedModel, batch: dict[str, Any]) -> dict[str, Any]:
    """Model keyword arguments for a batch from `esft.data.packing`'s collators."""
    # use_cache=False: with a cache, transformers skips the packed-document mask (NOTES).
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    elif model.config._attn_implementation == VARLEN:
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("esft_varlen attention takes flat packed batches: set data.layout to flat or auto")
        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs


def token_loss(model: PreTrainedModel, batch: dict[str, Any], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the batch's trained tokens, and their count.

    With a plain LM head and ``chunk_size > 0`` the loss is computed from the final hidden states
    in chunks (`esft.losses.chunked_cross_entropy`); otherwise from the model's full logits.
    """
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    kwargs = forward_kwargs(model, batch)
    if chunk_size > 0 and plain_head(model):
        hidden = model.get_decoder()(**kwargs).last_hidden_state
        head = model.get_output_embeddings()
        return chunked_cross_entropy(hidden, head.weight, targets, head.bias, chunk_size)
    logits = model(**kwargs).logits
    keep = targets != -100
    return cross_entropy_sum(logits[keep], targets[keep]), keep.sum()
