"""`esft sweep`: a grid of overrides x seeds over a tiny base config, resumable, with reports.

Every run is a real `python -m esft.cli fit` subprocess (~6 s each on 2 CPU cores), so the
tests share one sweep (run in two passes, the first stopped after one run) and keep grids small.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import esft.runs as runs
from esft.commands.sweep import load_grid, main, plan
from esft.runconfig import ConfigError, set_dotted

from conftest import TINY, alive, wait_for


def base_config(root: Path) -> Path:
    """The shape of tests/test_e2e.py's `config()`: tiny Llama, 2 steps, 4 eval examples."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "log_every_n_steps": 1,
            "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root / "base"),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "base"), "name": "", "version": ""}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "base" / "checkpoints"), "every_n_train_steps": 2,
                               "save_last": True}},
                {"class_path": "esft.callbacks.TokenThroughput", "init_args": {"log_every_n_steps": 1}},
                {"class_path": "esft.callbacks.TaskEvaluation",
                 "init_args": {"tasks": ["reverse_words"], "num_examples": 4, "max_new_tokens": 8}},
            ],
        },
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16,
                                "optim": {"lr": 1e-2, "warmup_steps": 1}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["arithmetic", "reverse_words"], "num_train_per_task": 48,
                               "num_val_per_task": 8, "max_length": 64, "max_tokens": 256}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_grid(root: Path, text: str) -> Path:
    path = root / "grid.yaml"
    path.write_text(text)
    return path


GRID = """
seeds: [0, 1]
axes:
  model.init_args.optim.lr: [1e-2, 3e-3]
"""
CELLS = ["lr=0.01", "lr=0.003"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 2 cells x 2 seeds sweep stopped after one run (as if killed), then rerun to the end."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["--config", str(base_config(root)), "--grid", str(write_grid(root, GRID)), "--out", str(root / "out")]
    first = root / "out" / "lr=0.01" / "seed0"
    main(args + ["--max-cells", "1"])
    assert (first / "done.json").exists()
    assert sorted(p.parent.relative_to(root / "out").as_posix() for p in (root / "out").glob("*/seed*/run.yaml")) \
        == ["lr=0.01/seed0"]
    before = ((first / "done.json").stat().st_mtime_ns, (first / "done.json").read_text())
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):
        main(args)
    return root / "out", before, printed.getvalue()


@pytest.mark.slow  # the shared 4-run sweep: 84.5 s of the default suite's 10 minutes
def test_rerun_finishes_only_the_missing_runs(resumed):
    out, (mtime, text), printed = resumed
    done = out / "lr=0.01" / "seed0" / "done.json"
    assert (done.stat().st_mtime_ns, done.read_text()) == (mtime, text)
    lines = printed.splitlines()
    assert [line for line in lines if "skip" in line] == ["[1/4] lr=0.01 seed=0  skip: done"]
    ran = sorted(line.split("  ")[0] for line in lines if "  done in " in line)
    assert ran == ["[2/4] lr=0.003 seed=0", "[3/4] lr=0.01 seed=1", "[4/4] lr=0.003 seed=1"]
    assert len(list(out.glob("*/seed*/done.json"))) == 4


@pytest.mark.slow  # the shared 4-run sweep: 84.5 s of the default suite's 10 minutes
def test_sweep_writes_results_summary_and_plot(resumed):
    import pandas as pd

    out, _, _ = resumed
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and list(results.columns[:3]) == ["cell", "seed", "model.init_args.optim.lr"]
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "eval/reverse_words/exact_match", "wall_s"} <= set(results.columns)
    assert sorted(zip(results.cell, results.seed)) == sorted((c, s) for c in CELLS for s in (0, 1))
    assert results.groupby("cell")["train/loss"].nunique().min() == 2  # the seeds differ

    summary = (out / "summary.md").read_text()
    header, _, *rows = summary.splitlines()
    assert header.startswith("| cell | n |") and "train/loss" in header
    assert [r.split(" | ")[0] for r in rows[:2]] == ["| " + c for c in CELLS]
    assert all(" | 2 | " in r and " ± " in r for r in rows[:2])
    assert len(pd.read_csv(out / "summary.csv")) == 2
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # each run lives in its own directory: config, log, TensorBoard events, checkpoints, eval.json
    run = out / "lr=0.003" / "seed1"
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["seed_everything"] == 1 and cfg["model"]["init_args"]["optim"]["lr"] == 3e-3
    assert cfg["trainer"]["default_root_dir"] == str(run)
    assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(run / "checkpoints")
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "eval.json").exists()
    assert list(run.glob("events.out.tfevents.*")) and "$ " in (run / "log.txt").read_text()
    logged = json.loads((run / "metrics.json").read_text())["metrics"]  # what done.json's metrics come from
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "eval/reverse_words/exact_match"} <= set(logged)
    assert json.loads((run / "done.json").read_text())["metrics"]["eval/reverse_words/exact_match"] >= 0.0


@pytest.mark.slow  # the shared 4-run sweep: 84.5 s of the default suite's 10 minutes
def test_metrics_option_selects_the_table_columns(resumed, tmp_path, capsys):
    out, _, _ = resumed
    root = out.parent
    main(["--config", str(root / "base.yaml"), "--grid", str(root / "grid.yaml"), "--out", str(out),
          "--metrics", "val/loss", "eval/*"])
    assert "skip" in capsys.readouterr().out
    header = "| cell | n | eval/reverse_words/exact_match | val/loss |"  # one name from eval.json and metrics.json
    assert (out / "summary.md").read_text().splitlines()[0] == header

    # a finished run is kept when its config changes, but the skip line says so
    changed = tmp_path / "grid.yaml"
    changed.write_text(GRID + "set: {trainer.log_every_n_steps: 2}\n")
    main(["--config", str(root / "base.yaml"), "--grid", str(changed), "--out", str(out), "--seeds", "0",
          "--max-cells", "0"])
    skips = [line for line in capsys.readouterr().out.splitlines() if "skip" in line]
    assert len(skips) == 2 and all("config has changed" in line for line in skips)


def test_a_failing_cell_is_recorded_and_the_others_still_run(tmp_path, capsys):
    """Also: the base config's logger (CSV here) is kept, and done.json's metrics come from the
    metrics.json every run writes, not from one logger's files."""
    grid = write_grid(tmp_path, """
seeds: [0]
set:
  trainer.logger: {class_path: lightning.pytorch.loggers.CSVLogger}
cells:
  broken: {model.init_args.optim.lr: not-a-number}
  ok: {}
""")
    args = ["--config", str(base_config(tmp_path)), "--grid", str(grid), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "broken seed=0 (exit" in captured.err
    failed = json.loads((tmp_path / "out" / "broken" / "seed0" / "failed.json").read_text())
    assert failed["returncode"] != 0 and "lr" in failed["log_tail"]
    assert not (tmp_path / "out" / "broken" / "seed0" / "done.json").exists()
    ok = tmp_path / "out" / "ok" / "seed0"
    assert {"train/loss", "val/loss"} <= set(json.loads((ok / "done.json").read_text())["metrics"])
    assert (ok / "metrics.csv").exists() and not list(ok.rglob("events.out.tfevents.*"))
    assert "1 failed: broken seed=0" in (tmp_path / "out" / "summary.md").read_text()

    # a dry rerun shows what a rerun would do: retry the failure, skip the finished run
    main(args + ["--dry-run"])
    printed = capsys.readouterr().out
    assert "[1/2] broken seed=0  failed" in printed and "[2/2] ok seed=0  done" in printed


@pytest.mark.parametrize(
    "key, message",
    [
        ("trainer.max_steps.value", "'trainer.max_steps' is 2 (int), not a mapping"),
        ("trainr.max_steps", "unknown top-level key 'trainr'"),
        ("trainer.callbacks.7.init_args.dirpath", "index 7 is out of range for 'trainer.callbacks'"),
        ("trainer.callbacks.EarlyStopping.init_args.patience", "no item of class 'EarlyStopping'"),
        ("trainer..max_steps", "bad override key"),
    ],
)
def test_a_bad_override_path_is_an_error_naming_the_key(tmp_path, capsys, key, message):
    grid = write_grid(tmp_path, f"seeds: [0]\ncells:\n  bad: {{{key}: 1}}\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(base_config(tmp_path)), "--grid", str(grid), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("esft sweep: error: ") and key in err and message in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_set_dotted_creates_keys_indexes_lists_and_picks_callbacks_by_class():
    cfg = {"trainer": {"callbacks": [{"class_path": "a.ModelCheckpoint", "init_args": {}}]}, "model": None}
    set_dotted(cfg, "model.init_args.optim.lr", 0.1)
    set_dotted(cfg, "trainer.callbacks.ModelCheckpoint.init_args.every_n_train_steps", 5)
    set_dotted(cfg, "trainer.callbacks.0.init_args.save_last", True)
    set_dotted(cfg, "seed_everything", 3)
    assert cfg == {"trainer": {"callbacks": [{"class_path": "a.ModelCheckpoint",
                                              "init_args": {"every_n_train_steps": 5, "save_last": True}}]},
                   "model": {"init_args": {"optim": {"lr": 0.1}}}, "seed_everything": 3}
    with pytest.raises(ConfigError, match="'trainer.callbacks.0.class_path.x'"):
        set_dotted(cfg, "trainer.callbacks.0.class_path.x", 1)


def test_grid_names_cells_from_axes_crossed_with_named_cells(tmp_path):
    grid = load_grid(write_grid(tmp_path, """
seeds: [1, 2]
set: {trainer.max_steps: 5}
axes:
  model.init_args.optim.lr: [1e-3, 3.0e-3]
  data.init_args.packing: [true, false]
cells:
  base: {}
  "no warmup/x": {model.init_args.optim.warmup_steps: 0}
"""), seeds=[7])
    assert grid.seeds == [7]
    assert list(grid.cells)[:2] == ["base,lr=0.001,packing=true", "base,lr=0.001,packing=false"]
    assert len(grid.cells) == 8 and all("/" not in name and " " not in name for name in grid.cells)
    assert grid.cells["no-warmup-x,lr=0.003,packing=false"] == {
        "trainer.max_steps": 5, "model.init_args.optim.warmup_steps": 0,
        "model.init_args.optim.lr": 3e-3, "data.init_args.packing": False}


def test_seed_placeholder_gives_each_run_its_own_value(tmp_path):
    grid = load_grid(write_grid(tmp_path, """
seeds: [0, 2]
set:
  data.init_args.seed: "{seed}"
  data.init_args.teacher_cache: "cache_seed{seed}.safetensors"
cells:
  a: {data.init_args.paths: ["x{seed}.jsonl", "y.jsonl"]}
"""))
    base = {"seed_everything": 9, "data": {"init_args": {"seed": 5, "note": "{seed} stays in the base config"}}}
    runs = plan(base, grid, tmp_path / "out")
    for run, seed in zip(runs, [0, 2]):
        data = run.config["data"]["init_args"]
        assert data == {"seed": seed, "note": "{seed} stays in the base config",
                        "teacher_cache": f"cache_seed{seed}.safetensors", "paths": [f"x{seed}.jsonl", "y.jsonl"]}
        assert run.config["seed_everything"] == seed
    assert runs[0].config_sha != runs[1].config_sha


def test_quickstart_study_dry_run_lists_its_cells(capsys):
    repo = Path(__file__).parents[1]
    main(["--config", str(repo / "configs/sft/quickstart.yaml"),
          "--grid", str(repo / "experiments/quickstart_lr/grid.yaml"), "--out", "/nonexistent/out", "--dry-run"])
    printed = capsys.readouterr().out
    assert "2 cells x 3 seeds = 6 runs" in printed
    assert "[1/6] lr=0.001 seed=0  pending" in printed and "[6/6] lr=0.003 seed=2  pending" in printed
    assert not Path("/nonexistent/out").exists()


# ---- two sweeps, killed sweeps, restarts: a real `esft sweep` parent with a fake `esft fit` child ----
FAKE_FIT = """
import os, signal, sys, time
from pathlib import Path
mode, run_yaml = sys.argv[1:]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "tree":  # a grandchild in the child's process group, as dataloader workers are
    import subprocess
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (Path(run_yaml).parent / "grandchild.pid").write_text(str(grandchild.pid))
(Path(run_yaml).parent / "child.pid").write_text(str(os.getpid()))
if mode != "quick":
    time.sleep(120)
"""
DRIVER = """
import signal
import sys
# as a shell's foreground command has it, whatever the test process left: Ctrl-C on, unblocked
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
import esft.commands.sweep as sweep
import esft.runs as runs
fake, mode, *args = sys.argv[1:]
runs.esft_command = lambda argv: [sys.executable, fake, mode, argv[2]]  # argv: fit --config run.yaml
sweep.main(args)
"""
ONE_CELL = "seeds: [0]\ncells:\n  slow: {}\n"


def fake_fit(root: Path) -> Path:
    path = root / "fake_fit.py"
    path.write_text(FAKE_FIT)
    return path


def sweep_args(root: Path) -> list[str]:
    return ["--config", str(base_config(root)), "--grid", str(write_grid(root, ONE_CELL)), "--out", str(root / "out")]


def start_sweep(root: Path, mode: str) -> tuple[subprocess.Popen, int]:
    """`esft sweep` of one cell in a subprocess whose child is `fake_fit.py MODE`; returns it and the child's pid."""
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(root / "driver.py"), str(fake_fit(root)), mode, *sweep_args(root)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = root / "out" / "slow" / "seed0" / "child.pid"
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the sweep's child"))
    return proc, child


def end(proc: subprocess.Popen, child: int, grandchild: int | None = None) -> None:
    for pid in (proc.pid, child, grandchild or child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def quick_child(monkeypatch, root: Path) -> None:
    fake = fake_fit(root)
    monkeypatch.setattr(runs, "esft_command", lambda argv: [sys.executable, str(fake), "quick", argv[2]])


def test_a_second_sweep_on_the_same_out_fails_at_once_naming_the_holder(tmp_path, monkeypatch, capsys):
    proc, child = start_sweep(tmp_path, "sleep")
    try:
        quick_child(monkeypatch, tmp_path)
        with pytest.raises(SystemExit) as e:
            main(sweep_args(tmp_path))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("esft sweep: error: ") and "\n" not in err
        assert str(tmp_path / "out") in err and f"pid {proc.pid}" in err
        assert alive(child) and not (tmp_path / "out" / "slow" / "seed0" / "done.json").exists()
    finally:
        end(proc, child)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_sweep_ends_its_child(tmp_path, sig):
    """SIGTERM and Ctrl-C: the sweep ends the child's whole process group and exits non-zero;
    SIGKILL runs no handler: the child gets SIGTERM from the kernel when its parent dies."""
    proc, child = start_sweep(tmp_path, "sleep" if sig == signal.SIGKILL else "tree")
    run_dir = tmp_path / "out" / "slow" / "seed0"
    grandchild = int(run_dir.joinpath("grandchild.pid").read_text()) if sig != signal.SIGKILL else None
    try:
        proc.send_signal(sig)
        proc.communicate(timeout=60)  # seconds when idle; generous for a loaded machine (reads the pipes: no stall on a full one)
        assert proc.returncode == {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: -signal.SIGINT,
                                   signal.SIGKILL: -signal.SIGKILL}[sig]
        for pid in (child, grandchild or child):
            wait_for(lambda: not alive(pid), timeout=30, what=f"pid {pid} to end after {sig.name} of the sweep")
        assert (run_dir / "RUNNING").exists() == (sig == signal.SIGKILL)  # a handler ran, or none could
        assert not (run_dir / "done.json").exists() and not (run_dir / "failed.json").exists()
    finally:
        end(proc, child, grandchild)


def test_a_second_sigterm_kills_a_child_that_ignores_the_first_at_once(tmp_path):
    proc, child = start_sweep(tmp_path, "ignore-term")
    try:
        proc.send_signal(signal.SIGTERM)  # the child ignores it: the sweep waits out its grace period ...
        time.sleep(0.5)
        assert alive(child) and proc.poll() is None
        proc.send_signal(signal.SIGTERM)  # ... unless stopped again: then SIGKILL at once
        proc.wait(timeout=10)
        assert proc.returncode == 128 + signal.SIGTERM
        wait_for(lambda: not alive(child), timeout=5, what="the child to end after the second SIGTERM")
    finally:
        end(proc, child)


def test_a_restart_keeps_a_run_dir_that_a_live_child_still_writes(tmp_path, monkeypatch, capsys):
    proc, child = start_sweep(tmp_path, "ignore-term")  # a child that outlives its sweep
    run_dir = tmp_path / "out" / "slow" / "seed0"
    try:
        proc.kill()
        proc.wait(timeout=10)
        time.sleep(0.5)
        assert alive(child)
        quick_child(monkeypatch, tmp_path)
        with pytest.raises(SystemExit) as e:
            main(sweep_args(tmp_path))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert str(run_dir) in err and f"pid {child}" in err and "\n" not in err
        assert (run_dir / "child.pid").read_text() == str(child)  # not deleted
        main(sweep_args(tmp_path) + ["--dry-run"])
        assert f"[1/1] slow seed=0  running (pid {child})" in capsys.readouterr().out
    finally:
        end(proc, child)
    wait_for(lambda: not alive(child), what="the escaped child to end")
    main(sweep_args(tmp_path))  # once it has ended, the restart runs the cell again
    assert (run_dir / "done.json").exists() and (run_dir / "child.pid").read_text() != str(child)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_sweep_ends_a_training_esft_fit_child(tmp_path, sig):
    """The real child: Lightning turns SIGTERM (from the sweep, or from the kernel after SIGKILL of
    the sweep) into a stop after the current step."""
    args = sweep_args(tmp_path)
    cfg = yaml.safe_load(Path(args[1]).read_text())
    cfg["trainer"].update(max_steps=100_000, limit_val_batches=0, callbacks=[])
    args[1] = str(tmp_path / "long.yaml")
    Path(args[1]).write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "esft.commands.sweep", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir, child = tmp_path / "out" / "slow" / "seed0", None
    try:
        wait_for(lambda: list(run_dir.glob("events.out.tfevents.*")), timeout=120, what="the child to train")
        child = int((run_dir / "RUNNING").read_text().split()[0])
        proc.send_signal(sig)
        proc.wait(timeout=60)
        wait_for(lambda: not alive(child), timeout=30, what=f"the fit child to end after {sig.name} of the sweep")
        assert proc.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
        assert yaml.safe_load((run_dir / "run.yaml").read_text())["trainer"]["max_steps"] == 100_000
    finally:
        end(proc, child or proc.pid)
