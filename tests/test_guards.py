"""Guards: a non-finite loss stops the run naming the step and the checkpoint, or is skipped
without touching the weights; an unreadable checkpoint names its file."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from esft.callbacks import NonFiniteGuard
from esft.callbacks.guards import NonFiniteError
from esft.cli import run
from esft.data import SFTDataModule
from esft.objectives import SFTModule

from conftest import TINY
from test_e2e import config


class PoisonedSFT(SFTModule):
    """Returns a NaN loss at the given optimizer steps (1-based)."""

    def __init__(self, bad_steps=(3,), factor=float("nan"), **kw):
        super().__init__(**kw)
        self.bad_steps = set(bad_steps)
        self.factor = factor
        self.weights_before_step: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step + 1
        self.weights_before_step[step] = self.model.lm_head.weight.detach().clone()
        return loss * self.factor if step in self.bad_steps else loss


def fit(tmp_path, guard, bad_steps, max_steps=5, factor=float("nan")):
    L.seed_everything(0)
    module = PoisonedSFT(bad_steps, factor, model_config=TINY["llama"], optim={"lr": 1e-2})
    data = SFTDataModule(tasks=["reverse_words"], num_train_per_task=64, num_val_per_task=0, max_length=64, max_tokens=256)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path),
                        callbacks=[guard, checkpoints], use_distributed_sampler=False)
    trainer.fit(module, data)
    return module, trainer


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3; last good checkpoint: .*last\.ckpt"):
        fit(tmp_path, NonFiniteGuard("stop"), bad_steps=[3])
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


def test_skip_leaves_the_weights_of_that_step_untouched_and_goes_on(tmp_path):
    guard = NonFiniteGuard("skip")
    module, trainer = fit(tmp_path, guard, bad_steps=[3])
    w = module.weights_before_step
    assert trainer.global_step == 5 and guard.skipped_total == 1
    assert torch.equal(w[3], w[4])  # step 3 changed nothing
    assert not torch.equal(w[2], w[3]) and not torch.equal(w[4], w[5])  # the others did
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_stops_after_max_skips_in_a_row(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 3 after 2 skipped steps in a row"):
        fit(tmp_path, NonFiniteGuard("skip", max_skips=2), bad_steps=[1, 2, 3])


def test_a_loss_spike_stops_or_is_skipped_like_a_non_finite_loss(tmp_path):
    with pytest.raises(NonFiniteError, match=r"loss spike \(.* > 5.0 x the median .* of the last 3 steps\) at step 5; "
                                             r"last good checkpoint: .*last\.ckpt"):
        fit(tmp_path, NonFiniteGuard("stop", spike_factor=5.0, spike_window=3), bad_steps=[5], factor=20.0)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 4
    guard = NonFiniteGuard("skip", spike_factor=5.0, spike_window=3)
    module, trainer = fit(tmp_path / "skip", guard, bad_steps=[5], max_steps=6, factor=20.0)
    assert guard.skipped_total == 1 and torch.equal(module.weights_before_step[5], module.weights_before_step[6])
    _, trainer = fit(tmp_path / "mild", NonFiniteGuard("stop", spike_factor=5.0, spike_window=3), bad_steps=[5], factor=2.0)
    assert trainer.global_step == 5, "a loss under the factor is not a spike"


def test_an_unreadable_checkpoint_names_its_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setattr("sys.argv", ["esft", "fit", "--config", str(config(tmp_path, 2)), "--ckpt_path", str(bad)])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"esft: error: {bad}: cannot be loaded as a checkpoint" in err
    monkeypatch.setattr("sys.argv", ["esft", "fit", "--config", str(config(tmp_path, 2)), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    with pytest.raises(SystemExit):
        run()
    assert "nope.ckpt: no such checkpoint file" in capsys.readouterr().err
