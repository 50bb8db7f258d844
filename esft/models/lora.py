"""LoRA through `peft` as a model option of every objective (``model.init_args.lora`` in YAML).

    model:
      init_args:
        lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear, use_dora: false, use_rslora: false}

The base weights are frozen and only the low-rank factors train. The HF export merges them
(`merged_copy`), so ``<run>/hf`` stays a plain transformers checkpoint, and also writes the adapter
alone in peft's format to ``<run>/hf/adapter`` (`ExportHF`), loadable on the base model with
``PeftModel.from_pretrained(base, "<run>/hf/adapter")``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from esft.extras import require


@dataclass
class LoraOptions:
    """LoRA adapters on the model's linear layers (Hu et al. 2021, arXiv 2106.09685)."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is ``alpha / r * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "all-linear"
    """Module-name suffixes to adapt, or ``all-linear`` (every linear layer but the LM head)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv 2402.09353): the update is split into a magnitude and a direction."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""


def apply_lora(model: nn.Module, opts: LoraOptions | dict) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters; only the adapters require gradients."""
    peft = require("peft", "lora", "LoRA (model.init_args.lora)")
    opts = opts if isinstance(opts, LoraOptions) else LoraOptions(**opts)
    if opts.r <= 0:
        raise ValueError(f"lora.r must be positive, got {opts.r}")
    # a reward model (`esft.models.build_model(head="score")`): peft trains its new scalar head in full
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    config = peft.LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                             target_modules=opts.target_modules, use_dora=opts.use_dora, use_rslora=opts.use_rslora,
                             task_type=task)
    return peft.get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with the LoRA updates merged in; `model` is not changed."""
    return copy.deepcopy(model).merge_and_unload()
