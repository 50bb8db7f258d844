"""Held-out accuracy against the data budget, one line per strategy (mean ± std over seeds), with
the full pool as a horizontal band; from the sweep's results.csv.

    python experiments/curation/plot.py        # writes results/accuracy_vs_budget.png
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
METRICS = ("eval/intent_json/json_match", "eval/intent_json")  # the name since tasks name their metric, and before


def main() -> None:
    runs = defaultdict(list)
    with (HERE / "results/results.csv").open() as f:
        for row in csv.DictReader(f):
            value = next((row[m] for m in METRICS if row.get(m)), None)
            if value is not None:
                runs[row["cell"]].append(float(value))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for cell, color, label in (("full", "k", "full pool, 600 steps (3x compute)"), ("full_200", "grey", "full pool, 200 steps")):
        if runs.get(cell):
            m = statistics.mean(runs[cell])
            s = statistics.stdev(runs[cell]) if len(runs[cell]) > 1 else 0.0
            ax.axhline(m, color=color, lw=1, ls="--" if cell == "full_200" else "-", label=f"{label} (n={len(runs[cell])})")
            ax.axhspan(m - s, m + s, color=color, alpha=0.1)
    strategies = sorted({c.rsplit("_", 1)[0] for c in runs if not c.startswith("full")})
    for strategy in strategies:
        points = sorted((int(c.rsplit("_", 1)[1]), v) for c, v in runs.items()
                        if c.rsplit("_", 1)[0] == strategy and not c.startswith("full"))
        xs = [b for b, _ in points]
        ys = [statistics.mean(v) for _, v in points]
        es = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=strategy)
    ax.set_xlabel("budget (% of the 4000-record pool)")
    ax.set_ylabel("held-out exact match (intent_json)")
    ax.set_xticks([5, 10, 25])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "results/accuracy_vs_budget.png", dpi=110)


if __name__ == "__main__":
    main()
