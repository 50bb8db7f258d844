"""What each strategy of the curation study keeps from the noisy pool, by kind of record.

    python experiments/curation/composition.py        # after the sweep (reads its cached scores and embeddings)

Runs every cell's ``data.init_args.curation`` of grid.yaml and grid_budgets.yaml on the pool
with the data seed 0 and counts the kept records by the kind their id names (see make_pool.py).
Writes results/composition.md and results/composition.csv.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from esft.curation import curate
from esft.data.records import load_records
from esft.runconfig import load_yaml

HERE = Path(__file__).parent
KINDS = ("clean", "exact", "near", "wrong", "truncated", "degenerate", "offtask")


def main() -> None:
    pool, _ = load_records(str(HERE / "results/data/pool.jsonl"))
    cells = {"full": None}
    for grid in ("grid.yaml", "grid_budgets.yaml"):
        for name, overrides in load_yaml(HERE / grid)["cells"].items():
            if overrides.get("data.init_args.curation"):
                cells[name] = overrides["data.init_args.curation"]
    rows = []
    for name, stages in cells.items():
        kept = pool if stages is None else curate(pool, stages, seed=0, log=False)[0]
        count = Counter(r["id"].split("-")[0] for r in kept)
        rows.append({"cell": name, "kept": len(kept), **{k: count.get(k, 0) for k in KINDS}})
        print(rows[-1], flush=True)
    with (HERE / "results/composition.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| cell | kept | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * (len(KINDS) + 1)]
    md += [f"| {r['cell']} | {r['kept']} | " + " | ".join(str(r[k]) for k in KINDS) + " |" for r in rows]
    (HERE / "results/composition.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
