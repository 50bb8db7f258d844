"""Distillation step throughput vs SFT of the same student, one process, same packed batches.

    python benchmarks/distill_throughput.py                # GPU: Qwen2-0.5B-shaped student, 1.5B-shaped teacher, bf16
    python benchmarks/distill_throughput.py --quick        # CPU: tiny student and a 4x wider teacher

Rows: SFT (`token_loss`, chunked CE); online logit KD with forward KL and with the generalized JSD
(`DistillModule.distill_loss`: teacher forward under no_grad + both models' logits chunk by chunk);
KD from a cached top-k teacher (k = 64 log-probs per trained token attached to the batch, as
`DistillDataModule` attaches them; the teacher is not called in the timed step). Data and timing
as `sft_throughput.py` (synthetic lognormal documents, packed, full-sequence loss, AdamW on the
student, medians of real tokens/s over the timed steps after warm-up). Random-init weights: speed
does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from esft.data.teacher_cache import teacher_topk
from esft.objectives import DistillModule
from esft.optim import OptimConfig, build_adamw
from sft_throughput import QWEN2_05B, TINY, batches, synthetic_examples

QWEN2_15B = dict(QWEN2_05B, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
TINY_TEACHER = dict(TINY, hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def timed(kind: str, module: DistillModule, batch_list: list, warmup: int, device: torch.device) -> dict:
    optimizer = build_adamw(module.model, OptimConfig(lr=1e-5))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for step, cpu_batch in enumerate(batch_list):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        batch = move_data_to_device(cpu_batch, device)
        if kind == "sft":
            loss_sum, count = module.token_loss(batch)
        else:
            loss_sum, _, count = module.distill_loss(batch)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            rates.append(cpu_batch["num_tokens"] / (time.perf_counter() - start))
    return {"tokens_per_s": round(statistics.median(rates)),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--k", type=int, default=64, help="cached teacher log-probs per token")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    (student_cfg, teacher_cfg, dtype) = (TINY, TINY_TEACHER, "float32") if args.quick else (QWEN2_05B, QWEN2_15B, "bfloat16")
    max_len, max_tokens = (256, 1024) if args.quick else (2048, args.max_tokens)
    attn = "esft_varlen" if device.type == "cuda" else "sdpa"
    examples = synthetic_examples(256 if args.quick else 4096, student_cfg["vocab_size"], max_len=max_len)
    it = batches(examples, "packed", attn, max_tokens, max_len, 16)
    batch_list = [next(it) for _ in range(args.warmup + args.steps)]
    torch.manual_seed(0)
    with torch.device(device):
        module = DistillModule(model_config=student_cfg, teacher_config=teacher_cfg, dtype=dtype, teacher_dtype=dtype,
                               attn_implementation=attn, tokenizer=None)
    teacher = module.teacher
    cached = []
    for b in batch_list:  # what the cache file would hand the loader: top-k ids and log-probs on the CPU
        ids, logprobs = teacher_topk(teacher, move_data_to_device(b, device), args.k)
        cached.append({**b, "teacher_topk_ids": ids.cpu(), "teacher_topk_logprobs": logprobs.cpu()})
    rows = []
    for name, kind, data, divergence in [("SFT (chunked CE)", "sft", batch_list, None),
                                         ("online KD, forward KL", "kd", batch_list, "forward_kl"),
                                         ("online KD, JSD beta 0.5", "kd", batch_list, "jsd"),
                                         (f"cached top-{args.k} KD, forward KL (no teacher in the step)", "kd", cached, "forward_kl")]:
        if divergence:
            module.hparams.divergence = divergence
        row = {"setup": name, **timed(kind, module, data, args.warmup, device)}
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["tokens_per_s"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    params = lambda m: sum(x.numel() for x in m.parameters()) / 1e6  # noqa: E731
    print(f"\n{where}; student {params(module.model):.1f}M, teacher {params(teacher):.1f}M params; "
          f"{max_tokens} tokens per step; medians of {args.steps} steps\n")
    print("| setup | tokens/s | x SFT | peak GiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['tokens_per_s']:,} | {r['tokens_per_s'] / base:.2f} | {r['peak_gib']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": where, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
