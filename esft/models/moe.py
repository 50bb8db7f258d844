"""Where the MoE parts of a transformers 5 model live, one small adapter per family.

In all supported families a sparse decoder layer has ``layer.mlp.gate`` (the router, returning
``(logits, top-k weights, top-k indices)``), ``layer.mlp.experts`` (routed experts fused in 3-D
parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]) and, in some families, shared
experts that every token passes through. Dense layers (deepseek's first ``first_k_dense_replace``
layers, qwen's ``mlp_only_layers``) have no router and are skipped.

    from esft.models.moe import moe_adapter
    moe = moe_adapter(model)          # error naming the supported families otherwise
    for index, block in moe.layers(model).items(): ...
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from esft.losses.router import load_balancing_loss

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""The fused routed-expert parameters, each ``[num_experts, ...]``."""


@dataclass(frozen=True)
class MoEFamily:
    """One model family's MoE layout."""

    model_type: str
    experts_field: str
    """Config field holding the number of routed experts."""
    shared: tuple[str, ...] = ()
    """Attributes of ``layer.mlp`` that hold shared-expert modules (with their gates)."""
    sigmoid: bool = False
    """The router scores experts with a sigmoid (deepseek_v3) instead of a softmax."""

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` -> per-token expert probabilities (rows summing to 1): the
        softmax, or for sigmoid routers the normalised sigmoid scores (DeepSeek-V3's sequence-wise
        balance loss, arXiv 2412.19437 eq. 18)."""
        if self.sigmoid:
            scores = logits.float().sigmoid()
            return scores / scores.sum(-1, keepdim=True)
        return logits.float().softmax(-1)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_field))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def layers(self, model: nn.Module) -> dict[int, nn.Module]:
        """Decoder-layer index -> sparse MoE block (``layer.mlp``), dense layers left out."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        return {i: layer.mlp for i, layer in enumerate(decoder.layers)
                if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")}

    def shared_modules(self, block: nn.Module) -> list[nn.Module]:
        return [getattr(block, name) for name in self.shared if getattr(block, name, None) is not None]


FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        MoEFamily("deepseek_v2", "n_routed_experts", ("shared_experts",)),
        MoEFamily("deepseek_v3", "n_routed_experts", ("shared_experts",), sigmoid=True),
        MoEFamily("qwen2_moe", "num_experts", ("shared_expert", "shared_expert_gate")),
        MoEFamily("qwen3_moe", "num_experts"),
        MoEFamily("olmoe", "num_experts"),
        MoEFamily("mixtral", "num_local_experts"),
    )
}


def moe_adapter(model: nn.Module) -> MoEFamily:
    """The family adapter for `model` (a transformers causal LM, optionally wrapped by peft)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"expert-specialized fine-tuning does not support model_type={model_type!r}; "
                         f"supported MoE families: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    if not family.layers(model):
        raise ValueError(f"{model_type} model has no sparse MoE layer (layer.mlp.gate + layer.mlp.experts)")
    return family


class RouterBalance:
    """The load-balancing loss (`esft.losses.load_balancing_loss`) of a model's sparse layers,
    from forward hooks on their routers (``layer.mlp.gate``, which every family's MoE block calls
    with the flattened tokens, with or without ESFT's trainable expert slices).

        balance = RouterBalance(model)
        with balance.capture(attention_mask):   # records only inside the block, so the recompute
            out = model(...)                    # of gradient checkpointing adds nothing
        aux = balance.loss()                    # mean over the sparse layers; 1.0 = uniform

    Tokens are all positions of the batch except padding of the padded layout (`attention_mask`);
    fixed-shape packed batches' filler tokens are routed like text and count.
    """

    def __init__(self, model: nn.Module) -> None:
        self.family = moe_adapter(model)
        config = model.config
        self.num_experts = self.family.num_experts(config)
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        self._active = False
        for block in self.family.layers(model).values():
            block.gate.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args, output) -> None:
        if self._active:
            self._records.append((output[0], output[2]))

    @contextmanager
    def capture(self, attention_mask: torch.Tensor | None = None) -> Iterator[RouterBalance]:
        self._records, self._active = [], True
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        try:
            yield self
        finally:
            self._active = False

    def loss(self) -> torch.Tensor:
        """Mean balance loss over the layers recorded by the last `capture` (which it releases)."""
        if not self._records:
            raise RuntimeError("RouterBalance.loss: no router ran inside capture()")
        losses = [load_balancing_loss(self.family.router_probs(logits), indices, self.num_experts, self._mask)
                  for logits, indices in self._records]
        self._records = []
        return torch.stack(losses).mean()
