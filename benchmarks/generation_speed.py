"""Batched generation vs one prompt at a time, same model, same prompts, same run.

    python benchmarks/generation_speed.py                  # quickstart-shaped model on this machine
    python benchmarks/generation_speed.py --prompts 512 --batch-size 128

Every completion is forced to exactly `--new-tokens` tokens (``min_new_tokens``), so both
settings produce the same number of tokens; the model is randomly initialised (weights do not
change the cost). Reports generated tokens/s and the speed-up of `esft.evaluation.generate`
with batching over batch size 1. Median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from esft.data.tasks import get_task
from esft.evaluation import generate
from esft.models import build_model, load_tokenizer

QUICKSTART = dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("builtin")
    model = build_model(tokenizer, model_config=QUICKSTART, attn_implementation="sdpa")
    half = args.prompts // 2
    records = get_task("arithmetic").generate(half, split="heldout") + get_task("reverse_words").generate(args.prompts - half, split="heldout")
    conversations = [r["messages"][:-1] for r in records]
    forced = {"min_new_tokens": args.new_tokens}
    generate(model, tokenizer, conversations[:8], args.new_tokens, batch_size=8, **forced)  # warm-up
    rows = {}
    for batch_size in (args.batch_size, 1):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = generate(model, tokenizer, conversations, args.new_tokens, batch_size=batch_size, **forced)
            times.append(time.perf_counter() - start)
        assert len(out) == len(conversations)
        seconds = statistics.median(times)
        rows[batch_size] = {"batch_size": batch_size, "seconds": round(seconds, 2),
                            "tokens_per_s": round(len(conversations) * args.new_tokens / seconds)}
        print(rows[batch_size], flush=True)
    speedup = rows[args.batch_size]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print("| batch size | seconds | generated tokens/s |\n|---|---|---|")
    for r in rows.values():
        print(f"| {r['batch_size']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(f"\nbatched / one-by-one: {speedup:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": list(rows.values()), "speedup": speedup, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
