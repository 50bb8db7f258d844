"""Runs and their files: one option (`trainer.default_root_dir`) moves every output; a resume
with other model or data options is refused; ``--ckpt_path last`` falls back to the newest
intact checkpoint; checkpoints and run files are written through fresh
temporary files, each writer its own; a diverging run stops
by default, non-zero, leaving the previous export intact; `ExportHF` replaces only its own
directories."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from esft.callbacks import ExportHF, NonFiniteGuard
from esft.checkpoint import AtomicCheckpointIO
from esft.cli import main, run

from conftest import TINY


def shipped_style_config(root: Path, max_steps: int = 4, **data) -> Path:
    """A config written as the shipped ones are: only `default_root_dir` names the run directory."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": max_steps, "log_every_n_steps": 1, "enable_progress_bar": False,
            "default_root_dir": str(root / "run"), "limit_val_batches": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"name": "", "version": ""}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1}},
                {"class_path": "esft.callbacks.TaskEvaluation",
                 "init_args": {"tasks": ["reverse_words"], "num_examples": 2, "max_new_tokens": 4, "before_fit": False}},
                {"class_path": "esft.callbacks.ExportHF"},
            ],
        },
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16, "optim": {"lr": 1e-2, "warmup_steps": 1}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["reverse_words"], "num_train_per_task": 32, "num_val_per_task": 4,
                               "max_length": 64, "max_tokens": 128, **data}},
    }
    path = root / "cfg.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def esft(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """`esft ARGV` through the console entry point: (exit status, stderr)."""
    monkeypatch.setattr("sys.argv", ["esft", *argv])
    capsys.readouterr()  # what earlier runs printed
    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("esft: error:")) or err


def test_default_root_dir_moves_every_output(tmp_path, monkeypatch):
    cfg = shipped_style_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "elsewhere"
    cli = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(other)])
    assert not (tmp_path / "run").exists() and not (tmp_path / "lightning_logs").exists()
    assert {p.name for p in (other / "checkpoints").iterdir()} >= {"last.ckpt", "epoch=0-step=2.ckpt"}
    assert (other / "eval.json").exists() and (other / "hf" / "model.safetensors").exists()
    assert list(other.glob("events.out.tfevents.*")) and (other / "config.yaml").exists()
    assert any(isinstance(c, NonFiniteGuard) for c in cli.trainer.callbacks), "a guard is on by default"


def test_a_guard_listed_in_the_config_is_not_doubled(tmp_path):
    cfg = shipped_style_config(tmp_path, max_steps=1)
    guard = '[{"class_path": "esft.callbacks.NonFiniteGuard", "init_args": {"action": "skip"}}]'
    cli = main(["fit", "--config", str(cfg), "--trainer.callbacks+", guard])
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert [g.action for g in guards] == ["skip"]


def test_resume_with_other_data_or_model_options_is_refused(tmp_path, monkeypatch, capsys):
    cfg = shipped_style_config(tmp_path)
    main(["fit", "--config", str(cfg)])
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "6",
                     "--data.init_args.tasks", '["arithmetic"]', "--model.init_args.optim.lr", "0.003")
    assert code == 2
    assert "last.ckpt was written with other options" in err and "data.tasks: ['reverse_words'] -> ['arithmetic']" in err
    assert "model.optim" in err and "--allow_config_change" in err and len(err.strip().splitlines()) == 1
    # the same options resume (a longer run is a trainer option); an explicit override resumes too
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert code == 0, err
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "8",
                     "--data.init_args.tasks", '["arithmetic"]', "--allow_config_change", "true")
    assert code == 0, err
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_last_falls_back_to_the_newest_intact_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = shipped_style_config(tmp_path)
    main(["fit", "--config", str(cfg)])
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last.ckpt").rename(ckpts / "last.ckpt.tmp")  # the disk filled while last.ckpt was written
    (ckpts / "epoch=0-step=4.ckpt").write_bytes(b"truncated")  # and the newest step checkpoint is broken
    seen = {}
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint",
                        lambda self, path, *a, **k: seen.setdefault("path", path) and torch.load(path, weights_only=False))
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert code == 0, err
    assert Path(seen["path"]).name == "epoch=0-step=2.ckpt"
    assert not list(ckpts.glob("*.tmp")), "leftover temporary files are removed"


def test_checkpoints_never_write_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "ckpt" / "last.ckpt"
    target.parent.mkdir()
    os.symlink(victim, str(target) + ".tmp")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, target)
    assert victim.read_text() == "keep me"
    assert torch.equal(torch.load(target)["x"], torch.ones(2)) and not os.path.lexists(str(target) + ".tmp")


def test_a_diverging_run_stops_non_zero_and_keeps_the_previous_export(tmp_path, monkeypatch, capsys):
    cfg = shipped_style_config(tmp_path, max_steps=8)
    main(["fit", "--config", str(cfg)])
    hf = tmp_path / "run" / "hf"
    before = load_file(hf / "model.safetensors")
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--model.init_args.optim.lr", "1e30")
    assert code == 1
    assert "esft: error: non-finite" in err and "last good checkpoint:" in err
    after = load_file(hf / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before), "the previous export is intact"
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


class _Trainer:
    is_global_zero, log_dir, default_root_dir = True, None, None


def test_export_replaces_only_directories_it_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    with pytest.raises(Exception, match=r"holds files that no esft export wrote"):
        ExportHF(str(mine)).on_fit_start(_Trainer(), None)
    assert (mine / "notes.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match=r"not an export directory"):
        ExportHF(str(tmp_path / "file")).on_fit_start(_Trainer(), None)


def test_export_refuses_the_base_model_directory(tmp_path, monkeypatch, capsys):
    cfg = shipped_style_config(tmp_path, max_steps=2)
    main(["fit", "--config", str(cfg)])
    base = tmp_path / "base"
    (tmp_path / "run" / "hf").rename(base)
    (base / ".esft-export").unlink()  # a model directory from elsewhere
    code, err = esft(monkeypatch, capsys, "fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "ft"),
                     "--model.init_args.model_config", "null", "--model.init_args.model_name_or_path", str(base),
                     "--trainer.callbacks+", json.dumps([{"class_path": "esft.callbacks.ExportHF", "init_args": {"dirpath": str(base)}}]))
    assert code == 2 and f"{base}: holds files that no esft export wrote" in err
    assert (base / "model.safetensors").exists()


def best_export_config(root: Path, mode: str, monitor: str | None = "val/loss") -> Path:
    """`shipped_style_config` validated every 2 of 6 steps, one checkpoint kept by `monitor` and
    exported with ``ExportHF(best=True)``."""
    cfg = yaml.safe_load(shipped_style_config(root, max_steps=6).read_text())
    cfg["trainer"].update(limit_val_batches=1.0, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": monitor, "mode": mode, "save_top_k": 1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # the last step's weights, to compare with
         "init_args": {"dirpath": str(root / "final"), "every_n_train_steps": 6, "save_top_k": -1}},
        {"class_path": "esft.callbacks.ExportHF", "init_args": {"best": True}},
    ]
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("mode", ["min", "max"])
def test_export_best_writes_the_monitored_optimum(tmp_path, mode):
    """``mode: max`` on the validation loss selects an early checkpoint, so the export differs
    from the last step's weights and equals the selected checkpoint's."""
    main(["fit", "--config", str(best_export_config(tmp_path, mode))])
    run = tmp_path / "run"
    source = json.loads((run / "hf" / "export.json").read_text())
    best = list((run / "checkpoints").glob("*.ckpt"))
    assert len(best) == 1 and source["weights"] == "best" and source["steps_trained"] == 6
    ckpt = torch.load(best[0], map_location="cpu", weights_only=False)
    last = torch.load(next((tmp_path / "final").glob("*step=6.ckpt")), map_location="cpu", weights_only=False)
    assert source["step"] == ckpt["global_step"] and source["monitor"] == "val/loss"
    state = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))]
    assert source["score"] == pytest.approx(float(state["best_model_score"]))
    exported = load_file(run / "hf" / "model.safetensors")
    for key, value in exported.items():
        assert torch.equal(value, ckpt["state_dict"]["model." + key]), key
    if mode == "max":  # the loss falls at lr 1e-2: the highest validation loss is the first one, not the last step
        assert source["step"] == 2
        assert not all(torch.equal(v, last["state_dict"]["model." + k]) for k, v in exported.items())


def test_export_best_needs_a_monitored_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="ModelCheckpoint with a monitor"):
        main(["fit", "--config", str(best_export_config(tmp_path, "min", monitor=None))])
    assert not (tmp_path / "run" / "hf").exists()


def test_concurrent_atomic_writes_of_one_file_neither_fail_nor_mix(tmp_path):
    import threading

    from esft.runconfig import atomic_write

    path, errors = tmp_path / "cache.json", []

    def writer(i):
        try:
            for _ in range(200):  # with one shared temporary name, a rename takes another writer's file away
                atomic_write(path, json.dumps({"writer": i, "pad": str(i) * 20000}))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    last = json.loads(path.read_text())
    assert last["pad"] == str(last["writer"]) * 20000  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left
