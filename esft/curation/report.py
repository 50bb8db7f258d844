"""The curation report: Markdown + JSON (per-stage removed counts and timings), score histograms
(PNG, kept vs removed), removed examples (JSONL); and the same numbers to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from esft.curation.base import prompt_text, response_text
from esft.curation.pipeline import Report
from esft.extras import require


def _short(record: dict[str, Any], limit: int = 120) -> str:
    text = f"{prompt_text(record)!r} -> {response_text(record)!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def histogram_png(path: Path, title: str, scores: torch.Tensor, kept: torch.Tensor) -> None:
    matplotlib = require("matplotlib", "plots", "curation histograms")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ~scores.isnan()
    s, k = scores[ok].numpy(), kept[ok].numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = (float(s.min()), float(s.max())) if len(s) else (0.0, 1.0)
    bins = 40 if hi > lo else 1
    ax.hist([s[k], s[~k]], bins=bins, range=(lo, hi if hi > lo else lo + 1), stacked=True, label=["kept", "removed"])
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, out: Path, extra: dict[str, Any] | None = None) -> None:
    """``report.md``, ``report.json``, ``scores_<stage>.png`` and ``removed.jsonl`` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"stage": s.name, "in": s.before, "removed": s.removed, "kept": s.kept, "seconds": round(s.seconds, 3)}
            for s in report.stages]
    md = ["# Curation report", "", f"{report.input} records in, {report.output} out "
          f"({report.output / max(report.input, 1):.1%}).", ""]
    md += ["| stage | in | removed | kept | seconds |", "|---|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['in']} | {r['removed']} | {r['kept']} | {r['seconds']:.1f} |" for r in rows]
    with (out / "removed.jsonl").open("w", encoding="utf-8") as f:
        for s in report.stages:
            for r in s.removed_examples:
                f.write(json.dumps({"stage": s.name, **r}, ensure_ascii=False) + "\n")
    for s in report.stages:
        md += ["", f"## {s.name}", ""]
        if s.scores is not None:
            png = f"scores_{_slug(s.name)}.png"
            histogram_png(out / png, f"{s.name}: scores", s.scores.float(), s.kept_mask)
            finite = s.scores[~s.scores.isnan()].float()
            if len(finite):
                md += [f"scores: min {finite.min():.4g}, median {finite.median():.4g}, max {finite.max():.4g}; "
                       f"![{s.name}]({png})", ""]
        if s.removed_examples:
            md += ["Removed, for example:", ""] + [f"- `{_short(r)}`" for r in s.removed_examples]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"input": report.input, "output": report.output, "stages": rows,
                                                 **(extra or {})}, indent=2) + "\n", encoding="utf-8")


def log_report(logger: Any, report: Report, step: int = 0) -> None:
    """Per-stage kept/removed scalars and score histograms to a TensorBoard logger (others: metrics only)."""
    if logger is None:
        return
    metrics = {"curation/input": float(report.input), "curation/output": float(report.output)}
    for i, s in enumerate(report.stages):
        metrics[f"curation/{i}_{_slug(s.name)}/removed"] = float(s.removed)
        metrics[f"curation/{i}_{_slug(s.name)}/kept"] = float(s.kept)
    logger.log_metrics(metrics, step=step)
    writer = getattr(logger, "experiment", None)
    if hasattr(writer, "add_histogram"):
        for i, s in enumerate(report.stages):
            if s.scores is not None and (~s.scores.isnan()).any():
                writer.add_histogram(f"curation/{i}_{_slug(s.name)}/scores", s.scores[~s.scores.isnan()].float(), step)
