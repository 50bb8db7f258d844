"""Tables and plots of results, for the run commands and the studies: Markdown and CSV tables,
mean ± sample std over seeds, and bar charts with error bars."""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esft.runconfig import atomic_write


def mean_std(values: list) -> tuple[float, float, int]:
    """Mean, sample std (nan for one value) and count of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs)


def show_mean_std(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" if n < 2 else f"{mean:.4g} ± {std:.2g}"


def select_metrics(names: Sequence[str], patterns: Sequence[str] | None, exclude: tuple[str, ...] = (),
                   order: Sequence[str] = ()) -> list[str]:
    """The metrics matching `patterns` (globs), or without patterns all but those starting with an
    `exclude` prefix; sorted by the first `order` prefix they start with, then by name, ``wall_s``
    last of its group. A pattern that matches nothing is warned about."""
    def rank(name: str) -> tuple:
        prefix = next((i for i, p in enumerate(order) if name.startswith(p)), len(order))
        return (prefix, name == "wall_s", name)

    names = sorted(names, key=rank)
    if not patterns:
        return [n for n in names if not (exclude and n.startswith(exclude))]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        print(f"warning: no collected metric matches {missing} (have {names})", file=sys.stderr)
    return chosen


def summarise(records: Sequence[dict], key: str, groups: Sequence[str], metrics: Sequence[str]):
    """Mean ± sample std over the records of each group (``record[key]``; ``record["metrics"]``
    holds the values): returns ``stats[group][metric]`` (`mean_std`'s triple), the CSV rows
    (``<metric>_mean``, ``<metric>_std``) and the Markdown rows (``mean ± std``), groups in the
    order given (those without records left out)."""
    groups = [g for g in groups if any(r[key] == g for r in records)]
    stats = {g: {m: mean_std([r["metrics"].get(m) for r in records if r[key] == g]) for m in metrics} for g in groups}
    counts = {g: sum(r[key] == g for r in records) for g in groups}
    csv_rows = [{key: g, "n": counts[g], **{f"{m}_{k}": v for m in metrics for k, v in zip(("mean", "std"), stats[g][m])}}
                for g in groups]
    md_rows = [{key: g, "n": counts[g], **{m: show_mean_std(*stats[g][m]) for m in metrics}} for g in groups]
    return stats, csv_rows, md_rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict], numeric: Sequence[str] = ()) -> str:
    """A Markdown table of `rows` (dicts) over `columns`; floats to 4 significant digits, `numeric`
    columns right-aligned, missing values as ``–``; a cell already a string is shown as it is."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "".join("---:|" if c in numeric else "---|" for c in columns)
    return "\n".join([head, rule] + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows])


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """`rows` as CSV over `columns` (extra keys ignored, missing ones empty), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def bar_plot(path: Path, groups: list[str], metrics: list[str], stats: dict) -> None:
    """One bar chart per metric (mean per group, sample std as error bars: ``stats[group][metric]``
    is `mean_std`'s triple) in one PNG, written atomically; a warning without matplotlib."""
    if not metrics:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed (pip install 'esft[plots]'); no summary.png", file=sys.stderr)
        return
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(4.0, 0.6 * len(groups) + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.4 * nrows), squeeze=False)
    x = list(range(len(groups)))
    for ax, m in zip(axes.flat, metrics):
        heights = [stats[c][m][0] for c in groups]
        errs = [0.0 if math.isnan(stats[c][m][1]) else stats[c][m][1] for c in groups]
        ax.bar(x, heights, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_title(m, fontsize=10)
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
