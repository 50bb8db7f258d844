"""The run core of sweep, tune and pipeline: safe names, the directory lock, live run dirs, run
configs (`esft.runconfig`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from esft.runconfig import ConfigError, get_dotted, load_yaml, run_config, run_loggers, set_dotted
from esft.runs import RunDirBusy, claim, is_safe_name, lock_dir, running_pid, safe_name


def test_safe_names_are_single_directory_names():
    for name in ("cold_start", "lr=0.001,packing=true", "rs-sft.2", "a+b"):
        assert is_safe_name(name) and safe_name(name) == name
    for name in ("", ".", "..", "../x", "/abs", "a/b", "-a", ".hidden", "a b", "x" * 121, 3, None):
        assert not is_safe_name(name)


def test_the_lock_is_exclusive_and_released_at_the_end(tmp_path):
    with lock_dir(tmp_path / "out"):
        assert (tmp_path / "out" / ".lock").read_text().strip().isdigit()
        with pytest.raises(RunDirBusy, match=r"out is in use by another run \(pid \d+ holds"):
            with lock_dir(tmp_path / "out"):  # a second open file: flock treats it as another holder
                pass
    with lock_dir(tmp_path / "out"):  # released: a restart gets it
        pass


def test_a_recorded_pid_counts_only_while_that_very_process_lives(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (tmp_path / "RUNNING").write_text(f"{proc.pid} {started}\n")
        assert running_pid(tmp_path) == proc.pid
        with pytest.raises(RunDirBusy, match=f"still being written by pid {proc.pid}"):
            claim(tmp_path)
        (tmp_path / "RUNNING").write_text(f"{proc.pid} {int(started) - 1}\n")  # the pid, given to another process
        assert running_pid(tmp_path) is None
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "RUNNING").write_text(f"{proc.pid} {started}\n")
    assert running_pid(tmp_path) is None
    claim(tmp_path)
    (tmp_path / "RUNNING").write_text("garbage\n")
    assert running_pid(tmp_path) is None


# ---- run configs: one directory a run, the user's loggers kept ---------------------------------
def test_run_config_moves_every_output_into_the_run_dir_and_keeps_the_users_loggers(tmp_path):
    base = {"trainer": {"default_root_dir": "runs/base",
                        "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": "runs/base", "name": "csv"}},
                                   {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                    "init_args": {"project": "esft", "offline": True}}],
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": "runs/base/checkpoints"}},
                                      {"class_path": "esft.callbacks.TaskEvaluation",
                                       "init_args": {"output": "/elsewhere/scores.json"}}]},
            "model": {"init_args": {"optim": {"lr": 1e-3}}}}
    run = tmp_path / "cell" / "seed1"
    cfg, sha = run_config(base, {"model.init_args.optim.lr": 3e-3}, 1, run, label="cell/seed1")
    trainer = cfg["trainer"]
    assert trainer["default_root_dir"] == str(run) and cfg["seed_everything"] == 1
    csv_logger, wandb = trainer["logger"]
    assert csv_logger["class_path"].endswith("CSVLogger") and csv_logger["init_args"] == {"save_dir": str(run), "name": "", "version": ""}
    assert wandb["init_args"] == {"project": "esft", "offline": True, "save_dir": str(run), "name": "cell/seed1"}
    assert trainer["callbacks"][0]["init_args"]["dirpath"] == str(run / "checkpoints")
    assert trainer["callbacks"][1]["init_args"]["output"] == str(run / "scores.json")
    assert base["trainer"]["logger"][0]["init_args"]["save_dir"] == "runs/base"  # the base is not changed
    # the hash names the run-independent part: the same overrides give the same hash in any directory
    assert run_config(base, {"model.init_args.optim.lr": 3e-3}, 1, tmp_path / "other")[1] == sha
    assert run_config(base, {"model.init_args.optim.lr": 1e-2}, 1, run)[1] != sha


@pytest.mark.parametrize("logger, expected", [
    (None, {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "R", "name": "", "version": ""}}),
    (False, False),
    ({"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"run_name": "mine"}},
     {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"run_name": "mine", "save_dir": "R"}}),
    ({"class_path": "my.Logger", "init_args": {"token": 1}}, {"class_path": "my.Logger", "init_args": {"token": 1}}),
])
def test_run_loggers(logger, expected):
    """No logger: TensorBoard in the run dir; off stays off; a tracker keeps its own run name; a
    class we do not know keeps its arguments (it may take no save_dir)."""
    assert run_loggers(logger, Path("R"), "label") == expected


def test_get_dotted_follows_set_dotteds_paths_and_errors_name_the_key():
    cfg = {"trainer": {"callbacks": [{"class_path": "a.ModelCheckpoint", "init_args": {"dirpath": "x"}}]}}
    assert get_dotted(cfg, "trainer.callbacks.ModelCheckpoint.init_args.dirpath") == "x"
    assert get_dotted(cfg, "trainer.callbacks.0.init_args.dirpath") == "x"
    assert get_dotted(cfg, "model.init_args.optim.lr") is None and get_dotted(cfg, "trainer.callbacks.5") is None
    with pytest.raises(ConfigError, match="'trainer.callbacks.Missing.x'.*no item of class 'Missing'"):
        set_dotted(cfg, "trainer.callbacks.Missing.x", 1)
    with pytest.raises(ConfigError, match="unknown top-level key 'modle'"):
        set_dotted(cfg, "modle.x", 1)


def test_load_yaml_reads_exponents_as_floats(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nname: 1e3x\n")
    assert load_yaml(tmp_path / "c.yaml") == {"lr": 1e-3, "name": "1e3x"}
