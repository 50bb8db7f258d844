"""Metric conventions: token accuracy (trained tokens only, token-weighted over micro-batches and
validation batches), the learning rate of every parameter group, each task's own metric in
``eval.json``, and one name for a task's metric during training and in ``esft eval``."""

import json
import tempfile

import lightning as L
import pytest
import torch

from esft.data import SFTDataModule
from esft.data.tasks import TASKS
from esft.losses.ce import IGNORE_INDEX, chunked_cross_entropy, next_token_targets
from esft.losses.kd import chunked_kd_loss, chunked_topk_kd_loss
from esft.models.forward import forward_kwargs, token_loss
from esft.objectives import DistillModule, SFTModule
from esft.optim import OptimConfig, grouped_parameters, lr_factor

from conftest import TINY


# ---- token accuracy -------------------------------------------------------------------------
def test_token_accuracy_of_a_hand_batch_counts_trained_tokens_only():
    """Logits are the hidden states (identity head). Of the 5 trained targets the argmax hits 4;
    the 3 masked positions never count, in the numerator or the denominator: 4 / 5, whatever the
    chunking, and the same from the distillation losses' student logits."""
    predicted = torch.tensor([[1, 1, 0, 2], [0, 0, 4, 4]])
    targets = torch.tensor([[1, IGNORE_INDEX, 3, 2], [IGNORE_INDEX, 0, 4, IGNORE_INDEX]])
    hidden = torch.nn.functional.one_hot(predicted, 5).float().requires_grad_()
    weight = torch.eye(5)
    for chunk in (0, 2, 100):
        loss, count, correct = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk, return_correct=True)
        assert (int(count), int(correct)) == (5, 4), chunk
        loss.backward()  # the count rides along the loss's graph without breaking it
    assert len(chunked_cross_entropy(hidden, weight, targets)) == 2  # callers that do not ask get the pair
    teacher = dict(teacher_hidden=torch.randn(2, 4, 3), teacher_weight=torch.randn(5, 3))
    *_, count, correct = chunked_kd_loss(hidden, weight, targets=targets, chunk_size=2, return_correct=True, **teacher)
    assert (int(count), int(correct)) == (5, 4)
    ids, logprobs = torch.zeros(5, 2, dtype=torch.long), torch.full((5, 2), -2.0)
    *_, count, correct = chunked_topk_kd_loss(hidden, weight, ids, logprobs, targets, chunk_size=2, return_correct=True)
    assert (int(count), int(correct)) == (5, 4)


class Logged(L.Callback):
    """The logged value of `name` after every training batch."""

    def __init__(self, name: str) -> None:
        self.name, self.values = name, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.name in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.name]))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A long response the model is first taught, and a short one it is not: per-record token
    accuracies far apart, trained-token counts about 10-fold apart, too long to share a 64-token row."""
    path = tmp_path_factory.mktemp("data") / "uneven.jsonl"
    rows = [{"prompt": "say it", "response": " ".join(["alpha beta"] * 5)},
            {"prompt": " ".join(["please answer this question"] * 3), "response": "no way"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data(path: str, max_tokens: int) -> SFTDataModule:
    return SFTDataModule(path=path, val_path=path, tokenizer_name="builtin", max_length=64, max_tokens=max_tokens,
                         layout="rows")


def taught(module: SFTModule, path: str) -> None:
    """A few steps on the first record only, so the model predicts it well and the other badly."""
    dm = data(path, 64)
    dm.setup("fit")
    batch = next(b for b in dm.train_dataloader() if (b["labels"] != IGNORE_INDEX).sum() > 10)
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        loss, count = token_loss(module.model, batch, 16)
        (loss / count).backward()
        optimizer.step()


@torch.no_grad()
def hand_accuracy(model, path: str) -> tuple[float, float]:
    """(all correct / all trained tokens, mean of the per-record accuracies) from the model's full
    logits, one record at a time; `token_loss` counts the same, chunked or from full logits."""
    dm = data(path, 64)
    dm.setup("fit")
    hits, counts = [], []
    for batch in dm.val_dataloader():
        targets = next_token_targets(batch["labels"], batch["position_ids"])
        logits = model(**forward_kwargs(model, batch)).logits
        trained = targets != IGNORE_INDEX
        hits.append(int((logits.argmax(-1) == targets)[trained].sum()))
        counts.append(int(trained.sum()))
        for chunk in (16, 0):
            _, count, correct = token_loss(model, batch, chunk, return_correct=True)
            assert (int(count), int(correct)) == (counts[-1], hits[-1]), chunk
    assert len(counts) == 2 and max(counts) > 5 * min(counts), counts
    return sum(hits) / sum(counts), sum(h / c for h, c in zip(hits, counts)) / len(counts)


@pytest.mark.parametrize("kind", ["sft", "distill"])
def test_token_accuracy_is_all_correct_over_all_trained_tokens(uneven, kind):
    """`train/token_acc` of an optimizer step over two accumulated micro-batches, and
    `val/token_acc` over two validation batches, equal the hand count over both records (not the
    mean of the two batches' accuracies, which differs by far more than the tolerance)."""
    L.seed_everything(0)
    common = dict(model_config=TINY["llama"], loss_chunk_size=16, optim={"lr": 1e-3, "warmup_steps": 0})
    module = (DistillModule(teacher_config=dict(TINY["llama"], hidden_size=32, intermediate_size=64), alpha=0.5, **common)
              if kind == "distill" else SFTModule(**common))
    taught(module, uneven)
    expected, mean_of_means = hand_accuracy(module.model, uneven)
    assert abs(expected - mean_of_means) > 0.1, (expected, mean_of_means)

    logged = Logged("train/token_acc")
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tempfile.mkdtemp())
    validated = L.Trainer(**quiet).validate(module, data(uneven, 64), verbose=False)[0]["val/token_acc"]
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[logged], **quiet)
    trainer.fit(module, data(uneven, 64))
    assert logged.values == [pytest.approx(expected, abs=1e-6)]
    assert validated == pytest.approx(expected, abs=1e-6)


# ---- learning rate per parameter group ------------------------------------------------------
class GroupRates(L.Callback):
    """Each step: the optimizer's own per-group LRs as it steps, and what the module logged."""

    def __init__(self) -> None:
        self.optimizer, self.logged = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer.append({g["group"]: g["lr"] for g in optimizer.param_groups})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.logged.append({k[len("train/lr/"):]: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("train/lr/")})


def test_every_parameter_group_logs_the_lr_it_steps_with(tmp_path):
    """``train/lr/<group>`` is logged per optimizer group, named as `grouped_parameters` names them,
    with the multiplier applied and the schedule's factor of the step (warmup, then cosine)."""
    rates = GroupRates()
    optim = {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 2, "lr_multipliers": {"*embed_tokens*": 0.1}}
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=[rates])
    dm = SFTDataModule(tasks=["reverse_words"], num_train_per_task=32, num_val_per_task=0, max_length=64, max_tokens=128)
    trainer.fit(SFTModule(model_config=dict(TINY["llama"], tie_word_embeddings=False), loss_chunk_size=16, optim=optim), dm)
    peaks = {"decay": 1e-2, "no_decay": 1e-2, "no_decay*0.1": 1e-3}
    assert len(rates.logged) == 4
    for step, (logged, stepped) in enumerate(zip(rates.logged, rates.optimizer)):
        assert logged == pytest.approx(stepped, rel=1e-6)
        factor = lr_factor(step, 4, 2, "cosine", 0.1)
        assert logged == pytest.approx({g: peak * factor for g, peak in peaks.items()}, rel=1e-6), step


def test_groups_of_the_same_name_are_told_apart():
    """Two patterns with the same multiplier give two groups: their names (and logged LRs) differ."""
    model = SFTModule(model_config=TINY["llama"]).model
    cfg = OptimConfig(lr_multipliers={"*embed_tokens*": 0.1, "*norm*": 0.1})
    assert [g["group"] for g in grouped_parameters(model, cfg)] == ["decay", "no_decay", "no_decay*0.1", "no_decay*0.1#2"]


# ---- evaluation metric names ----------------------------------------------------------------
def test_every_task_declares_its_metric():
    metrics = {name: cls.metric for name, cls in TASKS.items()}
    assert all(m and m.isidentifier() for m in metrics.values()), metrics
    assert metrics["translate"] == "chrf" and metrics["extract_fields"] == "rouge_l"
    assert metrics["arithmetic"] == "exact_match" and metrics["math_word"] == "accuracy"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps with `TaskEvaluation` on a chrF task and an exact-match task, then `esft eval` on
    the export with the same held-out records (the callback's seed, split and count)."""
    import yaml

    from esft.cli import main, run

    from test_e2e import config

    root = tmp_path_factory.mktemp("run")
    tasks = ["translate", "reverse_words"]
    path = config(root, 4)  # validation at step 4
    cfg = yaml.safe_load(path.read_text())
    evaluation = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("TaskEvaluation"))
    evaluation["init_args"].update(tasks=tasks, output=str(root / "eval" / "eval.json"))
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    out = root / "esft_eval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["esft", "eval", "--model", str(root / "hf"), "--tasks", *tasks, "--num-examples", "4",
                                "--max-new-tokens", "8", "--out", str(out)])
        run()
    return root, out


def scalars(directory) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory)).Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def test_eval_json_names_each_tasks_metric(trained):
    root, _ = trained
    results = json.loads((root / "eval" / "eval.json").read_text())
    assert results["metrics"] == {"translate": "chrf", "reverse_words": "exact_match"}
    assert set(results["scalars"]["after"]) == {"eval/translate/chrf", "eval/translate/bleu",
                                                "eval/reverse_words/exact_match"}
    for when in ("before", "after"):  # the plain task -> score mapping: the score in the task's metric
        assert results[when] == {"translate": results["scalars"][when]["eval/translate/chrf"],
                                 "reverse_words": results["scalars"][when]["eval/reverse_words/exact_match"]}
    tags = scalars(root)
    assert {"train/token_acc", "val/token_acc", "train/lr/decay", "train/lr/no_decay"} <= set(tags)
    assert set(results["scalars"]["after"]) <= set(tags) and not any(t.count("/") == 1 for t in tags if t.startswith("eval/"))
    assert all(0.0 <= tags[t] <= 1.0 for t in ("train/token_acc", "val/token_acc"))


def test_training_and_esft_eval_give_a_metric_the_same_name_and_value(trained):
    """The exported model evaluated by `esft eval` on the same records logs every name the
    callback logged after training, with the same value; `esft eval` adds pass@1 and n."""
    root, out = trained
    during = json.loads((root / "eval" / "eval.json").read_text())["scalars"]["after"]
    after = scalars(out)
    assert set(during) <= set(after)
    assert {t: after[t] for t in during} == pytest.approx(during, abs=1e-6)
    assert {"eval/translate/pass@1", "eval/reverse_words/n"} <= set(after)
    report = json.loads((out / "results.json").read_text())["results"]
    assert set(report["translate"]) == {"chrf", "bleu", "pass@1", "n"}
