"""The ``model`` reward: completions scored by a trained reward model (`esft.objectives.RewardModule`).

    rewards: {accuracy: 1.0, model: 0.5}
    reward_options: {model: {path: runs/reward_tiny/hf, batch_size: 64}}

The path is an exported reward model (``AutoModelForSequenceClassification``, one label) with its
tokenizer. Each completion is rendered after its prompt with the reward model's chat template,
exactly as the pairs it was trained on (`esft.data.PreferenceDataModule`), and the reward is the
model's scalar on the document's last token (`esft.models.forward.sequence_rewards`), computed for
``batch_size`` completions at a time packed in one row (no padding). The model loads on first use,
on the training process's device (its CUDA device, else the CPU), frozen and in eval mode.

Departures: the raw reward-model score is used (GRPO's group normalisation makes its scale and
offset irrelevant within a group; its weight sets its share against the rule rewards); a
rendering longer than ``max_length`` tokens keeps its last ``max_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from esft.data.packing import collate_packed
from esft.data.prompts import prompt_messages
from esft.losses.ce import IGNORE_INDEX
from esft.models import DType, torch_dtype


class ModelReward:
    """A batched reward: ``reward(samples) -> [score per sample]``.

    Args:
        path: the exported reward model's directory (or hub id).
        batch_size: completions scored in one forward.
        max_length: tokens kept per rendered prompt + completion (the last ones).
        device: ``auto`` (the current CUDA device, else CPU), or a torch device string.
        dtype: ``auto`` (bfloat16 on CUDA, else float32) or a dtype name.
    """

    batched = True

    def __init__(self, path: str, batch_size: int = 64, max_length: int = 2048, device: str = "auto",
                 dtype: DType = "auto") -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"model reward: batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.path, self.batch_size, self.max_length, self.device, self.dtype = path, batch_size, max_length, device, dtype
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForSequenceClassification

            from esft.checkpoint import reading
            from esft.models import load_tokenizer
            from esft.models.attention import resolve_attn_implementation

            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if self.device == "auto" and cuda else \
                torch.device("cpu" if self.device == "auto" else self.device)
            dtype = ("bfloat16" if device.type == "cuda" else "float32") if self.dtype == "auto" else self.dtype
            attn = resolve_attn_implementation("auto", device, half=dtype != "float32")
            with reading(self.path):  # a missing or unreadable model is a one-line error naming it
                model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch_dtype(dtype),
                                                                           attn_implementation=attn)
                self._tokenizer = load_tokenizer(self.path)
            if model.config.num_labels != 1:
                raise ValueError(f"model reward: {self.path} has {model.config.num_labels} labels; a reward model has 1 "
                                 "(export one with esft.objectives.RewardModule)")
            self._model = model.to(device).eval().requires_grad_(False)
        return self._model, self._tokenizer

    def encode(self, samples: Sequence[Any]) -> list[list[int]]:
        """Token ids of every sample's prompt + completion as the reward model reads them."""
        _, tokenizer = self._load()
        texts = [tokenizer.apply_chat_template(prompt_messages(s.record) + [{"role": "assistant", "content": s.text}],
                                               tokenize=False) for s in samples]
        return [ids[-self.max_length :] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def __call__(self, samples: Sequence[Any]) -> list[float]:
        from esft.models.forward import sequence_rewards

        model, _ = self._load()
        device = next(model.parameters()).device
        scores: list[float] = []
        ids = self.encode(samples)
        for lo in range(0, len(ids), self.batch_size):
            docs = [{"input_ids": x, "labels": [IGNORE_INDEX] * len(x), "length": len(x)} for x in ids[lo : lo + self.batch_size]]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_packed([docs], "flat").items()}
            scores += sequence_rewards(model, batch).tolist()
        return scores
