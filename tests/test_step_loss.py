"""The loss of an optimizer step is the mean over all of its trained tokens: gradient accumulation
over micro-batches with very different trained-token counts gives the gradient of one
micro-batch holding them all (SFT and distillation), and `train/loss` logs that mean."""

import json
import tempfile

import lightning as L
import pytest
import torch

from esft.data import SFTDataModule
from esft.data.packing import ResumableBatchSampler
from esft.objectives import DistillModule, SFTModule

from conftest import TINY


def test_step_tokens_sum_every_micro_batch_of_the_step_on_every_rank():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    world, acc = 2, 2
    samplers = [ResumableBatchSampler(11, 1, seed=1, num_replicas=world, rank=r, unit_tokens=tokens, accumulate=acc)
                for r in range(world)]
    batches = [list(s) for s in samplers]  # 5 micro-batches per rank: steps of 2, 2 and 1
    for k in range(5):
        window = range(k - k % acc, min(k - k % acc + acc, 5))
        expected = sum(tokens[u] for r in range(world) for j in window for u in batches[r][j])
        assert all(b[k].step_tokens == expected for b in batches), k


class GradRecorder(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if "train/loss" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Two records whose trained tokens differ about 20-fold, too long to share a 64-token row."""
    path = tmp_path_factory.mktemp("data") / "uneven.jsonl"
    rows = [{"prompt": "say it", "response": " ".join(["alpha beta"] * 5)},
            {"prompt": " ".join(["please answer this question"] * 3), "response": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def first_step(path: str, kind: str, max_tokens: int, accumulate: int) -> tuple[GradRecorder, torch.Tensor]:
    L.seed_everything(0)
    common = dict(model_config=TINY["llama"], loss_chunk_size=16, optim={"lr": 1e-3, "warmup_steps": 0})
    module = (DistillModule(teacher_config=dict(TINY["llama"], hidden_size=32, intermediate_size=64), alpha=0.5, **common)
              if kind == "distill" else SFTModule(**common))
    data = SFTDataModule(path=path, tokenizer_name="builtin", max_length=64, max_tokens=max_tokens, layout="rows")
    recorder = GradRecorder()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, callbacks=[recorder],
                        default_root_dir=tempfile.mkdtemp())
    trainer.fit(module, data)
    counts = [sum(1 for label in e["labels"][1:] if label != -100) for e in data.train_examples]
    return recorder, torch.tensor(counts)


@pytest.mark.parametrize("kind", ["sft", "distill"])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch_holding_both(uneven, kind):
    one, counts = first_step(uneven, kind, max_tokens=128, accumulate=1)
    two, _ = first_step(uneven, kind, max_tokens=64, accumulate=2)
    assert counts.max() > 10 * counts.min(), counts
    assert len(one.grads) == len(two.grads) == 1
    for name, grad in one.grads[0].items():
        torch.testing.assert_close(two.grads[0][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert two.losses[-1] == pytest.approx(one.losses[-1], rel=1e-5)


def test_train_loss_is_the_token_mean_of_the_step(uneven):
    recorder, _ = first_step(uneven, "sft", max_tokens=64, accumulate=2)
    L.seed_everything(0)  # the same initial weights as the run
    module = SFTModule(model_config=TINY["llama"], loss_chunk_size=16)
    data = SFTDataModule(path=uneven, tokenizer_name="builtin", max_length=64, max_tokens=128, layout="rows")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        loss_sum, count = module.token_loss(batch)
    assert recorder.losses[-1] == pytest.approx(float(loss_sum / count), rel=1e-5)


class GradNorm(L.Callback):
    """Computes the gradient norm by hand at the point the module logs it (callbacks run first)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []
        self.expected: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.expected = float(torch.cat(grads).norm())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((float(trainer.callback_metrics["train/grad_norm"]), self.expected))


def test_the_gradient_norm_before_clipping_is_logged_every_step(tmp_path):
    norms = GradNorm()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1e-3,
                        default_root_dir=str(tmp_path), callbacks=[norms])
    data = SFTDataModule(tasks=["reverse_words"], num_train_per_task=16, num_val_per_task=0, max_length=64, max_tokens=128)
    trainer.fit(SFTModule(model_config=TINY["llama"], loss_chunk_size=16), data)
    assert len(norms.pairs) == 3
    for logged, expected in norms.pairs:
        assert logged == pytest.approx(expected, rel=1e-4) and logged > 1e-3  # the norm before clipping
