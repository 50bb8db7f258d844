"""Exact resume over several epochs: every epoch draws a fresh order, and a run interrupted
anywhere (epoch 0, a later epoch, exactly on an epoch boundary) and resumed from its last
checkpoint ends with the same weights, bit for bit, as the run that was never interrupted; for
SFT, distillation, a curriculum order and a weighted mixture of cached sources, through
Lightning's own loops."""

import json
import tempfile
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from esft.checkpoint import AtomicCheckpointIO
from esft.data import SFTDataModule
from esft.objectives import DistillModule, SFTModule

from conftest import TINY

STEPS_PER_EPOCH = 3  # 6 packed rows of 64 tokens, 2 per micro-batch (checked below)
MAX_STEPS = 8  # two and two-thirds epochs


class Interrupt(Exception):
    pass


class Recorder(L.Callback):
    """Records the token ids of every training micro-batch per epoch, and interrupts the run at
    optimizer step `stop_at` (after that step's checkpoint)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.epochs: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_at:
            raise Interrupt(f"interrupted at step {self.stop_at}")
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["input_ids"].flatten().tolist())


def module(kind: str):
    common = dict(model_config=TINY["llama"], loss_chunk_size=16, optim={"lr": 1e-2, "warmup_steps": 2})
    if kind == "distill":
        return DistillModule(teacher_config=dict(TINY["llama"], hidden_size=32, intermediate_size=64), alpha=0.5, **common)
    return SFTModule(**common)


def mixture_sources() -> list[dict]:
    """Two small JSONL sources (built-in tasks) for a weighted mixture, written once."""
    from esft.data.tasks import get_task

    root = Path(tempfile.mkdtemp(prefix="esft-mixture-"))
    for name in ("reverse_words", "arithmetic"):
        with (root / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in get_task(name).generate(12, seed=0))
    return [{"path": str(root / "reverse_words.jsonl"), "weight": 0.7}, {"path": str(root / "arithmetic.jsonl"), "weight": 0.3}]


MIXTURE = mixture_sources()


def data(kind: str) -> SFTDataModule:
    if kind == "mixture":
        return SFTDataModule(sources=MIXTURE, max_length=64, max_tokens=128)
    curriculum = {"name": "length", "unit": "tokens"} if kind == "curriculum" else None
    return SFTDataModule(tasks=["reverse_words"], num_train_per_task=16, num_val_per_task=0, max_length=64,
                         max_tokens=128, curriculum=curriculum)


def fit(root, kind: str, stop_at: int | None = None, ckpt_path: str | None = None):
    L.seed_everything(0)
    recorder = Recorder(stop_at)
    trainer = L.Trainer(
        max_steps=MAX_STEPS, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(root), plugins=[AtomicCheckpointIO()],
        callbacks=[recorder, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)],
    )
    lm = module("distill" if kind == "distill" else "sft")
    try:
        trainer.fit(lm, data(kind), ckpt_path=ckpt_path)
    except Interrupt:
        pass
    return trainer, lm, recorder


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    runs = {}
    for kind in ("sft", "distill", "curriculum", "mixture"):
        trainer, lm, recorder = fit(tmp_path_factory.mktemp(kind), kind)
        assert trainer.global_step == MAX_STEPS
        runs[kind] = ({k: v.clone() for k, v in lm.model.state_dict().items()}, recorder.epochs)
    return runs


def test_every_epoch_draws_a_fresh_order(full):
    _, epochs = full["sft"]
    assert [len(epochs[e]) for e in (0, 1)] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH]
    assert epochs[0] != epochs[1] != epochs[2][:2]
    tokens = [sorted(t for b in epochs[e] for t in b if t != 0) for e in (0, 1)]  # 0: filler at row ends
    assert tokens[0] == tokens[1], "each epoch sees every row once"


def test_a_curriculum_keeps_its_order_every_epoch(full):
    _, epochs = full["curriculum"]
    assert len(epochs[0]) > 1 and epochs[0] == epochs[1]


@pytest.mark.parametrize(
    "kind,stop_at",
    [("sft", 2), ("sft", STEPS_PER_EPOCH), ("sft", 5), ("distill", 5), ("curriculum", 5), ("mixture", 5)],
    ids=["sft-epoch0", "sft-epoch-boundary", "sft-epoch1", "distill-epoch1", "curriculum-epoch1", "mixture-epoch1"],
)
def test_interrupted_run_resumes_bit_identical(tmp_path, full, kind, stop_at):
    fit(tmp_path, kind, stop_at=stop_at)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == stop_at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, lm, recorder = fit(tmp_path, kind, ckpt_path="last")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert trainer.global_step == MAX_STEPS
    expected, epochs = full[kind]
    seen = [b for e in sorted(recorder.epochs) for b in recorder.epochs[e]]
    assert seen == [b for e in sorted(epochs) for b in epochs[e]][stop_at:], "the resumed run replays no batch"
    for name, value in lm.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
