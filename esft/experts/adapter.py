"""ESFT adapters: only what was trained, as safetensors, plus the expert config, in this project's
layout or in deepseek-ai/ESFT's.

- ``esft`` layout: ``expert_config.json`` and ``adapter.safetensors`` with every trainable tensor
  under its parameter name (the ``[k, ...]`` slices ``...mlp.experts.esft_gate_up_proj`` /
  ``esft_down_proj``, and whole modules where the config unfroze shared experts or non-expert
  modules).
- ``deepseek`` layout (deepseek-ai/ESFT's ``train.py`` saves its model with every frozen weight
  turned into a non-persistent buffer): ``expert_cfg.json`` (every sparse layer listed, ``[]``
  where none trains: the reference indexes each one) and ``model.safetensors`` with one tensor per
  trained expert and projection, ``model.layers.{L}.mlp.experts.{e}.gate_proj.weight`` [I, H],
  ``up_proj.weight`` [I, H] and ``down_proj.weight`` [H, I]; other trained modules keep their
  names. The fused ``gate_up_proj`` row of an expert is ``cat(gate_proj, up_proj)``, the order in
  which transformers fuses such checkpoints. Reading takes every ``*.safetensors`` in the
  directory (the reference may shard) and the reference's legacy ``layers.`` key prefix.

Loading applies the config to the base model and copies the tensors in, so the result computes
exactly the fine-tuned logits, whichever layout it came from.

    esft experts save  --ckpt runs/x/checkpoints/last.ckpt --out adapter/ [--layout deepseek]
    esft experts merge --base runs/base/hf --adapter adapter/ --out merged/
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from esft.experts.config import ExpertConfig
from esft.experts.trainable import PREFIX, apply_expert_config, merge_experts, trainable_state_dict
from esft.models.moe import moe_adapter

Layout = Literal["esft", "deepseek"]
CONFIG_FILE, WEIGHTS_FILE = "expert_config.json", "adapter.safetensors"
REFERENCE_CONFIG_FILE, REFERENCE_WEIGHTS_FILE = "expert_cfg.json", "model.safetensors"
_SLICE = re.compile(rf"^(?P<experts>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.{PREFIX}(?P<proj>gate_up|down)_proj$")
_EXPERT = re.compile(r"^(?P<experts>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def to_reference(tensors: dict[str, torch.Tensor], cfg: ExpertConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors -> deepseek-ai/ESFT's per-expert keys (other tensors keep their names)."""
    out = {}
    for name, value in tensors.items():
        m = _SLICE.match(name)
        if m is None:
            out[name] = value
            continue
        ids = cfg.experts.get(int(m["layer"]), [])
        if len(ids) != value.shape[0]:
            raise ValueError(f"{name} holds {value.shape[0]} experts; the expert config lists {ids} for its layer")
        for slot, e in enumerate(ids):
            if m["proj"] == "down":
                out[f"{m['experts']}.{e}.down_proj.weight"] = value[slot]
            else:
                gate, up = value[slot].chunk(2, dim=0)
                out[f"{m['experts']}.{e}.gate_proj.weight"], out[f"{m['experts']}.{e}.up_proj.weight"] = gate, up
    return out


def from_reference(tensors: dict[str, torch.Tensor], cfg: ExpertConfig, where: str = "adapter") -> dict[str, torch.Tensor]:
    """deepseek-ai/ESFT's per-expert tensors -> ours: per layer, ``[k, ...]`` slices stacked in the
    config's (ascending) expert order."""
    out, experts = {}, {}
    for name, value in tensors.items():
        name = "model." + name if name.startswith("layers.") else name  # the reference's legacy prefix
        m = _EXPERT.match(name)
        if m is None:
            out[name] = value
        else:
            experts.setdefault((m["experts"], int(m["layer"])), {})[(int(m["e"]), m["proj"])] = value
    for (prefix, layer), found in sorted(experts.items(), key=lambda kv: kv[0][1]):
        ids = cfg.experts.get(layer, [])
        extra = sorted({e for e, _ in found} - set(ids))
        if extra:
            raise ValueError(f"{where}: layer {layer} holds weights of experts {extra}, which its expert config "
                             f"does not train (it lists {ids})")
        try:
            out[f"{prefix}.{PREFIX}gate_up_proj"] = torch.stack([torch.cat([found[e, "gate"], found[e, "up"]]) for e in ids])
            out[f"{prefix}.{PREFIX}down_proj"] = torch.stack([found[e, "down"] for e in ids])
        except KeyError as e:
            raise ValueError(f"{where}: layer {layer}, expert {e.args[0][0]} lacks its {e.args[0][1]}_proj weight") from None
    return out


def save_adapter(model: nn.Module, cfg: ExpertConfig, out: str | Path,
                 tensors: dict[str, torch.Tensor] | None = None, layout: Layout = "esft") -> Path:
    """Write `model`'s trainable tensors (or `tensors`, from `trainable_state_dict`) and `cfg` to
    the directory `out`, in this project's layout or deepseek-ai/ESFT's (`layout`)."""
    if layout not in ("esft", "deepseek"):
        raise ValueError(f"layout must be 'esft' or 'deepseek', got {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in (trainable_state_dict(model) if tensors is None else tensors).items()}
    if not tensors:
        raise ValueError("the model has no trainable tensors: apply an expert config first")
    metadata = {"model_type": model.config.model_type, "format": "esft-experts" if layout == "esft" else "pt"}
    if layout == "esft":
        save_file(tensors, out / WEIGHTS_FILE, metadata=metadata)
        cfg.save(out / CONFIG_FILE)
        return out
    save_file({k: v.contiguous() for k, v in to_reference(tensors, cfg).items()}, out / REFERENCE_WEIGHTS_FILE, metadata=metadata)
    every_layer = {i: cfg.experts.get(i, []) for i in moe_adapter(model).layers(model)}
    ExpertConfig(every_layer, cfg.shared_experts, cfg.non_expert_modules).save(out / REFERENCE_CONFIG_FILE)
    return out


def adapter_layout(adapter: str | Path) -> Layout:
    """Which layout the directory `adapter` holds; an error naming both when it is neither."""
    adapter = Path(adapter)
    if (adapter / WEIGHTS_FILE).is_file() and (adapter / CONFIG_FILE).is_file():
        return "esft"
    if (adapter / REFERENCE_CONFIG_FILE).is_file() and any(adapter.glob("*.safetensors")):
        return "deepseek"
    raise FileNotFoundError(f"{adapter} is not an ESFT adapter: it holds neither {CONFIG_FILE} + {WEIGHTS_FILE} "
                            f"nor deepseek-ai/ESFT's {REFERENCE_CONFIG_FILE} + *.safetensors")


def _read(adapter: Path) -> tuple[ExpertConfig, dict[str, torch.Tensor], str | None, str]:
    """(config, tensors in our naming, model_type the adapter names, the weights it came from)."""
    if adapter_layout(adapter) == "esft":
        with safe_open(adapter / WEIGHTS_FILE, "pt") as f:
            trained_on = (f.metadata() or {}).get("model_type")
        return adapter_config(adapter), load_file(adapter / WEIGHTS_FILE), trained_on, str(adapter / WEIGHTS_FILE)
    cfg = adapter_config(adapter)
    tensors, trained_on = {}, None
    for path in sorted(adapter.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            trained_on = trained_on or (f.metadata() or {}).get("model_type")
        tensors.update(load_file(path))
    return cfg, from_reference(tensors, cfg, str(adapter)), trained_on, f"{adapter}/*.safetensors"


def load_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """Apply the adapter's expert config to the base `model` and load its tensors (in place);
    either layout."""
    adapter = Path(adapter)
    cfg, tensors, trained_on, where = _read(adapter)
    if trained_on is not None and trained_on != model.config.model_type:
        raise ValueError(f"{adapter} was trained on a {trained_on} model; this model is {model.config.model_type}")
    apply_expert_config(model, cfg)
    expected = dict(model.named_parameters())
    trainable = {n for n, p in expected.items() if p.requires_grad}
    if set(tensors) != trainable:
        missing, extra = sorted(trainable - set(tensors)), sorted(set(tensors) - trainable)
        raise ValueError(f"{where} does not match its expert config on this model: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if expected[name].shape != value.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(expected[name].shape)}")
            expected[name].copy_(value)
    return model


def adapter_config(adapter: str | Path) -> ExpertConfig:
    """The expert config of an adapter of either layout (layers without experts left out)."""
    adapter = Path(adapter)
    cfg = ExpertConfig.load(adapter / (CONFIG_FILE if adapter_layout(adapter) == "esft" else REFERENCE_CONFIG_FILE))
    return ExpertConfig({i: ids for i, ids in cfg.experts.items() if ids}, cfg.shared_experts, cfg.non_expert_modules)


def merge_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """The base `model` with the adapter merged in: a plain transformers model (in place)."""
    return merge_experts(load_adapter(model, adapter))
