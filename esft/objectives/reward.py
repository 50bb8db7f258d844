"""Bradley–Terry reward model on chosen / rejected pairs: a scalar head on the LM.

    esft fit --config configs/preference/reward_tiny.yaml

The model is the LM's decoder with a linear ``score`` head to one value
(``AutoModelForSequenceClassification`` with ``num_labels=1``; from a causal LM checkpoint the
decoder is loaded and the head starts at random). A document's reward is the head on the last
hidden state of its last token (`esft.models.forward.sequence_rewards`), computed on the packed
pair batches of `esft.data.PreferenceDataModule` (chosen and rejected in one micro-batch, no
padding). The loss is ``-log sigmoid(r_chosen - r_rejected)`` (`esft.losses.bradley_terry_loss`,
optionally with Eisenstein et al.'s centring term), a mean over an optimizer step's pairs.

Logged per step (``train/``) and on held-out pairs (``val/``): ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins`` (their difference) and ``accuracy`` (the share of pairs
whose chosen completion gets the higher reward).

The export (`esft.callbacks.ExportHF`, ``<run>/hf``) is a plain transformers sequence-classification
model with the tokenizer's pad token set: ``AutoModelForSequenceClassification.from_pretrained``
gives the same rewards on padded batches (its forward pools at the last non-pad token). GRPO scores
completions with it through the ``model`` reward (`esft.rewards.model.ModelReward`).

Departures: the pair data carries no rating strength, so Llama 2's per-pair margin (an option of
the loss) is not used here; the head has no bias (the loss sees only reward differences).
"""

from __future__ import annotations

from typing import Any

import torch

from esft.losses.reward import bradley_terry_loss
from esft.models.forward import sequence_rewards
from esft.models.sharding import call_model
from esft.objectives.base import PairModule


def pair_rewards(model, batch: dict[str, Any]) -> torch.Tensor:
    """Rewards of a pair batch's documents, ``[P, 2]`` (chosen, rejected), by a reward model."""
    rewards = call_model(model, sequence_rewards, batch)
    return rewards[batch["doc_index"].to(rewards.device)].view(-1, 2)


class RewardModule(PairModule):
    head = "score"

    def __init__(self, center_coef: float = 0.0, **kwargs: Any) -> None:
        """
        Args:
            center_coef: weight of the centring term ``(r_c + r_r)^2`` (0: off; 0.01 in Eisenstein et al.).
            **kwargs: the model, tokenizer and optimizer arguments of `CausalLMModule`.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def pair_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of every pair ``[P]``, and the logged statistics per pair."""
        rewards = pair_rewards(self.model, batch)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        loss = bradley_terry_loss(chosen, rejected, center_coef=self.hparams.center_coef)
        r = rewards.detach()
        return loss, {"rewards/chosen": r[:, 0], "rewards/rejected": r[:, 1], "rewards/margins": r[:, 0] - r[:, 1],
                      "accuracy": (r[:, 0] > r[:, 1]).float()}


    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        raise NotImplementedError("a reward model does not generate: score texts with esft.rewards.model.ModelReward")
