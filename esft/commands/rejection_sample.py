"""`esft rejection-sample`: sample k completions per prompt, keep the verified-correct and
well-formatted ones, dedupe, cap per prompt, and write an SFT dataset plus statistics; with
``--pairs``, preference pairs whose rejected answer is one of the model's own wrong samples.

    esft rejection-sample --model runs/grpo_arithmetic/hf \\
        --task '{"name": "arithmetic", "max_digits": 2, "think": true}' --num-prompts 2000 \\
        --k 8 --max-per-prompt 2 --temperature 1.0 --max-new-tokens 48 --out data/rs.jsonl
    esft fit --config configs/sft/r1_cold_start.yaml --data.init_args.path data/rs.jsonl

DeepSeek-R1 (arXiv 2501.12948, section 2.3.3) samples several responses per prompt from the RL
checkpoint and keeps only correct ones, filtering out mixed languages and unreadable chains of
thought. Here "readable" is the rule-based format check (and, with ``--min-language``, the
language-consistency reward). Output rows are ``messages`` records (the prompt turns plus the
kept completion) that keep ``task``, ``answer`` and ``id``; ``<out>.stats.json`` holds counts.

``--pairs`` writes ``prompt`` + ``chosen`` + ``rejected`` rows for `esft.data.PreferenceDataModule`
instead (`preference_pairs`): wrong answers the model actually gives, the hard negatives that
on-policy preference data is made of, rather than the built-in pairs' perturbed reference answers.

    esft rejection-sample --pairs --no-format --model runs/quickstart/hf --task arithmetic \
        --num-prompts 2000 --k 8 --out data/sampled_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esft.commands.options import CommandParser
from esft.data.prompts import prompt_messages
from esft.data.records import load_records
from esft.data.tasks import build_task
from esft.evaluation import rollout
from esft.rewards.rules import Sample, accuracy, language_consistency, think_format


def _scored(model, tokenizer, records, k, max_new_tokens, batch_size, progress, sampling):
    """Per record: its `k` sampled completions with their verdicts, as
    ``(record, [(sample, correct, formatted), ...])`` (accuracy reward 1, format reward 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    sampling.setdefault("do_sample", True)
    outs = rollout(model, tokenizer, [prompt_messages(r) for r in records], max_new_tokens, batch_size, k, progress,
                   **sampling)
    for i, record in enumerate(records):
        samples = [Sample(record, out.text, len(out.completion_ids), out.truncated) for out in outs[i * k : (i + 1) * k]]
        yield record, [(s, accuracy(s) == 1.0, think_format(s) == 1.0) for s in samples]


def _key(text: str) -> str:
    """A completion up to whitespace: the dedupe key."""
    return " ".join(text.split())


def rejection_sample(
    model,
    tokenizer,
    records: Sequence[dict[str, Any]],
    k: int = 8,
    max_per_prompt: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    require_format: bool = True,
    min_language: float | None = None,
    progress: bool = False,
    **sampling: Any,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample `k` completions per record and keep at most `max_per_prompt` distinct ones that the
    accuracy reward scores 1.0 (and that pass the format check with `require_format`, and the
    language-consistency reward at `min_language` or above when given). Truncated completions
    are never kept. Returns ``(rows, stats)``."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    rows: list[dict[str, Any]] = []
    counts = dict(correct=0, formatted=0, truncated=0, accepted=0, duplicates=0, over_cap=0, prompts_kept=0)
    for i, (record, scored) in enumerate(_scored(model, tokenizer, records, k, max_new_tokens, batch_size, progress,
                                                 sampling)):
        seen: set[str] = set()
        kept = 0
        for s, correct, formatted in scored:
            counts["correct"] += correct
            counts["formatted"] += formatted
            counts["truncated"] += s.truncated
            if s.truncated or not correct or (require_format and not formatted):
                continue
            if min_language is not None and language_consistency(s) < min_language:
                continue
            counts["accepted"] += 1
            key = _key(s.text)
            if key in seen:
                counts["duplicates"] += 1
                continue
            if kept >= max_per_prompt:
                counts["over_cap"] += 1
                continue
            seen.add(key)
            kept += 1
            rows.append({
                "messages": [*prompt_messages(record), {"role": "assistant", "content": s.text}],
                **{f: record[f] for f in ("task", "answer") if f in record},
                "id": f"{record.get('id', i)}-rs{kept}",
                "source": "rejection_sampling",
            })
        counts["prompts_kept"] += kept > 0
    n = max(len(records) * k, 1)
    stats = {"prompts": len(records), "k": k, "samples": len(records) * k, **counts, "kept": len(rows),
             "correct_rate": counts["correct"] / n, "format_rate": counts["formatted"] / n,
             "prompt_coverage": counts["prompts_kept"] / max(len(records), 1),
             "kept_per_prompt": len(rows) / max(len(records), 1)}
    return rows, stats


def preference_pairs(
    model,
    tokenizer,
    records: Sequence[dict[str, Any]],
    k: int = 8,
    max_per_prompt: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    require_format: bool = True,
    chosen: str = "sample",
    progress: bool = False,
    **sampling: Any,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Preference pairs from `k` samples per record: each rejected answer is a distinct sample the
    accuracy reward scores below 1 (truncated and empty samples are skipped: neither is an
    answer), at most `max_per_prompt` per record. The chosen answer is, with ``chosen="sample"``,
    a distinct correct sample (formatted, with `require_format`) of the same record, taken in turn,
    or the record's reference answer when the model had none; with ``chosen="reference"``, always
    the reference answer (the record's last turn, which the task's verifier scores 1). Records with
    no wrong sample give no pair. Rows: ``prompt`` (the prompt turns), ``chosen``, ``rejected``,
    ``task``, ``answer``, ``id``; returns ``(rows, stats)``."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    if chosen not in ("sample", "reference"):
        raise ValueError(f"chosen must be 'sample' or 'reference', got {chosen!r}")
    rows: list[dict[str, Any]] = []
    counts = dict(correct=0, wrong=0, formatted=0, truncated=0, empty=0, duplicates=0, chosen_from_reference=0,
                  prompts_paired=0)
    for i, (record, scored) in enumerate(_scored(model, tokenizer, records, k, max_new_tokens, batch_size, progress,
                                                 sampling)):
        right: dict[str, str] = {}
        wrong: dict[str, str] = {}
        for s, correct, formatted in scored:
            counts["truncated"] += s.truncated
            counts["empty"] += not s.text.strip()
            if s.truncated or not s.text.strip():  # an empty turn is no answer (and no preference row)
                continue
            counts["correct"] += correct
            counts["wrong"] += not correct
            counts["formatted"] += formatted
            side = right if correct else wrong
            if _key(s.text) in side:
                counts["duplicates"] += 1
            elif not correct or formatted or not require_format:
                side[_key(s.text)] = s.text
        rejected = list(wrong.values())[:max_per_prompt]
        if not rejected:
            continue
        good = list(right.values()) if chosen == "sample" else []
        if not good:
            turns = record.get("messages") or [{}]
            if turns[-1].get("role") != "assistant":
                raise ValueError(f"record {record.get('id', i)!r} has no reference answer (its last turn is not the "
                                 f"assistant's) and the model gave no correct sample")
            good = [turns[-1]["content"]]
            counts["chosen_from_reference"] += len(rejected)
        counts["prompts_paired"] += 1
        for j, bad in enumerate(rejected):
            rows.append({"prompt": prompt_messages(record), "chosen": good[j % len(good)], "rejected": bad,
                         **{f: record[f] for f in ("task", "answer") if f in record},
                         "id": f"{record.get('id', i)}-pair{j + 1}", "source": "sampled_pairs"})
    n = max(len(records) * k, 1)
    stats = {"prompts": len(records), "k": k, "samples": len(records) * k, **counts, "pairs": len(rows),
             "correct_rate": counts["correct"] / n, "format_rate": counts["formatted"] / n,
             "prompt_coverage": counts["prompts_paired"] / max(len(records), 1)}
    return rows, stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft rejection-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory, hub id, or Lightning .ckpt")
    p.add_argument("--task", action="append", default=[],
                   help='built-in task: a name or a JSON mapping, e.g. \'{"name": "arithmetic", "think": true}\' (repeatable)')
    p.add_argument("--prompts", help="a prompt file instead (rows with task/answer or GSM8K/MATH answers)")
    p.add_argument("--num-prompts", type=int, default=1000, help="built-in prompts per task (train split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts and of sampling")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-per-prompt", type=int, default=1, help="kept samples per prompt at most")
    p.add_argument("--no-format", action="store_true", help="keep correct samples even without the <think> format")
    p.add_argument("--pairs", action="store_true",
                   help="write preference pairs (prompt, chosen, rejected) whose rejected answer is a wrong sample")
    p.add_argument("--chosen", choices=("sample", "reference"), default="sample",
                   help="with --pairs: the chosen answer is a correct sample (the reference answer when the model "
                        "had none), or always the reference answer")
    p.add_argument("--min-language", type=float, help="minimum language-consistency reward to keep a sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated together")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output JSONL (statistics go to <out>.stats.json)")
    args = p.parse_args(argv)
    if not args.task and not args.prompts:
        p.error("give --task and/or --prompts")
    if args.pairs and args.min_language is not None:
        p.error("--min-language filters kept samples; it does not apply to --pairs")
    return args


def _task_spec(text: str):
    text = text.strip()
    if not text.startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--task {text!r}: not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> dict[str, float]:
    from esft.objectives.loading import load_model

    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device)
    records = [r for spec in args.task for r in build_task(_task_spec(spec)).generate(args.num_prompts, args.seed, "train")]
    if args.prompts:
        records += load_records(args.prompts)[0]
    sampling = dict(progress=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    if args.pairs:
        rows, stats = preference_pairs(model, tokenizer, records, args.k, args.max_per_prompt, args.max_new_tokens,
                                       args.batch_size, not args.no_format, args.chosen, **sampling)
    else:
        rows, stats = rejection_sample(model, tokenizer, records, args.k, args.max_per_prompt, args.max_new_tokens,
                                       args.batch_size, not args.no_format, args.min_language, **sampling)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(out)
    stats = {"model": args.model, **stats, "wall_s": round(time.perf_counter() - start, 2)}
    Path(f"{out}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if args.pairs:
        print(f"[rejection-sample] {stats['pairs']} pairs from {stats['prompts_paired']} of {stats['prompts']} prompts "
              f"({stats['samples']} samples, correct {stats['correct_rate']:.3f}; chosen from the reference: "
              f"{stats['chosen_from_reference']}); wrote {out} and {out}.stats.json")
    else:
        print(f"[rejection-sample] kept {stats['kept']} of {stats['samples']} samples ({stats['prompts_kept']} of "
              f"{stats['prompts']} prompts); correct {stats['correct_rate']:.3f}, formatted {stats['format_rate']:.3f}; "
              f"wrote {out} and {out}.stats.json")
    return stats


if __name__ == "__main__":
    main()
