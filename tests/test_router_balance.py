"""The routers' load-balancing loss (`esft.losses.load_balancing_loss`, `esft.models.moe.RouterBalance`)
and SFT's ``router_aux_loss_coef``: hand values, the recorded routers against the model's own
router logits, and training that spreads a collapsed router's tokens."""

import lightning as L
import pytest
import torch

from esft.data import SFTDataModule
from esft.losses import load_balancing_loss
from esft.models import build_model
from esft.models.moe import RouterBalance, moe_adapter
from esft.objectives import SFTModule

from conftest import TINY


def test_hand_values_uniform_and_the_collapse_limit():
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.6, 0.3, 0.05, 0.05]])
    both_to_0_and_1 = torch.tensor([[0, 1], [0, 1]])
    # f = E/(K T) * counts = 4/4 * [2, 2, 0, 0]; P = [0.65, 0.25, 0.05, 0.05]; 2 * 0.65 + 2 * 0.25
    assert float(load_balancing_loss(probs, both_to_0_and_1, 4)) == pytest.approx(1.8)
    uniform = torch.full((2, 4), 0.25)
    assert float(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3]]), 4)) == pytest.approx(1.0)
    certain = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3)  # every token to experts 0 and 1: E/K
    assert float(load_balancing_loss(certain, torch.tensor([[0, 1]] * 3), 4)) == pytest.approx(2.0)


def test_padding_is_left_out_and_only_probabilities_carry_the_gradient():
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.6, 0.3, 0.05, 0.05], [0.0, 0.0, 0.5, 0.5]], requires_grad=True)
    indices = torch.tensor([[0, 1], [0, 1], [2, 3]])
    loss = load_balancing_loss(probs, indices, 4, mask=torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx(1.8)
    loss.backward()
    # d/dP_t = f / T for counted tokens: the most loaded experts get pushed down the most
    expected = torch.tensor([[2.0, 2.0, 0.0, 0.0]] * 2 + [[0.0] * 4]) / 2
    torch.testing.assert_close(probs.grad, expected)
    with pytest.raises(ValueError, match=r"probs must be \[T, 4\]"):
        load_balancing_loss(probs[:, :3], indices, 4)


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe", "deepseek_v3"])
def test_recorded_routers_match_the_models_own_router_logits(tokenizer, family):
    torch.manual_seed(0)
    model = build_model(tokenizer, model_config=TINY[family], attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    balance = RouterBalance(model)
    ids = torch.randint(5, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    with balance.capture(mask):
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    (out.logits.sum() * 0 + out.logits.mean()).backward()  # checkpointing recomputes the layers here
    assert len(balance._records) == len(moe_adapter(model).layers(model))  # the recompute added nothing
    family_ = moe_adapter(model)
    expected = []
    keep = mask.reshape(-1).bool()
    for logits in out.router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()[keep]
        if family == "deepseek_v3":  # sigmoid scores, top-k with the (zero) correction bias
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = logits.softmax(-1)
        top = scores.topk(family_.top_k(model.config), dim=-1).indices
        E, (T, K) = probs.shape[1], top.shape
        f = torch.bincount(top.reshape(-1), minlength=E).float() * E / (K * T)
        expected.append(float((f * probs.mean(0)).sum()))
    assert float(balance.loss()) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    with pytest.raises(RuntimeError, match="no router ran"):
        balance.loss()  # released; and nothing is recorded outside capture
    model(input_ids=ids, use_cache=False)
    assert balance._records == []


def collapsed_moe_run(coef: float, tmp_path, steps: int = 12) -> list[float]:
    """Train a tiny qwen3_moe whose routers start collapsed onto experts 0 and 1 (their rows point
    along the mean router input, as a small MoE's do after pretraining without the loss); returns
    its logged train/router_balance per step (recorded also when `coef` is 0)."""
    L.seed_everything(0)
    module = SFTModule(model_config=TINY["qwen3_moe"], router_aux_loss_coef=1.0, optim={"lr": 1e-2, "warmup_steps": 0})
    module.hparams.router_aux_loss_coef = coef  # 0: record the balance, train without it
    data = SFTDataModule(tasks=["reverse_words"], num_train_per_task=32, num_val_per_task=0, max_length=64, max_tokens=128)
    data.setup("fit")
    blocks = list(moe_adapter(module.model).layers(module.model).values())
    inputs = []
    hooks = [b.gate.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach())) for b in blocks]
    with torch.no_grad():
        module.token_loss(next(iter(data.train_dataloader())))
    for hook in hooks:
        hook.remove()
    for block, x in zip(blocks, inputs):
        mean = x.reshape(-1, x.shape[-1]).mean(0)
        with torch.no_grad():
            block.gate.weight[:2] = 10 * mean / mean.norm() ** 2
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(float(trainer.callback_metrics["train/router_balance"]))

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[Record()])
    trainer.fit(module, data)
    return seen


def test_the_balance_loss_spreads_a_collapsed_router(tmp_path):
    without = collapsed_moe_run(0.0, tmp_path / "without")
    with_loss = collapsed_moe_run(1.0, tmp_path / "with")
    assert len(without) == len(with_loss) == 12
    assert without[0] == pytest.approx(with_loss[0]) and without[0] > 1.6  # collapsed: the limit is E/K = 2
    # measured: the last 4 steps average 1.77 without the loss and 1.05 with it (1.0 = uniform)
    last = lambda values: sum(values[-4:]) / 4  # noqa: E731
    assert last(with_loss) < 1.2 < 1.6 < last(without), (with_loss, without)


def test_router_aux_loss_on_a_dense_model_is_a_clear_error():
    with pytest.raises(ValueError, match="router_aux_loss_coef needs an MoE model"):
        SFTModule(model_config=TINY["llama"], router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="must be >= 0"):
        SFTModule(model_config=TINY["qwen3_moe"], router_aux_loss_coef=-1.0)
