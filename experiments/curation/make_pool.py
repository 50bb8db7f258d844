"""Build the noisy intent_json pool of the curation study, in stated proportions.

    python experiments/curation/make_pool.py --out experiments/curation/results/data/pool.jsonl

Of N records (default 4000), shuffled with a fixed seed:

| share | kind | how |
|---|---|---|
| 50%   | clean | distinct intent_json training problems with their reference answers |
| 15%   | exact duplicates | copies of clean records; half verbatim, half upper-cased with extra spaces |
| 10%   | near duplicates | a clean record with a filler word added to or dropped from the request |
| 10%   | wrong answers | a fresh problem answered with another problem's JSON (valid JSON, wrong content) |
| 3.75% | truncated | a fresh problem whose JSON answer is cut at 40-80% of its characters |
| 3.75% | degenerate | a fresh problem whose answer is one word repeated 8-20 times |
| 7.5%  | off-task | correct records of other built-in tasks (translate, general, verdict) |

Every record keeps ``task`` and the reference ``answer`` (so the verifier can check it), and its
``id`` starts with its kind (``clean-``, ``exact-``, ``near-``, ``wrong-``, ``truncated-``,
``degenerate-``, ``offtask-``): counting ids in a curated file shows what a strategy kept.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from esft.data.tasks import build_task

SHARES = {"clean": 0.5, "exact": 0.15, "near": 0.10, "wrong": 0.10, "truncated": 0.0375, "degenerate": 0.0375,
          "offtask": 0.075}
FILLERS = ("please", "now", "quickly", "kindly")


def with_response(record: dict, response: str, kind: str, i: int) -> dict:
    return {**record, "messages": [record["messages"][0], {"role": "assistant", "content": response}], "id": f"{kind}-{i}"}


def with_prompt(record: dict, prompt: str, kind: str, i: int) -> dict:
    return {**record, "messages": [{"role": "user", "content": prompt}, record["messages"][1]], "id": f"{kind}-{i}"}


def build(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    counts = {k: round(v * n) for k, v in SHARES.items()}
    counts["clean"] += n - sum(counts.values())
    fresh_needed = counts["clean"] + counts["wrong"] + counts["truncated"] + counts["degenerate"]
    fresh = build_task("intent_json").generate(fresh_needed, seed=seed)
    clean = [dict(r, id=f"clean-{i}") for i, r in enumerate(fresh[: counts["clean"]])]
    rest = fresh[counts["clean"]:]
    wrong_src, rest = rest[: counts["wrong"]], rest[counts["wrong"]:]
    trunc_src, degen_src = rest[: counts["truncated"]], rest[counts["truncated"]:]
    pool = list(clean)
    for i in range(counts["exact"]):
        r = rng.choice(clean)
        prompt = r["messages"][0]["content"]
        pool.append(with_prompt(r, prompt if i % 2 else "  " + prompt.upper().replace(" ", "  "), "exact", i))
    for i in range(counts["near"]):
        r = rng.choice(clean)
        words = r["messages"][0]["content"].split()
        if i % 2 and len(words) > 5:
            del words[rng.randrange(3, len(words))]  # keep "Parse to JSON:"
        else:
            words.insert(rng.randrange(3, len(words) + 1), rng.choice(FILLERS))
        pool.append(with_prompt(r, " ".join(words), "near", i))
    answers = [r["answer"] for r in wrong_src]
    for i, r in enumerate(wrong_src):
        other = rng.choice([a for a in answers[:50] if a != r["answer"]])
        pool.append(with_response(r, other, "wrong", i))
    for i, r in enumerate(trunc_src):
        a = r["answer"]
        pool.append(with_response(r, a[: int(len(a) * rng.uniform(0.4, 0.8))], "truncated", i))
    for i, r in enumerate(degen_src):
        word = rng.choice(["intent", "alarm", "the", "slots"])
        pool.append(with_response(r, " ".join([word] * rng.randint(8, 20)), "degenerate", i))
    per_task = -(-counts["offtask"] // 3)
    off = [r for t in ("translate", "general", "verdict") for r in build_task(t).generate(per_task, seed=seed)]
    pool += [dict(r, id=f"offtask-{i}") for i, r in enumerate(off[: counts["offtask"]])]
    rng.shuffle(pool)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool = build(args.n, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in pool), encoding="utf-8")
    kinds: dict[str, int] = {}
    for r in pool:
        kinds[r["id"].split("-")[0]] = kinds.get(r["id"].split("-")[0], 0) + 1
    print(f"wrote {len(pool)} records to {out}: {kinds}")


if __name__ == "__main__":
    main()
