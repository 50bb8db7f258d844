"""Hyperparameter search with Optuna, the library part of `esft tune`: the search-space file,
sampling, the study's storage and sampler state, and its reports.

A space YAML (see `esft.commands.tune`) names dotted config keys and their ranges; `suggest` draws
a value for each from an Optuna trial; `create_study` opens (or resumes) ``OUT/study.db`` with the
sampler saved in ``OUT/sampler.pkl``; `write_reports` writes ``trials.csv``, ``summary.md``,
``best_grid.yaml`` (the best values as an `esft sweep` cell) and the plots.
"""

from __future__ import annotations

import math
import pickle
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft.optim import OptimConfig
from esft.reports import write_csv
from esft.runconfig import ConfigError, atomic_write, get_dotted, load_yaml, short_keys

SAMPLER_FILE = "sampler.pkl"
SPACE_KEYS = ("metric", "direction", "n_trials", "seed", "startup_trials", "pruner", "enqueue_base", "set", "space")


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
        return short_keys(list(self.params))


def _check_range(path: str, key: str, spec: Any) -> None:
    where = f"{path}: space[{key!r}]"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{low: 1.0e-4, high: 1.0e-2, log: true}} or {{choices: [...]}}")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list and the only field")
        return
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs 'low' and 'high' (optional 'log', 'step'); got {sorted(spec)}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise ConfigError(f"{where}: 'low' and 'high' must be numbers with low < high, got {low!r}, {high!r}")
    if spec.get("log") and (low <= 0 or spec.get("step") is not None):
        raise ConfigError(f"{where}: a log range needs low > 0 and no 'step'")


def load_space(path: str | Path, n_trials: int | None = None) -> Space:
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search space is a mapping with 'space' and optional {SPACE_KEYS}")
    unknown = set(raw) - set(SPACE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected {list(SPACE_KEYS)})")
    params = raw.get("space") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'space' must map at least one dotted config key to a range")
    for key, spec in params.items():
        _check_range(str(path), key, spec)
    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: 'direction' must be minimize or maximize, got {direction!r}")
    pruner = raw.get("pruner", {})
    if pruner is not None and (not isinstance(pruner, dict) or set(pruner) - {"startup_trials", "warmup_steps"}):
        raise ConfigError(f"{path}: 'pruner' is null or a mapping of startup_trials / warmup_steps, got {pruner!r}")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of dotted keys")
    space = Space(params=dict(params), metric=str(raw.get("metric", "val/loss")), direction=direction,
                  n_trials=int(n_trials if n_trials is not None else raw.get("n_trials", 10)),
                  seed=int(raw.get("seed", 0)), startup_trials=int(raw.get("startup_trials", 4)),
                  pruner=pruner, enqueue_base=bool(raw.get("enqueue_base", False)), common=dict(common))
    if space.n_trials < 1:
        raise ConfigError(f"{path}: n_trials must be >= 1")
    return space


def suggest(trial, name: str, spec: dict) -> Any:
    """One value for `spec` from the Optuna `trial` (categorical, int or float range)."""
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
        return trial.suggest_int(name, low, high, step=step or 1, log=log)
    return trial.suggest_float(name, float(low), float(high), step=step, log=log)


def base_params(base: dict, space: Space) -> dict[str, Any] | None:
    """The base config's values of the searched keys (as Optuna params), or None when one is
    missing or outside its range (then it cannot be enqueued)."""
    out = {}
    for key, spec in space.params.items():
        value = get_dotted(base, key)
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


# ---- the study -------------------------------------------------------------------------------
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
    atomic_write(out / SAMPLER_FILE, pickle.dumps({"settings": _sampler_settings(space), "sampler": sampler}))


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
    write_csv(out / "trials.csv", list(rows[0]), rows)
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
    atomic_write(out / "summary.md", "\n".join(lines) + "\n")
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
    atomic_write(out / "best_grid.yaml", header + yaml.safe_dump(grid, sort_keys=False))


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
