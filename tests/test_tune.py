"""`esft tune`: search-space parsing, pruning, a study that resumes from its SQLite storage, LR finder."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import esft.commands.tune as tune
import esft.search as search
from esft.callbacks.tuning import OptunaPruning
from esft.runconfig import ConfigError

from conftest import TINY, hold_lock

ROOT = Path(__file__).parents[1]


def base_config(root: Path, max_steps: int = 4) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_model_summary": False,
                    "enable_checkpointing": False, "default_root_dir": str(root)},
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16, "optim": {"lr": 1e-2, "warmup_steps": 1}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["reverse_words"], "num_train_per_task": 32, "num_val_per_task": 8,
                               "max_length": 64, "max_tokens": 128}},
    }


def write_space(path: Path, **fields) -> Path:
    space = {"metric": "val/loss", "n_trials": 2, "startup_trials": 1, "pruner": None, "enqueue_base": True,
             "space": {"model.init_args.optim.lr": {"low": 1e-3, "high": 3e-2, "log": True},
                       "model.init_args.optim.warmup_steps": {"low": 0, "high": 2}}, **fields}
    path.write_text(yaml.safe_dump(space))
    return path


# ---- search space ----------------------------------------------------------------------------
def test_space_parses_and_bad_ranges_name_the_key(tmp_path):
    space = search.load_space(write_space(tmp_path / "s.yaml"))
    assert space.names == {"model.init_args.optim.lr": "lr", "model.init_args.optim.warmup_steps": "warmup_steps"}
    assert search.load_space(write_space(tmp_path / "s.yaml"), n_trials=7).n_trials == 7
    bad = {"model.init_args.optim.lr": {"low": 0.0, "high": 1.0, "log": True}}
    with pytest.raises(ConfigError, match=r"space\['model.init_args.optim.lr'\]: a log range needs low > 0"):
        search.load_space(write_space(tmp_path / "b.yaml", space=bad))
    with pytest.raises(ConfigError, match="unknown keys \\['trials'\\]"):
        search.load_space(write_space(tmp_path / "b.yaml", trials=3))
    with pytest.raises(ConfigError, match="low < high"):
        search.load_space(write_space(tmp_path / "b.yaml", space={"a.b": {"low": 2, "high": 1}}))


def test_suggest_types_and_base_params():
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(search.suggest(trial, "i", {"low": 0, "high": 10, "step": 5}), int)
    assert isinstance(search.suggest(trial, "f", {"low": 1e-4, "high": 1e-2, "log": True}), float)
    assert search.suggest(trial, "c", {"choices": ["wsd"]}) == "wsd"
    space = search.Space(params={"model.init_args.optim.lr": {"low": 1e-3, "high": 1e-1, "log": True},
                               "model.init_args.optim.schedule": {"choices": ["cosine", "wsd"]}})
    base = {"model": {"init_args": {"optim": {"lr": 0.003}}}}
    # a key the base config leaves out takes OptimConfig's default
    assert search.base_params(base, space) == {"lr": 0.003, "schedule": "cosine"}
    assert search.base_params({"model": {"init_args": {"optim": {"lr": 0.5}}}}, space) is None  # outside the range


# ---- pruning ---------------------------------------------------------------------------------
def test_pruning_callback_reports_and_raises():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    cb = OptunaPruning("val/loss")
    trainer = SimpleNamespace(sanity_checking=False, global_step=4, callback_metrics={"val/loss": torch.tensor(0.5)})
    OptunaPruning.trial = trial
    try:
        cb.on_validation_end(trainer, None)  # under the threshold: reported, not pruned
        trainer.global_step, trainer.callback_metrics = 6, {"val/loss": torch.tensor(2.0)}
        with pytest.raises(optuna.TrialPruned, match="step 6"):
            cb.on_validation_end(trainer, None)
    finally:
        OptunaPruning.trial = None
    assert study.trials[0].intermediate_values == {4: 0.5, 6: 2.0}


def test_median_pruner_prunes_a_bad_trial_in_a_study(tmp_path):
    space = search.load_space(write_space(tmp_path / "s.yaml", pruner={"startup_trials": 1}, enqueue_base=False,
                                        space={"model.init_args.optim.lr": {"low": 1e-6, "high": 3e-2, "log": True}}))
    study = search.create_study(space, tmp_path / "out")
    study.enqueue_trial({"lr": 2e-2})
    study.enqueue_trial({"lr": 1e-6})  # learns nothing: worse than the first trial at step 2
    tune.run_study(base_config(tmp_path / "base"), space, tmp_path / "out")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]  # a pruned trial counts toward n_trials
    assert study.trials[1].last_step == 2 and study.trials[1].intermediate_values[2] > study.trials[0].intermediate_values[2]
    assert "pruned" in (tmp_path / "out" / "summary.md").read_text()


# ---- a study that resumes --------------------------------------------------------------------
def test_study_writes_reports_and_resumes_from_storage(tmp_path):
    base, out = base_config(tmp_path / "base"), tmp_path / "study"
    space = search.load_space(write_space(tmp_path / "s.yaml"))
    study = tune.run_study(base, space, out)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params == {"lr": 1e-2, "warmup_steps": 1} and trials[0].user_attrs["base_config"]
    assert (out / "trial_000" / "run.yaml").exists() and (out / "history.png").exists()
    assert (out / "importance.png").exists()
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,lr,warmup_steps") and len(rows) == 3
    best = yaml.safe_load((out / "best_grid.yaml").read_text())
    assert best["cells"]["tuned"] == {"model.init_args.optim.lr": study.best_trial.params["lr"],
                                      "model.init_args.optim.warmup_steps": study.best_trial.params["warmup_steps"]}
    cfg = yaml.safe_load((out / "trial_001" / "run.yaml").read_text())
    assert cfg["model"]["init_args"]["optim"]["lr"] == pytest.approx(trials[1].params["lr"])

    # a process killed mid-trial leaves it RUNNING; the next run fails it and retries its values
    stale = optuna.load_study(study_name="esft-tune", storage=f"sqlite:///{out / 'study.db'}").ask()
    stale.suggest_float("lr", 1e-3, 3e-2, log=True)
    stale.suggest_int("warmup_steps", 0, 2)
    resumed = tune.run_study(base, search.load_space(tmp_path / "s.yaml", n_trials=3), out)
    trials = resumed.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[3].params == trials[2].params and trials[3].user_attrs["retry_of"] == 2
    assert len((out / "trials.csv").read_text().splitlines()) == 5


class KillOnce(L.Callback):
    """SIGKILLs its own process at the first training step of trial 1, once (marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, *args) -> None:
        trial = OptunaPruning.trial
        if trial is not None and trial.number == 1 and trainer.global_step == 1 and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_killed_study_process_resumes(tmp_path):
    base = base_config(tmp_path / "base")
    base["trainer"]["callbacks"] = [{"class_path": "test_tune.KillOnce", "init_args": {"marker": str(tmp_path / "killed")}}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = write_space(tmp_path / "s.yaml", n_trials=3)
    cmd = [sys.executable, "-m", "esft.commands.tune", "--config", str(tmp_path / "base.yaml"), "--space", str(space),
           "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    study = optuna.load_study(study_name="esft-tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[2].params == study.trials[1].params


# ---- LR finder -------------------------------------------------------------------------------
def test_lr_find_writes_a_suggestion(tmp_path):
    result = tune.lr_find(base_config(tmp_path / "base"), tmp_path / "lrf", min_lr=1e-5, max_lr=1.0, steps=20)
    assert len(result["lr"]) == len(result["loss"]) > 10
    assert result["lr"][0] == pytest.approx(1e-5) and result["lr"] == sorted(result["lr"])
    assert result["suggestion"] is not None and 1e-5 <= result["suggestion"] <= 1.0
    assert json.loads((tmp_path / "lrf" / "lr_find.json").read_text()) == result
    assert (tmp_path / "lrf" / "lr_find.png").exists()
    assert not list((tmp_path / "lrf").glob("*.ckpt"))  # the finder's temporary checkpoint is gone


def test_cli_table_has_tune():
    from esft.cli import PROJECT_COMMANDS, _project_command

    assert PROJECT_COMMANDS["tune"][0] == "esft.commands.tune" and _project_command("tune") is tune.main


def test_objective_value_reads_the_files_the_run_wrote(tmp_path):
    logged = {"val/loss": 1.5, "eval/reverse_words/exact_match": 0.5}
    (tmp_path / "metrics.json").write_text(json.dumps({"step": 4, "metrics": logged}))
    (tmp_path / "eval.json").write_text(json.dumps({"after": {"reverse_words": 0.75},
                                                    "scalars": {"after": {"eval/reverse_words/exact_match": 0.75}}}))
    assert tune.objective_value(tmp_path, {}, "eval/reverse_words/exact_match") == 0.75  # eval.json's final scores win
    assert tune.objective_value(tmp_path, {}, "val/loss") == 1.5
    with pytest.raises(KeyError, match="'val/acc' was not logged"):
        tune.objective_value(tmp_path, {}, "val/acc")


def test_sigterm_stops_the_study_and_leaves_the_trial_to_recover(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(cfg, run_dir):
        raise SIGTERMException(1)

    monkeypatch.setattr(tune, "_fit", stopped)
    space = search.load_space(write_space(tmp_path / "s.yaml"))
    with pytest.raises(SIGTERMException):
        tune.run_study(base_config(tmp_path / "base"), space, tmp_path / "out")
    study = optuna.load_study(study_name="esft-tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    assert search.recover(study) == [0] and study.trials[0].state == TrialState.FAIL


# ---- restarts: the sampler goes on where it stopped; one process per study directory -------
def fake_fit(stop_at: int | None = None):
    """`_fit` without training: the val/loss it writes to metrics.json is a smooth function of the
    sampled values; raises
    SIGTERMException (the process being stopped) in trial `stop_at`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def fit(cfg, run_dir):
        optim = cfg["model"]["init_args"]["optim"]
        if stop_at is not None and run_dir.name == f"trial_{stop_at:03d}":
            raise SIGTERMException(1)
        loss = (math.log10(optim["lr"]) + 2) ** 2 + 0.1 * optim["warmup_steps"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"step": 1, "metrics": {"val/loss": loss}}))
    return fit


def params(study) -> list[dict]:
    return [t.params for t in study.trials]


def test_a_restarted_study_goes_on_with_the_samplers_state(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    space = search.load_space(write_space(tmp_path / "s.yaml", enqueue_base=False, startup_trials=3))
    more = search.load_space(tmp_path / "s.yaml", n_trials=4)
    base = base_config(tmp_path / "base")
    monkeypatch.setattr(tune, "write_reports", lambda *args: None)  # plots take seconds; not tested here
    monkeypatch.setattr(tune, "_fit", fake_fit())
    whole = params(tune.run_study(base, more, tmp_path / "whole"))
    assert len({json.dumps(p, sort_keys=True) for p in whole}) == 4

    # stopped between trials: the restart continues the same sequence (random, then TPE trials),
    # it does not start it again
    tune.run_study(base, space, tmp_path / "restarted")
    assert params(tune.run_study(base, more, tmp_path / "restarted")) == whole

    # stopped inside trial 1: its values are retried once, and the next new trial differs from them
    monkeypatch.setattr(tune, "_fit", fake_fit(stop_at=1))
    with pytest.raises(SIGTERMException):
        tune.run_study(base, space, tmp_path / "stopped")
    monkeypatch.setattr(tune, "_fit", fake_fit())
    study = tune.run_study(base, search.load_space(tmp_path / "s.yaml", n_trials=3), tmp_path / "stopped")
    p = params(study)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert p[2] == p[1] and study.trials[2].user_attrs["retry_of"] == 1
    assert p[3] not in (p[0], p[1])


def test_a_second_tune_on_the_same_out_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune, "_fit", lambda cfg, run_dir: pytest.fail("a trial ran"))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_config(tmp_path / "base")))
    args = ["--config", str(tmp_path / "base.yaml"), "--space", str(write_space(tmp_path / "s.yaml"))]
    for extra in ([], ["--lr-find"]):
        with hold_lock(tmp_path / "out") as pid, pytest.raises(SystemExit) as e:
            tune.main(args + ["--out", str(tmp_path / "out"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("esft tune: error: ") and "\n" not in err
        assert str(tmp_path / "out") in err and f"pid {pid}" in err
    assert not (tmp_path / "out" / "study.db").exists()
