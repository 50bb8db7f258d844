"""SFT step throughput and peak memory: padded batches vs padding-free packing, one run, same data.

    python benchmarks/sft_throughput.py                 # GPU: Qwen2-0.5B shape, bf16, 16k tokens/step
    python benchmarks/sft_throughput.py --quick         # CPU smoke run with a tiny model

Data: synthetic documents with lognormal lengths (median 270, mean ~400, clipped to 16..2048
tokens) of random token ids, full-sequence loss, AdamW. Every row runs the product's own
`SFTModule.token_loss`; the "HF loss" row instead calls the model with ``labels=`` (the usual
padded recipe, full fp32 logits). Real (non-pad) tokens/s are medians over the timed steps,
after warm-up steps. MFU counts model FLOPs (`esft.flops`: matmul weights and causal attention
of the real documents) against the GPU's dense BF16 peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from functools import partial

import torch

from esft.commands.bench import SHAPES, lognormal_examples
from esft.data.packing import PackedRows, ResumableBatchSampler, best_fit_decreasing, collate_packed, collate_padded
from esft.models.attention import packed_layout
from esft.flops import attention_flops_per_pair, matmul_params, peak_bf16_tflops, training_flops
from esft.objectives import SFTModule
from esft.optim import OptimConfig, build_adamw

QWEN2_05B = SHAPES["0.5b"]
TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True)


def batches(examples, mode: str, attn: str, max_tokens: int, max_len: int, batch_size: int):
    """Endless micro-batches, built the way SFTDataModule builds them."""
    if mode == "padded":
        units, per_batch, collate = [[i] for i in range(len(examples))], batch_size, partial(collate_padded, pad_token_id=0)
    else:
        units = best_fit_decreasing([e["length"] for e in examples], max_len)
        layout = packed_layout(attn)
        per_batch, collate = max_tokens // max_len, partial(collate_packed, layout=layout)
    rows = PackedRows(examples, units)
    sampler = ResumableBatchSampler(len(units), per_batch, seed=0)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for idx in sampler:
            yield collate([rows[i] for i in idx])


def run(name, module, batch_iter, steps, warmup, hf_loss, device, peak_tflops) -> dict:
    model = module.model
    optimizer = build_adamw(model, OptimConfig(lr=1e-5))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, pairs = [], [], []
    for step in range(warmup + steps):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batch_iter).items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if hf_loss:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
        else:
            loss_sum, count = module.token_loss(batch)
            loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(batch["num_tokens"])
            pairs.append(batch["num_causal_pairs"])
    per_step = [t / s for t, s in zip(tokens, times)]
    tok_s = statistics.median(per_step)
    params = sum(p.numel() for p in model.parameters())
    flops = training_flops(matmul_params(model), attention_flops_per_pair(model.config), sum(tokens), sum(pairs))
    tflops = tok_s * flops / sum(tokens) / 1e12
    row = {
        "setup": name,
        "tokens_per_s": round(tok_s),
        "tflops": round(tflops, 2),
        "mfu_pct": round(100 * tflops / peak_tflops, 1) if peak_tflops else None,
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
        "tokens_per_step": round(statistics.mean(tokens)),
        "params": params,
        "loss": round(float(loss), 3),
    }
    del optimizer
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU (smoke test)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cfg, dtype = (TINY, "float32") if args.quick else (QWEN2_05B, "bfloat16")
    max_len = 256 if args.quick else 2048
    max_tokens = 1024 if args.quick else args.max_tokens
    examples = lognormal_examples(4096 if not args.quick else 256, cfg["vocab_size"], max_len)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(device)
    # (name, batching, attention, HF loss, loss chunk size)
    setups = [("padded, batch %d, HF loss" % args.batch_size, "padded", "sdpa", True, 0),
              ("padded, batch %d, chunked CE" % args.batch_size, "padded", "sdpa", False, 1024),
              ("packed %d tok, SDPA block mask (rows), chunked CE" % max_tokens, "packed", "sdpa", False, 1024)]
    if device.type == "cuda":
        setups += [("packed %d tok, flash varlen (flat), full logits" % max_tokens, "packed", "esft_varlen", False, 0),
                   ("packed %d tok, flash varlen (flat), chunked CE" % max_tokens, "packed", "esft_varlen", False, 1024)]
    rows = []
    for name, mode, attn, hf_loss, chunk in setups:
        torch.manual_seed(0)
        with torch.device(device):  # initialise the weights where they will live
            module = SFTModule(model_config=cfg, dtype=dtype, attn_implementation=attn, loss_chunk_size=chunk)
        it = batches(examples, mode, attn, max_tokens, max_len, args.batch_size)
        rows.append(run(name, module, it, args.steps, args.warmup, hf_loss, device, peak))
        print(rows[-1], flush=True)
        del module
    base = rows[0]["tokens_per_s"]
    print(f"\n{gpu}, {rows[0]['params'] / 1e6:.0f}M params, {len(examples)} documents, medians of {args.steps} steps\n")
    print("| setup | tokens/s | x padded HF | MFU % | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f} | {r['mfu_pct']} | {r['peak_gib']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": gpu, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
