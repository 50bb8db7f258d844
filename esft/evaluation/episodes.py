"""Batched multi-turn episodes: the policy acts, the environment replies, the KV cache carries over.

`episode_rollout` plays the episodes of `esft.data.tasks.EpisodeTask` records (``num_samples``
per record, as GRPO's groups) in batches. Each prompt runs once and its cache is copied to its
samples (`prefill_shared`); then every turn is one ``model.generate`` call over the rows still
playing, continuing the same cache: a row's policy turn ends at its end-of-turn token, the
environment's reply (rendered by the chat template as a ``EpisodeTask.env_role`` turn followed by
the next assistant header, `env_tokens`) is appended, and only the tokens the cache lacks are run
before the next turn. Finished rows leave the batch (and the cache).

Rows of a batch stop at different lengths and get replies of different lengths: after a row's
end-of-turn token its padding stays in the grid with attention mask 0, and its reply is padded on
the left, so the grid keeps one width; position ids count real tokens only, as in the training
forward of the same tokens without the holes, so a token's log-prob is the one it was sampled from.

Each `Rollout` holds the completion as it is trained: the policy's tokens and the environment's,
in order, with ``env_mask`` True on the environment's (GRPO masks them out of the loss), ``text``
the final turn (what the verifier scores) and ``turns``. ``truncated``: the episode ended on a
turn cut by ``max_new_tokens``, or the environment still had a reply after the last allowed turn.

Departures: the environment sees decoded text, stripped; a sharded model (FSDP2, ZeRO-3), which
generates in lockstep across ranks, is not supported (ranks would take different turn counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esft.data.tasks import EpisodeTask, TASKS, get_task
from esft.evaluation.generate import (CacheKind, CompileDecode, Rollout, _cache_argument, _select_rows, compile_options,
                                     generation_mode, prefill_shared)
from esft.models.sharding import synced_generation


def episode_task(record: dict[str, Any]) -> EpisodeTask | None:
    """The record's task when it is a multi-turn `EpisodeTask` (built with default options), else None."""
    cls = TASKS.get(record.get("task"))
    return get_task(record["task"]) if cls is not None and issubclass(cls, EpisodeTask) else None


def all_episodes(records: Sequence[dict[str, Any]]) -> bool:
    """Whether every record is an episode (True) or none is (False); a mix is an error."""
    kinds = {episode_task(r) is not None for r in records}
    if len(kinds) > 1:
        first = next(r for r in records if episode_task(r) is not None)
        raise ValueError(f"records mix multi-turn episode tasks (e.g. {first.get('id', first['task'])!r}) with "
                         "single-turn prompts; train or evaluate them in separate runs")
    return kinds == {True}


def policy_tokens(r: Rollout) -> int:
    """The completion tokens the policy wrote (an episode's environment tokens not counted)."""
    return len(r.completion_ids) - sum(r.env_mask or ())


def env_tokens(tokenizer: PreTrainedTokenizerBase, role: str, content: str) -> list[int]:
    """The tokens the chat template puts after an assistant turn's end-of-turn token when the
    environment's turn (`role`, `content`) follows, up to and including the next assistant header."""
    eos = tokenizer.eos_token
    head = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
    before = tokenizer.apply_chat_template(head, tokenize=False)
    after = tokenizer.apply_chat_template(head + [{"role": role, "content": content}], tokenize=False,
                                          add_generation_prompt=True)
    if eos is None or eos not in before or not after.startswith(before):
        raise ValueError(f"env_tokens: the chat template must end an assistant turn with the EOS token {eos!r} and "
                         f"render later turns after earlier ones unchanged; it renders {before!r} then {after!r}")
    return tokenizer(after[before.rindex(eos) + len(eos):], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def episode_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    num_samples: int = 1,
    max_turns: int | None = None,
    max_env_tokens: int = 64,
    cache: CacheKind = "static",
    compile_decode: CompileDecode = "auto",
    **sampling: Any,
) -> list[Rollout]:
    """Play each record's episode ``num_samples`` times; greedy unless ``do_sample=True``.

    Args:
        records: records of `EpisodeTask` tasks; each episode starts from `EpisodeTask.prompt`.
        max_new_tokens: the limit of one policy turn.
        batch_size: records played together (each with its ``num_samples`` rows).
        num_samples: episodes per record, consecutive in the result.
        max_turns: policy turns per episode (None: each task's ``max_turns``).
        max_env_tokens: the limit of one rendered environment reply (sizes the static cache); a
            longer reply is an error naming the task and the reply.
        cache: ``static`` (preallocated for the longest episode) or ``dynamic``.
        compile_decode: compile ``generate``'s decode step: ``auto`` where transformers does (CUDA,
            static cache), True on any device (static cache only), False never (`compile_options`).
        **sampling: passed to ``model.generate`` (``do_sample``, ``temperature``, ``top_p``, ...).

    Returns:
        ``len(records) * num_samples`` rollouts (module docstring).
    """
    if synced_generation(model):
        raise ValueError("episode_rollout: a sharded model (FSDP2, ZeRO-3) generates in lockstep across ranks; "
                         "multi-turn episodes take different turn counts per rank and are not supported there")
    tasks = [episode_task(r) for r in records]
    for r, t in zip(records, tasks):
        if t is None:
            raise ValueError(f"episode_rollout: record {r.get('id', '?')!r} has task {r.get('task')!r}, which is not "
                             f"a multi-turn episode task")
    sampling.setdefault("do_sample", num_samples > 1)
    sampling.update(compile_options(compile_decode, cache))
    prompts = [tokenizer.apply_chat_template(EpisodeTask.prompt(r), tokenize=False, add_generation_prompt=True)
               for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Rollout | None] = [None] * (len(records) * num_samples)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with generation_mode(model):
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(next(model.parameters()).device)
                for j, i in enumerate(idx):
                    prompt_ids = enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist()
                    for s in range(num_samples):
                        results[i * num_samples + s] = Rollout(prompt_ids, [], "", False, [], 0)
                turns = max(max_turns or tasks[i].max_turns for i in idx)
                budget = turns * max_new_tokens + (turns - 1) * max_env_tokens
                slots = [i * num_samples + s for i in idx for s in range(num_samples)]
                _play(model, tokenizer, prefill_shared(model, enc, num_samples, budget, cache), [results[k] for k in slots], [records[k // num_samples] for k in slots],
                      [tasks[k // num_samples] for k in slots], max_new_tokens, max_turns, max_env_tokens, sampling)
    finally:
        tokenizer.padding_side = side
    return results


def _play(model, tokenizer, inputs: dict[str, Any], outs: list[Rollout], records: list[dict],
          tasks: list[EpisodeTask], max_new_tokens: int, max_turns: int | None, max_env_tokens: int,
          sampling: dict[str, Any]) -> None:
    """The turns of one batch, filling `outs` (one `Rollout` per grid row) in place."""
    name = _cache_argument(model)
    ids, mask, kv = inputs["input_ids"], inputs["attention_mask"], inputs[name]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = list(range(len(outs)))  # indices into outs of the grid's rows
    while rows:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos, **{name: kv}, **sampling)
        new = out[:, ids.shape[1]:]
        new_mask = torch.zeros_like(new)
        keep, replies = [], []
        for g, r in enumerate(rows):
            o, task = outs[r], tasks[r]
            action = new[g].tolist()
            action = action[: action.index(eos) + 1] if eos in action else action
            new_mask[g, : len(action)] = 1
            o.completion_ids += action
            o.env_mask += [False] * len(action)
            o.turns += 1
            o.text = tokenizer.decode(action, skip_special_tokens=True).strip()
            cut = eos not in action
            reply = None if cut else task.reply(records[r], o.text)
            if reply is None or o.turns >= (max_turns or task.max_turns):
                o.truncated = cut or reply is not None
                continue
            tokens = env_tokens(tokenizer, task.env_role, reply)
            if len(tokens) > max_env_tokens:
                raise ValueError(f"episode_rollout: task {task.name!r} replied {reply!r} ({len(tokens)} tokens "
                                 f"rendered), more than max_env_tokens={max_env_tokens}")
            o.completion_ids += tokens
            o.env_mask += [True] * len(tokens)
            keep.append(g)
            replies.append(tokens)
        if not keep:
            return
        width = max(map(len, replies))
        block = torch.full((len(keep), width), pad, dtype=ids.dtype, device=ids.device)
        block_mask = torch.zeros_like(block)
        for g, tokens in enumerate(replies):  # padded on the left: every row's last column is real
            block[g, width - len(tokens):] = torch.tensor(tokens, dtype=ids.dtype)
            block_mask[g, width - len(tokens):] = 1
        sel = torch.tensor(keep, device=ids.device)
        if len(keep) < len(rows):
            _select_rows(kv, sel)
        ids = torch.cat([ids[sel], new[sel], block], 1)
        mask = torch.cat([mask[sel], new_mask[sel], block_mask], 1)
        rows = [rows[g] for g in keep]
        # run what the cache lacks (the turn's last token, the reply) but the last token: generate runs that
        done = int(kv.get_seq_length())
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids[:, done:-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, done:-1],
              use_cache=True, logits_to_keep=1, **{name: kv})
