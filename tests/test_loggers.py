"""`MetricsFile`: every `esft fit` writes metrics.json beside whatever loggers the config names."""

import json
from pathlib import Path

import yaml

from esft.cli import main
from esft.loggers import MetricsFile

from conftest import TINY


def tiny_config(root: Path, logger, max_steps: int = 4) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root), "logger": logger,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}},
                                  {"class_path": "esft.callbacks.TaskEvaluation",
                                   "init_args": {"tasks": ["reverse_words"], "num_examples": 2, "max_new_tokens": 4,
                                                 "before_fit": False}}]},
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "optim": {"lr": 1e-2}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["reverse_words"], "num_train_per_task": 32, "num_val_per_task": 4,
                               "max_length": 64, "max_tokens": 256}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run.yaml"


def test_metrics_file_with_no_logger_and_beside_a_csv_logger(tmp_path):
    """Metrics from `self.log` (train/val loss) and from callbacks that log to every logger
    (TaskEvaluation's eval/*) reach metrics.json, with logging off and beside a CSV logger; the
    checkpoint directory and the first logger's files stay where they were."""
    off = tmp_path / "off"
    main(["fit", "--config", str(tiny_config(off, False))])
    logged = json.loads((off / "metrics.json").read_text())
    assert logged["step"] >= 3 and {"train/loss", "val/loss", "eval/reverse_words/exact_match"} <= set(logged["metrics"])
    assert (off / "checkpoints" / "last.ckpt").exists() and not list(off.rglob("events.out.tfevents.*"))
    # validating the run's checkpoint adds to its metrics; it does not start the file anew
    main(["validate", "--config", str(off / "run.yaml"), "--ckpt_path", str(off / "checkpoints" / "last.ckpt")])
    assert "train/loss" in json.loads((off / "metrics.json").read_text())["metrics"]

    csv = tmp_path / "csv"
    main(["fit", "--config", str(tiny_config(csv, {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                   "init_args": {"save_dir": str(csv), "name": "", "version": ""}}))])
    logged = json.loads((csv / "metrics.json").read_text())["metrics"]
    assert (csv / "metrics.csv").exists() and logged["val/loss"] == logged["val/loss"]  # finite, not null
    assert "eval/reverse_words/exact_match" in logged  # logged to every logger, not only the first
    assert "eval/reverse_words/exact_match" in (csv / "metrics.csv").read_text().splitlines()[0]


def test_a_resumed_run_keeps_the_metrics_on_file_and_a_new_one_starts_anew(tmp_path):
    logger = MetricsFile(tmp_path)
    logger.log_metrics({"val/loss": 2.0, "train/loss": 3.0}, step=10)
    logger.finalize("success")
    resumed = MetricsFile(tmp_path)
    resumed.resume = True
    resumed.log_metrics({"train/loss": 1.0}, step=12)
    resumed.finalize("success")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"step": 12, "metrics": {"val/loss": 2.0, "train/loss": 1.0}}
    fresh = MetricsFile(tmp_path)
    fresh.log_metrics({"train/loss": float("nan")}, step=1)
    fresh.finalize("success")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"step": 1, "metrics": {"train/loss": None}}
