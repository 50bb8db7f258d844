"""End to end through the CLI: train a tiny model, checkpoint, interrupt, resume, export."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from esft.cli import main

from conftest import TINY


class Interrupt(Exception):
    pass


class InterruptAt(L.Callback):
    """Crashes the run when it reaches `step` (after that step's checkpoint, if any)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Interrupt(f"interrupted at step {self.step}")


def config(root: Path, max_steps: int, extra_callbacks=(), accelerator: str = "cpu", **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": accelerator, "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
            "val_check_interval": 4, "check_val_every_n_epoch": None, "enable_progress_bar": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": "", "version": ""}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 4,
                               "save_last": True, "save_top_k": -1}},
                {"class_path": "esft.callbacks.TokenThroughput", "init_args": {"log_every_n_steps": 1}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                {"class_path": "esft.callbacks.TaskEvaluation",
                 "init_args": {"tasks": ["reverse_words"], "num_examples": 4, "max_new_tokens": 8}},
                {"class_path": "esft.callbacks.ExportHF"},
                *extra_callbacks,
            ],
        },
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16,
                                "optim": {"lr": 1e-2, "warmup_steps": 2}}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["arithmetic", "reverse_words"], "num_train_per_task": 48,
                               "num_val_per_task": 8, "max_length": 64, "max_tokens": 256, **data}},
    }
    path = root / "run.yaml"  # not config.yaml: LightningCLI saves the resolved config there
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    main(["fit", "--config", str(config(root, 10))])
    return root


def test_fit_logs_evaluates_and_exports(uninterrupted):
    root = uninterrupted
    assert (root / "checkpoints" / "last.ckpt").exists() and (root / "checkpoints" / "epoch=0-step=4.ckpt").exists()
    assert not list((root / "checkpoints").glob("*.tmp"))
    results = json.loads((root / "eval.json").read_text())
    assert set(results) >= {"before", "after"} and results["steps"] == 10
    events = list(root.glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "perf/tflops", "perf/padding_fraction", "perf/peak_memory_gib",
            "lr-AdamW/pg1", "eval/reverse_words"} <= tags
    assert "perf/mfu" not in tags  # no known peak on a CPU
    assert all(e.value > 0 for e in acc.Scalars("perf/tflops"))
    assert all(0.0 <= e.value < 0.25 for e in acc.Scalars("perf/padding_fraction"))  # filler at row ends (SDPA rows)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses[-1] < losses[0]


def test_exported_model_loads_in_transformers(uninterrupted):
    hf = uninterrupted / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 1?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, uninterrupted):
    interrupt = {"class_path": "test_e2e.InterruptAt", "init_args": {"step": 6}}
    cfg = config(tmp_path, 10, extra_callbacks=[interrupt])
    with pytest.raises(Interrupt):
        main(["fit", "--config", str(cfg)])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    main(["fit", "--config", str(config(tmp_path, 10)), "--ckpt_path", "last"])
    resumed, full = weights(tmp_path), weights(uninterrupted)
    assert resumed.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=1e-5, msg=name)


def padding_fractions(root: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(root)).Reload().Scalars("perf/padding_fraction")]


def test_flat_packing_has_no_padding_and_padded_baseline_has_some(tmp_path):
    main(["fit", "--config", str(config(tmp_path / "flat", 3, layout="flat"))])
    assert padding_fractions(tmp_path / "flat") == [0.0, 0.0, 0.0]
    main(["fit", "--config", str(config(tmp_path / "padded", 3, packing=False, batch_size=8))])
    assert min(padding_fractions(tmp_path / "padded")) > 0.0


def test_validate_test_and_predict_from_a_checkpoint(tmp_path, uninterrupted):
    writer = {"class_path": "esft.callbacks.JSONLPredictionWriter", "init_args": {"path": str(tmp_path / "pred.jsonl")}}
    cfg = str(config(tmp_path, 10, extra_callbacks=[writer]))
    ckpt = str(uninterrupted / "checkpoints" / "last.ckpt")
    for command, metric in (("validate", "val/loss"), ("test", "test/loss")):
        cli = main([command, "--config", cfg, "--ckpt_path", ckpt])
        assert 0 < float(cli.trainer.callback_metrics[metric]) < 10
    main(["predict", "--config", cfg, "--ckpt_path", ckpt, "--model.init_args.max_new_tokens", "8"])
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 16  # 8 held-out records per task
    assert all(set(r) >= {"messages", "completion", "reference", "score"} for r in rows)
    assert rows[0]["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "mixtral"])
def test_model_families_train_through_the_cli(tmp_path, family):
    cfg = str(config(tmp_path, 3))
    cli = main(["fit", "--config", cfg, "--model.init_args.model_config", json.dumps(TINY[family])])
    assert cli.model.model.config.model_type == family and cli.trainer.global_step == 3


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": "What is 1 + 1?", "response": "2"}] * 8,
        [{"instruction": "Reverse", "input": "apple river", "output": "river apple"}] * 8,
        [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                       {"role": "assistant", "content": "d"}]}] * 8,
        [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}] * 8,
    ],
    ids=["prompt_response", "alpaca", "messages", "sharegpt"],
)
def test_data_path_in_each_format(tmp_path, rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = main(["fit", "--config", str(config(tmp_path, 2)), "--data.init_args.path", str(data),
                "--data.init_args.val_fraction", "0.25"])
    assert len(cli.datamodule.train_examples) == 6 and cli.trainer.global_step == 2


def test_bad_data_ends_the_command_with_file_and_line(tmp_path, monkeypatch, capsys):
    from esft.cli import run

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ""}\n')
    monkeypatch.setattr("sys.argv", ["esft", "fit", "--config", str(config(tmp_path, 2)), "--data.init_args.path", str(data)])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    assert f"esft: error: {data}:2: field 'response' is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_reaches_its_target(tmp_path):
    """The README's default run: exact match on held-out reversals rises from ~0 to >= 0.9 (1.00 with
    seeds 0 and 1 when measured; arithmetic stays low at this budget and is explained under the table)."""
    text = (Path(__file__).parents[1] / "configs" / "sft" / "quickstart.yaml").read_text()
    (tmp_path / "quickstart.yaml").write_text(text.replace("runs/quickstart", str(tmp_path)).replace("save_dir: runs", f"save_dir: {tmp_path}"))
    main(["fit", "--config", str(tmp_path / "quickstart.yaml"), "--trainer.enable_progress_bar", "false"])
    results = json.loads((tmp_path / "quickstart" / "eval.json").read_text())
    assert results["before"]["reverse_words"] <= 0.05
    assert results["after"]["reverse_words"] >= 0.9
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_fine_tune_a_pretrained_directory_with_worker_processes(tmp_path, uninterrupted):
    """model_name_or_path loads weights and tokenizer from a HF directory (here our own export)."""
    cli = main(["fit", "--config", str(config(tmp_path, 2, num_workers=2)), "--model.init_args.model_config", "null",
                "--model.init_args.model_name_or_path", str(uninterrupted / "hf")])
    assert cli.datamodule.hparams.tokenizer_name == str(uninterrupted / "hf")
    start, tuned = weights(uninterrupted), weights(tmp_path)
    assert tuned.keys() == start.keys() and any(not torch.equal(tuned[k], start[k]) for k in start)
    # it starts from the trained weights: its first loss is well below a random init's
    assert first_loss(tmp_path) < first_loss(uninterrupted) - 0.5


def first_loss(root: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(root)).Reload().Scalars("train/loss")[0].value
