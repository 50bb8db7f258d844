"""Batched generation with a KV cache, and per-task scoring with the tasks' verifiers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esft.data.tasks import get_task
from esft.models.attention import VARLEN


@contextmanager
def generation_mode(model: PreTrainedModel):
    """Eval mode, a cache-friendly attention path, left padding; restored afterwards."""
    was_training = model.training
    attn = model.config._attn_implementation
    if attn == VARLEN:  # varlen takes packed batches only; generation pads
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        yield
    finally:
        if attn == VARLEN:
            model.set_attn_implementation(attn)
        model.train(was_training)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    **sampling: Any,
) -> list[str]:
    """Complete each conversation with an assistant turn (greedy unless `sampling` says otherwise)."""
    device = next(model.parameters()).device
    sampling.setdefault("do_sample", False)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[str] = []
    try:
        with generation_mode(model):
            for lo in range(0, len(conversations), batch_size):
                prompts = [
                    tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                    for c in conversations[lo : lo + batch_size]
                ]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
                outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in outputs]


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records_by_task: dict[str, list[dict[str, Any]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean verifier score per task on the given records (prompts = all but the last turn)."""
    scores = {}
    for name, records in records_by_task.items():
        task = get_task(name)
        completions = generate(model, tokenizer, [r["messages"][:-1] for r in records], max_new_tokens, batch_size)
        metric = MeanMetric()
        for record, completion in zip(records, completions):
            metric.update(task.score(record, completion))
        scores[name] = float(metric.compute())
    return scores
