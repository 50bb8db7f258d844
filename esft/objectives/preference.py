"""Preference optimisation: DPO, IPO, SimPO and ORPO on chosen / rejected pairs, KTO on unpaired rows.

    esft fit --config configs/preference/dpo_tiny.yaml

Each micro-batch holds whole pairs (`esft.data.preference.PreferenceDataModule`): one packed
forward gives every document's summed completion log-prob (`esft.models.forward.document_logprobs`,
chunked like the cross-entropy); the pure losses of `esft.losses.preference` turn them into
per-pair losses. A step's loss is the mean over its pairs (all micro-batches and ranks).

The reference of ``sigmoid`` (DPO), ``ipo`` and ``kto`` is the starting policy, frozen
(`CausalLMModule.frozen_reference`: a copy sharded like the policy under FSDP2, or with LoRA the
policy with its adapters disabled), run under ``no_grad`` in every step, or once before training
(``precompute_reference``; on disk, resumable, with ``reference_cache``: `esft.data.reference_cache`).
It is not checkpointed; resuming rebuilds it from the starting model. ``simpo`` and ``orpo`` load
none; ORPO adds its SFT term, the chosen completion's mean token NLL.

Logged (``train/``, ``val/``): ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracy``, ``logps/chosen``, ``logps/rejected``, with a reference ``kl`` (the mean
per-token log-ratio policy / reference on the completions: on the data, not on policy samples), and
``accuracy``: the share of pairs whose chosen completion has the higher log-probability.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306): the data module pairs each example with a
mismatched document (its prompt, another example's completion); their mean log-ratio over the
micro-batch, detached and clamped at 0, is the reference point z0. Logged: ``rewards``, ``z0``,
``logps``, ``kl``, ``accuracy`` (examples whose implicit reward has the sign of their label).
Departures: z0 is not gathered over ranks, and the mismatched documents share the policy's training
forward (no gradient reaches the loss from them, but the backward pass covers their tokens).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from esft.data.reference_cache import model_key, reference_logps
from esft.losses.preference import dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from esft.models.forward import document_logprobs
from esft.models.frozen import FrozenModel
from esft.models.sharding import call_model, is_sharded
from esft.objectives.base import PairModule

LossType = Literal["sigmoid", "ipo", "simpo", "orpo", "kto"]
REFERENCE_FREE = ("simpo", "orpo")

# loss_type -> (hparams, pair log-probs) -> (loss [P], chosen reward [P], rejected reward [P])
PAIR_LOSSES: dict[str, Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]] = {
    "sigmoid": lambda hp, p: dpo_loss(p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"], hp.beta,
                                      hp.label_smoothing),
    "ipo": lambda hp, p: ipo_loss(p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"], hp.beta),
    "simpo": lambda hp, p: simpo_loss(p["chosen_mean"], p["rejected_mean"], hp.beta, hp.simpo_gamma, hp.label_smoothing),
    "orpo": lambda hp, p: orpo_loss(p["chosen_mean"], p["rejected_mean"], hp.beta),
}


class PreferenceModule(PairModule):
    def __init__(
        self,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        precompute_reference: bool = False,
        reference_cache: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            loss_type: ``sigmoid`` (DPO), ``ipo``, ``simpo``, ``orpo`` or ``kto`` (`esft.losses.preference`;
                ``kto`` takes KTO's unpaired rows, the others pairs).
            beta: DPO's and KTO's beta, IPO's tau, SimPO's reward scale, ORPO's lambda.
            label_smoothing: conservative DPO / SimPO: probability that a preference label is flipped.
            simpo_gamma: SimPO's target reward margin.
            desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
            precompute_reference: compute the reference's log-probs of every training and held-out
                document once when fitting starts, then free it; else it runs in every step.
            reference_cache: a directory: precompute the reference log-probs through this on-disk
                cache (resumable, keyed by reference weights and documents; implies precompute).
            **kwargs: the model, tokenizer and optimizer arguments of `CausalLMModule`.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.reference: FrozenModel | None = None  # outside the module's parameters and checkpoint

    def configure_model(self) -> None:
        """The reference is made here, before any strategy shards the policy (`frozen_reference`)."""
        if self.hparams.loss_type not in REFERENCE_FREE and self.reference is None and not is_sharded(self.model):
            self.reference = self.frozen_reference()
        super().configure_model()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference is None:
            return
        self.reference.to(self.device).match_attention(self.model)
        datamodule = getattr(self.trainer, "datamodule", None)
        if (self.hparams.precompute_reference or self.hparams.reference_cache) and datamodule is not None:
            self.cache_reference_logps(datamodule.train_examples + datamodule.val_examples)
            self.reference = None  # the cached log-probs replace it

    def cache_reference_logps(self, examples: list[dict[str, Any]]) -> None:
        """Store the reference's completion log-prob in every example (``ref_logp``; batches then
        carry them), read from and written to ``reference_cache`` when set (`esft.data.reference_cache`;
        rank 0 writes). Every rank computes what is missing: a sharded reference runs on every rank."""
        cache, trainer = self.hparams.reference_cache, getattr(self, "_trainer", None)
        reference_logps(lambda batch: self.reference(document_logprobs, batch, self.hparams.loss_chunk_size)[0],
                        examples, self.device, cache, model_key(self.reference.model) if cache else "",
                        write=trainer is None or trainer.is_global_zero)

    # ---- the loss --------------------------------------------------------------------------
    def _pair_logps(self, run: Callable[..., Any], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs and token counts per document, ``[P, 2]`` (chosen, rejected)."""
        sums, counts = run(document_logprobs, batch, self.hparams.loss_chunk_size)
        index = batch["doc_index"].to(sums.device)
        return sums[index].view(-1, 2), counts[index].view(-1, 2)

    def pair_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of every pair ``[P]``, and the logged statistics per pair."""
        hp = self.hparams
        sums, counts = self._pair_logps(lambda fn, *a: call_model(self.model, fn, *a), batch)
        means = sums / counts.clamp(min=1)
        p = {"chosen": sums[:, 0], "rejected": sums[:, 1], "chosen_mean": means[:, 0], "rejected_mean": means[:, 1]}
        stats: dict[str, torch.Tensor] = {}
        if ("desirable" in batch) != (hp.loss_type == "kto"):
            raise ValueError(f"loss_type {hp.loss_type!r} got {'KTO rows' if 'desirable' in batch else 'preference pairs'}"
                             ": kto takes rows of prompt, completion, label; the other losses chosen / rejected pairs")
        if hp.loss_type not in REFERENCE_FREE:
            if "ref_logps" in batch:  # precomputed
                ref = batch["ref_logps"].to(sums.device).view(-1, 2)  # in example order, like `sums`
            else:
                if self.reference is None:
                    self.reference = self.frozen_reference()  # outside a trainer (tests, notebooks)
                ref = self._pair_logps(self.reference.to(sums.device), batch)[0]
            p.update(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])
            stats["kl"] = ((sums - ref).sum(1) / counts.sum(1).clamp(min=1)).detach()
        if hp.loss_type == "kto":  # (example, mismatched document): z0 = the mismatched documents' mean log-ratio
            desirable, z0 = batch["desirable"].to(sums.device), (sums[:, 1] - ref[:, 1]).mean()
            loss, reward = kto_loss(sums[:, 0], ref[:, 0], desirable, z0, hp.beta, hp.desirable_weight,
                                    hp.undesirable_weight)
            return loss, {**stats, "rewards": reward, "z0": z0.detach().clamp(min=0).expand_as(loss),
                          "logps": p["chosen"].detach(), "accuracy": ((reward > 0) == desirable).float()}
        loss, chosen_reward, rejected_reward = PAIR_LOSSES[hp.loss_type](hp, p)
        if hp.loss_type == "orpo":
            loss = loss - means[:, 0]  # ORPO's SFT term: the chosen completion's mean token NLL
        return loss, {**stats, "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                      "rewards/margins": chosen_reward - rejected_reward, "logps/chosen": p["chosen"].detach(),
                      "rewards/accuracy": (chosen_reward > rejected_reward).float(), "logps/rejected": p["rejected"].detach(),
                      "accuracy": (p["chosen"] > p["rejected"]).float().detach()}

