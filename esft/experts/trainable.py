"""Train only the selected routed experts: gradients and optimizer state exist for their slices
of the fused expert tensors and for nothing else.

A fused ``[E, ...]`` parameter cannot be partly trainable, so `apply_expert_config` restructures
each sparse layer's experts module in place:

- the fused ``gate_up_proj`` / ``down_proj`` stay where they are (same state-dict keys) with
  ``requires_grad=False``;
- the selected experts' rows are copied into new parameters ``esft_gate_up_proj`` /
  ``esft_down_proj`` of shape ``[k, ...]`` (k = experts selected in that layer);
- the module's forward is replaced by `esft_experts_forward`: one stable sort puts the
  (token, expert) pairs of frozen experts first and those of selected experts after them, and two
  grouped GEMMs (``torch.nn.functional.grouped_mm`` through transformers' dispatcher, the kernel
  behind its ``experts_implementation="grouped_mm"``) run the frozen experts on the fused tensors, which do
  not require grad, and the selected experts on the ``[k, ...]`` slices. There is no per-expert
  Python loop. Autograd computes input gradients through both calls and weight gradients only for
  the slices, so frozen experts get no weight gradient at all (not a gradient that is then
  masked), the backward skips the frozen experts' weight-gradient GEMMs, and AdamW — fused,
  foreach or not, with any weight decay — only ever sees the ``[k, ...]`` tensors: every frozen
  weight stays bit-identical to the base.

Everything else (attention, norms, embeddings, routers, dense MLPs, shared experts) is frozen
unless the expert config asks for shared experts or non-expert modules. `merge_experts` writes
the slices back and restores a plain transformers model; `merged_state_dict` does the same
without touching the model (for exports during a run).

Departures from the paper: routing is not restricted (as in the paper) and the router's
auxiliary balance loss is not added — the SFT loss never adds it (it calls the decoder directly),
and with frozen routers its only path to the trained experts would be through earlier layers'
hidden states. A trainable slice that no token reached in a step gets a zero gradient rather
than none (its grouped call always runs, with an empty group), so DDP needs no
``find_unused_parameters``: AdamW still applies its momentum and weight decay to it, as it does to
the untouched rows of any partly used weight. The split point between the two grouped calls is
read on the host (one synchronisation per patched layer), so under ``torch.compile`` the patched
experts break the graph.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from esft.experts.config import ExpertConfig
from esft.models.sharding import gathered
from esft.models.moe import EXPERT_PARAMS, moe_adapter

try:  # transformers' dispatcher for its own grouped_mm experts: torch.nn.functional.grouped_mm where
    # the torch version, device and alignment allow it, torch._grouped_mm or a fallback op otherwise
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - a transformers without it: torch >= 2.10's public kernel
    _grouped_mm = F.grouped_mm

PREFIX = "esft_"
SORT_KEY = PREFIX + "sort_key"


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [S, in] times the transposed weight of their group, ``weight`` [G, out, in];
    group g holds rows ``offsets[g-1]:offsets[g]``."""
    return _grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)


def _expert_mlp(self: nn.Module, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_linear(self._apply_gate(_grouped_linear(x, gate_up, offsets)), down, offsets)


def esft_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed-expert output for [tokens, H] `hidden_states` and [tokens, K] routing: frozen experts
    in one grouped GEMM over the fused tensors, selected experts in one over the trainable slices."""
    tokens, k = top_k_index.shape
    num_experts = self.num_experts
    # frozen expert e sorts as e, selected expert e as num_experts + its slot
    key = self.esft_sort_key[top_k_index.reshape(-1)]
    key, perm = torch.sort(key, stable=True)
    offsets = torch.bincount(key, minlength=num_experts + self.esft_gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
    split = int(offsets[num_experts - 1])  # pairs routed to frozen experts: the only host sync
    x = hidden_states[perm // k]
    weights = top_k_weights.reshape(-1)[perm, None]
    frozen = _expert_mlp(self, x[:split], self.gate_up_proj, self.down_proj, offsets[:num_experts])
    trained = _expert_mlp(self, x[split:], self.esft_gate_up_proj, self.esft_down_proj, offsets[num_experts:] - split)
    frozen, trained = frozen * weights[:split], trained * weights[split:]  # in the weights' dtype if wider
    # each part straight back to (token, k) order: no concatenation of the two, one write per row
    out = frozen.new_empty(tokens * k, frozen.shape[-1])
    out[perm[:split]] = frozen
    out[perm[split:]] = trained
    # summed over k, as transformers' grouped_mm path does
    return out.view(tokens, k, -1).sum(1).to(hidden_states.dtype)


def _check(model: nn.Module, cfg: ExpertConfig) -> dict[int, nn.Module]:
    family = moe_adapter(model)
    blocks = family.layers(model)
    n = family.num_experts(model.config)
    for layer, ids in cfg.experts.items():
        if layer not in blocks:
            raise ValueError(f"expert config names layer {layer}, which is not a sparse MoE layer of this "
                             f"{model.config.model_type} model (sparse layers: {sorted(blocks)})")
        bad = [i for i in ids if i >= n]
        if bad:
            raise ValueError(f"expert config layer {layer}: expert ids {bad} out of range (model has {n} routed experts)")
        experts = blocks[layer].experts
        if ids and (getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False)):
            raise ValueError(f"layer {layer}: {type(experts).__name__} stores transposed or biased expert weights, "
                             "which the trainable-slice forward does not support")
    return blocks


def apply_expert_config(model: nn.Module, cfg: ExpertConfig) -> int:
    """Freeze `model` except the experts (and optional parts) `cfg` selects; returns the number of
    trainable parameters. Idempotent per model: applying twice is an error."""
    family = moe_adapter(model)
    blocks = _check(model, cfg)
    if any(hasattr(b.experts, "_esft_slots") for b in blocks.values()):
        raise ValueError("an expert config is already applied to this model")
    for p in model.parameters():
        p.requires_grad_(cfg.non_expert_modules)
    for index, block in blocks.items():
        for name in EXPERT_PARAMS:
            getattr(block.experts, name).requires_grad_(False)
        for module in family.shared_modules(block):
            module.requires_grad_(cfg.shared_experts)
        ids = cfg.experts.get(index, [])
        experts = block.experts
        experts._esft_slots = {e: slot for slot, e in enumerate(ids)}
        if not ids:
            continue
        select = torch.tensor(ids, device=experts.gate_up_proj.device)
        for name in EXPERT_PARAMS:
            full = getattr(experts, name)
            setattr(experts, PREFIX + name, nn.Parameter(full.detach().index_select(0, select).clone()))
        key = torch.arange(experts.num_experts, device=select.device)
        key[select] = experts.num_experts + torch.arange(len(ids), device=select.device)
        experts.register_buffer(SORT_KEY, key, persistent=False)
        experts.forward = types.MethodType(esft_experts_forward, experts)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def patched_experts(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> experts module that holds trainable slices."""
    return {i: b.experts for i, b in moe_adapter(model).layers(model).items() if getattr(b.experts, "_esft_slots", None)}


def _merged(experts: nn.Module, name: str) -> torch.Tensor:
    ids = torch.tensor(list(experts._esft_slots), device=experts.gate_up_proj.device)
    full = getattr(experts, name).detach().clone()
    return full.index_copy_(0, ids, getattr(experts, PREFIX + name).detach().to(full.dtype))


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with the trained slices written into the fused expert tensors and
    the slice parameters left out: a plain transformers state dict. The model is not changed.
    `state`: a full state dict of `model` to merge instead (e.g. gathered from FSDP2 shards)."""
    state = dict(model.state_dict() if state is None else state)
    owner = {id(m): n for n, m in model.named_modules()}
    for experts in patched_experts(model).values():
        for name in EXPERT_PARAMS:
            key = f"{owner[id(experts)]}.{name}"
            full, part = state[key].detach().clone(), state.pop(f"{owner[id(experts)]}.{PREFIX}{name}").detach()
            ids = torch.tensor(list(experts._esft_slots), device=full.device)
            state[key] = full.index_copy_(0, ids, part.to(full.device, full.dtype))
    return state


def merge_experts(model: nn.Module) -> nn.Module:
    """Write the trained slices into the fused tensors in place and restore the plain forward."""
    for experts in patched_experts(model).values():
        with torch.no_grad():
            for name in EXPERT_PARAMS:
                getattr(experts, name).copy_(_merged(experts, name))
                delattr(experts, PREFIX + name)
        delattr(experts, SORT_KEY)
        del experts.forward
        del experts._esft_slots
    for block in moe_adapter(model).layers(model).values():
        block.experts.__dict__.pop("_esft_slots", None)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (the trained slices and any unfrozen module), whole:
    FSDP2 shards and ZeRO-3 partitions are gathered, so on a sharded model every rank must call this."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}
