import json

import lightning as L
import pytest
import yaml

from esft.cli import main
from esft.data import SFTDataModule
from esft.data.packing import PackingNeeds
from esft.data.records import DataFormatError
from esft.objectives import SFTModule

from conftest import TINY


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conversations(n):
    return [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"Reverse: apple river {i}"},
                          {"role": "assistant", "content": f"{i} river apple"},
                          {"role": "user", "content": "again"},
                          {"role": "assistant", "content": f"{i} river apple"}]} for i in range(n)]


@pytest.fixture
def report(capfd, caplog):
    """The data-preparation report printed since the last call (Lightning logs to stderr or to
    the logging tree, depending on how the process configured logging)."""
    caplog.set_level("INFO")

    def read():
        text = capfd.readouterr().err + caplog.text
        caplog.clear()
        return text

    return read


def make(path, **kw):
    kw.setdefault("tokenizer_name", "builtin")
    dm = SFTDataModule(path=path, max_length=64, max_tokens=256, **kw)
    dm.setup("fit")
    return dm


def test_val_fraction_and_packed_loader(tmp_path):
    dm = make(write_jsonl(tmp_path / "d.jsonl", conversations(40)), val_fraction=0.25, layout="flat")
    assert len(dm.train_examples) == 30 and len(dm.val_examples) == 10
    batches = list(dm.train_dataloader())
    assert sum(len(b["cu_seqlens"]) - 1 for b in batches) == 30
    assert all(b["input_ids"].shape[0] == 1 and b["num_tokens"] <= 256 and b["num_padding"] == 0 for b in batches)
    assert sum(b["num_tokens"] for b in dm.val_dataloader()) == sum(e["length"] for e in dm.val_examples)
    dm.hparams.layout = "rows"  # one row per packed row of <= max_length tokens
    batches = list(dm.train_dataloader())
    assert all(b["input_ids"].shape[1] <= 64 and b["input_ids"].numel() <= 256 for b in batches)
    assert sum(b["num_tokens"] for b in batches) == sum(e["length"] for e in dm.train_examples)


def test_val_path_and_padded_loader(tmp_path):
    dm = make(write_jsonl(tmp_path / "a.jsonl", conversations(9)), val_path=write_jsonl(tmp_path / "b.jsonl", conversations(3)),
              packing=False, batch_size=4)
    assert len(dm.val_examples) == 3
    shapes = [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
    assert [s[0] for s in shapes] == [4, 4, 1]


def test_extra_paths_add_training_records_beside_builtin(tmp_path):
    extra = write_jsonl(tmp_path / "rs.jsonl", conversations(5))
    base = make("builtin", tasks=["arithmetic"], num_train_per_task=20, num_val_per_task=4)
    dm = make("builtin", tasks=["arithmetic"], num_train_per_task=20, num_val_per_task=4, extra_paths=[extra, extra])
    assert len(base.train_examples) == 20 and len(dm.train_examples) == 30
    assert [e["input_ids"] for e in dm.train_examples[:20]] == [e["input_ids"] for e in base.train_examples]
    assert len(dm.val_examples) == 4  # validation comes from `path` only
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make("builtin", tasks=["arithmetic"], num_train_per_task=4, extra_paths=[str(tmp_path / "missing.jsonl")])


def test_builtin_validation_from_the_training_split(tmp_path):
    """``val_split: train`` validates on training-split problems that are not trained on: apart
    from the held-out problems evaluations score, and without any prompt the training data holds
    (an `extra_paths` file of samples on training prompts included)."""
    from esft.data.datamodule import prompt_key
    from esft.data.tasks import build_task
    from esft.data.tasks.base import split_of

    kw = dict(tasks=["reverse_words"], num_train_per_task=40, num_val_per_task=10)
    dm = make("builtin", val_split="train", **kw)
    train, val = dm.load_records()
    prompts = lambda rs: {r["messages"][-2]["content"] for r in rs}  # noqa: E731
    assert len(train) == 40 and len(val) == 10 and not prompts(train) & prompts(val)
    assert all(split_of(p) == "train" for p in prompts(val))
    heldout = make("builtin", **kw).load_records()[1]
    assert all(split_of(p) == "heldout" for p in prompts(heldout))
    assert [e["input_ids"] for e in dm.train_examples] == [e["input_ids"] for e in make("builtin", **kw).train_examples]
    # samples on three of the validation prompts arrive as extra training data: those three leave
    extra = build_task("reverse_words").generate(50, seed=0, split="train")[40:43]
    dm = make("builtin", val_split="train", extra_paths=[write_jsonl(tmp_path / "rs.jsonl", extra)], **kw)
    train, val = dm.load_records()
    assert len(val) == 7 and not {prompt_key(r) for r in train} & {prompt_key(r) for r in val}
    with pytest.raises(ValueError, match="val_split='validation': with path: builtin"):
        make("builtin", val_split="validation", **kw)


def test_skip_policy_reports_counts(tmp_path, report):
    rows = conversations(5) + [{"prompt": "p", "response": ""}, {"prompt": "p", "response": " "}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"d\.jsonl:6: field 'response' is empty"):
        make(path)
    report()
    dm = make(path, on_bad_record="skip")
    assert len(dm.train_examples) == 5
    text = report()
    assert "7 rows read" in text and "2 skipped under on_bad_record=skip" in text and "d.jsonl:6" in text


def test_truncation_is_reported(tmp_path, report):
    rows = [{"prompt": "Reverse: " + " ".join(["apple"] * 80), "response": "apple"}, {"prompt": "hi", "response": "yo"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report()
    dm = make(path, truncation="drop")
    assert len(dm.train_examples) == 1
    assert "dropped: 1 x longer than max_length" in report()
    make(path)  # truncation="right"
    assert "1 truncated to max_length=64" in report()
    with pytest.raises(DataFormatError, match="no training examples"):
        make(write_jsonl(tmp_path / "e.jsonl", rows[:1]), truncation="drop")


def test_builtin_tasks_are_disjoint_from_validation():
    dm = make("builtin", tasks=["reverse_words"], num_train_per_task=50, num_val_per_task=10)
    assert len(dm.train_examples) == 50 and len(dm.val_examples) == 10
    train = {tuple(e["input_ids"]) for e in dm.train_examples}
    assert not train & {tuple(e["input_ids"]) for e in dm.val_examples}


def test_max_length_above_budget_is_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        SFTDataModule(max_length=512, max_tokens=256)


def test_truncation_error_names_file_and_line_after_the_validation_shuffle(tmp_path):
    rows = conversations(12)
    rows[6] = {"prompt": "Reverse: " + " ".join(["apple"] * 80), "response": "apple"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"^{path}:7: \d+ tokens exceed max_length=64 \(truncation='error'\)$"):
        make(path, truncation="error", val_fraction=0.25, seed=3)


def test_chat_template_option_takes_a_family_or_a_file_and_multiturn(tmp_path, report):
    think = [{"messages": [{"role": "user", "content": "Reverse: a b"},
                           {"role": "assistant", "content": "<think>\nswap\n</think>\n\nb a"},
                           {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "<think>\nswap\n</think>\n\nb a"}]}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", think)
    # Qwen3 drops the first turn's reasoning once the second follows: one example per turn
    assert len(make(path, chat_template="qwen3").train_examples) == 6
    assert len(make(path, chat_template="qwen3", multiturn="last").train_examples) == 3
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", encoding="utf-8")
    dm = make(path, chat_template=str(template))
    assert dm.tokenizer.chat_template == template.read_text() and len(dm.train_examples) == 3
    with pytest.raises(ValueError, match=r"chat_template 'mistral': tokenizer .* has no single token for <s>, </s>"):
        make(path, chat_template="mistral")


class NoModelTrainer(L.Trainer):
    """A trainer whose model the data must not read: its packing needs come through `connect`."""

    @property
    def lightning_module(self):
        raise AssertionError("the DataModule read trainer.lightning_module")


def test_connect_sets_the_packed_layout_without_reading_the_model(tmp_path):
    dm = SFTDataModule(path=write_jsonl(tmp_path / "d.jsonl", conversations(24)), tokenizer_name="builtin",
                       max_length=64, max_tokens=256)
    dm.trainer = NoModelTrainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    dm.setup("fit")

    def shapes():
        return {tuple(b["input_ids"].shape) for b in dm.train_dataloader()}

    assert all(rows > 1 and width <= 64 for rows, width in shapes())  # unconnected: rows
    dm.connect(PackingNeeds(layout="flat"))
    assert all(rows == 1 for rows, _ in shapes()) and max(width for _, width in shapes()) > 64
    dm.connect(PackingNeeds(layout="flat", static_shapes=True))
    assert shapes() == {(1, 256)}
    dm.connect(PackingNeeds(layout="rows", static_shapes=True))
    assert shapes() == {(4, 64)}
    dm.hparams.layout, dm.hparams.pad_to_budget = "flat", False  # the options win over the model's needs
    assert all(rows == 1 for rows, _ in shapes()) and (1, 256) not in shapes()


class BatchShapes(L.Callback):
    def __init__(self) -> None:
        self.shapes = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.shapes.append(tuple(batch["input_ids"].shape))


def test_objective_connects_its_packing_needs_through_lightning(tmp_path):
    """The objective's attention path decides the layout of the batches it trains on: flat for
    varlen (on CPU: attention per document), where an unconnected DataModule packs rows."""
    module = SFTModule(model_config=TINY["llama"], attn_implementation="esft_varlen", loss_chunk_size=16)
    dm = SFTDataModule(tokenizer_name="builtin", tasks=["reverse_words"], num_train_per_task=32, num_val_per_task=0,
                       max_length=64, max_tokens=256)
    seen = BatchShapes()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                        callbacks=[seen])
    trainer.fit(module, dm)
    assert dm.needs == module.packing_needs() == PackingNeeds(layout="flat")
    assert len(seen.shapes) == 2 and all(rows == 1 for rows, _ in seen.shapes) and max(w for _, w in seen.shapes) > 64
    compiled = SFTModule(model_config=TINY["llama"], compile=True)  # compiled later, in configure_model
    assert compiled.packing_needs() == PackingNeeds(layout="rows", static_shapes=True)


class ShortAnswers(SFTDataModule):
    """Trains on the records whose answer has at most `max_chars` characters: only the records
    stage is overridden, so the filter applies to cached file sources too."""

    def __init__(self, max_chars: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_chars = max_chars

    def load_records(self):
        train, val = super().load_records()
        return [r for r in train if len(r["messages"][-1]["content"]) <= self.max_chars], val


def test_subclass_overriding_a_public_stage_trains_through_the_cli(tmp_path):
    rows = [{"prompt": f"Say {i}", "response": "ab" * (i % 3 + 1)} for i in range(30)]  # 2, 4, 6 characters
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16}},
        "data": {"class_path": "test_datamodule.ShortAnswers",
                 "init_args": {"path": write_jsonl(tmp_path / "d.jsonl", rows), "val_fraction": 0.2,
                               "max_length": 32, "max_tokens": 64}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(tmp_path / "run.yaml")])
    held = {r["messages"][0]["content"] for r in cli.datamodule.val_records}
    kept = [r for r in rows if len(r["response"]) <= 2 and r["prompt"] not in held]
    assert len(cli.datamodule.train_examples) == len(kept) < 24 and len(cli.datamodule.val_examples) == 6
    assert cli.trainer.global_step == 2
