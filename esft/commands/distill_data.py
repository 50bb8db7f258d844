"""`esft distill-data`: data made by a teacher, for distillation.

Sequence-level KD (Kim & Rush 2016, arXiv 1606.07947; the recipe of DeepSeek-R1's distilled
models): the teacher samples k responses per prompt, responses its task verifier rejects are
dropped, and the rest is an SFT dataset for ordinary ``esft fit``::

    esft distill-data responses --teacher runs/distill_teacher/hf \\
        --tasks '{"name": "arithmetic", "max_digits": 2, "ops": "+"}' sort_words --num-prompts 8000 \\
        --k 1 --out runs/distill_data/seqkd.jsonl
    esft distill-data responses --teacher Qwen/Qwen2.5-7B-Instruct --data prompts.jsonl \\
        --k 4 --temperature 0.7 --top-p 0.95 --max-new-tokens 1024 --out teacher.jsonl
    esft fit --config configs/distill/seqkd.yaml

Prompts are built-in task problems (``--tasks``; names or JSON task specs) or the records of a
file in any esft format (``--data``; the turns before the first assistant turn are the prompt).
Where a record has a built-in ``task``, a response is kept only when the verifier scores it at
least ``--min-score`` (``--min-score 0`` keeps everything). Output rows are
``{"messages", "task"?, "answer"?, "source"}`` JSONL, written atomically.

Offline teacher cache (`esft.data.teacher_cache`): the teacher's top-k log-probs for every trained
token of the data a student config trains on, so that students train without the teacher::

    esft distill-data topk --config configs/distill/cached.yaml --teacher runs/distill_teacher/hf \\
        --k 64 --out runs/distill_data/teacher_top64.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from esft.commands.options import CommandParser
from esft.data.distill import first_prompt
from esft.data.tasks import TASKS, build_task, get_task


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _task_spec(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("{") else text


def prompt_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The records whose prompts the teacher answers (built-in problems and/or a data file)."""
    records: list[dict[str, Any]] = []
    for spec in args.tasks:
        records += build_task(spec).generate(args.num_prompts, args.seed, args.split)
    if args.data:
        from esft.data.records import load_records

        records += load_records(args.data, split=args.data_split)[0]
    return records


def teacher_responses(model, tokenizer, records: list[dict[str, Any]], k: int, max_new_tokens: int, batch_size: int,
                      min_score: float, unique: bool, source: str, **sampling: Any) -> tuple[list[dict], Counter, Counter]:
    """Sample `k` responses per record's prompt; keep those the record's task verifier scores at
    least `min_score` (records without a built-in task keep all). Returns the SFT rows and the
    sampled / kept counts per task."""
    from esft.evaluation import rollout

    prompts = [first_prompt(r["messages"]) for r in records]
    samples = rollout(model, tokenizer, prompts, max_new_tokens, batch_size, k, progress=True, **sampling)
    rows, sampled, kept = [], Counter(), Counter()
    for i, record in enumerate(records):
        task = record.get("task")
        seen: set[str] = set()
        for s in samples[i * k : (i + 1) * k]:
            sampled[task or "-"] += 1
            if s.truncated or not s.text or (unique and s.text in seen):
                continue
            if task in TASKS and get_task(task).score(record, s.text) < min_score:
                continue
            seen.add(s.text)
            kept[task or "-"] += 1
            row = {"messages": prompts[i] + [{"role": "assistant", "content": s.text}], "source": source}
            for key in ("task", "answer"):
                if key in record:
                    row[key] = record[key]
            rows.append(row)
    return rows, sampled, kept


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_responses(args: argparse.Namespace) -> dict[str, Any]:
    from esft.objectives.loading import load_model

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.teacher, _device(args.device), args.dtype)
    records = prompt_records(args)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample or args.k > 1 else {}
    rows, sampled, kept = teacher_responses(model, tokenizer, records, args.k, args.max_new_tokens, args.batch_size,
                                            args.min_score, args.unique, f"teacher:{args.teacher}", **sampling)
    _write_jsonl(Path(args.out), rows)
    summary = {"prompts": len(records), "sampled": sum(sampled.values()), "kept": len(rows),
               "kept_by_task": {t: f"{kept[t]}/{n}" for t, n in sampled.items()}, "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary, indent=2))
    print(f"SFT data written to {args.out}")
    return summary


def datamodule_from_config(path: str, seed: int | None = None):
    """The data module a fit config trains on (its ``data`` section; the tokenizer is the model's),
    set up, without a teacher cache; `seed` replaces its data seed."""
    from esft.models.tokenizer import resolve_tokenizer_name
    from esft.runconfig import load_yaml

    cfg = load_yaml(path)
    data, model = cfg.get("data") or {}, (cfg.get("model") or {}).get("init_args") or {}
    if "class_path" not in data:
        raise ValueError(f"{path}: needs a data section with a class_path (e.g. esft.data.DistillDataModule)")
    module, _, name = data["class_path"].rpartition(".")
    init = dict(data.get("init_args") or {})
    init.pop("teacher_cache", None)
    if seed is not None:
        init["seed"] = seed
    init.setdefault("tokenizer_name", resolve_tokenizer_name(model.get("tokenizer"), model.get("model_name_or_path")))
    dm = getattr(importlib.import_module(module), name)(**init)
    dm.setup("fit")
    return dm


def run_topk(args: argparse.Namespace) -> dict[str, Any]:
    from esft.data.teacher_cache import write_teacher_cache
    from esft.objectives.loading import load_model

    start = time.perf_counter()
    dm = datamodule_from_config(args.config, args.data_seed)
    model, tokenizer = load_model(args.teacher, _device(args.device), args.dtype)
    if tokenizer.get_vocab() != dm.tokenizer.get_vocab():
        raise ValueError(f"teacher {args.teacher!r} and the data of {args.config} use different tokenizers")
    summary = write_teacher_cache(model, dm.train_examples, args.out, args.k, args.temperature, args.max_tokens,
                                  getattr(torch, args.cache_dtype), args.teacher)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))
    print(f"teacher cache written to {args.out}; train with data.init_args.teacher_cache: {args.out}")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="esft distill-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name, helptext in (("responses", "teacher-generated SFT data (sequence-level KD)"),
                           ("topk", "teacher top-k log-prob cache of a config's training data")):
        s = sub.add_parser(name, help=helptext, options_flag="--options")  # topk's --config is a fit config
        s.add_argument("--teacher", required=True, help="HF directory, hub id, or Lightning .ckpt")
        s.add_argument("--out", required=True)
        s.add_argument("--device", default="auto")
        s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        s.add_argument("--temperature", type=float, default=1.0)
    r = sub.choices["responses"]
    r.add_argument("--tasks", nargs="*", type=_task_spec, default=[], help=f"built-in tasks (names or JSON specs): {', '.join(sorted(TASKS))}")
    r.add_argument("--num-prompts", type=int, default=1000, help="problems per built-in task")
    r.add_argument("--split", default="train", choices=["train", "heldout"])
    r.add_argument("--seed", type=int, default=0, help="seed of the problems and of sampling")
    r.add_argument("--data", help="prompts from a data file / directory / hub id in any esft format")
    r.add_argument("--data-split", default="train")
    r.add_argument("--k", type=int, default=1, help="responses per prompt (> 1 samples)")
    r.add_argument("--sample", action="store_true", help="sample even with k = 1 (default: greedy)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--min-score", type=float, default=1.0, help="verifier threshold for task records (0 keeps all)")
    r.add_argument("--unique", action="store_true", help="drop repeated responses to the same prompt")
    t = sub.choices["topk"]
    t.add_argument("--config", required=True, help="the student's fit config: its data section is cached")
    t.add_argument("--k", type=int, default=64, help="log-probs kept per token (the vocabulary size: exact)")
    t.add_argument("--max-tokens", type=int, default=8192, help="tokens per teacher forward")
    t.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    t.add_argument("--data-seed", type=int, help="the data module's seed instead of the config's (one cache per data "
                                                  "seed, for sweeps with seed_keys: [data.init_args.seed])")
    args = p.parse_args(argv)
    if args.command == "responses" and not args.tasks and not args.data:
        p.error("responses: give --tasks and/or --data")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_responses(args) if args.command == "responses" else run_topk(args)


if __name__ == "__main__":
    main()
