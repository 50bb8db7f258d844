"""Curation inside SFTDataModule (curation, curriculum, exact resume), TensorBoard logging of the
report, and `esft curate` writing the input's format plus its report."""

import json

import pytest
import yaml

from esft.cli import _project_command
from esft.curation.pipeline import curate
from esft.curation.report import log_report
from esft.data import SFTDataModule
from esft.data.tasks import build_task


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_CACHE", str(tmp_path / "cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_datamodule_curates_then_orders_easy_to_hard_and_resumes_exactly(tmp_path):
    records = build_task("arithmetic").generate(60, seed=0) + build_task("reverse_words").generate(60, seed=0)
    path = write_jsonl(tmp_path / "d.jsonl", records + records[:20])  # 20 planted exact duplicates
    dm = SFTDataModule(path=path, tokenizer_name="builtin", max_length=64, max_tokens=256, layout="flat",
                       curation=[{"filter": "exact_dedup"}, {"select": "random", "budget": 100}],
                       curriculum={"name": "length", "unit": "tokens"})
    dm.setup("fit")
    lengths = [e["length"] for e in dm.train_examples]
    assert len(lengths) == 100 and lengths == sorted(lengths)
    batches = list(dm.train_dataloader())
    seen = [int(n) for b in batches for n in b["cu_seqlens"].diff()]
    assert seen == lengths, "a curriculum visits examples in score order"
    assert [b["input_ids"].tolist() for b in dm.train_dataloader()] == [b["input_ids"].tolist() for b in batches]
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches_done": 2})
    resumed = list(loader)
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in batches[2:]]


def test_report_is_logged_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = build_task("arithmetic").generate(30, seed=0)
    _, report = curate(records + records[:5], [{"filter": "exact_dedup"},
                                               {"select": "top_k", "score": {"name": "length"}, "budget": 10}], log=False)
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    log_report(logger, report)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert events.Scalars("curation/0_0_exact_dedup/removed")[0].value == 5
    assert events.Scalars("curation/output")[0].value == 10
    assert "curation/1_1_top_k/scores" in events.Tags()["histograms"]


def test_esft_curate_keeps_input_format_and_writes_report(tmp_path):
    rows = [{"instruction": f"Add {a} and {b}", "input": "", "output": str(a + b)} for a in range(8) for b in range(5)]
    rows += [rows[3], {"instruction": "Say nothing", "input": "", "output": "   x"}]
    rows.append({"instruction": "Repeat", "input": "", "output": "la la la la la la la la la la"})
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"curation": [
        {"filter": "degenerate"}, {"filter": "exact_dedup"},
        {"select": "top_k", "score": {"name": "length", "field": "prompt"}, "budget": 0.5, "name": "longest"},
    ]}))
    _project_command("curate")(["--input", data, "--config", str(config), "--out", str(tmp_path / "out")])
    out = [json.loads(line) for line in (tmp_path / "out" / "alpaca.jsonl").read_text().splitlines()]
    assert len(out) == round(0.5 * len(rows)) and all(r in rows[:40] for r in out)  # same alpaca rows, unchanged
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["removed"] for s in report["stages"]] == [1, 1, len(rows) - 2 - len(out)]
    assert report["formats"] == ["alpaca"]
    assert (tmp_path / "out" / "scores_longest.png").stat().st_size > 1000
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert removed[0]["stage"] == "0:degenerate" and "la la" in removed[0]["messages"][1]["content"]
    assert "| longest |" in (tmp_path / "out" / "report.md").read_text()


def test_fit_with_curation_logs_the_report_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from esft.cli import main
    from tests.conftest import TINY

    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "", "version": ""}}},
        "model": {"class_path": "esft.objectives.SFTModule", "init_args": {"model_config": TINY["llama"]}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["arithmetic"], "num_train_per_task": 40, "num_val_per_task": 0,
                               "max_length": 64, "max_tokens": 256,
                               "curation": [{"select": "random", "budget": 10}]}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    assert len(cli.datamodule.train_examples) == 10
    events = EventAccumulator(str(tmp_path)).Reload()
    assert events.Scalars("curation/0_0_random/removed")[0].value == 30
