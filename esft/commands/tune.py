"""`esft tune`: hyperparameter search with Optuna over any config key, or Lightning's LR finder.

    esft tune --config configs/sft/quickstart.yaml --space experiments/optim/search.yaml --out runs/tune
    esft tune ... --n-trials 30            # more trials: a rerun continues the same study
    esft tune --config configs/sft/quickstart.yaml --lr-find --out runs/lr_find   # quick LR range test
    python -m esft.commands.tune ...                # the same, without the `esft` wrapper

The search space is a YAML file::

    metric: val/loss              # the objective: a metric logged in validation (val/*), or
    direction: minimize           #   eval/<task> from TaskEvaluation's "after" scores
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
config plus the sampled values, run in this process in ``OUT/trial_<k>/`` (its config as
``cell.yaml``, TensorBoard events, callback outputs; the layout of `esft sweep`). Every validation
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
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.utilities.exceptions import SIGTERMException

from esft.extras import require
from esft.optim import OptimConfig
from esft.runs import RunDirBusy, lock_dir
from esft.commands.sweep import SweepError, _atomic_write, _short_keys, build_config, load_yaml

SAMPLER_FILE = "sampler.pkl"
SPACE_KEYS = ("metric", "direction", "n_trials", "seed", "startup_trials", "pruner", "enqueue_base", "set", "space")
_ACTIVE_TRIAL = None  # the optuna Trial being run in this process (read by OptunaPruning)


# ---- search space ----------------------------------------------------------------------------
@dataclass
class Space:
    params: dict[str, dict]          # dotted key -> range spec
    metric: str = "val/loss"
    direction: str = "minimize"
    n_trials: int = 10
    seed: int = 0
    startup_trials: int = 4
    pruner: dict | None = field(default_factory=dict)
    enqueue_base: bool = False
    common: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> dict[str, str]:
        """Dotted key -> the Optuna parameter name (its shortest unique suffix)."""
        return _short_keys(list(self.params))


def _check_range(path: str, key: str, spec: Any) -> None:
    where = f"{path}: space[{key!r}]"
    if not isinstance(spec, dict):
        raise SweepError(f"{where} must be a mapping like {{low: 1.0e-4, high: 1.0e-2, log: true}} or {{choices: [...]}}")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise SweepError(f"{where}: 'choices' must be a non-empty list and the only field")
        return
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or "low" not in spec or "high" not in spec:
        raise SweepError(f"{where}: a range needs 'low' and 'high' (optional 'log', 'step'); got {sorted(spec)}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise SweepError(f"{where}: 'low' and 'high' must be numbers with low < high, got {low!r}, {high!r}")
    if spec.get("log") and (low <= 0 or spec.get("step") is not None):
        raise SweepError(f"{where}: a log range needs low > 0 and no 'step'")


def load_space(path: str | Path, n_trials: int | None = None) -> Space:
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a search space is a mapping with 'space' and optional {SPACE_KEYS}")
    unknown = set(raw) - set(SPACE_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)} (expected {list(SPACE_KEYS)})")
    params = raw.get("space") or {}
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: 'space' must map at least one dotted config key to a range")
    for key, spec in params.items():
        _check_range(str(path), key, spec)
    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"{path}: 'direction' must be minimize or maximize, got {direction!r}")
    pruner = raw.get("pruner", {})
    if pruner is not None and (not isinstance(pruner, dict) or set(pruner) - {"startup_trials", "warmup_steps"}):
        raise SweepError(f"{path}: 'pruner' is null or a mapping of startup_trials / warmup_steps, got {pruner!r}")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise SweepError(f"{path}: 'set' must be a mapping of dotted keys")
    space = Space(params=dict(params), metric=str(raw.get("metric", "val/loss")), direction=direction,
                  n_trials=int(n_trials if n_trials is not None else raw.get("n_trials", 10)),
                  seed=int(raw.get("seed", 0)), startup_trials=int(raw.get("startup_trials", 4)),
                  pruner=pruner, enqueue_base=bool(raw.get("enqueue_base", False)), common=dict(common))
    if space.n_trials < 1:
        raise SweepError(f"{path}: n_trials must be >= 1")
    return space


def suggest(trial, name: str, spec: dict) -> Any:
    """One value for `spec` from the Optuna `trial` (categorical, int or float range)."""
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
        return trial.suggest_int(name, low, high, step=step or 1, log=log)
    return trial.suggest_float(name, float(low), float(high), step=step, log=log)


def _get_dotted(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def base_params(base: dict, space: Space) -> dict[str, Any] | None:
    """The base config's values of the searched keys (as Optuna params), or None when one is
    missing or outside its range (then it cannot be enqueued)."""
    out = {}
    for key, spec in space.params.items():
        value = _get_dotted(base, key)
        prefix = "model.init_args.optim."
        if value is None and key.startswith(prefix) and hasattr(OptimConfig, key[len(prefix):]):
            value = getattr(OptimConfig, key[len(prefix):])  # the base config leaves the default
        if "choices" in spec:
            if value not in spec["choices"]:
                return None
        elif not isinstance(value, (int, float)) or not spec["low"] <= value <= spec["high"]:
            return None
        out[space.names[key]] = value
    return out


# ---- pruning and LR finder callbacks ---------------------------------------------------------
class OptunaPruning(L.Callback):
    """Reports `monitor` to the active Optuna trial after every validation and raises
    `optuna.TrialPruned` when the study's pruner says so. Added to each trial by `esft tune`."""

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        import optuna

        trial = _ACTIVE_TRIAL
        if trial is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = trainer.global_step
        trial.report(float(value), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={float(value):.4g}")


class LRFinder(LearningRateFinder):
    """Lightning's LR range test at the start of `fit`; writes ``lr_find.json`` and ``lr_find.png``
    to `output` and stops the run (it only measures)."""

    def __init__(self, output: str, min_lr: float = 1e-6, max_lr: float = 1.0, num_training_steps: int = 100) -> None:
        super().__init__(min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training_steps, update_attr=False)
        self.output = Path(output)
        self.result: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        finder = self.optimal_lr
        suggestion = finder.suggestion() if finder is not None else None
        self.result = {"suggestion": suggestion, "lr": [float(x) for x in finder.results.get("lr", [])],
                       "loss": [float(x) for x in finder.results.get("loss", [])]}
        self.output.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.output / "lr_find.json", json.dumps(self.result, indent=2) + "\n")
        try:
            fig = finder.plot(suggest=suggestion is not None)
            fig.savefig(self.output / "lr_find.png", dpi=100)
        except Exception as e:  # a plot is a nicety; the JSON is the result
            print(f"tune: warning: no lr_find.png ({e})", file=sys.stderr)
        trainer.should_stop = True


# ---- running trials --------------------------------------------------------------------------
def _fit(cfg: dict, run_dir: Path):
    """``esft fit`` of `cfg` in this process; returns the trainer."""
    import yaml

    from esft.cli import main as cli_main

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = cli_main(["fit", "--config", str(path)])
    return cli.trainer


def objective_value(trainer, metric: str) -> float:
    """The metric's final value: TaskEvaluation's "after" score for ``eval/<task>``, else the
    last logged value in ``trainer.callback_metrics``."""
    if metric.startswith("eval/"):
        task = metric[len("eval/"):]
        for cb in trainer.callbacks:
            after = (getattr(cb, "results", None) or {}).get("after")
            if isinstance(after, dict) and task in after:
                return float(after[task])
    value = trainer.callback_metrics.get(metric)
    if value is None:
        raise KeyError(f"metric {metric!r} was not logged (have {sorted(trainer.callback_metrics)})")
    return float(value)


def trial_config(base: dict, space: Space, overrides: dict[str, Any], run_dir: Path) -> dict:
    seed = base.get("seed_everything") if isinstance(base.get("seed_everything"), int) else 0
    cfg, _ = build_config(base, {"trainer.enable_progress_bar": False, **space.common, **overrides}, seed, run_dir)
    callbacks = cfg["trainer"].get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if space.pruner is not None and space.metric.startswith("val/"):
        callbacks.append({"class_path": "esft.commands.tune.OptunaPruning", "init_args": {"monitor": space.metric}})
    cfg["trainer"]["callbacks"] = callbacks
    return cfg


def _load_sampler(space: Space, out: Path):
    """The sampler saved in ``OUT/sampler.pkl`` when it was made with the space's seed and startup
    trials, else None."""
    path = out / SAMPLER_FILE
    if not path.exists():
        return None
    try:
        saved = pickle.loads(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - e.g. written by another Optuna version: start a new one
        print(f"tune: warning: cannot read {path} ({type(e).__name__}: {e}); a new sampler goes on", file=sys.stderr)
        return None
    if saved.get("settings") != _sampler_settings(space):
        print(f"tune: warning: {path} has {saved.get('settings')}, the space {_sampler_settings(space)}; "
              "a new sampler goes on", file=sys.stderr)
        return None
    return saved["sampler"]


def _sampler_settings(space: Space) -> dict[str, int]:
    return {"seed": space.seed, "startup_trials": space.startup_trials}


def save_sampler(sampler, space: Space, out: Path) -> None:
    """Pickle the sampler (with its random state) to ``OUT/sampler.pkl``, atomically."""
    _atomic_write(out / SAMPLER_FILE, pickle.dumps({"settings": _sampler_settings(space), "sampler": sampler}))


def create_study(space: Space, out: Path):
    """Create or load the study in ``OUT/study.db``. A restarted study goes on with the sampler
    saved after its last sampling: a new TPE sampler with the same seed would propose the first
    trials' values again. Without a saved sampler, a study that has trials gets one seeded with
    ``seed + number of trials``."""
    import optuna

    pruner = optuna.pruners.NopPruner() if space.pruner is None else optuna.pruners.MedianPruner(
        n_startup_trials=int(space.pruner.get("startup_trials", 3)), n_warmup_steps=int(space.pruner.get("warmup_steps", 0)))
    out.mkdir(parents=True, exist_ok=True)
    sampler = _load_sampler(space, out)
    study = optuna.create_study(study_name="esft-tune", storage=f"sqlite:///{out.resolve() / 'study.db'}",
                                sampler=sampler, pruner=pruner, direction=space.direction, load_if_exists=True)
    if sampler is None:
        study.sampler = optuna.samplers.TPESampler(seed=space.seed + len(study.trials),
                                                   n_startup_trials=space.startup_trials)
    return study


def recover(study) -> list[int]:
    """Trials left RUNNING by a killed process: mark them failed and enqueue their values again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


def run_study(base: dict, space: Space, out: Path, max_failures: int = 3, timeout: float | None = None):
    """Run trials until the study holds `space.n_trials` finished trials; returns the study.
    One process per study directory: another one holding it raises `RunDirBusy`."""
    with lock_dir(out):
        return _search(base, space, out, max_failures, timeout)


def _search(base: dict, space: Space, out: Path, max_failures: int, timeout: float | None):
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    global _ACTIVE_TRIAL
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
        _ACTIVE_TRIAL = trial
        try:
            trainer = _fit(cfg, run_dir)
            value = objective_value(trainer, space.metric)
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
            _ACTIVE_TRIAL = None
            trainer = None
            gc.collect()
        bar.update(1)
        write_reports(study, out, space)
    bar.close()
    write_reports(study, out, space)
    return study


# ---- reports ---------------------------------------------------------------------------------
def write_reports(study, out: Path, space: Space) -> None:
    """trials.csv, summary.md, history.png and importance.png for the study so far."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if not trials:
        return
    param_names = list(space.names.values())
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{n: t.params.get(n) for n in param_names},
                     "seconds": t.user_attrs.get("seconds"), "base_config": bool(t.user_attrs.get("base_config")),
                     "last_step": t.last_step, "error": t.user_attrs.get("error", "")})
    import pandas as pd

    df = pd.DataFrame(rows)
    _atomic_write(out / "trials.csv", df.to_csv(index=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    lines = [f"# esft tune: {space.metric} ({space.direction})", ""]
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    lines.append("Trials: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items()) + ".")
    if complete:
        best = study.best_trial
        lines += ["", f"Best: trial {best.number}, {space.metric} = {best.value:.4g}", ""]
        lines += [f"- `{key}`: {best.params[names]}" for key, names in space.names.items() if names in best.params]
        base = [t for t in complete if t.user_attrs.get("base_config")]
        if base:
            lines += ["", f"Base config (trial {base[0].number}): {space.metric} = {base[0].value:.4g}"]
    ranked = sorted(rows, key=lambda r: (r["value"] is None or (isinstance(r["value"], float) and math.isnan(r["value"])),
                                         (r["value"] or 0) * (1 if space.direction == "minimize" else -1)))
    lines += ["", "| trial | state | " + space.metric + " | " + " | ".join(param_names) + " | s |",
              "|---:|---|---:|" + "---|" * len(param_names) + "---:|"]
    for r in ranked:
        value = "–" if r["value"] is None else f"{r['value']:.4g}"
        if r["state"] == "PRUNED" and r["value"] is not None:
            value += f" (step {r['last_step']})"  # the last intermediate value, not a final one
        params = " | ".join(f"{r[n]:.4g}" if isinstance(r[n], float) else str(r[n]) for n in param_names)
        mark = " (base)" if r["base_config"] else ""
        lines.append(f"| {r['number']}{mark} | {r['state'].lower()} | {value} | {params} | {r['seconds'] or ''} |")
    _atomic_write(out / "summary.md", "\n".join(lines) + "\n")
    if complete:
        write_best_grid(study.best_trial, out, space)
    _plots(study, out, len(complete))


def write_best_grid(best, out: Path, space: Space) -> None:
    """``best_grid.yaml``: the best trial's values as an `esft sweep` cell, to confirm over seeds."""
    import yaml

    cell = {key: best.params[name] for key, name in space.names.items() if name in best.params}
    header = (f"# esft sweep --config BASE.yaml --grid {out / 'best_grid.yaml'} --out DIR\n#\n"
              f"# The best trial of the study in {out} (trial {best.number}, {space.metric} {best.value:.4g}),\n"
              f"# with the shared overrides of the search, to rerun over seeds beside the base config.\n")
    grid = {"seeds": [0, 1, 2], **({"set": space.common} if space.common else {}), "cells": {"tuned": cell}}
    _atomic_write(out / "best_grid.yaml", header + yaml.safe_dump(grid, sort_keys=False))


def _plots(study, out: Path, n_complete: int) -> None:
    if n_complete < 1:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as ovm
    except ImportError as e:
        print(f"tune: warning: no plots ({e})", file=sys.stderr)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = [("history.png", ovm.plot_optimization_history)]
        if n_complete >= 2:
            plots.append(("importance.png", ovm.plot_param_importances))
        for name, fn in plots:
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(7, 4)
                fig.tight_layout()
                fig.savefig(out / name, dpi=100)
                plt.close(fig)
            except (ValueError, RuntimeError) as e:  # e.g. importances need varying parameters
                print(f"tune: warning: no {name} ({e})", file=sys.stderr)


# ---- LR finder -------------------------------------------------------------------------------
def lr_find(base: dict, out: Path, min_lr: float, max_lr: float, steps: int) -> dict:
    """Lightning's LR range test on the base config; returns ``{"suggestion", "lr", "loss"}``."""
    seed = base.get("seed_everything") if isinstance(base.get("seed_everything"), int) else 0
    cfg, _ = build_config(base, {}, seed, out)
    trainer = cfg["trainer"]
    trainer.update({"logger": False, "enable_checkpointing": False, "max_steps": max(int(trainer.get("max_steps") or 0), steps + 1),
                    "callbacks": [{"class_path": "esft.commands.tune.LRFinder",
                                   "init_args": {"output": str(out), "min_lr": min_lr, "max_lr": max_lr,
                                                 "num_training_steps": steps}}]})
    with lock_dir(out):
        _fit(cfg, out)
    return json.loads((out / "lr_find.json").read_text())


# ---- command ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="esft tune", description="Optuna search over config keys (TPE, median pruning, "
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
        base = load_yaml(args.config)
        if not isinstance(base, dict):
            raise SweepError(f"{args.config}: expected a mapping (a LightningCLI config)")
        space = None if args.lr_find else load_space(args.space, args.n_trials)
        if space is not None:
            require("optuna", "tune", "esft tune")
        if space is not None:  # every key must be settable before any trial runs
            probe = {k: s["choices"][0] if "choices" in s else s["low"] for k, s in space.params.items()}
            trial_config(base, space, probe, Path(args.out or "runs/tune") / "probe")
    except (SweepError, OSError) as e:
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
    # run the package module's main, so that the callbacks the CLI imports (esft.commands.tune.OptunaPruning)
    # and this loop share one module and one active trial
    from esft.commands.tune import main as package_main

    package_main()
