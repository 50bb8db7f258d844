"""ESFT vs full fine-tuning vs LoRA: training-step time and gradient + optimizer memory, same run.

    python benchmarks/esft_step.py --out benchmarks/results/esft_step_cpu.json        # CPU, tiny MoE
    python benchmarks/esft_step.py --device cuda --size small --out esft_step_gpu.json

One random-init DeepSeek-V2-shaped MoE (the study's shape by default), packed micro-batches of the
built-in tasks from `SFTDataModule`, the product's `token_loss`, AdamW (weight decay 0.1). Three
copies of the same weights: FFT (everything trains), ESFT (the experts that token scores on the
data select with p=0.2, `esft.experts`), LoRA r=8 on every linear layer (`esft.models.lora`).
Steps are interleaved (FFT, ESFT, LoRA, FFT, ...) on the same batches so that machine load hits
all three alike; each row reports the median step time (forward, backward, optimizer step) after
`--warmup` steps, its ratio to FFT, the trainable parameters, and the bytes held in gradients plus
optimizer state after a step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from esft.data import SFTDataModule
from esft.experts import apply_expert_config, score_experts, select_experts
from esft.models import build_model, load_tokenizer
from esft.models.forward import token_loss
from esft.models.lora import apply_lora
from esft.optim import OptimConfig, build_adamw

SIZES = {
    "tiny": dict(model_type="deepseek_v2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                 moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                 q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1,
                 max_position_embeddings=512, tie_word_embeddings=False),
    "small": dict(model_type="deepseek_v2", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                  moe_intermediate_size=256, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=256,
                  q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1,
                  max_position_embeddings=4096, tie_word_embeddings=False),
}


def grad_and_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return grads + state


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tokenizer = load_tokenizer("builtin")
    data = SFTDataModule(tasks=["intent_json", "extract_fields", "verdict"], num_train_per_task=400, num_val_per_task=0,
                         tokenizer_name="builtin", max_length=256, max_tokens=args.max_tokens, layout="flat")
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) == args.steps:
            break
    torch.manual_seed(0)
    base = build_model(tokenizer, model_config=SIZES[args.size], attn_implementation="sdpa").to(device)
    scores = score_experts(base, [e["input_ids"] for e in data.train_examples[:256]], progress=False)
    experts = select_experts(scores, "token", 0.2)
    models = {"fft": copy.deepcopy(base), "esft_token_p0.2": copy.deepcopy(base), "lora_r8": copy.deepcopy(base)}
    apply_expert_config(models["esft_token_p0.2"], experts)
    models["lora_r8"] = apply_lora(models["lora_r8"], {"r": 8, "alpha": 16})
    opts = {k: build_adamw(m, OptimConfig(lr=1e-3, weight_decay=0.1)) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    memory = {}
    for batch in batches:
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_sum, count = token_loss(model, batch, 1024)
            (loss_sum / count).backward()
            memory[name] = grad_and_state_bytes(model, opts[name]) if opts[name].state else None
            opts[name].step()
            memory[name] = grad_and_state_bytes(model, opts[name])
            opts[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    total = sum(p.numel() for p in base.parameters())
    fft = statistics.median(times["fft"][args.warmup:])
    rows = []
    for name, model in models.items():
        step = statistics.median(times[name][args.warmup:])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"setup": name, "step_s": round(step, 4), "vs_fft": round(step / fft, 3), "trainable": trainable,
                     "trainable_pct": round(100 * trainable / total, 2),
                     "grad_optim_mib": round(memory[name] / 2**20, 2), "grad_optim_vs_fft": None})
    for r in rows:
        r["grad_optim_vs_fft"] = round(r["grad_optim_mib"] / rows[0]["grad_optim_mib"], 3)
    result = {"size": args.size, "device": str(device), "params": total, "experts_selected": experts.num_selected(),
              "experts_total": scores["num_experts"] * len(scores["token"]), "tokens_per_step": args.max_tokens,
              "steps_timed": args.steps - args.warmup, "loadavg": os.getloadavg(), "rows": rows}
    print(f"model {args.size}: {total:,} params, ESFT experts {result['experts_selected']}/{result['experts_total']}, "
          f"load average {result['loadavg'][0]:.2f}")
    print("| setup | step s | vs FFT | trainable % | grad + optimizer MiB | vs FFT |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['step_s']} | {r['vs_fft']} | {r['trainable_pct']} | {r['grad_optim_mib']} | {r['grad_optim_vs_fft']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
