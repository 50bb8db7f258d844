"""GRPO (DeepSeekMath, arXiv 2402.03300) after SFT with rule-based rewards (DeepSeek-R1, arXiv 2501.12948).

    esft fit --config configs/grpo/arithmetic_tiny.yaml

One training step: sample ``num_generations`` completions for each prompt of the batch with the
KV-cache generator (`esft.evaluation.rollout`), reward them (`esft.rewards.RewardSet`), turn the
rewards into group-relative advantages, then take ``num_iterations * num_minibatches`` optimizer
steps on the clipped surrogate (`esft.losses.grpo_loss`) against the log-probs stored before the
first update. The reference model (for the k3 KL term) is a frozen copy of the starting policy,
made only when ``beta > 0`` (`CausalLMModule.frozen_reference`: with LoRA the policy with its
adapters disabled); under FSDP2 it is sharded like the policy. Validation is greedy pass@1 and format rate on held-out prompts.

Departures: the reference is never refreshed (R1 keeps it fixed within a stage; the pipeline's
next stage starts from the new policy); it is not stored in checkpoints but rebuilt from the
starting model (`model_name_or_path`) when a run resumes; rollouts run on the training device in eval mode through
``model.generate`` (no separate inference engine).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from esft.data.packing import collate_padded
from esft.data.prompts import prompt_messages
from esft.data.tokenize import completion_example
from esft.evaluation import Rollout, rollout
from esft.losses.ce import IGNORE_INDEX, next_token_targets
from esft.losses.grpo import LossType, ScaleRewards, group_advantages, grpo_loss
from esft.models.forward import target_logprobs
from esft.models.sharding import call_model, is_sharded
from esft.models.frozen import FrozenModel
from esft.objectives.base import CausalLMModule
from esft.rewards import RewardSet, Sample
from esft.rewards.evaluate import evaluate_reasoning, reasoning_metrics


def rollout_batch(rollouts: list[Rollout], pad_token_id: int) -> dict[str, Any]:
    """Prompt + completion of every rollout as a right-padded batch whose labels are the
    completion tokens (the prompt is -100)."""
    return collate_padded([[completion_example(r.prompt_ids, r.completion_ids)] for r in rollouts], pad_token_id)


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
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_generations: G, completions sampled per prompt.
            max_completion_length: generation limit in tokens (and the ``dr_grpo`` normaliser).
            temperature: sampling temperature (the log-probs are computed at it too).
            top_p: nucleus sampling.
            rewards: reward name -> weight (`esft.rewards.REWARDS`); default accuracy 1, format 0.5.
            reward_options: reward name -> options, e.g. ``{overlong: {max_tokens: 64, cache: 16}}``.
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
            **kwargs: the model, tokenizer and optimizer arguments of `CausalLMModule`.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.rewards = RewardSet(rewards or {"accuracy": 1.0, "format": 0.5}, reward_options)
        self.reference: FrozenModel | None = None  # outside the module's parameters and checkpoint

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
        super().configure_model()

    def on_fit_start(self) -> None:
        self.model.train()  # a pretrained model loads in eval mode; generation switches modes itself
        if self.reference is not None:
            self.reference.to(self.device)

    # ---- one step --------------------------------------------------------------------------
    def generate(self, records: list[dict[str, Any]]) -> tuple[list[Rollout], list[Sample]]:
        hp = self.hparams
        outs = rollout(self.model, self.tokenizer, [prompt_messages(r) for r in records], hp.max_completion_length,
                       hp.generation_batch_size, hp.num_generations, do_sample=True, temperature=hp.temperature,
                       top_p=hp.top_p, top_k=0)
        records_g = [r for r in records for _ in range(hp.num_generations)]
        return outs, [Sample(r, o.text, len(o.completion_ids), o.truncated) for r, o in zip(records_g, outs)]

    def _logprobs(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logp, entropy, _ = call_model(model, target_logprobs, batch, self.hparams.loss_chunk_size, self.hparams.temperature)
        return logp, entropy

    def training_step(self, records: list[dict[str, Any]], batch_idx: int) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        outs, samples = self.generate(records)
        t_gen = time.perf_counter() - t0
        total, parts = self.rewards(samples)
        rewards = torch.tensor(total, device=self.device)
        advantages = group_advantages(rewards, hp.num_generations, hp.scale_rewards)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                 for k, v in rollout_batch(outs, self.tokenizer.pad_token_id).items()}
        mask = (next_token_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).float()
        if hp.mask_truncated_completions:
            mask = mask * torch.tensor([not o.truncated for o in outs], device=self.device, dtype=mask.dtype)[:, None]
        stats, update_tokens = self._update(batch, mask, advantages)
        t_update = time.perf_counter() - t0 - t_gen
        self._log_step(samples, parts, rewards, stats, t_gen, t_update, int(mask.sum()), update_tokens)

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
        self.log_dict(logs, batch_size=len(samples))
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, batch_size=len(samples))
        self.log("pass@1", metrics["pass@1"], prog_bar=True, logger=False, batch_size=len(samples))

    # ---- validation ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Log the held-out metrics of the starting policy at step 0 (sanity-check runs are not
        logged): rank 0 generates, or every rank when the policy is sharded (rank 0 logs)."""
        records = getattr(self.trainer.datamodule, "val_records", None)
        here = self.trainer.is_global_zero or is_sharded(self.model)
        if self.global_step == 0 and records and self.logger is not None and here:
            hp = self.hparams
            metrics = evaluate_reasoning(self.model, self.tokenizer, records, hp.max_completion_length, hp.generation_batch_size)
            metrics.pop("n")
            if self.trainer.is_global_zero:
                self.logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=0)

    def validation_step(self, records: list[dict[str, Any]], batch_idx: int) -> None:
        hp = self.hparams
        metrics = evaluate_reasoning(self.model, self.tokenizer, records, hp.max_completion_length, hp.generation_batch_size)
        metrics.pop("n")
        # each rank scores its share of the held-out prompts; the logged value is the mean over ranks
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=len(records), prog_bar=False, sync_dist=True)
        self.log("val_pass@1", metrics["pass@1"], prog_bar=True, logger=False, batch_size=len(records), sync_dist=True)
