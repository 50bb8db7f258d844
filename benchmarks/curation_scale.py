"""Curation at scale on CPU: the whole pipeline on 100,000 records, time per stage, and how each
selector's cost grows with the pool size.

    python benchmarks/curation_scale.py                                     # 100k records, all embedded
    python benchmarks/curation_scale.py --embed-n 2000 --sizes 1000 10000 100000 --kcenter-max 10000  # busy machine
    python benchmarks/curation_scale.py --n 5000 --sizes 1000 5000          # quick check

Records: built-in tasks (8 of them, n*0.8 distinct problems), plus 10% exact duplicates
(re-cased, re-spaced copies) and 10% near duplicates (one filler word inserted). Pipeline:
degenerate + length filters, exact dedup, MinHash-LSH dedup (char 5-grams, 128 permutations,
Jaccard 0.8), MiniLM embeddings, then DEITA's score-first diversity filter (score: response
length, cosine threshold 0.9) down to 10% of the input. The embedding is timed on its own
(it is the cache the selector stage then reads). With ``--embed-n`` smaller than the
deduplicated pool, only that many records are embedded (timed, and the per-record rate
reported) and the selector stage runs on those records; the JSON says so. Selector scaling: each
selector on pools of m vectors (10% budget) for every m in --sizes; beyond the embedded records
the pool repeats the real embeddings with Gaussian noise (sigma 0.05, renormalised). Writes a
JSON result file and prints Markdown tables; the load average is recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from esft.curation import Budget, curate
from esft.curation.embedders import build_embedder
from esft.curation.selectors import (
    DeitaSelector,
    KCenterSelector,
    KMeansSelector,
    RandomSelector,
    RelevanceSelector,
    ThresholdSelector,
    TopKSelector,
)
from esft.data.tasks import build_task

TASKS = ("arithmetic", "reverse_words", "sort_words", "math_word", "list_ops", "translate", "extract_fields", "general")


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    distinct = int(n * 0.8)
    per_task = -(-distinct // len(TASKS))
    records = [r for t in TASKS for r in build_task(t).generate(per_task, seed=seed)][:distinct]
    for i in range(n - distinct):
        r = rng.choice(records[:distinct])
        prompt = r["messages"][0]["content"]
        if i % 2:
            prompt = prompt.upper().replace(" ", "  ")
        else:
            words = prompt.split()
            words.insert(rng.randrange(len(words) + 1), "please")
            prompt = " ".join(words)
        records.append({**r, "messages": [{"role": "user", "content": prompt}, r["messages"][1]]})
    rng.shuffle(records)
    return records


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 100000])
    parser.add_argument("--kcenter-max", type=int, default=100000, help="largest pool k-center runs on")
    parser.add_argument("--embed-n", type=int, default=None, help="embed only this many records (default: all)")
    parser.add_argument("--out", default="benchmarks/results/curation_scale_cpu.json")
    args = parser.parse_args()
    os.environ["ESFT_CACHE"] = tempfile.mkdtemp(prefix="esft-bench-")  # cold caches: measure real work
    result: dict = {"n": args.n, "threads": torch.get_num_threads(), "load_before": load()}

    t = time.perf_counter()
    records = make_records(args.n)
    result["generate_s"] = round(time.perf_counter() - t, 1)

    embed = {"name": "minilm", "progress": True}
    t = time.perf_counter()
    filtered, report = curate(records, [
        {"filter": "degenerate"}, {"filter": "length", "field": "all", "max_chars": 4000},
        {"filter": "exact_dedup"}, {"filter": "minhash_dedup", "progress": True},
    ])
    stages = {s.name: round(s.seconds, 1) for s in report.stages}
    after_dedup = len(filtered)
    if args.embed_n is not None and args.embed_n < len(filtered):
        filtered = filtered[: args.embed_n]
    t_embed = time.perf_counter()
    import sentence_transformers  # noqa: F401  (import and model load timed apart from the embedding)

    stages["import_sentence_transformers"] = round(time.perf_counter() - t_embed, 1)
    t_embed = time.perf_counter()
    vectors = build_embedder(embed)(filtered)
    stages["minilm_embedding"] = round(time.perf_counter() - t_embed, 1)
    budget = round(0.1 * len(records) * len(filtered) / after_dedup)
    kept, report2 = curate(filtered, [{"select": "deita", "score": {"name": "length"}, "embed": embed, "budget": budget}])
    stages["deita_select_10pct"] = round(report2.stages[0].seconds, 1)
    result["pipeline"] = {"stages_s": stages, "total_s": round(time.perf_counter() - t, 1), "kept": len(kept),
                          "after_dedup": after_dedup, "embedded": len(filtered),
                          "embed_records_per_s": round(len(filtered) / max(stages["minilm_embedding"], 1e-9), 1),
                          "load_after": load()}

    # selector cost vs pool size, on the real embeddings
    scores = torch.tensor([float(len(r["messages"][-1]["content"])) for r in filtered])
    relevance = RelevanceSelector({"tasks": ["arithmetic"]})
    relevance.target_vectors = vectors[:100]
    selectors = {
        "random": RandomSelector(), "random_stratified": RandomSelector(stratify_by="task"), "top_k": TopKSelector(),
        "threshold": ThresholdSelector(min=10.0), "kmeans(100)": KMeansSelector(clusters=100),
        "deita": DeitaSelector(), "relevance": relevance, "kcenter": KCenterSelector(),
    }
    scaling = []
    g = torch.Generator().manual_seed(0)
    for m in args.sizes:
        reps = -(-m // len(vectors))
        pool = torch.cat([vectors] + [torch.nn.functional.normalize(vectors + 0.05 * torch.randn(vectors.shape, generator=g), dim=1)
                                      for _ in range(reps - 1)])[:m]
        pool_scores = scores.repeat(reps)[:m]
        pool_records = (filtered * reps)[:m]
        row = {"pool": m, "load": load()}
        for name, sel in selectors.items():
            if name == "kcenter" and m > args.kcenter_max:
                continue
            t = time.perf_counter()
            sel(pool_scores, pool, Budget(examples=m // 10), pool_records)
            row[name] = round(time.perf_counter() - t, 3)
        scaling.append(row)
        print(row, flush=True)
    result["selector_scaling_s"] = scaling

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.n} records, load average before {result['load_before']}, after {result['pipeline']['load_after']}\n")
    print("| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v} |")
    print(f"| **total** | {result['pipeline']['total_s']} |\n")
    names = list(selectors)
    print("| pool | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for row in scaling:
        print(f"| {row['pool']} | " + " | ".join(str(row.get(n, "-")) for n in names) + " |")


if __name__ == "__main__":
    main()
