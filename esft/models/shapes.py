"""Published MoE shapes as `build_model` configs (random init, no download), and cut-downs of them.

    from esft.models.shapes import SHAPES, cut
    cfg = cut(SHAPES["deepseek_v2_lite"], layers=2)   # two sparse layers at the real width

Values are those of the models' released ``config.json`` files on the Hugging Face hub
(deepseek-ai/DeepSeek-V2-Lite, Qwen/Qwen3-30B-A3B). Left out: DeepSeek-V2-Lite's YaRN rope
scaling (its 163,840-token context), which changes no shape and no FLOP at the sequence lengths
used here. The vocabulary is kept, so a model built from a full shape is the real size
(DeepSeek-V2-Lite: 15.7B parameters).
"""

from __future__ import annotations

import copy
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "deepseek_v2_lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def cut(shape: dict[str, Any], layers: int | None = None, keep_vocab: bool = False) -> dict[str, Any]:
    """`shape` with `layers` decoder layers, all of them sparse (no leading dense layers), and,
    unless `keep_vocab`, without its vocabulary size (`build_model` then takes the tokenizer's)."""
    out = copy.deepcopy(shape)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        out["num_hidden_layers"] = layers
        if "first_k_dense_replace" in out:
            out["first_k_dense_replace"] = 0
    if not keep_vocab:
        out.pop("vocab_size")
    return out
