"""The study's data: one set of built-in preference pairs written in the three layouts its cells read.

    python experiments/preference/make_data.py --out experiments/preference/results/data

From the built-in pairs (`esft.data.preference.task_pairs`: the verified answer chosen, the same
answer with one character changed, scored wrong by the task's verifier, rejected) of arithmetic
and reverse_words, seed 0, it writes for the ``train`` and the ``heldout`` split:

- ``pairs_<split>.jsonl``: ``prompt`` (turns), ``chosen``, ``rejected`` (DPO, IPO, SimPO, ORPO);
- ``kto_<split>.jsonl``: every pair as two unpaired rows, ``prompt`` + ``completion`` + ``label``
  (the chosen answer desirable, the rejected one undesirable; KTO's conversion of paired data),
  shuffled so that the mismatched completion of KTO's KL term (the next row's) is another prompt's;
- ``sft_<split>.jsonl``: ``messages``, the prompt and the chosen answer (more SFT).

Every cell thus trains on the same prompts and answers; the seeds vary only the order.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from esft.data.preference import task_pairs

TASKS = ("arithmetic", "reverse_words")


def split_pairs(split: str, n: int, seed: int) -> list[dict]:
    """`n` built-in pairs per task of `split` (``train`` / ``heldout``)."""
    return [p for task in TASKS for p in task_pairs(task, n, seed, split)]


def layouts(pairs: list[dict], seed: int) -> dict[str, list[dict]]:
    """The pairs as preference, KTO and SFT rows (module docstring)."""
    def answer(side: list[dict]) -> str:
        return side[0]["content"]

    kto = [{"prompt": p["history"], "completion": answer(p[side]), "label": side == "chosen"}
           for p in pairs for side in ("chosen", "rejected")]
    random.Random(f"kto:{seed}").shuffle(kto)
    return {"pairs": [{"prompt": p["history"], "chosen": answer(p["chosen"]), "rejected": answer(p["rejected"])}
                      for p in pairs],
            "kto": kto,
            "sft": [{"messages": p["history"] + p["chosen"]} for p in pairs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/preference/results/data")
    parser.add_argument("--train-per-task", type=int, default=2000)
    parser.add_argument("--val-per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train_per_task), ("heldout", args.val_per_task)):
        for kind, rows in layouts(split_pairs(split, n, args.seed), args.seed).items():
            path = out / f"{kind}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
