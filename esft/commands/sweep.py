"""`esft sweep`: run a grid of config overrides x seeds on top of one base config, resumably.

    esft sweep --config configs/sft/quickstart.yaml --grid experiments/quickstart_lr/grid.yaml \\
        --out experiments/quickstart_lr/results
    esft sweep ... --dry-run                  # list the cells and runs, and which are done
    esft sweep ... --seeds 0 1                # override the grid's seeds
    esft sweep ... --metrics 'eval/*' val/loss   # table and plot columns (globs; default: all)
    python -m esft.commands.sweep ...                  # the same, without the `esft` wrapper

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

Keys are dotted paths into the base YAML (``trainer.max_steps``, ``data.init_args.max_tokens``);
a number indexes a list and a class name picks a callback
(``trainer.callbacks.TaskEvaluation.init_args.num_examples``). Missing keys are created; a path
through a scalar, an unknown top-level key or a callback that is not there is an error. With both
`axes` and `cells`, every cell is crossed with every axis combination.

Each run lives in ``OUT/<cell>/seed<k>/``: ``cell.yaml`` (the full config: base + overrides +
seed, with the run dir as root dir, TensorBoard log dir and home of every callback output path),
``log.txt`` (the run's output), its TensorBoard events, checkpoints and ``eval.json``. Runs go
seed by seed (seed 0 of every cell first, so a partial sweep already compares all cells), each in
its own ``python -m esft.cli fit`` process so that one crash does not end the sweep. A finished
run writes ``done.json`` (its overrides and metrics: the last value of every TensorBoard scalar,
``eval/<task>`` from eval.json's "after" scores, ``wall_s``); a rerun skips those, and restarts
any other run from scratch, so a killed sweep resumes with only the missing runs. A failed run
writes ``failed.json`` (return code, log tail), the sweep goes on, ends with status 1 listing the
failures, and a rerun retries them.

One sweep per OUT: a second `esft sweep` on the same directory stops at once (status 2), naming
the pid that holds ``OUT/.lock``. Each child runs in its own process group: SIGTERM or Ctrl-C of
the sweep ends the child's group and the sweep exits non-zero; after SIGKILL of the sweep the
child receives SIGTERM from the kernel (Linux). While a child runs, ``RUNNING`` in its run
directory holds its pid; a rerun refuses (status 2) to restart a run whose recorded child is
still alive (see `esft.runs`).

After every run the reports are rewritten from all ``done.json`` under OUT: ``results.csv`` (one
row per run: cell, seed, overrides, metrics), ``summary.csv`` / ``summary.md`` (one row per cell:
mean ± sample std over seeds, n) and ``summary.png`` (a bar chart per metric, std error bars).
The table and plot show every metric but Lightning's ``epoch`` and ``hp_metric``, or those
matching ``--metrics``; results.csv always has them all.

Seeds set ``seed_everything`` only (model init, dropout, sampling); the data module's own `seed`
(data generation, split, shuffle) stays fixed unless listed in `seed_keys`. A done run is never
rerun even if the base config changed since: the skip line then says so; delete its directory
to rerun it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esft.runs import RunDirBusy, claim, lock_dir, run_child, running_pid, safe_name

TOP_LEVEL_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path")
PATH_ARGS = ("dirpath", "output", "path")  # callback init_args that name a place to write
LOG_TAIL_LINES = 40
NOT_SUMMARISED = ("epoch", "hp_metric", "data/")  # bookkeeping (Lightning's, the data report): in results.csv, not in the table
METRIC_ORDER = ("eval/", "val/", "test/", "train/")  # table and plot order; the rest follow, sorted


class SweepError(ValueError):
    """A bad grid, override or base config: reported before any run starts."""


# ---- YAML ------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``), as jsonargparse does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


# ---- overrides -------------------------------------------------------------------------------
def _child(node: Any, part: str, key: str, done: str) -> tuple[Any, Any]:
    """(container, index) of `part` inside `node`, for the dotted `key` traversed up to `done`."""
    if isinstance(node, dict):
        return node, part
    if isinstance(node, list):
        if re.fullmatch(r"-?\d+", part):
            i = int(part)
            if not -len(node) <= i < len(node):
                raise SweepError(f"cannot set {key!r}: index {i} is out of range for {done!r} ({len(node)} items)")
            return node, i
        matches = [i for i, item in enumerate(node)
                   if isinstance(item, dict) and str(item.get("class_path", "")).rsplit(".", 1)[-1] == part]
        if len(matches) != 1:
            names = [str(item.get("class_path", "?")).rsplit(".", 1)[-1] if isinstance(item, dict) else repr(item)
                     for item in node]
            what = "no item" if not matches else f"{len(matches)} items"
            raise SweepError(f"cannot set {key!r}: {done!r} has {what} of class {part!r} (it has {names}); "
                             "use a list index instead")
        return node, matches[0]
    raise SweepError(f"cannot set {key!r}: {done!r} is {node!r} ({type(node).__name__}), not a mapping or list")


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``key = "a.b.c"``, creating missing mappings.

    A number indexes a list, a class name picks the one list item with that ``class_path``
    (``trainer.callbacks.ModelCheckpoint.init_args.dirpath``). Raises `SweepError` naming the key
    for an unknown top-level key or a path through a scalar."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise SweepError(f"bad override key {key!r}: expected a dotted path like 'trainer.max_steps'")
    if parts[0] not in cfg and parts[0] not in TOP_LEVEL_KEYS:
        raise SweepError(f"cannot set {key!r}: unknown top-level key {parts[0]!r} "
                         f"(the base config has {sorted(cfg)}; LightningCLI knows {list(TOP_LEVEL_KEYS)})")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        container, index = _child(node, part, key, ".".join(parts[:depth]) or "<config>")
        if isinstance(container, dict) and container.get(index) is None:  # missing or null: create it
            container[index] = {}
        node = container[index]
    container, index = _child(node, parts[-1], key, ".".join(parts[:-1]) or "<config>")
    container[index] = value


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among `keys` (for cell names)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        short[key] = suffix
    return short


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
        raise SweepError(f"{path}: a grid is a mapping with 'seeds', 'axes' and/or 'cells'")
    unknown = set(raw) - {"seeds", "axes", "cells", "set", "seed_keys"}
    if unknown:
        raise SweepError(f"{path}: unknown grid keys {sorted(unknown)} (expected seeds, set, axes, cells, seed_keys)")
    common = raw.get("set") or {}
    axes = raw.get("axes") or {}
    named = raw.get("cells") or {}
    for what, value in (("set", common), ("axes", axes), ("cells", named)):
        if not isinstance(value, dict):
            raise SweepError(f"{path}: {what!r} must be a mapping, got {type(value).__name__}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: axis {key!r} needs a non-empty list of values, got {values!r}")

    short = _short_keys(list(axes))
    axis_cells = {"": {}}
    if axes:
        axis_cells = {
            ",".join(f"{short[k]}={_fmt(v)}" for k, v in zip(axes, combo)): dict(zip(axes, combo))
            for combo in itertools.product(*axes.values())
        }
    named_cells = {"": {}}
    if named:
        named_cells = {}
        for name, overrides in named.items():
            if overrides is not None and not isinstance(overrides, dict):
                raise SweepError(f"{path}: cell {name!r} must map dotted keys to values, got {overrides!r}")
            named_cells[str(name)] = dict(overrides or {})

    cells: dict[str, dict[str, Any]] = {}
    for (cname, cover), (aname, aover) in itertools.product(named_cells.items(), axis_cells.items()):
        name = safe_name(",".join(n for n in (cname, aname) if n) or "base")
        if name in cells:
            raise SweepError(f"{path}: two cells are both named {name!r} (after making names filesystem-safe)")
        cells[name] = {**common, **cover, **aover}

    if seeds is None:
        seeds = raw.get("seeds", [default_seed])
        seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"duplicate seeds in {seeds}")
    seed_keys = raw.get("seed_keys") or []
    if not isinstance(seed_keys, list):
        raise SweepError(f"{path}: 'seed_keys' must be a list of dotted keys")
    return Grid(cells, list(seeds), [str(k) for k in seed_keys])


def _roots(base: dict) -> list[str]:
    """Directories of the base run (root dir, logger dir): callback paths under them are moved."""
    trainer = base.get("trainer") or {}
    roots = []
    if trainer.get("default_root_dir"):
        roots.append(str(trainer["default_root_dir"]))
    logger = trainer.get("logger")
    for lg in logger if isinstance(logger, list) else [logger]:
        args = lg.get("init_args") or {} if isinstance(lg, dict) else {}
        if args.get("save_dir"):
            parts = [str(args["save_dir"])]
            if args.get("name"):
                parts.append(str(args["name"]))
                if isinstance(args.get("version"), str) and args["version"]:
                    parts.append(args["version"])
            roots.append(os.path.join(*parts))
    return sorted({os.path.abspath(r) for r in roots}, key=len, reverse=True)


def _relocate(path: str, roots: list[str], run_dir: Path) -> str:
    p = os.path.abspath(path)
    for root in roots:
        if p == root or p.startswith(root + os.sep):
            return str(run_dir / os.path.relpath(p, root)) if p != root else str(run_dir)
    return str(run_dir / os.path.basename(p.rstrip(os.sep)))


def build_config(base: dict, overrides: dict[str, Any], seed: int, run_dir: Path,
                 seed_keys: list[str] = ()) -> tuple[dict, str]:
    """The run's full config, and a hash of its run-independent part (base + overrides + seed)."""
    import copy

    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(cfg, str(key), copy.deepcopy(value))
    cfg["seed_everything"] = seed
    for key in seed_keys:
        set_dotted(cfg, key, seed)
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    roots = _roots(base)
    trainer = cfg.setdefault("trainer", {})
    if not isinstance(trainer, dict):
        raise SweepError(f"'trainer' must be a mapping, got {trainer!r}")
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}
    callbacks = trainer.get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = cb.get("init_args") if isinstance(cb, dict) else None
        if isinstance(args, dict):
            for key in PATH_ARGS:
                if isinstance(args.get(key), str) and args[key]:
                    args[key] = _relocate(args[key], roots, run_dir)
    return cfg, sha


def plan(base: dict, grid: Grid, out: Path) -> list[Run]:
    """Every (cell, seed) run, seed-major; raises SweepError for any bad override up front."""
    runs = []
    for seed in grid.seeds:
        for cell, overrides in grid.cells.items():
            run_dir = out / cell / f"seed{seed}"
            cfg, sha = build_config(base, overrides, seed, run_dir, grid.seed_keys)
            runs.append(Run(cell, seed, overrides, run_dir, cfg, sha))
    return runs


# ---- metrics ---------------------------------------------------------------------------------
def tensorboard_scalars(run_dir: Path) -> dict[str, float]:
    """The last value (highest step, then latest write) of every TensorBoard scalar in `run_dir`."""
    if not list(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0}).Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        if events:
            out[tag] = float(max(events, key=lambda e: (e.step, e.wall_time)).value)
    return out


def _eval_paths(run: Run) -> list[Path]:
    paths = [run.dir / "eval.json"]
    for cb in (run.config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("TaskEvaluation"):
            output = (cb.get("init_args") or {}).get("output")
            if output:
                paths.insert(0, Path(output))
    return paths


def collect_metrics(run: Run, wall_s: float) -> dict[str, float]:
    metrics = tensorboard_scalars(run.dir)
    for path in _eval_paths(run):
        if path.is_file():
            results = json.loads(path.read_text())
            metrics.update({f"eval/{task}": float(v) for task, v in (results.get("after") or {}).items()})
            break
    metrics["wall_s"] = round(wall_s, 3)
    return metrics


# ---- running ---------------------------------------------------------------------------------
def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def fit_command(cell_yaml: Path) -> list[str]:
    """The child command of one run: ``esft fit`` of its config, in a fresh interpreter."""
    return [sys.executable, "-m", "esft.cli", "fit", "--config", str(cell_yaml)]


def execute(run: Run) -> tuple[int, float]:
    """Fresh run dir, `cell.yaml`, then ``esft fit`` in a subprocess with output to `log.txt`;
    refuses (`RunDirBusy`) a run dir that a live child of an earlier sweep still writes."""
    claim(run.dir)
    if run.dir.exists():
        shutil.rmtree(run.dir)  # an interrupted or failed attempt: start clean
    run.dir.mkdir(parents=True)
    cell_yaml = run.dir / "cell.yaml"  # not config.yaml: LightningCLI writes that into the log dir
    cell_yaml.write_text(yaml.safe_dump(run.config, sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    rc = run_child(fit_command(cell_yaml), run.dir / "log.txt", run.dir, env)  # stopped: ends the child, re-raises
    return rc, time.perf_counter() - start


def _record(run: Run) -> dict:
    return {"cell": run.cell, "seed": run.seed, "overrides": run.overrides, "config_sha": run.config_sha}


def _done(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None


# ---- reports ---------------------------------------------------------------------------------
def _select(names: list[str], patterns: list[str] | None) -> list[str]:
    """Metrics matching `patterns` (globs), or all but `NOT_SUMMARISED`; headline metrics first."""
    def rank(name: str) -> tuple:
        prefix = next((i for i, p in enumerate(METRIC_ORDER) if name.startswith(p)), len(METRIC_ORDER))
        return (prefix, name == "wall_s", name)

    names = sorted(names, key=rank)
    if not patterns:
        return [n for n in names if not n.startswith(NOT_SUMMARISED)]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        print(f"sweep: warning: no collected metric matches {missing} (have {names})", file=sys.stderr)
    return chosen


def _cell(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n < 2 or std is None or math.isnan(std):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def write_reports(out: Path, runs: list[Run], metrics: list[str] | None = None) -> list[dict]:
    """results.csv, summary.csv, summary.md and summary.png from every done.json under `out`."""
    import pandas as pd

    order = {(r.cell, r.seed): i for i, r in enumerate(runs)}
    cell_order = list(dict.fromkeys(r.cell for r in runs))
    records = [d for p in sorted(out.glob("*/seed*/done.json")) if (d := _done(p.parent))]
    records.sort(key=lambda d: (order.get((d["cell"], d["seed"]), len(order)), d["cell"], d["seed"]))
    if not records:
        return []
    override_cols = list(dict.fromkeys(k for d in records for k in d.get("overrides", {})))
    metric_cols = sorted({k for d in records for k in d.get("metrics", {})})
    rows = [{"cell": d["cell"], "seed": d["seed"],
             **{k: _fmt(d["overrides"][k]) if k in d.get("overrides", {}) else "" for k in override_cols},
             **{k: d["metrics"].get(k, float("nan")) for k in metric_cols}} for d in records]
    df = pd.DataFrame(rows, columns=["cell", "seed", *override_cols, *metric_cols])
    _atomic_write(out / "results.csv", df.to_csv(index=False))

    chosen = _select(metric_cols, metrics)
    cells = [c for c in cell_order if c in set(df.cell)] + sorted(set(df.cell) - set(cell_order))
    grouped = df.groupby("cell", sort=False)
    mean, std, n = grouped[chosen].mean(), grouped[chosen].std(ddof=1), grouped.size()
    summary = pd.DataFrame({"cell": cells, "n": [int(n[c]) for c in cells]})
    for m in chosen:
        summary[f"{m}_mean"] = [mean.at[c, m] for c in cells]
        summary[f"{m}_std"] = [std.at[c, m] for c in cells]
    _atomic_write(out / "summary.csv", summary.to_csv(index=False))

    lines = [f"| cell | n | {' | '.join(chosen)} |", "|---|---:|" + "---:|" * len(chosen)]
    for c in cells:
        lines.append(f"| {c} | {int(n[c])} | " + " | ".join(_cell(mean.at[c, m], std.at[c, m], int(n[c])) for m in chosen) + " |")
    pending = [r for r in runs if (r.cell, r.seed) not in {(d["cell"], d["seed"]) for d in records}]
    failed = [r for r in pending if (r.dir / "failed.json").exists()]
    note = f"\n{len(records)} runs done; mean ± sample std over seeds."
    if pending:
        note += f" {len(pending)} of {len(runs)} planned runs not done"
        note += f" ({len(failed)} failed: " + ", ".join(r.label for r in failed) + ")." if failed else "."
    _atomic_write(out / "summary.md", "\n".join(lines) + "\n" + note + "\n")
    _plot(out / "summary.png", cells, chosen, mean, std)
    return records


def _plot(path: Path, cells: list[str], chosen: list[str], mean, std) -> None:
    if not chosen:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: warning: matplotlib is not installed; no summary.png", file=sys.stderr)
        return
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    width = max(4.0, 0.6 * len(cells) + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.4 * nrows), squeeze=False)
    x = list(range(len(cells)))
    for ax, m in zip(axes.flat, chosen):
        heights = [mean.at[c, m] for c in cells]
        errs = [0.0 if math.isnan(std.at[c, m]) else std.at[c, m] for c in cells]
        ax.bar(x, heights, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_title(m, fontsize=10)
        ax.set_xticks(x, cells, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---- command ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="esft sweep",
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
        base = load_yaml(args.config)
        if not isinstance(base, dict):
            raise SweepError(f"{args.config}: expected a mapping (a LightningCLI config)")
        default_seed = base.get("seed_everything") if isinstance(base.get("seed_everything"), int) else 0
        grid = load_grid(args.grid, args.seeds, default_seed)
        runs = plan(base, grid, out.resolve())
    except (SweepError, OSError, yaml.YAMLError) as e:
        print(f"esft sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    total = len(runs)
    print(f"sweep: {len(grid.cells)} cells x {len(grid.seeds)} seeds = {total} runs -> {out}")
    if args.dry_run:
        width = max(len(c) for c in grid.cells)
        for cell, overrides in grid.cells.items():
            print(f"  {cell:<{width}}  " + (" ".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "(base config)"))
        for i, run in enumerate(runs, 1):
            pid = running_pid(run.dir)
            status = "done" if (run.dir / "done.json").exists() else f"running (pid {pid})" if pid else \
                "failed" if (run.dir / "failed.json").exists() else "pending"
            print(f"[{i}/{total}] {run.label}  {status}  {run.dir}")
        return

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


def run_sweep(runs: list[Run], out: Path, max_cells: int | None = None,
              metrics: list[str] | None = None) -> list[tuple[Run, int]]:
    """Run the runs that are not done, one ``esft fit`` child at a time, rewriting the reports
    after each; returns the failed runs with their exit codes. The caller holds `out`'s lock."""
    total = len(runs)
    started, new, failures = time.perf_counter(), 0, []
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{total}] {run.label}"
        done = _done(run.dir)
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
            found = collect_metrics(run, wall)
            _atomic_write(run.dir / "done.json", json.dumps({**_record(run), "metrics": found}, indent=2) + "\n")
            shown = "  ".join(f"{k}={found[k]:.4g}" for k in ("train/loss", "val/loss") if k in found)
            print(f"{prefix}  done in {wall:.1f}s  {shown}  (sweep {time.perf_counter() - started:.0f}s)", flush=True)
        else:
            tail = _tail(run.dir / "log.txt")
            _atomic_write(run.dir / "failed.json", json.dumps(
                {**_record(run), "returncode": rc, "wall_s": round(wall, 3), "log_tail": tail}, indent=2) + "\n")
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
