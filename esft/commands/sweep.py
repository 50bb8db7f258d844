"""`esft sweep`: run a grid of config overrides x seeds on top of one base config, resumably.

    esft sweep --config configs/sft/quickstart.yaml --grid experiments/quickstart_lr/grid.yaml \\
        --out experiments/quickstart_lr/results
    esft sweep ... --dry-run                  # list the cells and runs, and which are done
    esft sweep ... --seeds 0 1                # override the grid's seeds
    esft sweep ... --metrics 'eval/*' val/loss   # table and plot columns (globs; default: all)

The grid is a small YAML file::

    seeds: [0, 1, 2]                # one run per cell and seed (`seed_everything`)
    set:                            # overrides every cell shares (not part of cell names)
      trainer.max_steps: 500
    axes:                           # cartesian product; cell names are built from the values
      model.init_args.optim.lr: [1.0e-3, 3.0e-3]
    cells:                          # and/or explicit named variants
      baseline: {}
      no_warmup: {model.init_args.optim.warmup_steps: 0}
    seed_keys: [data.init_args.seed]   # optional: more keys that receive the run's seed

In any override's value, ``{seed}`` is the run's seed (`esft.runconfig.with_seed`): a per-seed
file, e.g. ``data.init_args.teacher_cache: runs/cache_seed{seed}.safetensors``.

Keys are dotted paths into the base YAML (`esft.runconfig.set_dotted`: a number indexes a list,
a class name picks a callback, ``trainer.callbacks.TaskEvaluation.init_args.num_examples``). With
both `axes` and `cells`, every cell is crossed with every axis combination.

Each run lives in ``OUT/<cell>/seed<k>/``: ``run.yaml`` (base + overrides + seed, every output
moved into the run dir, the base's loggers kept: `esft.runconfig.run_config`), ``log.txt``,
``metrics.json``, the logger's files, checkpoints and ``eval.json``. Runs go seed by seed (seed 0
of every cell first, so a partial sweep already compares all cells), each in its own ``esft fit``
process. A finished run writes ``done.json`` (overrides; metrics: the last value of each logged
metric, ``eval/<task>/<metric>`` "after" scores, ``wall_s``) and is skipped by a rerun, which
restarts any other run from scratch; a failed run writes ``failed.json`` (exit code, log tail), the sweep goes
on and ends with status 1. One sweep per OUT (``OUT/.lock``); stopping the sweep ends its child
(see `esft.runs`).

After every run ``results.csv`` (a row per run), ``summary.csv`` / ``summary.md`` (a row per
cell: mean ± sample std over seeds) and ``summary.png`` are rewritten from all ``done.json``;
the table shows every metric but ``epoch``, ``hp_metric`` and ``data/*``, or those matching
``--metrics``. Seeds set ``seed_everything`` only; the data module's `seed` stays fixed unless
listed in `seed_keys`. A done run is not rerun when the base config changed (the skip line says
so): delete its directory to rerun it.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esft.commands.options import CommandParser
from esft.reports import bar_plot, markdown_table, select_metrics, summarise, write_csv
from esft.runconfig import (DONE, FAILED, ConfigError, atomic_write, base_seed, format_value, load_config, load_yaml, log_tail,
                            read_json, read_metrics, run_config, short_keys, write_json)
from esft.runs import RunDirBusy, claim, fit_child, lock_dir, running_pid, safe_name

NOT_SUMMARISED = ("epoch", "hp_metric", "data/")  # bookkeeping (Lightning's, the data report): in results.csv, not in the table
METRIC_ORDER = ("eval/", "val/", "test/", "train/")  # table and plot order; the rest follow, sorted


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class Run:
    cell: str
    seed: int
    overrides: dict[str, Any]
    dir: Path
    config: dict = field(repr=False)
    config_sha: str = ""

    @property
    def label(self) -> str:
        return f"{self.cell} seed={self.seed}"


@dataclass
class Grid:
    cells: dict[str, dict[str, Any]]
    seeds: list[int]
    seed_keys: list[str]


def load_grid(path: str | Path, seeds: list[int] | None = None, default_seed: int = 0) -> Grid:
    """Read a grid YAML into named cells (name -> overrides) and seeds."""
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with 'seeds', 'axes' and/or 'cells'")
    unknown = set(raw) - {"seeds", "axes", "cells", "set", "seed_keys"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)} (expected seeds, set, axes, cells, seed_keys)")
    common = raw.get("set") or {}
    axes = raw.get("axes") or {}
    named = raw.get("cells") or {}
    for what, value in (("set", common), ("axes", axes), ("cells", named)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {what!r} must be a mapping, got {type(value).__name__}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis {key!r} needs a non-empty list of values, got {values!r}")

    short = short_keys(list(axes))
    axis_cells = {",".join(f"{short[k]}={format_value(v)}" for k, v in zip(axes, combo)): dict(zip(axes, combo))
                  for combo in itertools.product(*axes.values())}  # {"": {}} without axes
    for name, overrides in named.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{path}: cell {name!r} must map dotted keys to values, got {overrides!r}")
    named_cells = {str(name): dict(overrides or {}) for name, overrides in named.items()} or {"": {}}

    cells: dict[str, dict[str, Any]] = {}
    for (cname, cover), (aname, aover) in itertools.product(named_cells.items(), axis_cells.items()):
        name = safe_name(",".join(n for n in (cname, aname) if n) or "base")
        if name in cells:
            raise ConfigError(f"{path}: two cells are both named {name!r} (after making names filesystem-safe)")
        cells[name] = {**common, **cover, **aover}

    if seeds is None:
        seeds = raw.get("seeds", [default_seed])
        seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"duplicate seeds in {seeds}")
    seed_keys = raw.get("seed_keys") or []
    if not isinstance(seed_keys, list):
        raise ConfigError(f"{path}: 'seed_keys' must be a list of dotted keys")
    return Grid(cells, list(seeds), [str(k) for k in seed_keys])


def plan(base: dict, grid: Grid, out: Path) -> list[Run]:
    """Every (cell, seed) run, seed-major; raises ConfigError for any bad override up front."""
    runs = []
    for seed in grid.seeds:
        for cell, overrides in grid.cells.items():
            run_dir = out / cell / f"seed{seed}"
            cfg, sha = run_config(base, overrides, seed, run_dir, grid.seed_keys, label=f"{cell}/seed{seed}")
            runs.append(Run(cell, seed, overrides, run_dir, cfg, sha))
    return runs


def _record(run: Run) -> dict:
    return {"cell": run.cell, "seed": run.seed, "overrides": run.overrides, "config_sha": run.config_sha}


# ---- reports ---------------------------------------------------------------------------------
def write_reports(out: Path, runs: list[Run], metrics: list[str] | None = None) -> list[dict]:
    """results.csv, summary.csv, summary.md and summary.png from every done.json under `out`."""
    order = {(r.cell, r.seed): i for i, r in enumerate(runs)}
    records = [d for p in sorted(out.glob(f"*/seed*/{DONE}")) if (d := read_json(p))]
    records.sort(key=lambda d: (order.get((d["cell"], d["seed"]), len(order)), d["cell"], d["seed"]))
    if not records:
        return []
    override_cols = list(dict.fromkeys(k for d in records for k in d.get("overrides", {})))
    metric_cols = sorted({k for d in records for k in d.get("metrics", {})})
    rows = [{"cell": d["cell"], "seed": d["seed"],
             **{k: format_value(d["overrides"][k]) if k in d.get("overrides", {}) else "" for k in override_cols},
             **d.get("metrics", {})} for d in records]
    write_csv(out / "results.csv", ["cell", "seed", *override_cols, *metric_cols], rows)

    chosen = select_metrics(metric_cols, metrics, NOT_SUMMARISED, METRIC_ORDER)
    cells = list(dict.fromkeys([r.cell for r in runs] + [d["cell"] for d in records]))
    stats, summary, table = summarise(records, "cell", cells, chosen)
    write_csv(out / "summary.csv", list(summary[0]), summary)
    done = {(d["cell"], d["seed"]) for d in records}
    pending = [r for r in runs if (r.cell, r.seed) not in done]
    failed = [r for r in pending if (r.dir / FAILED).exists()]
    note = f"\n{len(records)} runs done; mean ± sample std over seeds."
    if pending:
        note += f" {len(pending)} of {len(runs)} planned runs not done"
        note += f" ({len(failed)} failed: " + ", ".join(r.label for r in failed) + ")." if failed else "."
    atomic_write(out / "summary.md", markdown_table(list(table[0]), table, ["n", *chosen]) + "\n" + note + "\n")
    bar_plot(out / "summary.png", list(stats), chosen, stats)
    return records


# ---- command ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(
        prog="esft sweep", options_flag="--options",
        description="Run a grid of config overrides x seeds over a base `esft fit` config; "
                    "skip finished runs; summarise metrics (CSV, Markdown, PNG).",
    )
    p.add_argument("--config", required=True, help="base LightningCLI config for `esft fit`")
    p.add_argument("--grid", required=True, help="grid YAML: seeds, set, axes and/or cells")
    p.add_argument("--out", help="output directory (default: <grid dir>/results)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="K", help="seeds to run (overrides the grid's)")
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="metrics (glob patterns) for the table and plot; default: all")
    p.add_argument("--dry-run", action="store_true", help="list the cells and runs, run nothing")
    p.add_argument("--max-cells", type=int, metavar="N", help="run at most N new (cell, seed) runs, then stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.grid).parent / "results"
    try:
        base = load_config(args.config)
        grid = load_grid(args.grid, args.seeds, base_seed(base))
        runs = plan(base, grid, out.resolve())
    except (ConfigError, OSError, yaml.YAMLError) as e:
        print(f"esft sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    print(f"sweep: {len(grid.cells)} cells x {len(grid.seeds)} seeds = {len(runs)} runs -> {out}")
    if args.dry_run:
        return dry_run(grid, runs)
    try:
        with lock_dir(out):
            failures = run_sweep(runs, out, args.max_cells, args.metrics)
    except RunDirBusy as e:
        print(f"esft sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if failures:
        print(f"sweep: {len(failures)} runs failed (rerun to retry them): "
              + ", ".join(f"{r.label} (exit {rc})" for r, rc in failures), file=sys.stderr)
        raise SystemExit(1)


def dry_run(grid: Grid, runs: list[Run]) -> None:
    """Print the cells with their overrides, and every run with its status."""
    width = max(len(c) for c in grid.cells)
    for cell, overrides in grid.cells.items():
        print(f"  {cell:<{width}}  " + (" ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "(base config)"))
    for i, run in enumerate(runs, 1):
        pid = running_pid(run.dir)
        status = "done" if (run.dir / DONE).exists() else f"running (pid {pid})" if pid else \
            "failed" if (run.dir / FAILED).exists() else "pending"
        print(f"[{i}/{len(runs)}] {run.label}  {status}  {run.dir}")


def execute(run: Run) -> tuple[int, float]:
    """Fresh run dir, then ``esft fit`` of the run's config in a child process (`fit_child`);
    refuses (`RunDirBusy`) a run dir that a live child of an earlier sweep still writes."""
    claim(run.dir)
    if run.dir.exists():
        shutil.rmtree(run.dir)  # an interrupted or failed attempt: start clean
    return fit_child(run.config, run.dir)  # stopped: ends the child, re-raises


def run_sweep(runs: list[Run], out: Path, max_cells: int | None = None,
              metrics: list[str] | None = None) -> list[tuple[Run, int]]:
    """Run the runs that are not done, one ``esft fit`` child at a time, rewriting the reports
    after each; returns the failed runs with their exit codes. The caller holds `out`'s lock."""
    total = len(runs)
    started, new, failures = time.perf_counter(), 0, []
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{total}] {run.label}"
        done = read_json(run.dir / DONE)
        if done is not None:
            stale = "" if done.get("config_sha") == run.config_sha else \
                " (its config has changed since; delete the directory to rerun it)"
            print(f"{prefix}  skip: done{stale}", flush=True)
            continue
        if max_cells is not None and new >= max_cells:
            print(f"sweep: stopping after {new} new runs (--max-cells {max_cells}); rerun to continue")
            break
        new += 1
        print(f"{prefix}  running  (log: {run.dir / 'log.txt'})", flush=True)
        rc, wall = execute(run)
        if rc == 0:
            found = {**read_metrics(run.dir, run.config), "wall_s": round(wall, 3)}
            write_json(run.dir / DONE, {**_record(run), "metrics": found})
            shown = "  ".join(f"{k}={found[k]:.4g}" for k in ("train/loss", "val/loss") if found.get(k) is not None)
            print(f"{prefix}  done in {wall:.1f}s  {shown}  (sweep {time.perf_counter() - started:.0f}s)", flush=True)
        else:
            tail = log_tail(run.dir / "log.txt")
            write_json(run.dir / FAILED, {**_record(run), "returncode": rc, "wall_s": round(wall, 3), "log_tail": tail})
            failures.append((run, rc))
            print(f"{prefix}  FAILED (exit {rc}) in {wall:.1f}s; log: {run.dir / 'log.txt'}", flush=True)
            for line in tail.splitlines()[-5:]:
                print(f"    | {line}", flush=True)
        write_reports(out, runs, metrics)

    records = write_reports(out, runs, metrics)
    if records:
        print((out / "summary.md").read_text(), end="")
        print(f"sweep: results in {out}/results.csv, summary.md, summary.csv, summary.png")
    return failures


if __name__ == "__main__":
    main()
