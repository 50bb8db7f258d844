"""ESFT vs full fine-tuning vs LoRA: training-step time and gradient + optimizer memory, same run.

    python benchmarks/esft_step.py --out benchmarks/results/esft_step_cpu.json        # CPU, tiny MoE
    python benchmarks/esft_step.py --device cuda --size small --out esft_step_gpu.json
    python benchmarks/esft_step.py --size v2lite qwen3_30b_a3b --sides fft esft --dtype bfloat16 --lr 1e-5 \
        --max-tokens 512 --score-tokens 1024 --steps 7 --out benchmarks/results/esft_kernels_cpu.json

The ``v2lite`` / ``qwen3_30b_a3b`` sizes are two sparse layers (``--layers``) at the real layer
shape of DeepSeek-V2-Lite (hidden 2048, 64 routed experts top-6, 2 shared, expert width 1408) and
Qwen3-30B-A3B (hidden 2048, 128 routed experts top-8, expert width 768), `esft.models.shapes`,
with the built-in tokenizer's small vocabulary. Several sizes run one after another in one run.

One random-init DeepSeek-V2-shaped MoE (the study's shape by default), packed micro-batches of the
built-in tasks from `SFTDataModule`, the product's `token_loss`, AdamW (weight decay 0.1). Three
copies of the same weights: FFT (everything trains), ESFT (the experts that token scores on the
data select with p=0.2, `esft.experts`), LoRA r=8 on every linear layer (`esft.models.lora`).
Steps are interleaved on the same batches, the order reversed on every other batch, so that
machine load hits all three alike; each row reports the median step time (forward, backward,
optimizer step) after `--warmup` steps, its ratio to FFT, the median forward time (the loss
computation inside the same steps) and its ratio to FFT's forward (with ``--forward-reps``, also
the median of paired ratios over that many more rounds of forwards alone), the trainable
parameters, and the bytes held in gradients plus optimizer state after a step. FFT's experts run
transformers' ``grouped_mm`` implementation, ESFT's the two grouped calls of
`esft.experts.trainable`.
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
from esft.models.shapes import SHAPES, cut
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
    "v2lite": cut(SHAPES["deepseek_v2_lite"], layers=2),
    "qwen3_30b_a3b": cut(SHAPES["qwen3_30b_a3b"], layers=2),
}
SIDES = ("fft", "esft", "lora")


def grad_and_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return grads + state


def packed_batches(max_tokens: int, steps: int, device: torch.device) -> tuple[list[dict], list[list[int]]]:
    """`steps` packed flat micro-batches of the built-in tasks, and the tokenized examples."""
    data = SFTDataModule(tasks=["intent_json", "extract_fields", "verdict"], num_train_per_task=400, num_val_per_task=0,
                         tokenizer_name="builtin", max_length=256, max_tokens=max_tokens, layout="flat")
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) == steps:
            break
    return batches, [e["input_ids"] for e in data.train_examples]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def in_turn(models: dict[str, torch.nn.Module], flip: bool) -> list[tuple[str, torch.nn.Module]]:
    """The sides in their order, or reversed: alternating which goes first keeps what one side's
    optimizer step leaves in the caches and the allocator off always the same side's forward."""
    order = list(models.items())
    return order[::-1] if flip else order


def run_size(size: str, args: argparse.Namespace, batches: list[dict], examples: list[list[int]]) -> dict:
    device = torch.device(args.device)
    config = dict(SIZES[size], **({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    base = build_model(load_tokenizer("builtin"), model_config=config, dtype=args.dtype, attn_implementation="sdpa").to(device)
    probe, total = [], 0
    for ids in examples:
        if total >= args.score_tokens:
            break
        probe.append(ids)
        total += len(ids)
    scores = score_experts(base, probe, progress=False)
    experts = select_experts(scores, "token", 0.2)
    params = sum(p.numel() for p in base.parameters())
    models = {}
    for side in args.sides:
        model = copy.deepcopy(base)
        if side == "esft":
            apply_expert_config(model, experts)
        elif side == "lora":
            model = apply_lora(model, {"r": 8, "alpha": 16})
        models[{"esft": "esft_token_p0.2", "lora": "lora_r8"}.get(side, side)] = model
    del base
    opts = {k: build_adamw(m, OptimConfig(lr=args.lr, weight_decay=0.1)) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    forward: dict[str, list[float]] = {k: [] for k in models}
    memory = {}
    for i, batch in enumerate(batches):
        for name, model in in_turn(models, flip=i % 2 == 1):
            _sync(device)
            start = time.perf_counter()
            loss_sum, count = token_loss(model, batch, 1024)
            _sync(device)
            forward[name].append(time.perf_counter() - start)
            (loss_sum / count).backward()
            opts[name].step()
            memory[name] = grad_and_state_bytes(model, opts[name])
            opts[name].zero_grad(set_to_none=True)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    # forwards alone (autograd recording, as in training; no backward), `--forward-reps` rounds over
    # the batches, sides alternating which goes first: many more paired samples than the steps give
    alone: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(args.forward_reps):
        for i, batch in enumerate(batches):
            for name, model in in_turn(models, flip=(i + rep) % 2 == 1):  # each batch in both orders
                _sync(device)
                start = time.perf_counter()
                token_loss(model, batch, 1024)
                _sync(device)
                alone[name].append(time.perf_counter() - start)
    first = next(iter(models))
    ref_step, ref_fwd = (statistics.median(t[args.warmup:]) for t in (times[first], forward[first]))
    rows = []
    for name, model in models.items():
        step, fwd = statistics.median(times[name][args.warmup:]), statistics.median(forward[name][args.warmup:])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"setup": name, "step_s": round(step, 4), "vs_fft": round(step / ref_step, 3),
                     "forward_s": round(fwd, 4), "forward_vs_fft": round(fwd / ref_fwd, 3),
                     "trainable_pct": round(100 * trainable / params, 2), "trainable": trainable,
                     "grad_optim_mib": round(memory[name] / 2**20, 2),
                     "grad_optim_vs_fft": round(memory[name] / memory[first], 3),
                     "steps_s": [round(t, 4) for t in times[name]], "forwards_s": [round(t, 4) for t in forward[name]]})
        if alone[name]:
            paired = [ours / ref for ours, ref in zip(alone[name], alone[first])]
            q1, _, q3 = statistics.quantiles(paired, n=4)
            rows[-1].update({"forward_alone_s": round(statistics.median(alone[name]), 4),
                             "forward_alone_vs_fft": round(statistics.median(paired), 3),
                             "forward_alone_vs_fft_iqr": [round(q1, 3), round(q3, 3)],
                             "forwards_alone_s": [round(t, 4) for t in alone[name]]})
    return {"size": size, "config": config, "params": params, "experts_selected": experts.num_selected(),
            "experts_total": scores["num_experts"] * len(scores["token"]), "scored_tokens": scores["num_tokens"],
            "loadavg": os.getloadavg(), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["tiny"])
    parser.add_argument("--sides", choices=SIDES, nargs="+", default=list(SIDES), help="the first is the reference")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per packed micro-batch")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="AdamW learning rate; use deepseek-ai/ESFT's 1e-5 to compare forwards: at 1e-3 FFT's "
                             "routers drift within a few steps and its forward no longer runs the same experts")
    parser.add_argument("--forward-reps", type=int, default=0,
                        help="after the steps, this many rounds of forwards alone over the batches (more paired samples "
                             "of the forward ratio than the steps give)")
    parser.add_argument("--score-tokens", type=int, default=16384, help="tokens scored to select the ESFT experts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    batches, examples = packed_batches(args.max_tokens, args.steps, torch.device(args.device))
    result = {"device": args.device, "dtype": args.dtype, "lr": args.lr, "tokens_per_step": args.max_tokens, "threads": torch.get_num_threads(),
              "steps_timed": len(batches) - args.warmup, "sizes": []}
    for size in args.size:
        res = run_size(size, args, batches, examples)
        result["sizes"].append(res)
        print(f"model {size}: {res['params']:,} params, ESFT experts {res['experts_selected']}/{res['experts_total']}, "
              f"load average {res['loadavg'][0]:.2f}")
        print("| setup | step s | vs FFT | forward s | vs FFT | trainable % | grad + optimizer MiB | vs FFT |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['setup']} | {r['step_s']} | {r['vs_fft']} | {r['forward_s']} | {r['forward_vs_fft']} | "
                  f"{r['trainable_pct']} | {r['grad_optim_mib']} | {r['grad_optim_vs_fft']} |", flush=True)
        for r in res["rows"]:
            if "forward_alone_s" in r:
                print(f"{r['setup']}: forwards alone {r['forward_alone_s']} s, {r['forward_alone_vs_fft']}x FFT's "
                      f"(median of {len(r['forwards_alone_s'])} paired ratios, quartiles {r['forward_alone_vs_fft_iqr']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
