"""ESFT of a DeepSeek-V2-Lite-shaped MoE (15.7B parameters, random init, bf16) on one GPU, with full
fine-tuning of the same model on the same GPU for comparison.

    bash benchmarks/esft_v2lite_gpu.sh                                         # one GPU, full shape
    python benchmarks/esft_v2lite.py --device cpu --layers 2 --hidden 64 --experts 8 --expert-width 32 \\
        --dense-width 128 --heads 4 --vocab 0 --max-tokens 256 --score-tokens 512 --steps 3 --warmup 1   # CPU dry run

1. builds `esft.models.shapes`' DeepSeek-V2-Lite (27 layers, the first dense; 64 routed experts
   top-6, 2 shared, expert width 1408, hidden 2048, vocabulary 102,400) directly on the device in
   ``--dtype``, no download; ``--layers``/``--hidden``/``--experts``/... shrink it for a dry run;
2. token-scores the routed experts on built-in task data (`esft.experts.score_experts`, pooled
   token means) and selects them with p=``--p`` (paper: 0.2);
3. trains only those experts for ``--steps`` packed micro-batches of ``--max-tokens`` tokens
   (flash varlen attention on CUDA, SDPA elsewhere), AdamW on the trainable slices: real tokens/s,
   model TFLOP/s and MFU (`esft.flops`, the full model's 6 x active weights per token plus causal
   attention, against the device's dense BF16 peak), peak device memory;
4. merges the experts back and runs the same steps with every weight trainable (FFT). An
   out-of-memory error is caught and reported with the memory in use when it struck.

Weights, gradients and AdamW state are all in ``--dtype`` (pure bf16 by default, as with the
trainer's ``bf16-true``). Departures from the paper's set-up: random weights instead of
DeepSeek-V2-Lite's (the routing of a random model concentrates on few experts, so the selected
count is not the paper's), built-in tasks instead of its six domains, no YaRN rope scaling.
The MFU counts model FLOPs, identical for both sides: ESFT's backward skips the frozen weights'
gradient GEMMs, so it does less work per token than the count says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from esft.data import SFTDataModule
from esft.experts import apply_expert_config, merge_experts, score_experts, select_experts
from esft.experts.trainable import patched_experts
from esft.flops import attention_flops_per_pair, matmul_params, peak_bf16_tflops, training_flops
from esft.models import build_model, load_tokenizer
from esft.models.attention import packed_layout, resolve_attn_implementation
from esft.models.forward import token_loss
from esft.models.shapes import SHAPES
from esft.optim import OptimConfig, build_adamw

TASKS = ["intent_json", "extract_fields", "verdict", "arithmetic"]


def shape(args: argparse.Namespace) -> dict:
    """DeepSeek-V2-Lite's config with the command line's reductions applied."""
    cfg = dict(SHAPES["deepseek_v2_lite"])
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "n_routed_experts": args.experts,
                 "moe_intermediate_size": args.expert_width, "intermediate_size": args.dense_width,
                 "num_attention_heads": args.heads, "num_key_value_heads": args.heads}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if args.heads is not None:  # a narrow dry run: latent attention dims to match
        cfg.update(kv_lora_rank=4 * args.heads, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    if args.vocab == 0:
        cfg.pop("vocab_size")  # the tokenizer's
    elif args.vocab is not None:
        cfg["vocab_size"] = args.vocab
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2)}


def train(model: torch.nn.Module, batches: list[dict], args: argparse.Namespace, device: torch.device) -> dict:
    """`args.steps` optimizer steps, one micro-batch each; throughput over the steps after warm-up."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_adamw(model, OptimConfig(lr=args.lr, weight_decay=0.1))
    per_pair, params = attention_flops_per_pair(model.config), matmul_params(model)
    times, tokens, flops, losses = [], [], [], []
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        loss_sum, count = token_loss(model, batch)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(batch["num_tokens"])
        flops.append(training_flops(params, per_pair, batch["num_tokens"], batch["num_causal_pairs"]))
        losses.append(round(float(loss_sum.detach() / count), 4))
    del opt
    timed = slice(args.warmup, None)
    seconds = sum(times[timed])
    peak = peak_bf16_tflops(device)
    tflops = sum(flops[timed]) / seconds / 1e12
    return {"trainable": trainable, "steps_timed": len(times[timed]), "step_s_median": round(statistics.median(times[timed]), 4),
            "tokens_per_s": round(sum(tokens[timed]) / seconds, 1), "model_tflops": round(tflops, 3),
            "mfu_pct": round(100 * tflops / peak, 2) if peak else None, "losses": losses, **_memory(device)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (full: 27, the first dense)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (full: 2048)")
    parser.add_argument("--experts", type=int, default=None, help="routed experts per layer (full: 64)")
    parser.add_argument("--expert-width", type=int, default=None, help="routed/shared expert width (full: 1408)")
    parser.add_argument("--dense-width", type=int, default=None, help="dense MLP width (full: 10944)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads, with small latent dims (full: 16)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (full: 102400; 0: the tokenizer's)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens per packed micro-batch (= step)")
    parser.add_argument("--score-tokens", type=int, default=32768, help="tokens scored for expert selection")
    parser.add_argument("--p", type=float, default=0.2, help="token-score mass to cover per layer (paper: 0.2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sides", nargs="+", choices=["esft", "fft"], default=["esft", "fft"])
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    device = torch.device(args.device)
    started = time.perf_counter()
    tokenizer = load_tokenizer("builtin")
    attn = resolve_attn_implementation("auto", device, half=args.dtype == "bfloat16")
    torch.manual_seed(0)
    with device:
        model = build_model(tokenizer, model_config=shape(args), dtype=args.dtype, attn_implementation=attn)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "dtype": args.dtype, "attn": attn, "config": shape(args),
                    "params": sum(p.numel() for p in model.parameters()), "build_s": round(time.perf_counter() - started, 1),
                    **{f"model_{k}": v for k, v in _memory(device).items()}}
    print(f"[v2lite] {result['params']:,} parameters on {result['device']} in {result['build_s']} s, attention {attn}", flush=True)

    # built-in examples average ~46 tokens: enough for the steps and the scoring sample
    per_task = max(64, (args.steps * args.max_tokens + args.score_tokens) // (30 * len(TASKS)))
    data = SFTDataModule(tasks=TASKS, num_train_per_task=per_task, num_val_per_task=0, tokenizer_name="builtin",
                         max_length=min(512, args.max_tokens), max_tokens=args.max_tokens, layout=packed_layout(attn))
    data.setup("fit")
    probe, total = [], 0
    for example in data.train_examples:
        if total >= args.score_tokens:
            break
        probe.append(example["input_ids"])
        total += len(example["input_ids"])
    start = time.perf_counter()
    scores = score_experts(model, probe, max_tokens=args.max_tokens, progress=False)
    experts = select_experts(scores, "token", args.p)
    result.update(score_s=round(time.perf_counter() - start, 1), scored_tokens=scores["num_tokens"],
                  experts_selected=experts.num_selected(), experts_total=scores["num_experts"] * len(scores["token"]),
                  experts=experts.to_dict()["experts"])
    print(f"[v2lite] scored {scores['num_tokens']} tokens; {experts.num_selected()}/{result['experts_total']} experts "
          f"selected (token scores, p={args.p})", flush=True)
    batches = []
    for batch in data.train_dataloader():
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) == args.steps:
            break
    if len(batches) < args.steps:
        raise ValueError(f"the built-in data gave {len(batches)} micro-batches of {args.max_tokens} tokens, not --steps {args.steps}")

    for side in args.sides:
        if side == "esft":
            apply_expert_config(model, experts)
        else:
            if patched_experts(model):
                merge_experts(model)
            model.requires_grad_(True)
        try:
            result[side] = train(model, batches, args, device)
        except torch.OutOfMemoryError as e:
            result[side] = {"oom": True, "error": str(e).split("\n")[0][:300], **_memory(device)}
        model.zero_grad(set_to_none=True)
        row = result[side]
        if row.get("oom"):
            print(f"[v2lite] {side}: out of memory ({row.get('allocated_gib')} GiB allocated, peak {row.get('peak_gib')} GiB)", flush=True)
        else:
            print(f"[v2lite] {side}: {row['trainable']:,} trainable, {row['tokens_per_s']:,} tokens/s, "
                  f"{row['model_tflops']} TFLOP/s, MFU {row['mfu_pct']}%, peak {row.get('peak_gib')} GiB, "
                  f"median step {row['step_s_median']} s", flush=True)
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["loadavg"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
