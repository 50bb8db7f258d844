"""ESFT's expert forward alone against transformers' grouped_mm experts, one MoE layer at a real shape.

    python benchmarks/esft_kernels.py --shape deepseek_v2_lite qwen3_30b_a3b --routing balanced hot \\
        --out benchmarks/results/esft_kernels_module_cpu.json

One sparse layer of `esft.models.shapes` (random init, ``--dtype``), ``--selected`` of its routed
experts made trainable (`esft.experts.apply_expert_config`, evenly spaced ids). The same experts
module runs both paths on the same inputs, interleaved: transformers' own forward (the model's
``grouped_mm`` experts implementation, all experts on the fused tensors) and ESFT's (two grouped
calls, frozen experts and trainable slices). Routing is drawn, not computed: ``balanced`` gives
each token K distinct uniformly random experts; ``hot`` also sends every token's first three
choices to three selected experts (half the pairs on trainable slices at top-6). The input
requires grad, as inside a training step after a trainable layer; only the forward is timed.
Reports medians after one warm-up repetition and the ESFT / transformers ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from esft.experts import ExpertConfig, apply_expert_config
from esft.models import build_model, load_tokenizer
from esft.models.moe import moe_adapter
from esft.models.shapes import SHAPES, cut


def measure(shape: str, routing: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(load_tokenizer("builtin"), model_config=cut(SHAPES[shape], layers=1), dtype=args.dtype,
                        attn_implementation="sdpa")
    family = moe_adapter(model)
    num_experts, k = family.num_experts(model.config), family.top_k(model.config)
    chosen = list(range(0, num_experts, num_experts // args.selected))[: args.selected]
    apply_expert_config(model, ExpertConfig({0: chosen}))
    experts = family.layers(model)[0].experts
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"transformers": [], "esft": []}
    for _ in range(args.reps + 1):
        x = torch.randn(args.tokens, model.config.hidden_size, generator=g).to(model.dtype).requires_grad_()
        index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(args.tokens)])
        if routing == "hot":
            index[:, :3] = torch.tensor(chosen[:3])
        weights = torch.rand(args.tokens, k, generator=g).to(model.dtype)
        for side in times:
            start = time.perf_counter()
            if side == "esft":
                experts(x, index, weights)
            else:
                type(experts).forward(experts, x, index, weights)
            times[side].append(time.perf_counter() - start)
    base, ours = (statistics.median(times[s][1:]) for s in ("transformers", "esft"))
    return {"shape": shape, "routing": routing, "experts": num_experts, "top_k": k, "selected": args.selected,
            "transformers_s": round(base, 4), "esft_s": round(ours, 4), "ratio": round(ours / base, 3),
            "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=sorted(SHAPES))
    parser.add_argument("--routing", choices=["balanced", "hot"], nargs="+", default=["balanced"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--selected", type=int, default=6, help="trainable experts in the layer")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    print("| shape | routing | transformers s | ESFT s | ESFT / transformers | load |\n|---|---|---|---|---|---|")
    for shape in args.shape:
        for routing in args.routing:
            r = measure(shape, routing, args)
            rows.append(r)
            print(f"| {shape} | {routing} | {r['transformers_s']} | {r['esft_s']} | {r['ratio']} | {r['loadavg']:.1f} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
