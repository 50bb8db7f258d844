"""`esft tune`: hyperparameter search with Optuna over any config key, or Lightning's LR finder.

    esft tune --config configs/sft/quickstart.yaml --space experiments/optim/search.yaml --out runs/tune
    esft tune ... --n-trials 30            # more trials: a rerun continues the same study
    esft tune --config configs/sft/quickstart.yaml --lr-find --out runs/lr_find   # quick LR range test

The search space is a YAML file::

    metric: val/loss              # the objective: a metric logged in validation (val/*), or
    direction: minimize           #   eval/<task>/<metric> from TaskEvaluation's "after" scores
    n_trials: 12                  # finished (complete + pruned) trials the study should hold
    seed: 0                       # TPE sampler seed
    startup_trials: 4             # random trials before TPE models the space
    pruner: {startup_trials: 3, warmup_steps: 100}   # MedianPruner; `pruner: null` turns it off
    enqueue_base: true            # trial 0 = the base config's own values (the default to beat)
    set:                          # overrides every trial shares
      trainer.max_steps: 300
    space:                        # dotted config key -> range
      model.init_args.optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      model.init_args.optim.warmup_steps: {low: 0, high: 100, step: 10}   # ints -> integer range
      model.init_args.optim.schedule: {choices: [cosine, wsd]}

Trials use Optuna's TPE sampler (Bergstra et al. 2011). Each trial is one ``esft fit`` of the base
config plus the sampled values, run in this process in ``OUT/trial_<k>/`` (``run.yaml``,
``metrics.json``, the logger's files, callback outputs: the layout of `esft sweep`; the objective
is read from ``metrics.json`` / ``eval.json``, whatever logger the base config names). Every validation
reports the metric to the trial, and the median pruner stops a trial whose intermediate value is
worse than the median of earlier trials at the same step (so pruning needs a ``val/*`` metric and
``val_check_interval``). The study lives in ``OUT/study.db`` (SQLite): a rerun of the same command
continues it. A trial that was running when the process died is marked failed and its values are
tried again first; trials that fail for another reason are recorded and the search goes on (it
stops after ``--max-failures``). The sampler, with its random state, is saved to
``OUT/sampler.pkl`` after each trial's values are drawn, so a restart goes on drawing new values
(a new sampler with the same seed would propose the first trials' values again). One process per
study: a second `esft tune` on the same OUT stops at once (status 2), naming the pid that holds
``OUT/.lock``.

After every trial: ``trials.csv`` (one row a trial: number, state, value, parameters, seconds),
``summary.md`` (best trial and all trials ranked), ``history.png`` (optimisation history),
``importance.png`` (parameter importances, fANOVA; from 2 complete trials with varying values) and
``best_grid.yaml`` (the best values as an `esft sweep` cell, to confirm them over seeds).

``--lr-find`` runs Lightning's learning-rate range test (Smith 2017) on the base config instead:
the LR grows exponentially over ``--lr-find-steps`` steps, the run stops, and ``lr_find.json``
(suggestion, LRs, losses) and ``lr_find.png`` are written to OUT. Every group gets the same LR
during the test (LR multipliers are not applied).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from esft.callbacks.tuning import OptunaPruning
from esft.extras import require
from esft.commands.options import CommandParser
from esft.runconfig import (ConfigError, base_seed, load_config, read_metrics, run_config, set_callback,
                            write_run_config)
from esft.runs import RunDirBusy, lock_dir
from esft.search import Space, base_params, create_study, load_space, recover, save_sampler, suggest, write_reports


# ---- running trials --------------------------------------------------------------------------
def _fit(cfg: dict, run_dir: Path) -> None:
    """``esft fit`` of `cfg` (written to ``run.yaml``) in this process, so that pruning can stop it."""
    from esft.cli import main as cli_main

    cli_main(["fit", "--config", str(write_run_config(cfg, run_dir))])


def objective_value(run_dir: Path, cfg: dict, metric: str) -> float:
    """The metric's final value as the run recorded it (`esft.runconfig.read_metrics`: the last
    logged value in ``metrics.json``, ``eval/<task>/<metric>`` from ``eval.json``)."""
    metrics = read_metrics(run_dir, cfg)
    if metrics.get(metric) is None:
        raise KeyError(f"metric {metric!r} was not logged (have {sorted(metrics)})")
    return float(metrics[metric])


def trial_config(base: dict, space: Space, overrides: dict[str, Any], run_dir: Path) -> dict:
    cfg, _ = run_config(base, {"trainer.enable_progress_bar": False, **space.common, **overrides}, base_seed(base), run_dir,
                        label=run_dir.name)
    if space.pruner is not None and space.metric.startswith("val/"):
        set_callback(cfg, "esft.callbacks.tuning.OptunaPruning", monitor=space.metric)
    return cfg


def run_study(base: dict, space: Space, out: Path, max_failures: int = 3, timeout: float | None = None):
    """Run trials until the study holds `space.n_trials` finished trials; returns the study.
    One process per study directory: another one holding it raises `RunDirBusy`."""
    with lock_dir(out):
        return _search(base, space, out, max_failures, timeout)


def _search(base: dict, space: Space, out: Path, max_failures: int, timeout: float | None):
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(space, out)
    retried = recover(study)
    if retried:
        print(f"tune: trials {retried} were interrupted; marked failed, their values go first")
    finished = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))  # noqa: E731
    if space.enqueue_base and not study.trials:
        params = base_params(base, space)
        if params is None:
            print("tune: warning: the base config's values are not all inside the space; not enqueued", file=sys.stderr)
        else:
            study.enqueue_trial(params, user_attrs={"base_config": True})
    names = space.names
    failures, started = 0, time.perf_counter()
    bar = tqdm(total=space.n_trials, initial=min(finished(), space.n_trials), desc="trials", unit="trial")
    while finished() < space.n_trials:
        if timeout is not None and time.perf_counter() - started > timeout:
            bar.write(f"tune: --timeout {timeout:.0f}s reached; rerun to continue")
            break
        trial = study.ask()
        overrides = {key: suggest(trial, names[key], spec) for key, spec in space.params.items()}
        save_sampler(study.sampler, space, out)  # after sampling: a restart draws new values
        run_dir = out / f"trial_{trial.number:03d}"
        cfg = trial_config(base, space, overrides, run_dir)
        shown = " ".join(f"{names[k]}={v:.4g}" if isinstance(v, float) else f"{names[k]}={v}" for k, v in overrides.items())
        t0 = time.perf_counter()
        OptunaPruning.trial = trial
        try:
            _fit(cfg, run_dir)
            value = objective_value(run_dir, cfg, space.metric)
            if not math.isfinite(value):
                raise FloatingPointError(f"{space.metric} is {value}")
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            study.tell(trial, value)
            bar.write(f"trial {trial.number}: {space.metric}={value:.4g}  {shown}  ({time.perf_counter() - t0:.0f}s)")
        except SIGTERMException:  # the process is being stopped: leave the trial to `recover`
            bar.close()
            raise
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            study.tell(trial, state=TrialState.PRUNED)
            bar.write(f"trial {trial.number}: {e}  {shown}")
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a bad trial is recorded, the search goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            bar.write(f"trial {trial.number}: FAILED {type(e).__name__}: {e}  {shown}")
            if failures >= max_failures:
                bar.close()
                write_reports(study, out, space)
                raise RuntimeError(f"{failures} trials failed; see {out}/trials.csv (error column)") from e
        finally:
            OptunaPruning.trial = None
            gc.collect()
        bar.update(1)
        write_reports(study, out, space)
    bar.close()
    write_reports(study, out, space)
    return study


# ---- LR finder -------------------------------------------------------------------------------
def lr_find(base: dict, out: Path, min_lr: float, max_lr: float, steps: int) -> dict:
    """Lightning's LR range test on the base config; returns ``{"suggestion", "lr", "loss"}``."""
    cfg, _ = run_config(base, {}, base_seed(base), out)
    trainer = cfg["trainer"]
    trainer.update({"logger": False, "enable_checkpointing": False, "max_steps": max(int(trainer.get("max_steps") or 0), steps + 1),
                    "callbacks": [{"class_path": "esft.callbacks.tuning.LRFinder",
                                   "init_args": {"output": str(out), "min_lr": min_lr, "max_lr": max_lr,
                                                 "num_training_steps": steps}}]})
    with lock_dir(out):
        _fit(cfg, out)
    return json.loads((out / "lr_find.json").read_text())


# ---- command ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft tune", options_flag="--options", description="Optuna search over config keys (TPE, median pruning, "
                                "SQLite storage that resumes), or Lightning's LR finder.")
    p.add_argument("--config", required=True, help="base LightningCLI config for `esft fit`")
    p.add_argument("--space", help="search-space YAML (metric, direction, n_trials, set, space)")
    p.add_argument("--out", help="study directory (default: runs/tune, or runs/lr_find with --lr-find)")
    p.add_argument("--n-trials", type=int, help="finished trials the study should hold (overrides the space's)")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--max-failures", type=int, default=3, help="stop after this many failed trials in this process")
    p.add_argument("--lr-find", action="store_true", help="run Lightning's LR range test instead of a search")
    p.add_argument("--lr-find-min", type=float, default=1e-6)
    p.add_argument("--lr-find-max", type=float, default=1.0)
    p.add_argument("--lr-find-steps", type=int, default=100)
    args = p.parse_args(argv)
    if not args.lr_find and not args.space:
        p.error("give --space SPACE.yaml (a search) or --lr-find")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        base = load_config(args.config)
        space = None if args.lr_find else load_space(args.space, args.n_trials)
        if space is not None:
            require("optuna", "tune", "esft tune")
        if space is not None:  # every key must be settable before any trial runs
            probe = {k: s["choices"][0] if "choices" in s else s["low"] for k, s in space.params.items()}
            trial_config(base, space, probe, Path(args.out or "runs/tune") / "probe")
    except (ConfigError, OSError) as e:
        print(f"esft tune: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out or ("runs/lr_find" if args.lr_find else "runs/tune"))
    try:
        if args.lr_find:
            result = lr_find(base, out, args.lr_find_min, args.lr_find_max, args.lr_find_steps)
            print(f"tune: suggested lr {result['suggestion']!r}; {out}/lr_find.json, {out}/lr_find.png")
            return
        study = run_study(base, space, out, args.max_failures, args.timeout)
    except RunDirBusy as e:
        print(f"esft tune: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        print(f"esft tune: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print((out / "summary.md").read_text(), end="")
    print(f"tune: study {out}/study.db; tables {out}/trials.csv, summary.md; plots history.png, importance.png")
    del study


if __name__ == "__main__":
    main()
