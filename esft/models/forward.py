"""The training forward shared by every objective and by evaluation: packed or padded batch in,
summed next-token cross-entropy over trained tokens out.

Three loss implementations share the target construction (`next_token_targets`): ``chunked``
(`esft.losses.chunked_cross_entropy` on the final hidden states), the model's full logits (for
heads that are not a plain linear layer, or ``chunk_size=0``), and ``liger`` (Liger Kernel's fused
linear cross-entropy, CUDA only: ``pip install liger-kernel``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from esft.losses import chunked_cross_entropy, cross_entropy_sum, next_token_targets
from esft.losses.ce import IGNORE_INDEX, correct_predictions, trained_positions
from esft.models.attention import VARLEN

LossImpl = Literal["chunked", "liger"]

# config fields that make the LM head more than a plain linear layer; the chunked loss would be wrong
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model: PreTrainedModel) -> bool:
    """True when logits are exactly ``hidden @ lm_head.weight.T (+ bias)``."""
    return not any(getattr(model.config, k, None) for k in _HEAD_TRANSFORMS)


def forward_kwargs(model: PreTrainedModel, batch: dict[str, Any]) -> dict[str, Any]:
    """Model keyword arguments for a batch from `esft.data.packing`'s collators."""
    # use_cache=False: with attention_mask None, transformers 5 builds the block-diagonal mask of
    # packed documents from the restarting position_ids only when no cache exists; the default
    # use_cache=True creates a DynamicCache, skips that, and documents attend to each other (logits
    # off by up to 0.42 with the cache, 1.8e-7 without). tests/test_forward_isolation.py checks it.
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    elif model.config._attn_implementation == VARLEN:
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("esft_varlen attention takes flat packed batches: set data.layout to flat or auto")
        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs


def liger_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against `targets` with Liger Kernel's
    fused linear cross-entropy (no logits tensor at all), and the trained-token count.

    Shapes as `esft.losses.chunked_cross_entropy`; -100 targets are ignored. CUDA only.
    """
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ModuleNotFoundError("loss_impl='liger' needs liger-kernel: pip install liger-kernel (or esft[liger])") from e
    if not hidden.is_cuda:
        raise RuntimeError(f"loss_impl='liger' runs Triton kernels on CUDA only; the model is on {hidden.device.type}: use loss_impl='chunked'")
    hidden, targets, count = trained_positions(hidden, targets)
    if targets.numel() == 0:
        return hidden.sum() * 0.0, count
    loss = liger_fused_linear_cross_entropy(
        hidden.to(weight.dtype), weight, targets, bias, ignore_index=IGNORE_INDEX, reduction="sum",
        **({"label_smoothing": label_smoothing} if label_smoothing else {}),
    )
    return loss.float(), count


def token_loss(
    model: PreTrainedModel, batch: dict[str, Any], chunk_size: int = 1024, impl: LossImpl = "chunked",
    label_smoothing: float = 0.0, return_correct: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Summed next-token cross-entropy over the batch's trained tokens, and their count.

    With a plain LM head the loss is computed from the final hidden states: ``impl="liger"`` by
    Liger's fused kernel, else (``chunk_size > 0``) in chunks (`esft.losses.chunked_cross_entropy`).
    Otherwise it comes from the model's full logits. `label_smoothing` (0 = off) applies to all three.
    `return_correct` adds a third value, the trained tokens whose argmax prediction is the target
    (token accuracy's numerator), from the logits the loss computes anyway; None with ``liger``,
    whose fused kernel never forms logits.
    """
    targets = next_token_targets(batch["labels"], batch["position_ids"])
    kwargs = forward_kwargs(model, batch)
    if impl == "liger" and not plain_head(model):
        raise ValueError("loss_impl='liger' needs a plain linear LM head; this model transforms its logits")
    if impl == "liger" or (chunk_size > 0 and plain_head(model)):
        hidden = model.get_decoder()(**kwargs).last_hidden_state
        head = model.get_output_embeddings()
        if impl == "liger":
            out = liger_cross_entropy(hidden, head.weight, targets, head.bias, label_smoothing)
            return (*out, None) if return_correct else out
        return chunked_cross_entropy(hidden, head.weight, targets, head.bias, chunk_size, label_smoothing, return_correct)
    logits = model(**kwargs).logits
    keep = targets != -100
    logits, targets = logits[keep], targets[keep]
    out = cross_entropy_sum(logits, targets, label_smoothing), keep.sum()
    return (*out, correct_predictions(logits, targets)) if return_correct else out


def target_logprobs(
    model: PreTrainedModel, batch: dict[str, Any], chunk_size: int = 1024, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability and entropy of every next-token target of a batch (packed or padded).

    Returns ``(logp, entropy, targets)``, each ``[B, T]``: position t holds the log-prob of the
    label at t + 1 (0 where the target is -100); `entropy` is detached. Chunked like
    `token_loss` when the LM head is a plain linear layer, else from the model's full logits.
    """
    from esft.losses.logprobs import token_logprobs

    targets = next_token_targets(batch["labels"], batch["position_ids"])
    kwargs = forward_kwargs(model, batch)
    if plain_head(model):
        hidden = model.get_decoder()(**kwargs).last_hidden_state
        head = model.get_output_embeddings()
        logp, entropy = token_logprobs(hidden, head.weight, targets, head.bias, chunk_size, temperature)
        return logp, entropy, targets
    logp, entropy = token_logprobs(model(**kwargs).logits, None, targets, None, chunk_size, temperature)
    return logp, entropy, targets


def document_logprobs(
    model: PreTrainedModel, batch: dict[str, Any], chunk_size: int = 1024, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of every document's trained tokens, and their count: ``([D], [D])``.

    On a packed batch the documents are the ``cu_seqlens`` segments, fillers included (their count
    is 0); on a padded batch (`esft.data.packing.collate_padded`) the rows. Token log-probs come from
    `target_logprobs` (chunked like the cross-entropy); `esft.losses.logprobs.segment_sums` adds them
    up per document, so a sequence-level objective (DPO and kin) never leaves the packed layout.
    """
    from esft.losses.logprobs import segment_sums

    logp, _, targets = target_logprobs(model, batch, chunk_size, temperature)
    trained = (targets != IGNORE_INDEX).to(logp.dtype)
    if "cu_seqlens" in batch and "attention_mask" not in batch:
        cu = batch["cu_seqlens"]
        return segment_sums(logp, cu), segment_sums(trained, cu)
    return logp.sum(-1), trained.sum(-1)


def document_ends(batch: dict[str, Any]) -> torch.Tensor:
    """The flat index (into ``input_ids.reshape(-1)``) of every document's last token: the
    ``cu_seqlens`` segments of a packed batch (fillers included), the rows of a padded one."""
    if "cu_seqlens" in batch and "attention_mask" not in batch:
        return batch["cu_seqlens"][1:].long() - 1
    mask = batch["attention_mask"]
    return torch.arange(mask.shape[0], device=mask.device) * mask.shape[1] + mask.sum(1) - 1


def sequence_rewards(model: PreTrainedModel, batch: dict[str, Any]) -> torch.Tensor:
    """The scalar reward of every document of a batch (packed or padded), ``[D]`` float32: the
    reward model's ``score`` head (`esft.models.build_model` with ``head="score"``, or
    ``AutoModelForSequenceClassification`` with one label) on the last hidden state of each
    document's last token, the token that the HF model's own forward pools at. The head runs on
    those D states only."""
    hidden = model.get_decoder()(**forward_kwargs(model, batch)).last_hidden_state
    ends = document_ends(batch).to(hidden.device)
    return model.score(hidden.reshape(-1, hidden.shape[-1])[ends]).squeeze(-1).float()
