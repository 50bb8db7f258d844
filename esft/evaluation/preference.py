"""Held-out preference accuracy of an exported model: how often it ranks the chosen completion of
a pair above the rejected one (`esft pipeline`'s ``pref_accuracy``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def preference_accuracy(model_dir: str | Path, data_cfg: dict[str, Any], reward_model: bool) -> float | None:
    """The share of the held-out pairs of a preference DataModule config (``class_path`` and
    ``init_args``, as in a fit config) whose chosen completion the exported model in `model_dir`
    ranks higher: by reward (`reward_model`: a Bradley–Terry model, `esft.objectives.RewardModule`)
    or by summed completion log-prob (a policy, as `PreferenceModule`'s ``val/accuracy``). None
    when the config holds out no pairs."""
    import importlib

    import torch

    from esft.models.forward import document_logprobs
    from esft.objectives.reward import pair_rewards

    module_name, _, name = data_cfg["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), name)(**{**data_cfg.get("init_args", {}),
                                                                 "tokenizer_name": str(model_dir)})
    data.setup("fit")
    if not data.val_examples:
        return None
    if reward_model:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    else:
        from esft.objectives.loading import load_model

        model = load_model(str(model_dir), torch.device("cpu"), "float32")[0]
    right = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            if reward_model:
                scores = pair_rewards(model, batch)
            else:
                scores = document_logprobs(model, batch)[0][batch["doc_index"]].view(-1, 2)
            right += int((scores[:, 0] > scores[:, 1]).sum())
            total += scores.shape[0]
    return right / total
