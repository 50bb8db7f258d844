"""Knowledge distillation: a student trained on a frozen teacher's next-token distributions.

    esft fit --config configs/distill/logit_kd.yaml      # online logit KD (forward KL)
    esft fit --config configs/distill/on_policy.yaml     # GKD: a fraction of batches on student samples
    esft fit --config configs/distill/cached.yaml        # offline top-k teacher cache, no teacher in memory
    esft distill-data responses ...                      # sequence-level KD data, then plain `esft fit`

Per token the loss is ``alpha * D(teacher || student) + (1 - alpha) * CE(labels)``, averaged over
trained tokens, with ``D`` one of `esft.losses.kd`'s divergences (forward/reverse KL, generalized
JSD with `beta`, total variation) at `temperature`; both models' logits exist one chunk of tokens
at a time (`esft.losses.kd.chunked_kd_loss`).

On-policy distillation (GKD, Agarwal et al. 2023, arXiv 2306.13649): with probability `lmbda` a
training step replaces the batch's responses with the student's own sampled continuations of the
same prompts (`esft.evaluation.rollout`, prompts recovered through
`esft.data.DistillDataModule`), packs them with the same collator, and distils on them. Such a
step uses the divergence alone (``alpha`` is ignored: the hard labels would be the student's own
samples). Departures from TRL's GKDTrainer: the choice is drawn per optimizer step from a
generator seeded by the step (reproducible on resume), and the student samples with
``on_policy_temperature`` (not the distillation temperature).

The teacher (a HF directory / hub id, a Lightning ``.ckpt`` of any esft objective, or a config for
a random-init model) is frozen, in eval mode, run under ``no_grad``. It is held by
`esft.models.frozen.FrozenModel`, *not* a registered submodule: it follows the student to its device (on first use), stays out of the
optimizer, out of ``train()``/``eval()`` switches and out of checkpoints (a checkpoint records the
teacher's path in its hyperparameters and resuming reloads it; the exported model is the student
alone). Teacher and student must share a tokenizer and LM-head size: anything else is an error, as
no vocabulary mapping is attempted.

Under FSDP2 (`ModelParallelStrategy`) the teacher is sharded like the student (per decoder layer,
then the root; `esft.models.sharding`), so neither model is replicated on any rank; each step
gathers the teacher's LM head once for the chunked loss, whose backward recomputes teacher logits.
Under DDP and DeepSpeed every rank holds the whole teacher.

Logged per optimizer step: ``train/loss``, ``train/kd``, ``train/ce`` and the student's
``train/token_acc`` on the data's labels (not on on-policy steps); validation is SFT's
(``val/loss``, ``val/token_acc``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from esft.data.packing import best_fit_decreasing, collate_packed
from esft.data.tokenize import completion_example
from esft.evaluation import rollout
from esft.losses.ce import next_token_targets
from esft.losses.kd import Divergence, chunked_kd_loss, chunked_topk_kd_loss
from esft.models import DType, build_model
from esft.models.attention import packed_layout
from esft.models.forward import forward_kwargs, plain_head
from esft.models.frozen import FrozenModel
from esft.models.sharding import call_model
from esft.objectives.loading import load_model
from esft.objectives.sft import SFTModule, token_accuracy


def load_teacher(student_tokenizer, teacher: str | None, teacher_config: dict[str, Any] | None, dtype: DType) -> PreTrainedModel:
    """The frozen teacher: from a HF path / hub id / ``.ckpt``, or random-init from a config."""
    if (teacher is None) == (teacher_config is None):
        raise ValueError("give exactly one of teacher (path, hub id or .ckpt) or teacher_config")
    if teacher is not None:
        model, tokenizer = load_model(teacher, torch.device("cpu"), "float32" if dtype == "auto" else dtype)
        if tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ValueError(
                f"teacher {teacher!r} has another tokenizer than the student ({len(tokenizer)} vs "
                f"{len(student_tokenizer)} tokens): logit distillation needs a shared vocabulary; use sequence-level "
                "KD (esft distill-data responses) across tokenizers"
            )
    else:
        model = build_model(student_tokenizer, None, teacher_config, dtype, "sdpa")
    return model.requires_grad_(False).eval()


@torch.no_grad()
def teacher_outputs(teacher: PreTrainedModel, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's final hidden states for `batch`, and its LM head's weight and bias (copies of
    the gathered ones when the teacher is FSDP-sharded: the loss's backward needs them after the
    teacher's forward has released them)."""
    hidden = teacher.get_decoder()(**forward_kwargs(teacher, batch)).last_hidden_state
    head = teacher.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(teacher, FSDPModule):
        weight, bias = weight.clone(), None if bias is None else bias.clone()
    return hidden, weight, bias


class DistillModule(SFTModule):
    def __init__(
        self,
        teacher: str | None = None,
        teacher_config: dict[str, Any] | None = None,
        teacher_dtype: DType = "float32",
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        alpha: float = 1.0,
        lmbda: float = 0.0,
        on_policy_max_new_tokens: int = 64,
        on_policy_temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            teacher: teacher model: HF directory, hub id or Lightning ``.ckpt``. Leave it and
                `teacher_config` unset to train on a teacher cache (`DistillDataModule`) or, with
                ``alpha: 0``, to run plain SFT through this module.
            teacher_config: instead, a config dict for a random-init teacher (tests, benchmarks).
            teacher_dtype: teacher weight dtype.
            divergence: ``forward_kl`` KL(T||S), ``reverse_kl`` KL(S||T), ``jsd`` (generalized
                JSD, `beta`), ``tv`` (total variation); see `esft.losses.kd`.
            beta: JSD interpolation: 0 = forward KL, 1 = reverse KL (TRL's GKD convention).
            temperature: softmax temperature of both models in the divergence.
            alpha: weight of the divergence; ``1 - alpha`` goes to the hard-label cross-entropy.
            lmbda: fraction of training steps that distil on student-generated responses (GKD).
            on_policy_max_new_tokens: longest student response in an on-policy step.
            on_policy_temperature: sampling temperature of those responses.
            **kwargs: the student's options (`CausalLMModule`).
        """
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= lmbda <= 1.0 or not 0.0 <= beta <= 1.0:
            raise ValueError(f"alpha, lmbda and beta must lie in [0, 1], got {alpha}, {lmbda}, {beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._teacher: FrozenModel | None = None  # outside the module's parameters and checkpoint
        if teacher is not None or teacher_config is not None:
            model = load_teacher(self.tokenizer, teacher, teacher_config, teacher_dtype)
            rows, t_rows = self.model.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]
            if rows != t_rows:
                raise ValueError(f"student and teacher vocabularies differ: LM heads of {rows} and {t_rows} rows "
                                 f"(teacher {teacher or 'from teacher_config'})")
            if not (plain_head(model) and plain_head(self.model)):
                raise ValueError("chunked distillation needs plain linear LM heads; the student or the teacher transforms its logits")
            self._teacher = FrozenModel(model)

    # ---- the teacher ---------------------------------------------------------------------
    @property
    def teacher(self) -> PreTrainedModel | None:
        """The frozen teacher on the student's device (moved on first use), or None."""
        return None if self._teacher is None else self._teacher.to(self.device).model

    def configure_model(self) -> None:
        """FSDP2: shard the frozen teacher over the same data-parallel mesh as the student."""
        super().configure_model()
        if self.device_mesh is not None and self._teacher is not None:
            self._teacher.shard(self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._teacher is not None:
            self._teacher.match_attention(self.model)  # the same packed layout fits both

    # ---- losses --------------------------------------------------------------------------
    def distill_loss(self, batch: dict[str, Any], return_correct: bool = False) -> tuple[torch.Tensor, ...]:
        """``(kd_sum, ce_sum, num_tokens)`` over the batch's trained tokens, against the cached
        teacher when the batch carries one, else the online teacher; `return_correct` adds the
        student's correct argmax predictions (token accuracy's numerator)."""
        return call_model(self.model, self._distill_loss, batch, return_correct)

    def _distill_loss(self, model: PreTrainedModel, batch: dict[str, Any], return_correct: bool) -> tuple[torch.Tensor, ...]:
        hp = self.hparams
        targets = next_token_targets(batch["labels"], batch["position_ids"])
        hidden = model.get_decoder()(**forward_kwargs(model, batch)).last_hidden_state
        head = model.get_output_embeddings()
        opts = dict(divergence=hp.divergence, beta=hp.beta, temperature=hp.temperature, chunk_size=hp.loss_chunk_size,
                    return_correct=return_correct)
        if "teacher_topk_ids" in batch:
            cache = getattr(getattr(self._trainer, "datamodule", None), "cache", None)
            if cache is not None and cache.temperature != hp.temperature:
                raise ValueError(f"the teacher cache holds log-probs at temperature {cache.temperature}, the module "
                                 f"distils at {hp.temperature}: rebuild the cache or set temperature to match")
            return chunked_topk_kd_loss(hidden, head.weight, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                        targets, head.bias, **opts)
        if self.teacher is None:
            raise ValueError("DistillModule has no teacher: set model.teacher (or teacher_config), or train on a "
                             "teacher cache (data: esft.data.DistillDataModule with teacher_cache)")
        t_hidden, t_weight, t_bias = self._teacher(teacher_outputs, batch)
        return chunked_kd_loss(hidden, head.weight, t_hidden, t_weight, targets, head.bias, t_bias, **opts)

    def on_policy_step(self) -> bool:
        """Whether this optimizer step distils on student samples (probability `lmbda`)."""
        lmbda = self.hparams.lmbda
        return lmbda > 0 and random.Random(f"on-policy:{self.global_step}").random() < lmbda

    def on_policy_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's prompts completed by the student (sampled), packed like the data module
        packs: prompt tokens masked, the responses trained on."""
        from esft.data.distill import packed_prompts

        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "prompt_conversation"):
            raise ValueError("on-policy distillation (lmbda > 0) needs data: esft.data.DistillDataModule")
        conversations = [datamodule.prompt_conversation(p) for p in packed_prompts(batch)]
        hp = self.hparams
        samples = rollout(self.model, self.tokenizer, conversations, hp.on_policy_max_new_tokens, len(conversations),
                          do_sample=True, temperature=hp.on_policy_temperature)
        examples = [completion_example(s.prompt_ids, s.completion_ids) for s in samples if s.completion_ids]
        layout = packed_layout(self.model.config._attn_implementation)
        lengths = [e["length"] for e in examples]
        rows = best_fit_decreasing(lengths, max([batch["input_ids"].shape[1], *lengths]))
        packed = collate_packed([[examples[i] for i in row] for row in rows], layout)
        return move_data_to_device(packed, self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        alpha = self.hparams.alpha
        on_policy = self.on_policy_step()
        if on_policy:
            batch, alpha = self.on_policy_batch(batch), 1.0
        if alpha == 0.0:  # plain SFT: no teacher needed
            ce, count, correct = self.token_loss(batch, return_correct=True)
            kd = ce.new_zeros(())
        else:
            kd, ce, count, correct = self.distill_loss(batch, return_correct=True)
        n = self.step_denominator(batch, count)  # the step's token mean (on-policy: see step_denominator)
        loss = (alpha * kd + (1.0 - alpha) * ce) / n
        # on student samples the labels are the student's own draws: no token accuracy (the whole
        # optimizer step is on-policy or not, on every rank, so every step logs the same names)
        accuracy = {} if on_policy else token_accuracy("train/token_acc", correct, n)
        self.log_step(**{"train/loss": loss, "train/kd": kd / n, "train/ce": ce / n, **accuracy})
        self.log("train/on_policy", float(on_policy), batch_size=1)
        return loss
