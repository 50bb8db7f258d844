"""Optimizer-state memory and optimizer-step time per optimizer of `esft.optim`, in one process.

    python benchmarks/optimizer_step.py --out benchmarks/results/optimizer_step_cpu.json        # CPU, small model
    python benchmarks/optimizer_step.py --device cuda --model-size 0.5b --optimizers adamw muon adafactor lion adamw8bit \\
        --out benchmarks/results/optimizer_step_h200.json                                          # one GPU

For each optimizer: a random-init Llama/Qwen2-shaped model, the project's parameter groups
(`esft.optim.grouped_parameters`, weight decay 0.01), one forward/backward on random tokens to make
gradients, then `--steps` timed ``optimizer.step()`` calls after `--warmup` untimed ones (the
gradients stay fixed, so only the optimizer's own work is timed). Reports the state bytes
(`esft.optim.optimizer_state_bytes`: moments, momentum buffers, factored statistics) and the
median step time, each as a ratio to AdamW measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (128, 512, 4, 8, 8, 4096),
    "small": (512, 1408, 8, 8, 8, 32000),
    "0.5b": (896, 4864, 24, 14, 2, 151936),
}


def build(size: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    h, i, n, heads, kv, vocab = SIZES[size]
    cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args) -> dict:
    from esft.optim import OptimConfig, build_optimizer, optimizer_state_bytes

    dtype = getattr(torch, args.dtype)
    model = build(args.model_size, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, OptimConfig(optimizer=name, lr=1e-4, weight_decay=0.01))
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=args.device)
    model(input_ids=ids, labels=ids).loss.backward()
    for _ in range(args.warmup):
        opt.step()
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        opt.step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    row = {"optimizer": name, "class": type(opt).__name__, "params": n_params,
           "state_mib": optimizer_state_bytes(opt) / 2**20, "step_ms": 1000 * statistics.median(times)}
    del model, opt
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "adafactor", "lion"])
    p.add_argument("--model-size", choices=list(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for name in args.optimizers:
        try:
            rows.append(measure(name, args))
        except (RuntimeError, ModuleNotFoundError) as e:  # e.g. adamw8bit off CUDA
            print(f"{name}: skipped ({e})")
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)
    print(f"model {args.model_size} ({rows[0]['params'] / 1e6:.1f}M params), {args.device}, {args.dtype}" if rows else "")
    print("| optimizer | state MiB | vs AdamW | step ms | vs AdamW |\n|---|---|---|---|---|")
    for r in rows:
        if base:
            r["state_vs_adamw"] = r["state_mib"] / base["state_mib"]
            r["step_vs_adamw"] = r["step_ms"] / base["step_ms"]
        print(f"| {r['optimizer']} | {r['state_mib']:.1f} | {r.get('state_vs_adamw', float('nan')):.2f} | "
              f"{r['step_ms']:.1f} | {r.get('step_vs_adamw', float('nan')):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
