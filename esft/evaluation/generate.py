"""Batched generation with a KV cache, and per-task scoring with the tasks' verifiers."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esft.data.tasks import get_task
from esft.evaluation.metrics import summarize
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
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    num_samples: int = 1,
    progress: bool = False,
    **sampling: Any,
) -> list[str]:
    """Complete each conversation with an assistant turn; greedy unless ``do_sample=True``.

    Returns ``len(conversations) * num_samples`` completions, the samples of a conversation
    consecutive. Prompts are sorted by length before batching (less left padding) and the
    results put back in order.
    """
    device = next(model.parameters()).device
    sampling.setdefault("do_sample", num_samples > 1)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with generation_mode(model), tqdm(total=len(prompts), desc="generating", disable=not progress, leave=False) as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for j, i in enumerate(idx):
                    results[i] = [t.strip() for t in texts[j * num_samples : (j + 1) * num_samples]]
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
    return [text for group in results for text in group]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records_by_task: dict[str, list[dict[str, Any]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    num_samples: int = 1,
    ks: Sequence[int] = (1,),
    progress: bool = False,
    **sampling: Any,
) -> dict[str, dict[str, float]]:
    """Per task: ``score`` (mean verifier score over all samples), ``pass@k`` for each k <= n
    (a sample counts as correct when it scores 1.0; unbiased estimator), the means of a task's
    extra `metrics` (e.g. chrF and BLEU) on the first sample, and ``n`` (records)."""
    results = {}
    for name, records in records_by_task.items():
        task = get_task(name)
        completions = generate(
            model, tokenizer, [r["messages"][:-1] for r in records], max_new_tokens, batch_size, num_samples, progress, **sampling
        )
        scores = [task.score(r, c) for r, c in zip((r for r in records for _ in range(num_samples)), completions)]
        row = summarize(scores, num_samples, ks)
        if hasattr(task, "metrics"):
            extra = [task.metrics(r, completions[i * num_samples]) for i, r in enumerate(records)]
            for key in extra[0]:
                row[key] = sum(e[key] for e in extra) / len(extra)
        results[name] = row
    return results


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records_by_task: dict[str, list[dict[str, Any]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean greedy verifier score per task."""
    results = evaluate(model, tokenizer, records_by_task, max_new_tokens, batch_size)
    return {name: row["score"] for name, row in results.items()}
