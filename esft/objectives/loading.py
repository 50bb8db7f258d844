"""Load a trained model for inference or as a frozen second model: a HF directory, a hub id, or a
Lightning checkpoint (``.ckpt``) of any esft objective.

Below the commands: `esft eval`, `esft distill-data`, rejection sampling, the pipeline and the
distillation teacher all load models through `load_model`, and no objective imports a command.
"""

from __future__ import annotations

import torch

from esft.checkpoint import reading


def load_model(name: str, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer) from a HF directory / hub id, or from a Lightning checkpoint; one that is
    missing or cannot be read raises `CheckpointError` naming it. ``auto`` dtype: bfloat16 on CUDA,
    else float32. The model is on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    from esft.models import load_tokenizer, torch_dtype

    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    with reading(name):  # a missing or unreadable model is a one-line error naming it
        if name.endswith(".ckpt"):
            from esft.objectives.base import CausalLMModule

            module = CausalLMModule.load_from_checkpoint(name, map_location="cpu", attn_implementation="sdpa")
            model, tokenizer = module.model.to(torch_dtype(dtype)), module.tokenizer
        else:
            tokenizer = load_tokenizer(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype), attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer
