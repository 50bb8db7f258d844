"""GRPO (DeepSeekMath, arXiv 2402.03300) after SFT with rule-based rewards (DeepSeek-R1, arXiv 2501.12948).

    esft fit --config configs/grpo/arithmetic_tiny.yaml

One training step: sample ``num_generations`` completions for each prompt of the batch with the
KV-cache generator (`esft.evaluation.rollout`; each prompt runs once and its cache is copied to
its G samples), reward them (`esft.rewards.RewardSet`), turn the
rewards into group-relative advantages, then take ``num_iterations * num_minibatches`` optimizer
steps on the clipped surrogate (`esft.losses.grpo_loss`) against the log-probs stored before the
first update. The reference model (for the k3 KL term) is a frozen copy of the starting policy,
made only when ``beta > 0`` (`CausalLMModule.frozen_reference`: with LoRA the policy with its
adapters disabled); under FSDP2 it is sharded like the policy. Validation is greedy pass@1 and format rate on held-out prompts.

Multi-turn tasks (`esft.data.tasks.EpisodeTask`, e.g. ``calculator``): a batch of their records is
played as episodes (`esft.evaluation.episodes.episode_rollout`: the policy acts, the environment
replies, up to ``max_turns`` policy turns, one KV cache across the turns) and rewarded on the final
turn. The environment's tokens stay in the trained sequence, as context, with labels -100
(`rollout_example`): they are out of the loss, out of the token counts of its normalisers and out
of the KL term (`loss_mask`); logged ``train/turns`` is the mean policy turns per episode.

DAPO's dynamic sampling (arXiv 2503.14476, ``dynamic_sampling``): a group whose G samples all
score the same has advantage 0 and no signal; such groups are dropped and more prompts sampled,
up to ``max_refill_rounds`` extra rounds of a batch's worth of prompts each, until the batch holds
as many informative groups as it had prompts (extra ones are dropped).

Departures: the reference is fixed by default (R1 keeps it fixed within a stage; the pipeline's
next stage starts from the new policy); ``ref_refresh_steps`` copies the policy into it every N
optimizer steps instead. It is not stored in checkpoints but rebuilt from the starting model
(`model_name_or_path`) when a run resumes (with ``ref_refresh_steps``, from the resumed policy
when a refresh was due before the resume step). Rollouts run on the training device in eval mode
through ``model.generate`` (no separate inference engine). Dynamic sampling draws its extra prompts
at random from the training prompts (each rank with its own seed), not from the next batches of the
epoch; a step whose extra rounds find no informative group at all trains on its own batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader, RandomSampler

from esft.data.packing import collate_padded
from esft.data.prompts import prompt_messages
from esft.data.tokenize import completion_example
from esft.evaluation import Rollout, rollout
from esft.evaluation.episodes import all_episodes, episode_rollout, policy_tokens
from esft.evaluation.generate import CompileDecode
from esft.losses.ce import IGNORE_INDEX, next_token_targets
from esft.losses.grpo import LossType, ScaleRewards, group_advantages, grpo_loss
from esft.models.forward import target_logprobs
from esft.models.frozen import FrozenModel
from esft.models.sharding import call_model, gathered, is_sharded
from esft.loggers import log_to_all
from esft.objectives.base import CausalLMModule
from esft.rewards import RewardSet, Sample
from esft.rewards.evaluate import evaluate_reasoning, reasoning_metrics


def rollout_example(r: Rollout) -> dict[str, Any]:
    """A rollout as a tokenized example whose labels are the policy's completion tokens: the
    prompt and an episode's environment tokens (``env_mask``) are -100."""
    example = completion_example(r.prompt_ids, r.completion_ids)
    if r.env_mask:
        p = len(r.prompt_ids)
        example["labels"][p:] = [IGNORE_INDEX if env else t for t, env in zip(r.completion_ids, r.env_mask, strict=True)]
    return example


def rollout_batch(rollouts: list[Rollout], pad_token_id: int) -> dict[str, Any]:
    """Prompt + completion of every rollout as a right-padded batch (`rollout_example`)."""
    return collate_padded([[rollout_example(r)] for r in rollouts], pad_token_id)


def loss_mask(batch: dict[str, Any], rollouts: list[Rollout], mask_truncated: bool = False) -> torch.Tensor:
    """``[B, T]`` 1 where the next-token target is a trained token (the policy's own, never the
    prompt, an environment reply or padding), 0 elsewhere; all 0 on truncated rollouts with
    `mask_truncated`. It weights the loss, counts the tokens of the token-mean normalisers and
    masks the KL term."""
    mask = (next_token_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).float()
    if mask_truncated:
        mask = mask * torch.tensor([not o.truncated for o in rollouts], device=mask.device, dtype=mask.dtype)[:, None]
    return mask


class GRPOModule(CausalLMModule):
    def __init__(
        self,
        num_generations: int = 8,
        max_completion_length: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        rewards: dict[str, float] | None = None,
        reward_options: dict[str, dict[str, Any]] | None = None,
        scale_rewards: ScaleRewards = "group",
        loss_type: LossType = "grpo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        num_minibatches: int = 1,
        mask_truncated_completions: bool = False,
        max_grad_norm: float | None = 1.0,
        generation_batch_size: int = 256,
        skip_zero_advantage: bool = True,
        share_prefix: bool = True,
        compile_decode: CompileDecode = "auto",
        dynamic_sampling: bool = False,
        max_refill_rounds: int = 3,
        ref_refresh_steps: int | None = None,
        reward_workers: int = 0,
        reward_timeout: float | None = None,
        max_turns: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_generations: G, completions sampled per prompt.
            max_completion_length: generation limit in tokens (and the ``dr_grpo`` normaliser).
            temperature: sampling temperature (the log-probs are computed at it too).
            top_p: nucleus sampling.
            rewards: reward name -> weight (`esft.rewards.REWARDS`, ``model`` for a trained reward
                model, or ``module:function``); default accuracy 1, format 0.5.
            reward_options: reward name -> options, e.g. ``{overlong: {max_tokens: 64, cache: 16}}``,
                ``{model: {path: runs/reward_tiny/hf}}``.
            scale_rewards: advantage scaling: ``group`` std (GRPO), ``batch`` std, ``none`` (Dr. GRPO).
            loss_type: token aggregation: ``grpo`` (per sequence), ``dr_grpo`` (constant), ``dapo`` (per
                token of an optimizer step's batch over all ranks), ``bnpo`` (per token of this rank's).
            epsilon: lower clip range of the ratio (and upper, unless `epsilon_high`).
            epsilon_high: upper clip range (DAPO's clip-higher).
            beta: k3 KL coefficient to the starting policy; 0 loads no reference model.
            num_iterations: mu, passes over each batch of rollouts (old log-probs stored before the first).
            num_minibatches: optimizer steps per pass (the rollouts split into this many parts).
            mask_truncated_completions: completions cut by the length limit get no loss.
            max_grad_norm: clip the gradient norm (None: no clipping).
            generation_batch_size: prompts generated together.
            skip_zero_advantage: with ``beta`` 0, run the update only on sequences whose advantage
                is not 0 (the others add nothing to the loss or gradient; `_update`).
            share_prefix: run each prompt once and copy its KV cache to its G samples (the same
                samples as ``generate(num_return_sequences=G)``, without its G prefills).
            compile_decode: compile the decode step of generation (static KV cache): ``auto`` where
                transformers does (CUDA, not CPU); True on any device (on CPU 1.06-1.09x the rollout
                tokens/s after 1-2 minutes of compilation, benchmarks/README.md); False never
                (`esft.evaluation.generate.compile_options`).
            dynamic_sampling: DAPO's dynamic sampling: keep only groups whose rewards differ, and
                generate for more prompts until the batch is full again (`_sample`).
            max_refill_rounds: the cap on extra generation rounds per step with `dynamic_sampling`.
            ref_refresh_steps: copy the policy into the reference every this many optimizer steps
                (needs ``beta > 0``); None keeps the starting policy.
            reward_workers: compute the per-sample rewards in this many worker processes (0: here).
            reward_timeout: with workers, seconds per reward call; a call that times out or raises
                scores 0 and is counted (``train/reward_failures``, `esft.rewards.workers`).
            max_turns: policy turns per episode of a multi-turn task (`esft.data.tasks.EpisodeTask`;
                None: the task's own limit). `max_completion_length` then limits each turn, and
                stays the ``dr_grpo`` normaliser per sequence (a constant: it scales the step only).
            **kwargs: the model, tokenizer and optimizer arguments of `CausalLMModule`.
        """
        if ref_refresh_steps is not None and (ref_refresh_steps < 1 or beta <= 0):
            raise ValueError(f"GRPOModule: ref_refresh_steps={ref_refresh_steps} needs an integer >= 1 and beta > 0 "
                             f"(got beta={beta}: without the KL term there is no reference)")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"GRPOModule: max_turns must be >= 1 or None, got {max_turns}")
        if max_refill_rounds < 0:
            raise ValueError(f"GRPOModule: max_refill_rounds must be >= 0, got {max_refill_rounds}")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.rewards = RewardSet(rewards or {"accuracy": 1.0, "format": 0.5}, reward_options, reward_workers, reward_timeout)
        self.reference: FrozenModel | None = None  # outside the module's parameters and checkpoint
        self._reference_step: int | None = None  # the optimizer step whose policy the reference holds
        self._refill: Iterator[list[dict[str, Any]]] | None = None

    @torch.no_grad()
    def _refresh_reference(self) -> None:
        """With ``ref_refresh_steps`` N: after every N-th optimizer step, copy the policy into the
        reference; on the first step of a run resumed past a due refresh, too (the reference is not
        checkpointed). Both are whole, or sharded alike (FSDP2); ZeRO-3 gathers the policy."""
        n = self.hparams.ref_refresh_steps
        if not n or self.reference is None:
            return
        step = self.global_step
        due = step % n == 0 if self._reference_step is not None else step >= n
        if self._reference_step is None:
            self._reference_step = 0
        if not due or step == self._reference_step:
            return
        ref, policy = self.reference.model, self.model
        with gathered(list(policy.parameters())):
            for r, p in zip(ref.parameters(), policy.parameters(), strict=True):
                r.copy_(p)
        for r, b in zip(ref.buffers(), policy.buffers(), strict=True):
            r.copy_(b)
        self._reference_step = step

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and self.hparams.max_grad_norm is not None:
            # DeepSpeed clips inside its own step (Lightning's clip_gradients does nothing there)
            strategy.config.setdefault("gradient_clipping", self.hparams.max_grad_norm)

    def configure_model(self) -> None:
        """The reference is copied from the policy here, before any strategy shards it (and
        before a resumed run loads its checkpoint, so it stays the starting policy): sharded like
        the policy under FSDP2, whole on every rank otherwise (DDP, DeepSpeed)."""
        if self.hparams.beta > 0 and self.reference is None and not is_sharded(self.model):
            self.reference = self.frozen_reference()
            if self.hparams.ref_refresh_steps and self.reference.base_of_adapter:
                raise ValueError("GRPOModule: ref_refresh_steps needs a copied reference; with LoRA the reference is the "
                                 "base model under the adapters, which training does not change")
        super().configure_model()

    def on_fit_start(self) -> None:
        super().on_fit_start()  # train mode; generation switches modes itself
        if self.reference is not None:
            self.reference.to(self.device)

    def on_fit_end(self) -> None:
        self.rewards.close()  # reward worker processes, if any

    # ---- one step --------------------------------------------------------------------------
    def generate(self, records: list[dict[str, Any]]) -> tuple[list[Rollout], list[Sample]]:
        hp = self.hparams
        sampling = dict(do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=0)
        if all_episodes(records):
            outs = episode_rollout(self.model, self.tokenizer, records, hp.max_completion_length, hp.generation_batch_size,
                                   hp.num_generations, hp.max_turns, compile_decode=hp.compile_decode, **sampling)
        else:
            outs = rollout(self.model, self.tokenizer, [prompt_messages(r) for r in records], hp.max_completion_length,
                           hp.generation_batch_size, hp.num_generations, share_prefix=hp.share_prefix,
                           compile_decode=hp.compile_decode, **sampling)
        records_g = [r for r in records for _ in range(hp.num_generations)]
        return outs, [Sample(r, o.text, policy_tokens(o), o.truncated) for r, o in zip(records_g, outs)]

    def _logprobs(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logp, entropy, _ = call_model(model, target_logprobs, batch, self.hparams.loss_chunk_size, self.hparams.temperature)
        return logp, entropy

    def _refill_records(self, n: int) -> list[dict[str, Any]]:
        """``n`` training prompts drawn at random (dynamic sampling's extra rounds): an endless
        shuffled pass over the training set, seeded per rank."""
        if self._refill is None:
            dataset = getattr(self.trainer.train_dataloader, "dataset", None)
            if dataset is None:
                raise ValueError("GRPOModule: dynamic_sampling draws extra prompts from the training DataLoader's "
                                 "dataset, and this train_dataloader has none")
            generator = torch.Generator().manual_seed(torch.initial_seed() + 1 + self.global_rank)
            loader = DataLoader(dataset, batch_size=n, sampler=RandomSampler(dataset, generator=generator),
                                drop_last=len(dataset) >= n, collate_fn=list)
            self._refill = itertools.chain.from_iterable(itertools.repeat(loader))
        return next(self._refill)

    def _sample(self, records: list[dict[str, Any]]) -> tuple[list[Rollout], list[float], dict[str, Any]]:
        """Rollouts and their rewards for a batch of prompts.

        With ``dynamic_sampling``, groups whose G rewards are all equal are dropped and a batch's
        worth of prompts drawn again (`_refill_records`) while fewer informative groups than prompts
        are kept, for at most ``max_refill_rounds`` rounds; every rank takes the same number of
        rounds (sharded generation is collective). The first informative groups fill the batch; if
        none was found, the step trains on its own batch. Returns the kept rollouts, their total
        rewards, and the step's statistics: every generated sample and its reward parts (what the
        policy did), generation seconds, and with dynamic sampling ``groups_refilled`` (kept groups
        from extra rounds), ``informative_groups`` (their share of all groups generated) and
        ``refill_rounds``.
        """
        hp = self.hparams
        size = hp.num_generations
        info: dict[str, Any] = {"samples": [], "rewards": [], "parts": {}, "generation_s": 0.0, "reward_failures": 0}
        kept: list[tuple[list[Rollout], list[float], int]] = []  # (rollouts, rewards, round) per group
        first: list[tuple[list[Rollout], list[float], int]] = []
        prompts, rounds, groups, informative = records, 0, 0, 0
        while True:
            t0 = time.perf_counter()
            outs, samples = self.generate(prompts)
            info["generation_s"] += time.perf_counter() - t0
            total, parts = self.rewards(samples)
            info["reward_failures"] += self.rewards.last_stats.failures  # calls that raised or timed out, scored 0
            info["samples"] += samples
            info["rewards"] += total
            for name, values in parts.items():
                info["parts"].setdefault(name, []).extend(values)
            for lo in range(0, len(outs), size):
                group = (outs[lo : lo + size], total[lo : lo + size], rounds)
                first += [group] if rounds == 0 else []
                if not hp.dynamic_sampling or max(group[1]) > min(group[1]):
                    kept.append(group)
                    informative += 1
                groups += 1
            if not hp.dynamic_sampling or not self._any_rank(len(kept) < len(records)) or rounds == hp.max_refill_rounds:
                break
            rounds += 1
            prompts = self._refill_records(len(records))
        kept = kept[: len(records)] or first
        if hp.dynamic_sampling:
            info.update(groups_refilled=sum(g[2] > 0 for g in kept), informative_groups=informative / groups,
                        refill_rounds=rounds)
        return [o for g in kept for o in g[0]], [r for g in kept for r in g[1]], info

    def _any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce(torch.tensor(float(flag), device=self.device), reduce_op="sum") > 0)

    def training_step(self, records: list[dict[str, Any]], batch_idx: int) -> None:
        hp = self.hparams
        self._refresh_reference()  # a run resumed past a due refresh
        t0 = time.perf_counter()
        outs, total, info = self._sample(records)
        t_gen = info["generation_s"]
        t_sample = time.perf_counter() - t0
        rewards = torch.tensor(total, device=self.device)
        advantages = group_advantages(rewards, hp.num_generations, hp.scale_rewards)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                 for k, v in rollout_batch(outs, self.tokenizer.pad_token_id).items()}
        mask = loss_mask(batch, outs, hp.mask_truncated_completions)
        stats, update_tokens = self._update(batch, mask, advantages)
        t_update = time.perf_counter() - t0 - t_sample
        if outs[0].env_mask is not None:
            stats["turns"] = sum(o.turns for o in outs) / len(outs)
        for key in ("groups_refilled", "informative_groups", "refill_rounds", "reward_failures"):
            if key in info:
                stats[key] = float(info[key])
        generated = sum(s.num_tokens for s in info["samples"])
        self._log_step(info["samples"], info["parts"], torch.tensor(info["rewards"]), stats, t_gen, t_update, generated, update_tokens)

    def _update(self, batch: dict[str, Any], mask: torch.Tensor, advantages: torch.Tensor) -> tuple[dict[str, float], int]:
        """``num_iterations`` passes of ``num_minibatches`` optimizer steps over the rollouts.

        Without a KL term (``beta`` 0) a sequence whose advantage is 0 (every sample of its group
        scored the same) adds exactly nothing to the loss or its gradient, so only the others are
        run, with the normalisers of the full minibatch: the same step for less compute (on the
        arithmetic task most groups are all wrong at first). A minibatch keeps at least one row so
        every rank runs its collectives. Logged ratio, clip fraction and entropy are over the rows run.
        """
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        n = mask.shape[0]
        bounds = torch.linspace(0, n, hp.num_minibatches + 1).round().long().tolist()
        parts = []  # (rows run, sequences) per minibatch
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rows = torch.arange(lo, hi, device=mask.device)
            if hp.skip_zero_advantage and hp.beta == 0:
                live = rows[advantages[lo:hi] != 0]
                rows = live if live.numel() else rows[:1]
            parts.append((rows, hi - lo))
        tokens = torch.stack([mask[lo:hi].sum() for lo, hi in zip(bounds[:-1], bounds[1:])])  # completion tokens
        if hp.loss_type == "dapo":  # an optimizer step's tokens over all ranks (their mean, as the
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="mean")  # gradients are averaged)
        rows = torch.cat([p[0] for p in parts])
        width = int(batch["attention_mask"][rows].sum(1).max())
        batch = {k: v[rows, :width] if torch.is_tensor(v) and v.ndim == 2 else v for k, v in batch.items()}
        mask, advantages = mask[rows, :width], advantages[rows]
        several = hp.num_iterations > 1 or hp.num_minibatches > 1
        with torch.no_grad():
            old = self._logprobs(self.model, batch)[0] if several else None
            ref = None if self.reference is None else \
                self.reference(target_logprobs, batch, hp.loss_chunk_size, hp.temperature)[0]
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(hp.num_iterations):
            lo = 0
            for i, (part_rows, sequences) in enumerate(parts):
                hi = lo + part_rows.numel()
                part = {k: v[lo:hi] if torch.is_tensor(v) and v.ndim == 2 else v for k, v in batch.items()}
                logp, entropy = self._logprobs(self.model, part)
                loss, stats = grpo_loss(
                    logp, logp.detach() if old is None else old[lo:hi], advantages[lo:hi], mask[lo:hi],
                    None if ref is None else ref[lo:hi], hp.beta, hp.epsilon, hp.epsilon_high, hp.loss_type,
                    hp.max_completion_length, num_sequences=sequences, num_tokens=tokens[i],
                )
                optimizer.zero_grad()
                self.manual_backward(loss)
                if hp.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                self._refresh_reference()
                m = mask[lo:hi]
                stats["entropy"] = (entropy * m).sum() / m.sum().clamp(min=1)
                for k, v in {"loss": loss.detach(), **stats}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                steps += 1
                lo = hi
        stats = {k: v / steps for k, v in sums.items()}
        stats["updated_sequences"] = rows.numel() / n
        return stats, int(batch["attention_mask"].sum())

    def _log_step(self, samples, parts, rewards, stats, t_gen, t_update, completion_tokens, update_tokens) -> None:
        """Rewards, pass@1, lengths and rollout tokens/s are over every sample generated in the step
        (with dynamic sampling, the dropped groups too); the update's statistics over the batch trained."""
        hp = self.hparams
        logs = {f"train/{k}": v for k, v in stats.items()}
        logs["train/reward"] = float(rewards.mean())
        logs["train/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
        for name, values in parts.items():
            t = torch.tensor(values)
            logs[f"train/reward/{name}"] = float(t.mean())
            logs[f"train/reward/{name}_std"] = float(t.std()) if t.numel() > 1 else 0.0
        metrics = reasoning_metrics(samples)
        logs.update({"train/pass@1": metrics["pass@1"], "train/format": metrics["format"],
                     "train/completion_length": metrics["length"], "train/truncated": metrics["truncated"]})
        logs.update({
            "time/generation_s": t_gen, "time/update_s": t_update,
            "time/generation_fraction": t_gen / max(t_gen + t_update, 1e-9),
            "throughput/rollout_tokens_per_s": completion_tokens / max(t_gen, 1e-9),
            "throughput/update_tokens_per_s": update_tokens * hp.num_iterations / max(t_update, 1e-9),
        })
        failures = logs.pop("train/reward_failures", None)
        self.log_dict(logs, batch_size=len(samples))
        if failures is not None:  # a count: the step's failed reward calls on all ranks
            self.log("train/reward_failures", failures, reduce_fx="sum", sync_dist=True, batch_size=len(samples))
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, batch_size=len(samples))
        self.log("pass@1", metrics["pass@1"], prog_bar=True, logger=False, batch_size=len(samples))

    # ---- validation ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Log the held-out metrics of the starting policy at step 0 (sanity-check runs are not
        logged): rank 0 generates, or every rank when the policy is sharded (rank 0 logs)."""
        records = getattr(self.trainer.datamodule, "val_records", None)
        here = self.trainer.is_global_zero or is_sharded(self.model)
        if self.global_step == 0 and records and self.trainer.loggers and here:
            hp = self.hparams
            metrics = evaluate_reasoning(self.model, self.tokenizer, records, hp.max_completion_length, hp.generation_batch_size,
                                         hp.max_turns)
            metrics.pop("n")
            if self.trainer.is_global_zero:
                log_to_all(self.trainer, {f"val/{k}": v for k, v in metrics.items()}, 0)

    def validation_step(self, records: list[dict[str, Any]], batch_idx: int) -> None:
        hp = self.hparams
        metrics = evaluate_reasoning(self.model, self.tokenizer, records, hp.max_completion_length, hp.generation_batch_size,
                                         hp.max_turns)
        metrics.pop("n")
        # each rank scores its share of the held-out prompts; the logged value is the mean over ranks
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=len(records), prog_bar=False, sync_dist=True)
        self.log("val_pass@1", metrics["pass@1"], prog_bar=True, logger=False, batch_size=len(records), sync_dist=True)
