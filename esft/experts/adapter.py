"""ESFT adapters: only what was trained, as safetensors, plus the expert config.

An adapter directory holds ``expert_config.json`` (deepseek-ai/ESFT format) and
``adapter.safetensors`` with every trainable tensor under its parameter name (the ``[k, ...]``
slices ``...mlp.experts.esft_gate_up_proj`` / ``esft_down_proj``, and whole modules where the
config unfroze shared experts or non-expert modules). Loading applies the config to the base
model and copies the tensors in, so the result computes exactly the fine-tuned logits.

    esft experts save  --ckpt runs/x/checkpoints/last.ckpt --out adapter/
    esft experts merge --base runs/base/hf --adapter adapter/ --out merged/
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from esft.experts.config import ExpertConfig
from esft.experts.trainable import apply_expert_config, merge_experts, trainable_state_dict

CONFIG_FILE, WEIGHTS_FILE = "expert_config.json", "adapter.safetensors"


def save_adapter(model: nn.Module, cfg: ExpertConfig, out: str | Path,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model`'s trainable tensors (or `tensors`, from `trainable_state_dict`) and `cfg` to
    the directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in (trainable_state_dict(model) if tensors is None else tensors).items()}
    if not tensors:
        raise ValueError("the model has no trainable tensors: apply an expert config first")
    save_file(tensors, out / WEIGHTS_FILE, metadata={"model_type": model.config.model_type, "format": "esft-experts"})
    cfg.save(out / CONFIG_FILE)
    return out


def load_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """Apply the adapter's expert config to the base `model` and load its tensors (in place)."""
    adapter = Path(adapter)
    if not (adapter / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{adapter} is not an ESFT adapter: {WEIGHTS_FILE} is missing")
    cfg = ExpertConfig.load(adapter / CONFIG_FILE)
    with safe_open(adapter / WEIGHTS_FILE, "pt") as f:
        trained_on = (f.metadata() or {}).get("model_type")
    if trained_on is not None and trained_on != model.config.model_type:
        raise ValueError(f"{adapter} was trained on a {trained_on} model; this model is {model.config.model_type}")
    apply_expert_config(model, cfg)
    tensors = load_file(adapter / WEIGHTS_FILE)
    expected = dict(model.named_parameters())
    trainable = {n for n, p in expected.items() if p.requires_grad}
    if set(tensors) != trainable:
        missing, extra = sorted(trainable - set(tensors)), sorted(set(tensors) - trainable)
        raise ValueError(f"{adapter / WEIGHTS_FILE} does not match its expert config on this model: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if expected[name].shape != value.shape:
                raise ValueError(f"{adapter / WEIGHTS_FILE}: {name} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(expected[name].shape)}")
            expected[name].copy_(value)
    return model


def adapter_info(adapter: str | Path) -> dict:
    adapter = Path(adapter)
    return {"bytes": (adapter / WEIGHTS_FILE).stat().st_size,
            "config": json.loads((adapter / CONFIG_FILE).read_text())}


def merge_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """The base `model` with the adapter merged in: a plain transformers model (in place)."""
    return merge_experts(load_adapter(model, adapter))
