"""GRPO rollouts: shared-prefix sampling vs ``generate(num_return_sequences=G)`` vs TRL's GRPOTrainer.

    python benchmarks/rollout_speed.py --out benchmarks/results/rollout_speed_cpu.json     # CPU
    python benchmarks/rollout_speed.py --device cuda --model-size 0.5b --prompts 64 --new-tokens 256

One process, one random-init model, the same prompts for every setup: 2-digit arithmetic in the
reasoning format behind an R1-style system prompt (100+ tokens each with the built-in tokenizer),
G samples per prompt at temperature 1 (top-k off), every completion forced to ``--new-tokens``
tokens (``min_new_tokens``), so every setup produces the same number of tokens. Setups:

* ``generate(num_return_sequences=G)``: `esft.evaluation.rollout` with ``share_prefix=False``,
  which runs every prompt G times;
* esft shared prefix: `esft.evaluation.rollout` (each prompt runs once, its KV cache is copied
  into a static cache), its decode step eager (``compile_decode=False``) and compiled
  (``compile_decode=True``: Inductor, dynamic shapes);
* TRL ``GRPOTrainer``: its generation path (``_generate_single_turn``, transformers ``generate``,
  no vLLM) on the prompt ids repeated G times, as its sampler hands them over.

The setups take turns within each repeat (the machine's load hits all alike); rollout tokens/s
= completion tokens / seconds, median over ``--repeats`` after one warm-up round. The warm-up
round's seconds are reported too (``first_call_s``): for the compiled setup they hold the
compilation, and ``graphs`` counts the graphs Dynamo made over the whole run (1: no recompile).
TRL is an optional dependency of this benchmark only: ``pip install trl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from grpo_vs_trl import SIZES as GRPO_SIZES, SYSTEM, TASK  # the GRPO benchmark's model, task and prompts

SIZES = {
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=True),
    "0.5b": GRPO_SIZES["0.5b"],
}


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` arithmetic prompts behind the system prompt."""
    from esft.data.prompts import prompt_messages
    from esft.data.tasks import build_task

    return [[{"role": "system", "content": SYSTEM}, *prompt_messages(r)] for r in build_task(TASK).generate(n, seed, "train")]


def trl_generator(model, tokenizer, args):
    """TRL's GRPOTrainer generation path, called on its own: a function of the prompt ids."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, report_to="none", save_strategy="no", use_cpu=args.device == "cpu",
        generation_kwargs={"min_new_tokens": args.new_tokens},
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}])
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=config,
                          train_dataset=dataset, processing_class=tokenizer)
    return lambda prompt_ids: trainer._generate_single_turn(prompt_ids, None, {}, args.generations)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-size", default="small", choices=sorted(SIZES))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8, help="G, samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="1: steadier on a CPU shared with other jobs")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--tmp", default="/tmp/rollout_speed")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from esft.evaluation import rollout
    from esft.models import build_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("builtin")
    model = build_model(tokenizer, model_config=dict(SIZES[args.model_size]), attn_implementation="sdpa").to(args.device)
    convs = conversations(args.prompts)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # as `rollout` encodes them
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, min_new_tokens=args.new_tokens)

    def ours(share: bool, compile_decode: bool = False):
        return lambda: [r.completion_ids for r in rollout(model, tokenizer, convs, args.new_tokens, args.prompts,
                                                          args.generations, share_prefix=share,
                                                          compile_decode=compile_decode, **sampling)]

    setups = {"generate(num_return_sequences=G)": ours(False), "esft rollout, shared prefix": ours(True),
              "esft rollout, shared prefix, compiled decode": ours(True, True)}
    if not args.no_trl:
        trl = trl_generator(copy.deepcopy(model), tokenizer, args)
        repeated = [ids for ids in prompt_ids for _ in range(args.generations)]
        setups["TRL GRPOTrainer generation"] = lambda: trl(repeated)
    times: dict[str, list[float]] = {name: [] for name in setups}
    first: dict[str, float] = {}
    for round_ in range(args.repeats + 1):
        for name, fn in setups.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            completions = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            tokens = sum(len(c) for c in completions)
            assert tokens == args.prompts * args.generations * args.new_tokens, (name, tokens)
            if round_:  # the first round warms up (and compiles)
                times[name].append(seconds)
            else:
                first[name] = seconds
    tokens = args.prompts * args.generations * args.new_tokens
    lengths = [len(ids) for ids in prompt_ids]
    baseline = statistics.median(times["generate(num_return_sequences=G)"])
    trl_s = statistics.median(times["TRL GRPOTrainer generation"]) if not args.no_trl else None
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        rows.append({"setup": name, "seconds": round(s, 3), "tokens_per_s": round(tokens / s),
                     "vs_generate": round(baseline / s, 2), "vs_trl": round(trl_s / s, 2) if trl_s else None,
                     "first_call_s": round(first[name], 3)})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.0f}) x "
          f"G={args.generations} x {args.new_tokens} new tokens, {n_params / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| setup | seconds | rollout tokens/s | vs generate(G) | vs TRL | first call s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['seconds']} | {r['tokens_per_s']:,} | {r['vs_generate']} | {r['vs_trl']} | "
              f"{r['first_call_s']} |")
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled decode: {graphs} graph(s) over the run")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"config": vars(args), "prompt_tokens": [min(lengths), max(lengths)], "parameters": n_params,
                  "graphs": graphs, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
