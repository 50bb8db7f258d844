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

from dataclasses import dataclass

from torch import nn

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
        MoEFamily("deepseek_v3", "n_routed_experts", ("shared_experts",)),
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
