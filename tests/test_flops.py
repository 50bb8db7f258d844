"""Model FLOPs for MFU: the formula against torch's FLOP counter, and the batch field it reads."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from esft.data.packing import causal_pairs, collate_packed, collate_padded
from esft.flops import attention_flops_per_pair, matmul_params, training_flops
from esft.models import build_model

from conftest import TINY


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_moe", "deepseek_v3"])
def test_formula_matches_torch_flop_counter_on_eager_attention(tokenizer, family):
    """Eager attention computes the full s x s square where causal kernels compute half, so the
    counter must read 6 P s + per_pair * s^2 for one document of s tokens. torch's counter does
    not see the fused routed experts' kernels (transformers' experts path), so they are left out
    of P here and checked by hand in the next test."""
    cfg = dict(TINY[family])
    torch.manual_seed(0)
    model = build_model(tokenizer, model_config=cfg, attn_implementation="eager")
    s = 24
    ids = torch.randint(3, len(tokenizer), (1, s))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, use_cache=False)
        out.logits.float().sum().backward()
    per_pair = attention_flops_per_pair(model.config)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    experts = sum(p.numel() * top_k // p.shape[0] for p in model.parameters() if p.dim() == 3)
    expected = 6 * (matmul_params(model) - experts) * s + per_pair * s * s
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


def test_routed_experts_count_their_active_share(tokenizer):
    cfg = dict(TINY["qwen2_moe"])
    dense = matmul_params(build_model(tokenizer, model_config={**cfg, "num_experts_per_tok": cfg["num_experts"]}))
    sparse = build_model(tokenizer, model_config=cfg)
    experts = sum(p.numel() for n, p in sparse.named_parameters() if p.dim() == 3)
    inactive = experts * (cfg["num_experts"] - cfg["num_experts_per_tok"]) // cfg["num_experts"]
    assert matmul_params(sparse) == dense - inactive


def test_llama_counts_by_hand(tokenizer):
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True)
    model = build_model(tokenizer, model_config=cfg)
    h, kv, inter, layers, vocab = 32, 2 * 8, 64, 3, len(tokenizer)
    assert matmul_params(model) == layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h
    assert attention_flops_per_pair(model.config) == 3 * 2 * 4 * (8 + 8) * layers
    assert training_flops(10, 7, num_tokens=5, num_causal_pairs=3) == 6 * 10 * 5 + 7 * 3


def test_batches_carry_causal_pairs_of_real_documents_only():
    docs = [{"input_ids": [1] * n, "labels": [1] * n, "length": n} for n in (3, 1, 5)]
    assert causal_pairs([3, 1, 5]) == 6 + 1 + 15
    flat = collate_packed([docs[:2], docs[2:]], layout="flat")
    rows = collate_packed([docs[:2], docs[2:]], layout="rows")  # the first row ends in filler
    padded = collate_padded([docs], pad_token_id=0)
    assert rows["num_padding"] > 0
    assert flat["num_causal_pairs"] == rows["num_causal_pairs"] == padded["num_causal_pairs"] == 22
