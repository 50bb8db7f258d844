"""Model FLOPs of a training step, and MFU against a stated peak.

Counting (the usual "model FLOPs", Kaplan et al. 2020 / PaLM appendix B; recomputation from
activation checkpointing is not counted, so this is MFU, not hardware FLOPs utilisation):

- matmuls: ``6 * P * tokens``, where P counts the weights of every Linear layer (the LM head
  included, also when it is tied to the embedding; the embedding lookup is free), routers kept
  as bare 2-D weights, and, for MoE
  layers whose routed experts are fused 3-D tensors ``[num_experts, ...]``, the active share
  ``num_experts_per_tok / num_experts`` of them;
- causal attention: per layer, ``QK^T`` and ``AV`` cost ``2 * heads * (d_qk + d_v)`` FLOPs per
  (query, key) pair in the forward pass, times 3 for forward + backward, over the causal pairs
  of each real document (``s (s + 1) / 2``; no cross-document pairs, no padding). PaLM counts
  ``12 * L * heads * d * T`` per token, the non-causal square; causal kernels skip half of it.
  Sliding-window attention is counted as full causal attention.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense peak TFLOP/s by device name fragment, from the vendors' data sheets (SXM parts, no
# sparsity). MFU is quoted against the BF16 peak whatever the run's precision.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The dense BF16 peak of a CUDA device by name; None elsewhere or when not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_params(model: nn.Module) -> int:
    """Weights one token multiplies through (see the module docstring)."""
    total = 0
    top_k = getattr(model.config, "num_experts_per_tok", None)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
            continue
        if isinstance(module, nn.Embedding):  # a lookup; a tied LM head is counted as its Linear
            continue
        for p in module.parameters(recurse=False):
            if p.dim() == 2:  # routers written as a bare weight
                total += p.numel()
            elif p.dim() == 3:  # fused routed experts [num_experts, out, in]
                total += p.numel() * (top_k or p.shape[0]) // p.shape[0]
    return total


def attention_flops_per_pair(config) -> int:
    """Forward + backward FLOPs of one causal (query, key) pair, summed over the layers."""
    heads = config.num_attention_heads
    if hasattr(config, "qk_nope_head_dim"):  # multi-head latent attention (DeepSeek-V2/V3)
        d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        d_v = config.v_head_dim
    else:
        d_qk = d_v = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 3 * 2 * heads * (d_qk + d_v) * config.num_hidden_layers


def training_flops(params: int, per_pair: int, num_tokens: int, num_causal_pairs: int) -> float:
    """Model FLOPs of forward + backward over a batch (`matmul_params`, `attention_flops_per_pair`)."""
    return 6.0 * params * num_tokens + float(per_pair) * num_causal_pairs
