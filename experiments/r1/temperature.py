"""GRPO's sampling temperature on the arithmetic task: held-out greedy pass@1 against step.

    python experiments/r1/temperature.py experiments/r1/runs            # run what is missing, then collect

For each temperature and seed, ``esft fit --config configs/grpo/arithmetic_tiny.yaml`` from the
cold start of the stages pipeline of that seed (``<runs>/stages_seed<k>/cold_start/hf``, written by
``run.sh``), with ``seed_everything`` k and ``model.init_args.temperature`` T, in
``<runs>/temperature/T<T>_seed<k>`` (one thread, as ``run.sh``). A run whose TensorBoard events
are there already is not run again. Writes ``temperature.csv`` (every evaluation),
``temperature.md`` (start, best and final pass@1 per run) and ``temperature.png`` next to this file.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CONFIG = HERE.parent.parent / "configs" / "grpo" / "arithmetic_tiny.yaml"


def val_curve(run: Path) -> list[tuple[int, float, float]]:
    """``(steps done, pass@1, format)`` of every held-out evaluation logged under `run` (the
    evaluation after step k is logged at global step k - 1; the one before training at 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.rglob("events.out.tfevents.*"))
    if not events:
        return []
    acc = EventAccumulator(str(events[-1])).Reload()
    fmt = {e.step: e.value for e in acc.Scalars("val/format")}
    return [(e.step + (e.step > 0), e.value, fmt.get(e.step, float("nan"))) for e in acc.Scalars("val/pass@1")]


def run_one(runs: Path, temperature: float, seed: int) -> Path:
    out = runs / "temperature" / f"T{temperature}_seed{seed}"
    if val_curve(out):
        return out
    start = (runs / f"stages_seed{seed}" / "cold_start" / "hf").resolve()
    if not (start / "config.json").exists():
        raise SystemExit(f"{start} is missing: run experiments/r1/run.sh (the stages pipeline) first")
    out.mkdir(parents=True, exist_ok=True)
    argv = ["esft", "fit", "--config", str(CONFIG.resolve()), "--seed_everything", str(seed),
            "--model.init_args.model_name_or_path", str(start), "--model.init_args.temperature", str(temperature),
            "--trainer.enable_progress_bar", "false"]
    with (out / "fit.log").open("w") as log:
        subprocess.run(argv, cwd=out, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="?", default=HERE / "runs")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.5, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    rows, lines = [], ["| temperature | seed | start | best (step) | final | final - start |", "|---|---|---|---|---|---|"]
    for t in args.temperatures:
        for seed in args.seeds:
            curve = val_curve(run_one(args.runs, t, seed))
            rows += [{"temperature": t, "seed": seed, "step": s, "val_pass@1": round(v, 4), "val_format": round(f, 4)}
                     for s, v, f in curve]
            best = max(curve, key=lambda c: c[1])
            lines.append(f"| {t} | {seed} | {curve[0][1]:.3f} | {best[1]:.3f} ({best[0]}) | {curve[-1][1]:.3f} | "
                         f"{100 * (curve[-1][1] - curve[0][1]):+.1f} |")
    with (HERE / "temperature.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (HERE / "temperature.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in args.temperatures:
        for seed, style in zip(args.seeds, ("-", "--", ":", "-.")):
            pts = [(r["step"], r["val_pass@1"]) for r in rows if r["temperature"] == t and r["seed"] == seed]
            ax.plot(*zip(*pts), style, label=f"T={t}, seed {seed}",
                    color={0.7: "tab:red", 0.5: "tab:orange", 0.4: "tab:blue"}.get(t))
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out greedy pass@1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "temperature.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
