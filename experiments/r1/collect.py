"""Collect the r1 study: per-stage greedy pass@1 and format rate, mean and std over seeds.

    python experiments/r1/collect.py experiments/r1/runs                         # -> results.*
    python experiments/r1/collect.py experiments/r1/runs_base results_base      # -> results_base.*

Reads every ``<runs>/<pipeline>_seed<k>/summary.csv`` written by ``esft pipeline`` and writes
``<name>.csv`` (one row a stage and seed, with the step of the exported weights), ``<name>.md``
(mean ± std over seeds per stage, then R1's Table 6 comparison) and ``<name>.png`` next to this
file (`name`: ``results`` unless given). Table 6 takes its RL row from the
stages pipeline (`rl`: the tiny model's cold start + GRPO) and the rest from the table6 pipeline.
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def main(runs: Path, name: str = "results") -> None:
    rows = []
    for summary in sorted(runs.glob("*_seed*/summary.csv")):
        pipeline, seed = re.fullmatch(r"(.+)_seed(\d+)", summary.parent.name).groups()
        for row in csv.DictReader(summary.open()):
            if row["kind"] == "fit":
                rows.append({"pipeline": pipeline, "seed": int(seed), "stage": row["stage"],
                             "step": row.get("step") or "", "pass@1": float(row["pass@1"]), "format": float(row["format"]),
                             "wall_s": float(row["wall_s"])})
    if not rows:
        raise SystemExit(f"no */summary.csv under {runs}")
    with (HERE / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["pipeline"], r["stage"])].append(r)
    ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"  # noqa: E731
    lines = ["| pipeline | stage | seeds | exported step (per seed) | pass@1 | format | wall s |", "|---|---|---|---|---|---|---|"]
    for (pipeline, stage), rs in groups.items():
        steps = " / ".join(str(r["step"]) for r in rs) if any(r["step"] for r in rs) else "–"
        lines.append(f"| {pipeline} | {stage} | {len(rs)} | {steps} | {ms([r['pass@1'] for r in rs])} | "
                     f"{ms([r['format'] for r in rs])} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    table6 = [("tiny model: cold start + RL", "stages", "rl"),
              ("tiny model: distilled from the larger RL model", "table6", "small_distilled"),
              ("larger model: cold start + RL (the teacher)", "table6", "large_rl")]
    if all((pipeline, stage) in groups for _, pipeline, stage in table6):
        lines += ["", "R1 Table 6 at toy scale (held-out greedy pass@1 and format rate, mean ± std over seeds):", "",
                  "| model | pass@1 | format | seeds |", "|---|---|---|---|"]
        for label, pipeline, stage in table6:
            rs = groups[(pipeline, stage)]
            lines.append(f"| {label} | {ms([r['pass@1'] for r in rs])} | {ms([r['format'] for r in rs])} | {len(rs)} |")
    (HERE / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{p}\n{s}" for p, s in groups]
    means = [statistics.mean(r["pass@1"] for r in rs) for rs in groups.values()]
    errs = [statistics.stdev([r["pass@1"] for r in rs]) if len(rs) > 1 else 0.0 for rs in groups.values()]
    ax.bar(range(len(means)), means, yerr=errs, capsize=3)
    ax.set_xticks(range(len(means)), labels, fontsize=6)
    ax.set_ylabel("held-out greedy pass@1")
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "runs"), *sys.argv[2:3])
