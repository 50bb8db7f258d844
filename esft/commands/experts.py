"""`esft experts`: score, select, save and merge for expert-specialized fine-tuning.

    esft experts score  --model runs/base/hf --tasks math_word --tokens 131072 --out runs/scores/math_word
        # -> scores.json (gate and token score per layer and expert) and heatmap.png
    esft experts select --scores runs/scores/math_word/scores.json --method token --p 0.2 \\
        --out runs/scores/math_word/token.json        # deepseek-ai/ESFT expert-config format
    esft experts select ... --random-seed 0           # same count per layer, random experts (Table 4)
    esft experts select ... --random-seed 1 --exclude-selected   # ... none of them a selected one
    esft experts save   --ckpt runs/x/checkpoints/last.ckpt --out runs/x/adapter
    esft experts merge  --base runs/base/hf --adapter runs/x/adapter --out runs/x/merged

`--model` / `--base` are HF model directories or hub ids. Scoring data is a data file (any format
the DataModule reads) or the built-in tasks (``--data builtin --tasks ...``); whole training
examples of a seeded shuffle are scored until ``--tokens`` is reached (paper: 32 x 4096), with
token means pooled over all of them (``--average tokens``, deepseek-ai/ESFT's convention) or
averaged per sequence (``--average sequences``). ``select --scores`` also takes the reference's
``summary.json``; ``save --layout deepseek`` writes its adapter layout, and every command that
reads an adapter takes either layout.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from esft.checkpoint import CheckpointError, reading
from esft.commands.options import CommandParser


def _score(args) -> None:
    from transformers import AutoModelForCausalLM

    from esft.data import SFTDataModule
    from esft.experts.scoring import concentration, plot_heatmap, save_scores, score_experts

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with reading(args.model):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device)
    data = SFTDataModule(path=args.data, tasks=args.tasks, num_train_per_task=args.num_per_task, num_val_per_task=0,
                         tokenizer_name=args.tokenizer or args.model, max_length=args.max_length, seed=args.seed)
    data.setup("fit")
    examples = list(data.train_examples)
    random.Random(args.seed).shuffle(examples)
    sequences, total = [], 0
    for ex in examples:  # whole sequences until --tokens is reached, as deepseek-ai/ESFT samples them
        if total >= args.tokens:
            break
        sequences.append(ex["input_ids"])
        total += len(sequences[-1])
    scores = score_experts(model, sequences, args.max_tokens, average=args.average)
    out = Path(args.out)
    save_scores(scores, out / "scores.json")
    plot_heatmap(scores, out / "heatmap.png", args.title or ",".join(args.tasks or [Path(args.data).name]))
    print(f"[experts] scored {scores['num_tokens']} tokens in {scores['num_sequences']} sequences "
          f"({args.average} averaged) -> {out}/scores.json, heatmap.png")
    spread = ", ".join(f"{i}: {c['effective_experts']:.1f} ({100 * c['top_share']:.0f}%)"
                       for i, c in concentration(scores).items())
    print(f"[experts] effective experts per layer of {scores['num_experts']} (top expert's token share): {spread}")


def _select(args) -> None:
    from esft.experts.scoring import load_scores
    from esft.experts.selection import random_like, select_experts

    scores = load_scores(args.scores)
    cfg = select_experts(scores, args.method, args.p, args.relative, args.shared_experts, args.non_expert_modules)
    if args.random_seed is not None:
        cfg = random_like(cfg, int(scores["num_experts"]), args.random_seed, args.exclude_selected)
    cfg.save(args.out)
    per_layer = {i: len(v) for i, v in cfg.experts.items()}
    print(f"[experts] {cfg.num_selected()} experts selected ({per_layer} per layer) -> {args.out}")


def _save(args) -> None:
    from esft.experts.adapter import save_adapter
    from esft.objectives import CausalLMModule

    with reading(args.ckpt):
        module = CausalLMModule.load_from_checkpoint(args.ckpt, map_location="cpu", attn_implementation="sdpa")
    if module.expert_config is None:
        raise CheckpointError(f"{args.ckpt}: was not trained with an expert config (model.init_args.experts)")
    save_adapter(module.model, module.expert_config, args.out, layout=args.layout)
    print(f"[experts] adapter saved to {args.out} ({args.layout} layout)")


def _merge(args) -> None:
    from transformers import AutoModelForCausalLM

    from esft.experts.adapter import adapter_config, merge_adapter
    from esft.models import load_tokenizer

    with reading(args.base):
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto", attn_implementation="sdpa")
    with reading(args.adapter):
        model = merge_adapter(model, args.adapter)
    model.save_pretrained(args.out, safe_serialization=True)
    load_tokenizer(args.tokenizer or args.base).save_pretrained(args.out)
    adapter_config(args.adapter).save(Path(args.out) / "expert_config.json")
    print(f"[experts] merged checkpoint saved to {args.out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esft experts", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    p = sub.add_parser("score", help="gate and token scores of every routed expert on a dataset")
    p.add_argument("--model", required=True, help="HF model directory or hub id")
    p.add_argument("--data", default="builtin", help="data file/directory/hub id, or builtin")
    p.add_argument("--tasks", nargs="*", default=None, help="built-in tasks (with --data builtin)")
    p.add_argument("--num-per-task", type=int, default=2000, help="built-in records generated per task")
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--tokens", type=int, default=32 * 4096,
                   help="tokens to score (paper: 131072); the last sequence is taken whole")
    p.add_argument("--average", choices=["tokens", "sequences"], default="tokens",
                   help="pool all tokens (deepseek-ai/ESFT's released scores) or average per-sequence means")
    p.add_argument("--max-length", type=int, default=4096, help="longest sequence, in tokens")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--title", default=None, help="heatmap title (default: the tasks)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=_score)
    p = sub.add_parser("select", help="an expert config from scores")
    p.add_argument("--scores", required=True, help="scores.json from `esft experts score`, or deepseek-ai/ESFT's summary.json")
    p.add_argument("--method", choices=["token", "gate"], default="token")
    p.add_argument("--p", type=float, default=None, help="score mass to cover per layer (paper: token 0.2, gate 0.1)")
    p.add_argument("--relative", action="store_true", help="p is a fraction of each layer's score total")
    p.add_argument("--shared-experts", action="store_true", help="also train the shared experts")
    p.add_argument("--non-expert-modules", action="store_true", help="also train attention, norms, embeddings, routers")
    p.add_argument("--random-seed", type=int, default=None, help="random experts of the same count per layer")
    p.add_argument("--exclude-selected", action="store_true",
                   help="with --random-seed: draw only from the experts the scores did not select")
    p.add_argument("--out", required=True, help="expert config JSON to write")
    p.set_defaults(fn=_select)
    p = sub.add_parser("save", help="the trained experts of an ESFT checkpoint as an adapter")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of a run with model.init_args.experts")
    p.add_argument("--layout", choices=["esft", "deepseek"], default="esft",
                   help="this project's files, or deepseek-ai/ESFT's (expert_cfg.json + per-expert keys)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_save)
    p = sub.add_parser("merge", help="base model + adapter -> full HF checkpoint")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True, help="an adapter directory, either layout")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_merge)
    args = parser.parse_args(argv)
    if args.command == "select" and args.p is None:
        args.p = 0.2 if args.method == "token" else 0.1
    if args.command == "select" and args.exclude_selected and args.random_seed is None:
        parser.error("select: --exclude-selected needs --random-seed")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
