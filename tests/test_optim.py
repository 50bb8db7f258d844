"""Optimizers, parameter groups, schedules, gradient clipping and early stopping (esft.optim)."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from esft.cli import main
from esft.models import build_model
from esft.optim import (
    MuonWithAdamW,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    grouped_parameters,
    lr_factor,
    optimizer_state_bytes,
    param_groups,
)

from conftest import TINY


@pytest.fixture(scope="module")
def untied(tokenizer):
    torch.manual_seed(0)
    return build_model(tokenizer, None, dict(TINY["llama"], tie_word_embeddings=False), "float32", "sdpa")


def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ---- parameter groups ------------------------------------------------------------------------
def test_default_groups_decay_matrices_only(untied):
    groups = grouped_parameters(untied, OptimConfig(weight_decay=0.1))
    assert [g["group"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = (names_of(untied, g["params"]) for g in groups)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decay and "model.layers.1.mlp.down_proj.weight" in decay
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight"} <= no_decay
    assert all(untied.get_parameter(n).ndim == 2 for n in decay)
    assert decay | no_decay == {n for n, _ in untied.named_parameters()} and not decay & no_decay
    # decay_embeddings moves exactly the embedding and the head
    decay2 = names_of(untied, grouped_parameters(untied, OptimConfig(weight_decay=0.1, decay_embeddings=True))[0]["params"])
    assert decay2 - decay == {"model.embed_tokens.weight", "lm_head.weight"}
    # the two-group helper kept for callers of the old API
    assert [len(g["params"]) for g in param_groups(untied, 0.1)] == [len(groups[0]["params"]), len(groups[1]["params"])]


def test_frozen_parameters_get_no_group(untied):
    untied.model.embed_tokens.weight.requires_grad_(False)
    try:
        groups = grouped_parameters(untied, OptimConfig())
        assert "model.embed_tokens.weight" not in set().union(*(names_of(untied, g["params"]) for g in groups))
    finally:
        untied.model.embed_tokens.weight.requires_grad_(True)


def test_lr_multipliers_make_their_own_groups_and_follow_the_schedule(untied):
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="linear", min_lr_ratio=0.0,
                      lr_multipliers={"*embed_tokens*": 0.1, "*self_attn*": 2.0})
    opt = build_optimizer(untied, cfg)
    by_name = {g["group"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay", "decay*2", "no_decay", "no_decay*0.1"}
    assert names_of(untied, by_name["no_decay*0.1"]["params"]) == {"model.embed_tokens.weight"}
    assert all(".self_attn." in n for n in names_of(untied, by_name["decay*2"]["params"]))
    assert by_name["decay*2"]["lr"] == pytest.approx(2e-2) and by_name["no_decay*0.1"]["lr"] == pytest.approx(1e-3)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    # linear to 0 over 10 steps: half way, every group at half its own peak
    assert by_name["decay*2"]["lr"] == pytest.approx(1e-2) and by_name["no_decay*0.1"]["lr"] == pytest.approx(5e-4)
    assert by_name["decay"]["lr"] == pytest.approx(5e-3)


def test_lr_multiplier_pattern_that_matches_nothing_is_an_error(untied):
    with pytest.raises(ValueError, match=r"\['\*nope\*'\] match no trainable parameter"):
        grouped_parameters(untied, OptimConfig(lr_multipliers={"*nope*": 0.5}))


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="optim: label_smoothing"):
        OptimConfig(label_smoothing=1.5)
    with pytest.raises(ValueError, match="decay_ratio"):
        OptimConfig(decay_ratio=0.0)


# ---- optimizers ------------------------------------------------------------------------------
def test_muon_takes_hidden_matrices_and_adamw_the_rest(untied):
    opt = build_optimizer(untied, OptimConfig(optimizer="muon", weight_decay=0.1))
    assert isinstance(opt, MuonWithAdamW)
    assert [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    muon = names_of(untied, [p for g in opt.muon.param_groups for p in g["params"]])
    matrices = {n for n, p in untied.named_parameters() if p.ndim == 2} - {"model.embed_tokens.weight", "lm_head.weight"}
    assert muon == matrices and len(muon) == 2 * 7  # q k v o gate up down per layer
    adam = names_of(untied, [p for g in opt.optimizers[1].param_groups for p in g["params"]])
    assert adam == {n for n, _ in untied.named_parameters()} - muon
    assert opt.param_groups[0] is opt.muon.param_groups[0]  # shared dicts: schedulers reach both


def test_muon_sends_3d_expert_tensors_to_adamw(tokenizer):
    model = build_model(tokenizer, None, TINY["qwen2_moe"], "float32", "sdpa")
    opt = build_optimizer(model, OptimConfig(optimizer="muon"))
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    assert muon and all(p.ndim == 2 for p in muon)
    experts = [p for n, p in model.named_parameters() if "experts.gate_up_proj" in n]
    assert experts and all(any(p is q for g in opt.optimizers[1].param_groups for q in g["params"]) for p in experts)


def _train(model, opt, sched, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 200, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_muon_with_adamw_resumes_from_its_state_dict(tokenizer, tmp_path):
    cfg = OptimConfig(optimizer="muon", lr=1e-2, warmup_steps=2, schedule="wsd", weight_decay=0.1)

    def fresh():
        torch.manual_seed(0)
        m = build_model(tokenizer, None, TINY["llama"], "float32", "sdpa")
        o = build_optimizer(m, cfg)
        return m, o, build_scheduler(o, cfg, total_steps=8)

    model, opt, sched = fresh()
    _train(model, opt, sched, 4, seed=1)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ck.pt")
    _train(model, opt, sched, 4, seed=2)

    model2, opt2, sched2 = fresh()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert all(g is h for g, h in zip(opt2.param_groups, [g for o in opt2.optimizers for g in o.param_groups]))
    _train(model2, opt2, sched2, 4, seed=2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_optimizer_state_bytes_by_hand(untied):
    params = [p for p in untied.parameters()]
    opt = build_optimizer(untied, OptimConfig(fused=False))
    ids = torch.randint(0, 200, (1, 8))
    untied(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    # AdamW: exp_avg + exp_avg_sq in fp32 per parameter, plus a 0-d fp32 step counter each
    assert optimizer_state_bytes(opt) == sum(2 * p.numel() * 4 + 4 for p in params)
    ada = build_optimizer(untied, OptimConfig(optimizer="adafactor"))
    untied(input_ids=ids, labels=ids).loss.backward()
    ada.step()
    assert optimizer_state_bytes(ada) < optimizer_state_bytes(opt) / 20  # factored second moments


def test_adamw8bit_on_cpu_is_a_clear_error(untied):
    with pytest.raises(RuntimeError, match="adamw8bit.*CUDA only.*\\['cpu'\\]"):
        build_optimizer(untied, OptimConfig(optimizer="adamw8bit"))


@pytest.mark.gpu
def test_adamw8bit_steps_on_cuda(tokenizer):
    pytest.importorskip("bitsandbytes")
    model = build_model(tokenizer, None, TINY["llama"], "float32", "sdpa").cuda()
    opt = build_optimizer(model, OptimConfig(optimizer="adamw8bit", lr=1e-3))
    ids = torch.randint(0, 200, (2, 16), device="cuda")
    before = model.lm_head.weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)
    # 8-bit moments: about a quarter of AdamW's fp32 state for the big matrices
    assert optimizer_state_bytes(opt) < sum(2 * p.numel() * 4 for p in model.parameters()) / 2


# ---- schedules -------------------------------------------------------------------------------
def test_schedule_shapes_by_hand():
    m = 0.1
    # warmup is shared: (step + 1) / warmup
    for schedule in ("cosine", "linear", "constant", "wsd"):
        assert lr_factor(0, 100, 10, schedule, m) == pytest.approx(0.1)
        assert lr_factor(9, 100, 10, schedule, m) == pytest.approx(1.0)
    # cosine / linear over the 90 steps after warmup: half way at step 55
    assert lr_factor(10, 100, 10, "cosine", m) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", m) == pytest.approx(m + (1 - m) * 0.5)
    assert lr_factor(100, 100, 10, "cosine", m) == pytest.approx(m)
    assert lr_factor(55, 100, 10, "linear", m) == pytest.approx(1 - (1 - m) * 0.5)
    assert lr_factor(100, 100, 10, "linear", m) == pytest.approx(m)
    assert lr_factor(99, 100, 10, "constant", m) == 1.0
    # WSD: stable until the last 20 steps (80..100), then decays
    assert lr_factor(79, 100, 10, "wsd", m, decay_ratio=0.2) == 1.0
    assert lr_factor(80, 100, 10, "wsd", m, decay_ratio=0.2) == 1.0
    for shape, expected in (("linear", 1 - 0.9 * 0.5), ("cosine", m + 0.9 * 0.5), ("sqrt", 1 - 0.9 * math.sqrt(0.5))):
        assert lr_factor(90, 100, 10, "wsd", m, 0.2, shape) == pytest.approx(expected), shape
        assert lr_factor(100, 100, 10, "wsd", m, 0.2, shape) == pytest.approx(m), shape
    # a decay longer than the run after warmup starts right after warmup
    assert lr_factor(10, 20, 10, "wsd", m, decay_ratio=1.0, decay_shape="linear") == pytest.approx(1.0)
    assert lr_factor(15, 20, 10, "wsd", m, decay_ratio=1.0, decay_shape="linear") == pytest.approx(1 - 0.9 * 0.5)


def test_cosine_is_the_previous_warmup_cosine():
    def previous(step, warmup, total, m):  # the formula the project shipped before schedules were options
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in range(0, 130, 7):
        assert lr_factor(step, 120, 30, "cosine", 0.05) == previous(step, 30, 120, 0.05)


# ---- from YAML, through the CLI --------------------------------------------------------------
class GradNormProbe(L.Callback):
    """Records the total gradient norm the optimizer steps with (after Lightning's clipping) and
    the optimizer's class and groups."""

    def __init__(self) -> None:
        self.norms = []

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.optimizer, self.groups = type(opt).__name__, [g["group"] for g in opt.param_groups]

        def record(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        opt.register_step_post_hook(record)


def fit(root: Path, optim: dict, max_steps: int = 3, trainer: dict | None = None, callbacks=(), ckpt: str | None = None):
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": str(root),
                    "logger": False, "callbacks": [{"class_path": "test_optim.GradNormProbe"}, *callbacks],
                    **(trainer or {})},
        "model": {"class_path": "esft.objectives.SFTModule",
                  "init_args": {"model_config": TINY["llama"], "loss_chunk_size": 16, "optim": optim}},
        "data": {"class_path": "esft.data.SFTDataModule",
                 "init_args": {"tasks": ["reverse_words"], "num_train_per_task": 40, "num_val_per_task": 8,
                               "max_length": 64, "max_tokens": 128}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    trainer = main(["fit", "--config", str(path), *(["--ckpt_path", ckpt] if ckpt else [])]).trainer
    probe = next(cb for cb in trainer.callbacks if type(cb).__name__ == "GradNormProbe")
    return trainer, probe


@pytest.mark.parametrize("optim, expected", [
    ({"optimizer": "muon", "schedule": "wsd", "decay_ratio": 0.5, "decay_shape": "cosine",
      "lr_multipliers": {"*embed_tokens*": 0.5}}, ("MuonWithAdamW", ["muon/decay", "no_decay", "no_decay*0.5"])),
    ({"optimizer": "adafactor", "lr": 1e-2, "schedule": "linear", "dropout": 0.1}, ("Adafactor", ["decay", "no_decay"])),
    ({"optimizer": "lion", "lr": 3e-4, "schedule": "constant", "neftune_alpha": 5.0, "label_smoothing": 0.1},
     ("Lion", ["decay", "no_decay"])),
])
def test_each_option_from_yaml_trains_with_clipped_gradients(tmp_path, optim, expected):
    trainer, probe = fit(tmp_path, {"warmup_steps": 1, **optim}, trainer={"gradient_clip_val": 0.05})
    assert (probe.optimizer, probe.groups) == expected
    assert trainer.global_step == 3 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert len(probe.norms) == 3 and max(probe.norms) <= 0.05 * (1 + 1e-4)  # clipped (a tiny model's norm is > 1)
    # the module holds the YAML's choices
    module = trainer.lightning_module
    assert module.optim.optimizer == optim["optimizer"]
    if "dropout" in optim:
        assert module.model.config.attention_dropout == 0.1


def test_early_stopping_from_yaml_stops_the_run(tmp_path):
    stop = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/loss", "patience": 1, "min_delta": 100.0}}  # no step improves by 100
    trainer, _ = fit(tmp_path, {"lr": 1e-3}, max_steps=20, callbacks=[stop])
    # validation at steps 2 (sets the best) and 4 (no improvement: patience 1 runs out)
    assert trainer.global_step == 4


# ---- study callbacks -------------------------------------------------------------------------
class Logger:
    def __init__(self):
        self.logged = {}

    def log_metrics(self, metrics, step):
        self.logged.update(metrics)


def test_steps_to_loss_follows_the_smoothed_loss():
    from types import SimpleNamespace

    from esft.callbacks import StepsToLoss

    def run(losses, target):
        cb = StepsToLoss(target=target, smoothing=0.5)
        logger = Logger()
        trainer = SimpleNamespace(callback_metrics={}, global_step=0, max_steps=10, logger=logger, loggers=[logger])
        for step, value in enumerate(losses, 1):
            trainer.global_step, trainer.callback_metrics = step, {"train/loss": torch.tensor(value)}
            cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_end(trainer, None)
        return trainer.logger.logged

    # EMA with weight 0.5: 3, 2, 1.5, 1.25, 0.875 -> at or below 1.0 at step 5 (the raw loss was at step 2)
    assert run([3.0, 1.0, 1.0, 1.0, 0.5], 1.0) == {"optim/steps_to_target": 5.0, "optim/reached_target": 1.0}
    assert run([3.0, 2.0], 1.0) == {"optim/steps_to_target": 11.0, "optim/reached_target": 0.0}


def test_interrupted_muon_wsd_run_resumes_to_the_same_weights(tmp_path):
    from test_e2e import Interrupt

    optim = {"optimizer": "muon", "schedule": "wsd", "decay_ratio": 0.5, "warmup_steps": 2, "weight_decay": 0.1,
             "lr_multipliers": {"*embed_tokens*": 0.5}}

    def run(root, interrupt=False, ckpt=None):
        ckpt_cb = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": str(root / "ck"), "every_n_train_steps": 2, "save_last": True, "save_top_k": -1}}
        extra = [{"class_path": "test_e2e.InterruptAt", "init_args": {"step": 3}}] if interrupt else []
        return fit(root, optim, max_steps=6, trainer={"enable_checkpointing": True, "gradient_clip_val": 1.0},
                   callbacks=[ckpt_cb, *extra], ckpt=ckpt)[0]

    full = run(tmp_path / "full").lightning_module.model.state_dict()
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", interrupt=True)
    resumed = run(tmp_path / "cut", ckpt="last")
    assert resumed.global_step == 6
    for name, value in resumed.lightning_module.model.state_dict().items():
        torch.testing.assert_close(value, full[name], atol=1e-6, rtol=1e-5, msg=name)
