"""Batched generation with a KV cache, and per-task scoring with the tasks' verifiers.

Several samples per prompt (`rollout` with ``num_samples`` G > 1, as GRPO, rejection sampling and
on-policy distillation ask) share the prompt's KV cache: ``generate(num_return_sequences=G)``
copies every prompt G times before its first forward and so runs the prompt G times; here the
prompts run once and their cache is copied G times (`prefill_shared`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import CompileConfig, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from esft.data.tasks import EpisodeTask, get_task
from esft.evaluation.metrics import summarize
from esft.models.attention import VARLEN
from esft.models.sharding import synced_generation


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


def _cache_argument(model: PreTrainedModel) -> str:
    """The keyword under which ``forward`` and ``generate`` take a cache: ``cache`` from
    transformers 5.24 (``past_key_values`` still accepted, with a deprecation warning), before that
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


CacheKind = Literal["dynamic", "static"]
CompileDecode = Literal["auto"] | bool


def compile_options(compile_decode: CompileDecode, cache: CacheKind) -> dict[str, Any]:
    """The ``model.generate`` options for `compile_decode`: ``auto`` leaves transformers' rule (it
    compiles the decode step for a static cache on CUDA, XPU, TPU and Neuron, not on CPU); False
    never compiles; True compiles it on any device, which needs the static cache. True compiles
    with dynamic shapes: a rollout's batch size and cache length change with its prompts, and
    transformers' default (static, then dynamic on the first change) compiles twice. (A batch
    without left padding after padded ones still compiles once more: transformers' decode mask
    is then a fresh tensor, not a view.)"""
    if compile_decode == "auto":
        return {}
    if compile_decode is False:
        return {"disable_compile": True}
    if compile_decode is not True:
        raise ValueError(f"compile_decode must be 'auto', True or False, got {compile_decode!r}")
    if cache != "static":
        raise ValueError(f"compile_decode=True compiles the decode step for a static cache; got cache={cache!r}")
    config = CompileConfig(dynamic=True)
    config._compile_all_devices = True  # transformers' switch for devices other than CUDA, XPU, TPU, Neuron
    return {"compile_config": config}


def _repeat_rows(cache: DynamicCache | StaticCache, repeats: int) -> None:
    """Each row of the cache `repeats` times, consecutive. A static layer has no
    ``batch_repeat_interleave``: its rows are indexed (`_select_rows`), which makes fresh tensors
    as ``generate``'s own static cache holds; ``repeat_interleave`` makes views, whose ``_base``
    a compiled decode step guards on (a second compilation for the other kind)."""
    if isinstance(cache, DynamicCache):
        cache.batch_repeat_interleave(repeats)
        return
    keys = cache.layers[0].keys
    _select_rows(cache, torch.arange(keys.shape[0], device=keys.device).repeat_interleave(repeats))


def _select_rows(cache: DynamicCache | StaticCache, rows: torch.Tensor) -> None:
    """Keep only the cache rows `rows` (in that order); a static layer's new tensors are marked
    static again."""
    if isinstance(cache, DynamicCache):
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        layer.batch_size = layer.keys.shape[0]
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def prefill_shared(model: PreTrainedModel, enc: dict[str, torch.Tensor], num_samples: int, max_new_tokens: int,
                   cache: CacheKind = "static") -> dict[str, Any]:
    """Run the left-padded prompts ``enc`` once, all but their last token, and copy the KV cache
    to ``num_samples`` rows per prompt (consecutive, as ``num_return_sequences``). Returns the
    keyword arguments under which ``model.generate`` continues: the prompts repeated and the cache;
    ``generate`` runs only the last prompt token of each row, so its first sampled token comes
    from the same logits as without the shared cache, through the same logits processors.
    Position ids count real tokens only, as ``generate`` derives them from the attention mask.

    ``static`` preallocates the cache for ``max_new_tokens`` more tokens: a dynamic cache grows by
    concatenation, copying every layer's keys and values at every step (61% of a shared-prefix
    rollout's time on CPU, 16 prompts of 195 tokens x 8 samples); with a static cache ``generate``
    can also compile its decode step (`rollout`'s ``compile_decode``)."""
    mask = enc["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    width = enc["input_ids"].shape[1]
    kv = StaticCache(config=model.config, max_cache_len=width + max_new_tokens) if cache == "static" else DynamicCache(config=model.config)
    name = _cache_argument(model)
    model(input_ids=enc["input_ids"][:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
          use_cache=True, logits_to_keep=1, **{name: kv})
    _repeat_rows(kv, num_samples)
    return {"input_ids": enc["input_ids"].repeat_interleave(num_samples, 0),
            "attention_mask": mask.repeat_interleave(num_samples, 0), name: kv}


@dataclass
class Rollout:
    """One sampled completion, as token ids: what RL and on-policy distillation train on."""

    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including the first end-of-turn token; no padding
    text: str  # the completion decoded without special tokens, stripped (of an episode: its final turn)
    truncated: bool  # stopped by ``max_new_tokens`` before an end-of-turn token (episodes: `episode_rollout`)
    env_mask: list[bool] | None = None  # per completion token: written by the environment (never trained)
    turns: int = 1  # policy turns


@torch.no_grad()
def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    num_samples: int = 1,
    progress: bool = False,
    share_prefix: bool = True,
    cache: CacheKind = "static",
    compile_decode: CompileDecode = "auto",
    **sampling: Any,
) -> list[Rollout]:
    """Complete each conversation with an assistant turn; greedy unless ``do_sample=True``
    (``temperature``, ``top_p``, ... are passed to ``model.generate``).

    Returns ``len(conversations) * num_samples`` rollouts, the samples of a conversation
    consecutive. Prompts are sorted by length before batching (less left padding) and the
    results put back in order. With ``num_samples`` > 1 and `share_prefix`, each prompt runs
    once and its KV cache is copied to its samples (`prefill_shared`; beam search always runs
    through ``generate`` alone); greedy completions are the same token for token either way. A
    sharded model (FSDP2, ZeRO-3) generates in lockstep across ranks (``synced_gpus``); every rank
    must then pass the same number of conversations.

    ``cache`` is the shared path's KV cache (`prefill_shared`). ``compile_decode`` (`compile_options`):
    ``auto`` compiles ``generate``'s decode step where transformers does (CUDA, static cache; not
    on CPU), True on any device (the plain path then has ``generate`` allocate a static cache),
    False never. On CPU the compiled step gave 1.06-1.09x the eager one's tokens/s after 1-2
    minutes of compilation per process (benchmarks/README.md): worth it for long runs only.
    """
    device = next(model.parameters()).device
    compiled = compile_options(compile_decode, cache)
    plain = dict(compiled, cache_implementation="static") if compile_decode is True else compiled
    sampling.setdefault("do_sample", num_samples > 1)
    if synced_generation(model):
        sampling.setdefault("synced_gpus", True)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[Rollout]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with generation_mode(model), tqdm(total=len(prompts), desc="generating", disable=not progress, leave=False) as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                shared = share_prefix and num_samples > 1 and enc["input_ids"].shape[1] > 1 and sampling.get("num_beams", 1) == 1
                inputs = prefill_shared(model, enc, num_samples, max_new_tokens, cache) if shared else enc
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=1 if shared else num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos,
                    **(compiled if shared else plain),
                    **sampling,
                )
                width = enc["input_ids"].shape[1]
                completions = out[:, width:].tolist()
                for j, i in enumerate(idx):
                    mask = enc["attention_mask"][j].bool()
                    prompt_ids = enc["input_ids"][j][mask].tolist()
                    for ids in completions[j * num_samples : (j + 1) * num_samples]:
                        stop = ids.index(eos) + 1 if eos in ids else len(ids)
                        ids = ids[:stop]
                        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                        results[i].append(Rollout(prompt_ids, ids, text, truncated=eos not in ids))
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
    return [r for group in results for r in group]


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
    """The completions of `rollout` as text."""
    rollouts = rollout(model, tokenizer, conversations, max_new_tokens, batch_size, num_samples, progress, **sampling)
    return [r.text for r in rollouts]


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
    """Per task: the mean verifier score over all samples under the task's metric name
    (`Task.metric`: ``exact_match``, ``chrf``, ...), ``pass@k`` for each k <= n (a sample counts as
    correct when it scores 1.0; unbiased estimator), the means of a task's other `metrics` (e.g.
    BLEU beside chrF) on the first sample, and ``n`` (records). Logged as
    ``eval/<task>/<metric>`` (`esft.evaluation.metrics.eval_tag`)."""
    results = {}
    for name, records in records_by_task.items():
        task = get_task(name)
        if not task.metric:
            raise ValueError(f"task {name!r} ({type(task).__name__}) declares no `metric`: name what its score measures")
        if isinstance(task, EpisodeTask):  # multi-turn: the final turn of each episode is scored
            from esft.evaluation.episodes import episode_rollout  # it builds on this module

            outs = episode_rollout(model, tokenizer, records, max_new_tokens, batch_size, num_samples, **sampling)
            completions = [o.text for o in outs]
        else:
            completions = generate(
                model, tokenizer, [r["messages"][:-1] for r in records], max_new_tokens, batch_size, num_samples,
                progress, **sampling
            )
        scores = [task.score(r, c) for r, c in zip((r for r in records for _ in range(num_samples)), completions)]
        row = summarize(scores, num_samples, ks, task.metric)
        if hasattr(task, "metrics"):
            extra = [task.metrics(r, completions[i * num_samples]) for i, r in enumerate(records)]
            for key in extra[0]:
                if key != task.metric:  # the task's own metric is the mean over all samples, kept above
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
    """Mean greedy verifier score per task (in the task's own metric, `Task.metric`)."""
    results = evaluate(model, tokenizer, records_by_task, max_new_tokens, batch_size)
    return {name: row[get_task(name).metric] for name, row in results.items()}
