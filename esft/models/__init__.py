"""Load a HF causal LM from a path / hub id, or build a tiny one from a config dict."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from esft.models.attention import AttnImplementation, resolve_attn_implementation
from esft.models.tokenizer import BUILTIN, load_tokenizer

DType = Literal["auto", "float32", "bfloat16", "float16"]
Head = Literal["lm", "score"]


def torch_dtype(dtype: str) -> torch.dtype | str:
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    model_name_or_path: str | None = None,
    model_config: dict[str, Any] | None = None,
    dtype: DType = "float32",
    attn_implementation: AttnImplementation = "auto",
    device: torch.device | None = None,
    head: Head = "lm",
    quantization_config: Any = None,
) -> PreTrainedModel:
    """Exactly one of `model_name_or_path` (pretrained weights) or `model_config` (random init).

    `model_config` is a dict with a transformers ``model_type`` and its fields; the vocabulary
    size and special token ids default to the tokenizer's. `head`: ``lm``, a causal LM; ``score``,
    a scalar reward model (``AutoModelForSequenceClassification`` with one label and the
    tokenizer's pad token; from a causal LM checkpoint its decoder is loaded and the head is new).
    `quantization_config`: a transformers quantization config for pretrained weights (QLoRA's
    4-bit base, `esft.models.lora.quantization_config`); the weights are quantized as they are
    loaded onto `device`.
    """
    if (model_name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of model_name_or_path (pretrained) or model_config (random init)")
    attn = resolve_attn_implementation(attn_implementation, device)
    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    extra = {} if head == "lm" else {"num_labels": 1}
    if quantization_config is not None:
        if model_name_or_path is None:
            raise ValueError("a quantized base (lora.quantize) needs pretrained weights (model_name_or_path): "
                             "a random-init model_config has none to quantize")
        extra.update(quantization_config=quantization_config, device_map={"": device})
    if model_name_or_path is not None:
        model = auto.from_pretrained(model_name_or_path, dtype=torch_dtype(dtype), attn_implementation=attn, **extra)
        if head == "score" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the HF forward pools at the last non-pad token
        return model
    # a copy, so the caller's dict stays as it was (fields are popped and filled below); each model
    # also gets its own config object: `from_config(cfg, attn_implementation=X)` writes X into `cfg`
    # (transformers 5.24), so two models built from one config object would share one attention
    fields = copy.deepcopy(model_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("model_config needs a 'model_type' (e.g. llama, qwen2, qwen2_moe, mixtral)")
    fields.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    config = AutoConfig.for_model(model_type, **fields, **extra)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"model_config.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    model = auto.from_config(config, dtype=torch_dtype(dtype) if dtype != "auto" else None, attn_implementation=attn)
    return model


__all__ = ["BUILTIN", "DType", "Head", "build_model", "load_tokenizer", "torch_dtype"]
