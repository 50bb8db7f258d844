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


class StartWeights(L.Callback):
    """Keeps a copy of the model's parameters as training starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}


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
            "train/lr/decay", "train/lr/no_decay", "train/token_acc", "val/token_acc",
            "eval/reverse_words/exact_match"} <= tags
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
    # the loss of the step-8 checkpoint is the val/loss the run logged after its 8th step (TensorBoard
    # step 7: the index of the batch it followed), from the same weights and data; `esft test` reports
    # it on the validation data too. A fresh model or another step's weights give another value.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {e.step: e.value for e in EventAccumulator(str(uninterrupted)).Reload().Scalars("val/loss")}
    assert set(logged) == {3, 7} and abs(logged[7] - logged[3]) > 1e-3
    step8 = str(uninterrupted / "checkpoints" / "epoch=0-step=8.ckpt")
    for command, metric in (("validate", "val/loss"), ("test", "test/loss")):
        cli = main([command, "--config", cfg, "--ckpt_path", step8])
        assert abs(float(cli.trainer.callback_metrics[metric]) - logged[7]) < 1e-6, command
    ckpt = str(uninterrupted / "checkpoints" / "last.ckpt")
    main(["predict", "--config", cfg, "--ckpt_path", ckpt, "--model.init_args.max_new_tokens", "8"])
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 16  # 8 held-out records per task
    assert all(set(r) >= {"messages", "completion", "reference", "score"} for r in rows)
    assert rows[0]["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "mixtral"])
def test_model_families_train_through_the_cli(tmp_path, family):
    """Every step sees the same batch (one repeated record): its loss must fall well below the
    first step's, and every parameter (attention, norms, router, routed and shared experts) must move."""
    data = tmp_path / "data.jsonl"
    data.write_text((json.dumps({"prompt": "Reverse: apple river stone", "response": "stone river apple"}) + "\n") * 8)
    cfg = str(config(tmp_path, 4, extra_callbacks=[{"class_path": "test_e2e.StartWeights"}]))
    cli = main(["fit", "--config", cfg, "--model.init_args.model_config", json.dumps(TINY[family]),
                "--data.init_args.path", str(data), "--data.init_args.val_fraction", "0.25"])
    assert cli.model.model.config.model_type == family and cli.trainer.global_step == 4
    losses = train_losses(tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    start = next(c for c in cli.trainer.callbacks if isinstance(c, StartWeights)).weights
    end = dict(cli.model.model.named_parameters())
    assert start.keys() == end.keys()
    unchanged = [k for k in start if torch.equal(start[k], end[k].detach())]
    assert not unchanged, unchanged


def train_losses(root: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(root)).Reload().Scalars("train/loss")]


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



def run_fit(monkeypatch, capsys, *argv: str) -> str:
    """`esft fit ARGV` through the console entry point; asserts status 2 and returns the one error line."""
    from esft.cli import run

    monkeypatch.setattr("sys.argv", ["esft", "fit", *argv])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esft: error:")]
    return line


def test_data_that_is_not_utf8_ends_the_command_with_file_and_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    line = run_fit(monkeypatch, capsys, "--config", str(config(tmp_path, 2)), "--data.init_args.path", str(data))
    assert line == f"esft: error: {data}:2: not UTF-8 text (byte 0xe9 at column 16); re-save the file as UTF-8"


def test_a_data_file_without_read_permission_is_named(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    path_open = Path.open

    def refuse(self, *args, **kwargs):  # as a file without read permission does for a non-root user
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return path_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    line = run_fit(monkeypatch, capsys, "--config", str(config(tmp_path, 2)), "--data.init_args.path", str(data))
    assert line == f"esft: error: {data}: permission denied"


def test_a_full_disk_while_checkpointing_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": str(tmp_path / "checkpoints"), "every_n_train_steps": 1}}
    cfg = str(config(tmp_path, 1))
    monkeypatch.setattr(torch, "save", disk_full)
    line = run_fit(monkeypatch, capsys, "--config", cfg, "--trainer.callbacks", json.dumps([checkpoints]))
    assert line == f"esft: error: {tmp_path / 'checkpoints' / 'epoch=0-step=1.ckpt'}: no space left on device"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))

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


def test_data_report_is_written_to_the_run_directory_and_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Reverse: apple river {i}", "response": f"river apple {i}"} for i in range(7)]
    rows[2] = {"prompt": "p", "response": ""}
    rows[4] = {"prompt": "Repeat apple", "response": " ".join(["apple"] * 80)}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["fit", "--config", str(config(tmp_path, 1)), "--data.init_args.path", str(data),
          "--data.init_args.on_bad_record", "skip", "--trainer.callbacks", "[]"])
    report = json.loads((tmp_path / "data_report.json").read_text())
    [source] = report["sources"]
    assert source["source"] == str(data) and source["read"] == 7 and source["skipped"] == 1
    assert source["skip_reasons"] == {"field 'response' is empty": 1}
    assert source["skip_examples"] == [f"{data}:3: field 'response' is empty"]
    train = report["train"]
    assert train["examples"] == 6 and train["truncated"] == 1 and train["dropped"] == 0
    assert 0 < train["trained_tokens"] < train["tokens"] <= 6 * 64
    scalars = EventAccumulator(str(tmp_path)).Reload()
    logged = {tag: scalars.Scalars(tag)[0].value for tag in scalars.Tags()["scalars"] if tag.startswith("data/")}
    assert logged == {"data/rows_read": 7, "data/skipped": 1, "data/examples": 6, "data/truncated": 1, "data/dropped": 0,
                      "data/tokens": train["tokens"], "data/trained_tokens": train["trained_tokens"]}


def test_a_pretrained_model_fine_tunes_in_train_mode(tmp_path):
    """`from_pretrained` returns eval mode and Lightning keeps each module's mode: without the
    module's switch a model with dropout would fine-tune with dropout off."""
    from transformers import AutoConfig

    from esft.models.tokenizer import load_tokenizer
    from esft.objectives import SFTModule
    from esft.data import SFTDataModule

    tok = load_tokenizer("builtin")
    config = AutoConfig.for_model(**TINY["llama"], vocab_size=len(tok), attention_dropout=0.1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "pretrained")
    tok.save_pretrained(tmp_path / "pretrained")
    seen = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(m.training for m in pl_module.model.modules()))

    module = SFTModule(model_name_or_path=str(tmp_path / "pretrained"))
    data = SFTDataModule(tokenizer_name=str(tmp_path / "pretrained"), tasks=["reverse_words"], num_train_per_task=8,
                         num_val_per_task=0, max_length=64, max_tokens=128)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Modes()]).fit(module, datamodule=data)
    assert seen == [True, True]
