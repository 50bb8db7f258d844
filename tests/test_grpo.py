"""GRPOModule end to end on a tiny model, the padded rollout batch, and one policy-gradient step
moving probability towards the rewarded completion."""

from pathlib import Path

import pytest
import torch
import yaml

from esft.cli import main
from esft.evaluation import Rollout
from esft.losses import group_advantages, grpo_loss
from esft.models import build_model
from esft.models.forward import target_logprobs
from esft.objectives.grpo import rollout_batch

from conftest import TINY


def test_rollout_batch_logprobs_match_unpadded(tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer, None, dict(TINY["llama"]), "float32", "sdpa")
    rollouts = [Rollout([5, 6, 7], [8, 9, 2], "", False), Rollout([5, 6], [10], "", True)]
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 6) and batch["num_tokens"] == 9
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 2], [-100, -100, 10, -100, -100, -100]]
    logp, _, targets = target_logprobs(model, batch, chunk_size=2)
    assert (targets != -100).sum() == 4
    for row, r in enumerate(rollouts):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        p = len(r.prompt_ids)
        expected = [full[p - 1 + i, tok] for i, tok in enumerate(r.completion_ids)]
        torch.testing.assert_close(logp[row, p - 1 : p - 1 + len(r.completion_ids)], torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_policy_gradient_step_favours_the_rewarded_completion(tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer, None, dict(TINY["llama"]), "float32", "sdpa")
    rollouts = [Rollout([5, 6], [8, 9], "", False), Rollout([5, 6], [11, 12], "", False)]
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    advantages = group_advantages(torch.tensor([1.0, 0.0]), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def seq_logp():
        logp, _, targets = target_logprobs(model, batch)
        return logp, (targets != -100).float()

    before, mask = seq_logp()
    loss, _ = grpo_loss(before, before.detach(), advantages, mask)
    loss.backward()
    opt.step()
    after, _ = seq_logp()
    gain = ((after - before) * mask).sum(1)
    assert gain[0] > 0 > gain[1]


def grpo_config(root: Path, **model) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "log_every_n_steps": 1, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_checkpointing": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": "", "version": ""}},
            "callbacks": [{"class_path": "esft.callbacks.ExportHF"}],
        },
        "model": {"class_path": "esft.objectives.GRPOModule",
                  "init_args": {"model_config": TINY["llama"], "tokenizer": "builtin", "num_generations": 4,
                                "max_completion_length": 10, "loss_chunk_size": 16,
                                "reward_options": {"overlong": {"max_tokens": 10, "cache": 4}},
                                "rewards": {"accuracy": 1.0, "format": 0.5, "overlong": 0.1},
                                "optim": {"lr": 1e-2}, **model}},
        "data": {"class_path": "esft.data.PromptDataModule",
                 "init_args": {"tasks": [{"name": "arithmetic", "max_digits": 1, "think": True}],
                               "num_train_per_task": 16, "num_val_per_task": 6, "batch_size": 3}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scalars(root: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root)).Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_grpo_fit_logs_and_updates(tmp_path, monkeypatch):
    from esft.rewards import REWARDS

    # a random model never answers right: a dense toy reward (share of digits) gives advantages
    monkeypatch.setitem(REWARDS, "digits", lambda s: sum(c.isdigit() for c in s.text) / max(len(s.text), 1))
    rewards = {"accuracy": 1.0, "format": 0.5, "overlong": 0.1, "digits": 1.0}
    cli = main(["fit", "--config", str(grpo_config(tmp_path, beta=0.04, num_iterations=2, loss_type="dapo",
                                                   epsilon_high=0.28, rewards=rewards))])
    module = cli.model
    assert cli.trainer.global_step == 4  # 2 batches x 2 inner iterations
    assert module.reference is not None  # beta > 0 made a frozen reference
    ref = module.reference.model
    assert not any(p.requires_grad for p in ref.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), module.model.parameters()))
    logs = scalars(tmp_path)
    expected = {"train/loss", "train/reward", "train/reward_std", "train/reward/accuracy", "train/reward/format",
                "train/reward/overlong", "train/reward/digits", "train/pass@1", "train/format", "train/completion_length", "train/kl",
                "train/clip_fraction", "train/entropy", "train/ratio", "time/generation_s", "time/update_s",
                "time/generation_fraction", "throughput/rollout_tokens_per_s", "throughput/update_tokens_per_s",
                "val/pass@1", "val/format", "val/length"}
    assert expected <= set(logs), expected - set(logs)
    assert len(logs["val/pass@1"]) == 2  # before training, then after 2 batches
    assert all(v >= 0 for v in logs["train/kl"]) and all(0 <= v <= 1 for v in logs["train/clip_fraction"])
    assert logs["train/kl"][-1] > 0  # the policy moved away from the reference
    assert any(v != 1.0 for v in logs["train/ratio"])  # the second inner iteration sees a ratio != 1
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_grpo_without_reference_and_bad_reward(tmp_path):
    cli = main(["fit", "--config", str(grpo_config(tmp_path, scale_rewards="none", loss_type="dr_grpo",
                                                   mask_truncated_completions=True))])
    assert cli.model.reference is None and cli.trainer.global_step == 4
    assert all(v == 0 for v in scalars(tmp_path)["train/kl"])
    with pytest.raises(KeyError, match="unknown reward"):
        from esft.objectives import GRPOModule

        GRPOModule(model_config=TINY["llama"], rewards={"acuracy": 1.0})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(tmp_path, monkeypatch, loss_type):
    """Running only the rows with a non-zero advantage (beta 0) ends at the same weights as running all."""
    from esft.rewards import REWARDS

    # groups of even answers all score 0 (advantage 0); the others get a dense reward
    def half(s):
        return 0.0 if int(s.record["answer"].rsplit(maxsplit=1)[-1]) % 2 == 0 else len(s.text) % 5 / 5
    monkeypatch.setitem(REWARDS, "half", half)
    from esft.objectives import GRPOModule

    start, fit_start = [], GRPOModule.on_fit_start
    monkeypatch.setattr(GRPOModule, "on_fit_start",
                        lambda self: (start.append([p.detach().clone() for p in self.model.parameters()]), fit_start(self)))
    weights = {}
    for skip in (False, True):
        root = tmp_path / str(skip)
        cfg = grpo_config(root, rewards={"half": 1.0}, reward_options={}, scale_rewards="none", loss_type=loss_type,
                          num_minibatches=2, skip_zero_advantage=skip)
        cli = main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "100",
                    "--data.init_args.batch_size", "4"])
        weights[skip] = [p.detach().clone() for p in cli.model.model.parameters()]
        run = scalars(root)["train/updated_sequences"]
        assert (run[0] < 1) if skip else (run[0] == 1), run
    assert max(float((a - b).abs().max()) for a, b in zip(start[0], weights[True])) > 1e-4  # the step moved
    # two optimizer steps (one per minibatch) and clipping at norm 1 make the weights depend on the
    # gradients' scale: normalising by the rows run instead of the minibatch fails all four cases.
    # AdamW turns rounding in gradients near 0 into moves of a few 1e-6 on a few entries
    for a, b in zip(weights[False], weights[True]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_reference_refresh_copies_the_policy_every_n_steps(tmp_path, monkeypatch):
    """With ``ref_refresh_steps`` 2 the reference is the starting policy after step 1, the policy
    itself after step 2, and still the step-2 policy after step 3."""
    from esft.objectives import GRPOModule

    with pytest.raises(ValueError, match="ref_refresh_steps=2 needs .* beta > 0"):
        GRPOModule(model_config=TINY["llama"], ref_refresh_steps=2)
    seen = []  # per step: (reference == policy, reference == the policy after step 2)
    policies = {}

    def record(self, outputs, batch, batch_idx):
        policy = [p.detach().clone() for p in self.model.parameters()]
        policies[self.global_step] = policy
        ref = list(self.reference.model.parameters())
        same = lambda a: all(torch.equal(x, y) for x, y in zip(ref, a))
        seen.append((same(policy), 2 in policies and same(policies[2])))

    monkeypatch.setattr(GRPOModule, "on_train_batch_end", record, raising=False)
    from esft.rewards import REWARDS

    monkeypatch.setitem(REWARDS, "digits", lambda s: sum(c.isdigit() for c in s.text) / max(len(s.text), 1))
    cfg = grpo_config(tmp_path, beta=0.04, ref_refresh_steps=2, rewards={"digits": 1.0}, reward_options={})
    cli = main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--trainer.val_check_interval", "100"])
    assert cli.trainer.global_step == 3
    assert seen == [(False, False), (True, True), (False, True)]


@pytest.mark.parametrize("informative", ["odd", "none"])
def test_dynamic_sampling_refills_the_batch_with_informative_groups(tmp_path, monkeypatch, informative):
    """DAPO's dynamic sampling: the update sees only groups whose rewards differ, refill rounds run
    while the batch is short and stop at the cap, and the logged statistics count them. A stub
    reward makes a prompt's group informative exactly when its answer is odd (its samples score
    0, 1, 0, 1, ...), or never."""
    from esft.objectives import GRPOModule
    from esft.rewards import REWARDS

    odd = lambda r: informative == "odd" and int(r["answer"].rsplit(maxsplit=1)[-1]) % 2 == 1
    counter = iter(range(10**6))
    monkeypatch.setitem(REWARDS, "stub", lambda s: float(next(counter) % 2) if odd(s.record) else 0.5)
    calls, updates = [], []
    generate, update = GRPOModule.generate, GRPOModule._update
    monkeypatch.setattr(GRPOModule, "generate", lambda self, records: calls.append(records) or generate(self, records))
    monkeypatch.setattr(GRPOModule, "_update", lambda self, batch, mask, adv: updates.append((len(calls), adv.clone()))
                        or update(self, batch, mask, adv))
    cfg = grpo_config(tmp_path, rewards={"stub": 1.0}, reward_options={}, dynamic_sampling=True, max_refill_rounds=2)
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--trainer.val_check_interval", "100",
          "--data.init_args.batch_size", "4"])
    logs, start = scalars(tmp_path), 0
    assert len(updates) == 3
    for step, (end, advantages) in enumerate(updates):
        rounds = calls[start:end]
        flags = [[odd(r) for r in records] for records in rounds]
        assert all(len(records) == 4 for records in rounds)
        # another round only while fewer than 4 informative groups are kept, at most 2 more
        assert len(rounds) == min(3, 1 + next((i for i in range(3) if sum(map(sum, flags[: i + 1])) >= 4), 2))
        found = sum(map(sum, flags))
        groups = advantages.view(-1, 4)
        if found:
            assert len(groups) == min(4, found) and (groups != 0).any(1).all()  # informative groups only
            assert logs["train/groups_refilled"][step] == min(4, found) - min(4, sum(flags[0]))
        else:
            assert len(groups) == 4 and (groups == 0).all()  # nothing informative: the step's own batch
            assert logs["train/groups_refilled"][step] == 0
        assert logs["train/informative_groups"][step] == pytest.approx(found / (4 * len(rounds)))
        assert logs["train/refill_rounds"][step] == len(rounds) - 1
        start = end
