"""What every objective shares: model and tokenizer building, the packed forward, the masked
token loss, and optimizer wiring. Objectives subclass `CausalLMModule` and add their loss.

Speed switches live here too: torchao FP8 (`fp8`), the Liger fused loss (`loss_impl`) and
`compile`; mixed precision is the trainer's ``precision``, Transformer Engine FP8 a trainer plugin
(`esft.precision`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule

from esft.data.packing import PackingNeeds
from esft.data.tasks import TASKS, get_task
from esft.evaluation import generate
from esft.experts.config import ExpertConfig
from esft.experts.trainable import apply_expert_config, merged_state_dict
from esft.models import DType, Head, build_model, load_tokenizer
from esft.models.attention import AttnImplementation, packed_layout, resolve_attn_implementation
from esft.models.forward import LossImpl, token_loss
from esft.models.frozen import FrozenModel
from esft.models.lora import (LoraOptions, apply_lora, is_lora, is_quantized, lora_options, merged_copy,
                              quantization_config, quantized_load_device)
from esft.models.sharding import call_model, shard_fsdp2
from esft.models.tokenizer import resolve_tokenizer_name
from esft.optim import OptimConfig, build_optimizer, build_scheduler, group_learning_rates
from esft.precision import Float8Recipe, convert_torchao_fp8
from esft.regularization import apply_regularization


def grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The L2 norm of all gradients the optimizer will apply (all ranks' shards of a sharded
    model), or None where the gradients are not on the parameters (DeepSpeed keeps its own)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor over the shards


class CausalLMModule(L.LightningModule):
    head: Head = "lm"  # the model's output head (`esft.models.build_model`); a reward model's is "score"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: DType = "float32",
        attn_implementation: AttnImplementation = "auto",
        gradient_checkpointing: bool = False,
        loss_chunk_size: int = 1024,
        loss_impl: LossImpl = "chunked",
        fp8: Float8Recipe | None = None,
        fp8_skip: list[str] | None = None,
        compile: bool = False,
        max_new_tokens: int = 256,
        optim: OptimConfig | None = None,
        experts: str | None = None,
        lora: LoraOptions | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: pretrained model (local directory or HF hub id).
            model_config: instead, a config dict (``model_type`` + fields) for a random-init model.
            tokenizer: tokenizer path / hub id / ``builtin``; default: the model's, else builtin.
            dtype: weight dtype (mixed precision is the trainer's `precision`).
            attn_implementation: ``auto`` = flash varlen on CUDA, SDPA with a block mask elsewhere.
            gradient_checkpointing: recompute activations in the backward pass.
            loss_chunk_size: trained tokens per chunk of the cross-entropy; 0 = all at once.
            loss_impl: ``chunked`` (any device) or ``liger`` (Liger Kernel's fused linear
                cross-entropy; CUDA and ``pip install liger-kernel``).
            fp8: torchao float8 training recipe (``tensorwise`` or ``rowwise``) for the Linear
                layers with dims divisible by 16; needs ``pip install torchao`` and an FP8 GPU.
            fp8_skip: module-name substrings kept out of FP8; default ``["lm_head"]`` (the
                model's output head is always kept out).
            compile: ``torch.compile`` the decoder (the loss stays eager); pair it with the
                DataModule's fixed-shape batches (``pad_to_budget``, on by default with compile).
            max_new_tokens: generation limit of ``esft predict``.
            optim: optimizer, parameter groups, schedule and regularization (`esft.optim.OptimConfig`).
            experts: an expert config JSON (``esft experts select``): train only the selected
                routed experts of an MoE model (expert-specialized fine-tuning, `esft.experts`).
            lora: LoRA adapters through peft (`esft.models.lora.LoraOptions`); the base is frozen.
        """
        super().__init__()
        self.save_hyperparameters()
        # a checkpoint's hyperparameters may hold the optimizer config as a plain mapping
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.tokenizer = load_tokenizer(resolve_tokenizer_name(tokenizer, model_name_or_path))
        # "auto" starts on SDPA; `setup` moves to varlen once the device is known to be CUDA.
        first = "sdpa" if attn_implementation == "auto" else attn_implementation
        lora = lora_options(lora)
        quantized = quantization_config(lora)  # QLoRA: a 4-bit base, loaded onto this process's GPU
        if quantized is not None and fp8 is not None:
            raise ValueError("model options 'fp8' and 'lora.quantize' cannot be combined: the base is either 4-bit or FP8")
        self.model = build_model(self.tokenizer, model_name_or_path, model_config, dtype, first, head=self.head,
                                 device=quantized_load_device() if quantized else None, quantization_config=quantized)
        apply_regularization(self.model, self.optim.dropout, self.optim.neftune_alpha)  # dropout override, NEFTune
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fp8 is not None:
            convert_torchao_fp8(self.model, fp8, ["lm_head"] if fp8_skip is None else fp8_skip)
        self.expert_config = None
        if experts is not None and lora is not None:
            raise ValueError("model options 'experts' and 'lora' cannot be combined: choose one")
        if experts is not None:
            self.expert_config = ExpertConfig.load(experts)
            apply_expert_config(self.model, self.expert_config)
        if lora is not None:
            self.model = apply_lora(self.model, lora, gradient_checkpointing)
        self._step_sums: dict[str, torch.Tensor] = {}

    def export_model(self, state: dict[str, torch.Tensor] | None = None):
        """The model as a plain transformers model for `ExportHF`: LoRA merged (an unsharded,
        unquantized copy, built from `state` when given: a full state dict gathered from shards),
        trained expert slices merged (the state dict of `export_state_dict`)."""
        return merged_copy(self.model, state) if is_lora(self.model) else self.model

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The state dict to save with `export_model` (None: the model's own), from `state` when
        given (a full state dict gathered from shards). With LoRA the merged copy's own."""
        if is_lora(self.model):
            return None
        return merged_state_dict(self.model, state) if self.expert_config is not None else state

    def setup(self, stage: str) -> None:
        if getattr(self.trainer.strategy, "zero_stage_3", False) and any(not p.requires_grad for p in self.model.parameters()):
            # ZeRO-3 gathers a module's parameters again for its backward through hooks on the
            # module's inputs; with frozen embeddings (ESFT, LoRA) no input needs a gradient, and
            # trained parameters would still be partitioned when their gradients arrive
            self.model.enable_input_require_grads()
        if self.hparams.attn_implementation == "auto":
            weights = getattr(self.trainer.precision_plugin, "weights_dtype", None)  # Transformer Engine
            half = self.model.dtype in (torch.bfloat16, torch.float16) or "16" in str(self.trainer.precision) \
                or weights in (torch.bfloat16, torch.float16)
            name = resolve_attn_implementation("auto", self.trainer.strategy.root_device, half)
            if name != self.model.config._attn_implementation:
                self.model.set_attn_implementation(name)
        connect = getattr(self.trainer.datamodule, "connect", None)  # Lightning has run the data's setup
        if connect is not None:
            connect(self.packing_needs())

    def packing_needs(self) -> PackingNeeds:
        """What this model asks of packed batches (`esft.data.SFTDataModule.connect`): the
        ``flat`` layout where its attention's cost follows the documents, fixed shapes when it is
        compiled or FP8."""
        return PackingNeeds(layout=packed_layout(self.model.config._attn_implementation),
                            static_shapes=bool(self.hparams.compile or self.hparams.fp8))

    def on_fit_start(self) -> None:
        # from_pretrained returns a model in eval mode and Lightning keeps every module's mode, so
        # a pretrained model would fine-tune with dropout and NEFTune (train-mode only) switched off
        self.model.train()

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy` (FSDP2): ``fully_shard`` every decoder layer,
        then the root, over the data-parallel mesh (`esft.models.sharding`); ``compile`` then
        compiles each sharded layer. Elsewhere ``compile`` compiles the whole decoder. Runs once
        (Lightning may call it again)."""
        mesh = self.device_mesh
        if mesh is not None and not isinstance(self.model, FSDPModule):
            if mesh["tensor_parallel"].size() > 1:
                raise ValueError("tensor parallelism is not supported: set ModelParallelStrategy(tensor_parallel_size=1)")
            if is_quantized(self.model):
                raise ValueError("model.init_args.lora.quantize (QLoRA) is not supported under FSDP2 (ModelParallelStrategy): "
                                 "its 4-bit weights are not sharded; use DDP, or LoRA on an unquantized base")
            shard_fsdp2(self.model, mesh["data_parallel"], self.hparams.compile)
        decoder = self.model.get_decoder()
        if self.hparams.compile and mesh is None and getattr(decoder, "_compiled_call_impl", None) is None:
            decoder.compile()

    def frozen_reference(self) -> FrozenModel:
        """The starting policy, frozen, for a KL or preference reference: with LoRA the policy
        itself with its adapters disabled (no copy), else a copy made now, sharded like the policy
        under FSDP2. Call it from `configure_model` before the policy is sharded (and before a
        resumed run loads its checkpoint, so it stays the starting policy); a resumed run rebuilds
        it from the starting model (`model_name_or_path`) the same way."""
        if is_lora(self.model):
            return FrozenModel.base_of(self.model)
        reference = FrozenModel.copy_of(self.model)
        if self.device_mesh is not None:
            reference.shard(self.device_mesh["data_parallel"])
        return reference

    # ---- loss ------------------------------------------------------------------------------
    def token_loss(self, batch: dict[str, Any], return_correct: bool = False) -> tuple[torch.Tensor, ...]:
        """Summed next-token cross-entropy over trained tokens, and their count (label-smoothed in
        training when `optim.label_smoothing` is set; evaluation losses stay plain); with
        `return_correct` also the count of correct argmax predictions (`esft.models.forward.token_loss`)."""
        smoothing = self.optim.label_smoothing if self.training else 0.0
        return call_model(self.model, token_loss, batch, self.hparams.loss_chunk_size, self.hparams.loss_impl, smoothing,
                          return_correct)

    def step_denominator(self, batch: dict[str, Any], count: torch.Tensor) -> torch.Tensor:
        """The divisor of a micro-batch's summed token loss that makes an optimizer step's
        gradient the mean over all of the step's trained tokens (every micro-batch, every rank),
        as if the step were one batch: ``step_tokens / (A * W)``, since Lightning divides each
        micro-batch's loss by ``accumulate_grad_batches`` (A) and DDP / FSDP / ZeRO average
        gradients over the W ranks. ``step_tokens`` comes with batches of `esft.data.SFTDataModule`
        (`esft.data.packing.ResumableBatchSampler`); a batch without it (another DataModule,
        on-policy distillation) counts its own tokens summed over the ranks, times A: exact when
        A is 1, a mean of micro-batch means otherwise."""
        trainer = self.trainer
        scale = trainer.accumulate_grad_batches * trainer.world_size
        if batch.get("step_tokens") is not None:
            return count.new_tensor(max(int(batch["step_tokens"]), 1), dtype=torch.float32) / scale
        total = trainer.strategy.reduce(count.detach().float(), reduce_op="sum") * trainer.accumulate_grad_batches
        return total.clamp(min=1) / scale

    def log_step(self, **values: torch.Tensor) -> None:
        """Adds micro-batch terms (summed token losses divided by `step_denominator`) to this
        optimizer step's sums; they are logged once per step, before the optimizer step, as the
        step's token means over all micro-batches and ranks."""
        for name, value in values.items():
            self._step_sums[name] = self._step_sums.get(name, 0.0) + value.detach().float()

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = grad_norm(optimizer)
        if norm is not None:  # before clipping, after unscaling (Lightning calls this hook there)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        # the LR this step applies, per parameter group, so LR multipliers show: train/lr/<group>
        self.log_dict({f"train/lr/{name}": lr for name, lr in group_learning_rates(optimizer).items()},
                      on_step=True, on_epoch=False, batch_size=1)
        if not self._step_sums:
            return
        names = list(self._step_sums)
        trainer = self.trainer
        sums = trainer.strategy.reduce(torch.stack([self._step_sums[k] for k in names]), reduce_op="sum")
        means = sums / (trainer.accumulate_grad_batches * trainer.world_size)
        for name, value in zip(names, means):
            self.log(name, value, prog_bar=name == "train/loss", on_step=True, on_epoch=False, batch_size=1)
        self._step_sums = {}

    # ---- generation ------------------------------------------------------------------------
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy completions of each record's conversation minus its last (assistant) turn,
        scored by the record's task verifier where it has one."""
        conversations = [r["messages"][:-1] for r in batch]
        completions = generate(self.model, self.tokenizer, conversations, self.hparams.max_new_tokens)
        out = []
        for record, completion in zip(batch, completions):
            row = {"id": record.get("id"), "messages": record["messages"][:-1], "completion": completion,
                   "reference": record["messages"][-1]["content"]}
            if record.get("task") in TASKS:
                row["score"] = get_task(record["task"]).score(record, completion)
            out.append(row)
        return out

    # ---- optimization ----------------------------------------------------------------------
    def configure_optimizers(self):
        # one optimizer (Muon + AdamW combined in esft.optim.MuonWithAdamW), so automatic
        # optimization, gradient clipping and checkpoint/resume work for every choice
        optimizer = build_optimizer(self.model, self.optim)
        scheduler = build_scheduler(optimizer, self.optim, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PairModule(CausalLMModule):
    """Steps of an objective whose loss is a mean over pairs (or single examples) of a batch:
    `pair_terms` gives each one's loss ``[P]`` and logged statistics; the step's loss is the mean
    over all of its pairs (`step_denominator` with the data module's pair counts), and validation
    and test log every statistic as a mean over the split's pairs (``accuracy`` in the bar).
    Preference optimisation and the reward model build on it."""

    def pair_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        losses, stats = self.pair_terms(batch)
        n = self.step_denominator(batch, losses.new_tensor(losses.numel()))  # the step's pairs
        loss = losses.sum() / n
        self.log_step(**{"train/loss": loss, **{f"train/{k}": v.sum() / n for k, v in stats.items()}})
        return loss

    def _eval(self, batch: dict[str, Any], prefix: str) -> None:
        losses, stats = self.pair_terms(batch)
        values = {f"{prefix}/loss": losses.mean(), **{f"{prefix}/{k}": v.mean() for k, v in stats.items()}}
        # weighted by the pairs of the batch: the epoch value is the mean over the split's pairs
        self.log_dict(values, batch_size=losses.numel(), sync_dist=True)
        self.log(f"{prefix}_accuracy", values[f"{prefix}/accuracy"], prog_bar=True, logger=False,
                 batch_size=losses.numel(), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "test")
