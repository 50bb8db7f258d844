"""`esft eval`: evaluate a model by generation on built-in tasks or a data file, and perplexity.

    esft eval --model runs/quickstart/hf --tasks reverse_words arithmetic
    esft eval --model runs/quickstart/checkpoints/last.ckpt --tasks reverse_words \\
        --num-samples 8 --k 1 4 8 --temperature 0.8          # sampled: pass@1, pass@4, pass@8
    esft eval --model Qwen/Qwen2.5-0.5B-Instruct --data test.jsonl   # rows with a `task` are scored,
                                                                     # every row counts for perplexity
    esft eval --model Qwen/Qwen2.5-Math-1.5B-Instruct --math-data gsm8k_test.jsonl   # GSM8K / MATH files

`--model` is a HF model directory, a hub id, or a Lightning checkpoint (``.ckpt``) of any esft
objective. Results go to ``--out`` (default ``runs/eval``): ``results.json``, ``results.md``
(also printed) and TensorBoard scalars ``eval/<task>/<metric>``. Each task's score is reported
under its own metric (`Task.metric`: ``eval/translate/chrf``, ``eval/arithmetic/exact_match``;
GSM8K / MATH files ``accuracy``) beside ``pass@k``, ``n`` and a task's other metrics
(``eval/translate/bleu``): the names `esft.callbacks.TaskEvaluation` logs during training.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from esft.commands.options import CommandParser
from esft.data.records import load_records
from esft.data.tasks import TASKS, get_task
from esft.evaluation.generate import evaluate
from esft.evaluation.metrics import eval_tag
from esft.evaluation.perplexity import perplexity
from esft.objectives.loading import load_model


def math_file_scores(model, tokenizer, source: str, split: str, max_new_tokens: int, batch_size: int,
                     ks: list[int], num_samples: int, **sampling: Any) -> dict[str, float]:
    """Generate for every GSM8K / MATH-style row and score with the math verifier."""
    from esft.data.records import DataFormatError, read_rows
    from esft.data.tasks.math import MathWord, score_rows
    from esft.evaluation.generate import generate
    from esft.evaluation.metrics import summarize

    rows, conversations = [], []
    for where, row in read_rows(source, split=split):
        question = row.get("question") or row.get("problem")
        if not isinstance(question, str) or not question.strip():
            raise DataFormatError(f"{where}: a math row needs a non-empty 'question' (GSM8K) or 'problem' (MATH) field")
        rows.append(row)
        conversations.append([{"role": "user", "content": question}])
    completions = generate(model, tokenizer, conversations, max_new_tokens, batch_size, num_samples, True, **sampling)
    scores = score_rows([r for r in rows for _ in range(num_samples)], completions)
    return summarize(scores, num_samples, ks, MathWord.metric)


def markdown(results: dict[str, dict[str, float]]) -> str:
    metrics = sorted({m for row in results.values() for m in row if m != "n"}, key=lambda m: (m.startswith("pass@"), m))
    lines = ["| task | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, row in results.items():
        cells = [f"{row[m]:.3f}" if m in row else "" for m in metrics]
        lines.append(f"| {name} | {int(row.get('n', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, hub id, or Lightning .ckpt")
    p.add_argument("--tasks", nargs="*", default=[], help=f"built-in tasks: {', '.join(sorted(TASKS))}")
    p.add_argument("--num-examples", type=int, default=100, help="records per task")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0, help="seed of the generated records (and of sampling)")
    p.add_argument("--data", help="a data file / directory / hub id in any esft format")
    p.add_argument("--data-split", default="test", help="split, for a hub dataset")
    p.add_argument("--math-data", help="GSM8K-style (question, answer with '#### N') or MATH-style (problem, "
                   "solution with \\boxed{}) rows: file, directory or hub id; scored by the math verifier")
    p.add_argument("--max-length", type=int, default=2048, help="perplexity: longest example in tokens")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (> 1 samples)")
    p.add_argument("--k", type=int, nargs="*", default=[1], help="pass@k for these k (k <= num-samples)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", default="runs/eval")
    args = p.parse_args(argv)
    if not args.tasks and not args.data and not args.math_data:
        p.error("give --tasks, --data and/or --math-data")
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown tasks {unknown}; built-in tasks: {', '.join(sorted(TASKS))}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device, args.dtype)
    records_by_task = {t: get_task(t).generate(args.num_examples, args.seed, args.split) for t in args.tasks}
    data_records: list[dict[str, Any]] = []
    if args.data:
        data_records, _ = load_records(args.data, split=args.data_split)
        by_task = defaultdict(list)
        for r in data_records:
            if r.get("task") in TASKS:
                by_task[r["task"]].append(r)
        for t, rs in by_task.items():
            records_by_task.setdefault(f"{t}", []).extend(rs)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.num_samples > 1 else {}
    results = evaluate(model, tokenizer, records_by_task, args.max_new_tokens, args.batch_size,
                       args.num_samples, args.k, progress=True, **sampling)
    if args.math_data:
        results[f"math:{Path(args.math_data).name}"] = math_file_scores(
            model, tokenizer, args.math_data, args.data_split, args.max_new_tokens, args.batch_size, args.k, args.num_samples, **sampling
        )
    if data_records:
        results[f"perplexity:{Path(args.data).name}"] = {
            **perplexity(model, tokenizer, data_records, args.max_length, progress=True),
            "n": float(len(data_records)),
        }
    report = {"model": args.model, "split": args.split, "seed": args.seed, "num_samples": args.num_samples,
              "wall_s": round(time.perf_counter() - start, 2), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(f"Model: `{args.model}`\n\n{table}\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:
        for name, row in results.items():
            for metric, value in row.items():
                writer.add_scalar(eval_tag(name, metric), value, 0)
    print(f"\n{table}\n\nresults: {out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
