"""Perplexity of a model on a data file, over the same tokens SFT trains on."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esft.data.packing import best_fit_decreasing, collate_packed
from esft.data.tokenize import TrainOn, tokenize_records
from esft.models.attention import packed_layout
from esft.models.forward import token_loss


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    max_length: int = 2048,
    max_tokens: int = 16384,
    train_on: TrainOn = "assistant",
    progress: bool = False,
) -> dict[str, float]:
    """``exp`` of the mean next-token loss over the records' trained tokens (the assistant turns,
    or every token with ``train_on="all"``), computed on packed batches; longer examples are
    cut to `max_length`."""
    examples, _ = tokenize_records(records, tokenizer, max_length, train_on, "right")
    rows = best_fit_decreasing([e["length"] for e in examples], max_length)
    layout = packed_layout(model.config._attn_implementation)
    per_batch = max(1, max_tokens // max_length)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for lo in tqdm(range(0, len(rows), per_batch), desc="perplexity", disable=not progress, leave=False):
        batch = collate_packed([[examples[i] for i in row] for row in rows[lo : lo + per_batch]], layout)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum, n = token_loss(model, batch)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(count), "examples": float(len(examples))}
