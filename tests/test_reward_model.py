"""Bradley–Terry reward model: the loss by hand, rewards on packed pairs equal to the exported HF
model's own forward, LoRA, and a CLI run that learns a held-out preference."""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from esft.cli import main
from esft.data import PreferenceDataModule
from esft.data.packing import collate_padded
from esft.losses import bradley_terry_loss
from esft.objectives import RewardModule
from esft.objectives.reward import pair_rewards
from esft.checkpoint import CheckpointError
from esft.rewards import ModelReward, RewardSet, Sample

from conftest import TINY
from test_preference import BUILTIN, dpo_config, write_rows


def hf_pair_rewards(model, batch) -> torch.Tensor:
    """The HF model's own forward on the documents of a packed pair batch, cut out and right-padded
    one to a row: ``[P, 2]`` in the batch's pair order."""
    ids, cu = batch["input_ids"].reshape(-1), batch["cu_seqlens"]
    docs = [{"input_ids": ids[cu[d] : cu[d + 1]].tolist(), "labels": [0], "length": int(cu[d + 1] - cu[d])}
            for d in batch["doc_index"]]
    padded = collate_padded([[e] for e in docs], model.config.pad_token_id)
    with torch.no_grad():
        return model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.view(-1, 2)


def export_tiny_reward_model(path, seed: int = 0):
    """A random tiny reward model whose rewards spread out, exported to `path`."""
    torch.manual_seed(seed)
    module = RewardModule(model_config=TINY["llama"])
    torch.nn.init.normal_(module.model.score.weight, std=1.0)
    module.model.save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    return path


def prompt_record(a: int, b: int) -> dict:
    return {"task": "arithmetic", "answer": str(a + b), "messages": [{"role": "user", "content": f"What is {a} + {b}?"}]}


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    nll = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([nll(1.0), nll(-2.0), math.log(2)]))
    margin = torch.tensor([0.5, 0.5, -1.0])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin), torch.tensor([nll(0.5), nll(-2.5), nll(1.0)]))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, center_coef=0.1),
                               torch.tensor([nll(1.0) + 0.1, nll(-2.0) + 0.4, math.log(2) + 3.6]))
    # the loss sees differences only: shifting both rewards changes nothing; swapping adds the difference
    torch.testing.assert_close(bradley_terry_loss(chosen + 7, rejected + 7), bradley_terry_loss(chosen, rejected))
    torch.testing.assert_close(bradley_terry_loss(rejected, chosen) - bradley_terry_loss(chosen, rejected), chosen - rejected)
    with pytest.raises(ValueError, match="chosen .* and rejected .* differ"):
        bradley_terry_loss(chosen, rejected[:2])


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_packed_pair_rewards_equal_the_exported_model_on_padded_rows(tmp_path, layout):
    dm = PreferenceDataModule(**BUILTIN, layout=layout)
    dm.setup("fit")
    export_tiny_reward_model(tmp_path)
    module = RewardModule(model_name_or_path=str(tmp_path)).eval()
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert exported.config.num_labels == 1 and exported.config.pad_token_id == module.tokenizer.pad_token_id
    pairs = 0
    for batch in dm.train_dataloader():
        rewards = pair_rewards(module.model, batch).detach()
        torch.testing.assert_close(rewards, hf_pair_rewards(exported, batch), atol=1e-4, rtol=1e-4)
        assert rewards.std() > 0.1
        pairs += rewards.shape[0]
    assert 2 * pairs == len(dm.train_examples)


def test_a_reward_model_from_a_causal_lm_takes_its_decoder(tmp_path):
    from esft.objectives import SFTModule

    lm = SFTModule(model_config=TINY["llama"])
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    module = RewardModule(model_name_or_path=str(tmp_path))
    decoder = module.model.get_decoder().state_dict()
    assert decoder.keys() == lm.model.get_decoder().state_dict().keys()
    assert all(torch.equal(v, decoder[k]) for k, v in lm.model.get_decoder().state_dict().items())
    assert module.model.score.weight.shape == (1, TINY["llama"]["hidden_size"])
    assert module.model.config.pad_token_id == module.tokenizer.pad_token_id


def test_lora_trains_the_head_in_full_and_exports_a_plain_model():
    module = RewardModule(model_config=TINY["llama"], lora={"r": 4})
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained) and any("lora_A" in n for n in trained)
    assert not any("embed_tokens" in n or ("q_proj.base_layer" in n) for n in trained)
    exported = module.export_model()
    assert type(exported).__name__ == "LlamaForSequenceClassification"
    assert "score.weight" in exported.state_dict() and not any("lora" in k for k in exported.state_dict())


def reward_config(root, steps: int, export: bool = True):
    """A RewardModule run on held-out pairs whose chosen answers end in a word of one set and the
    rejected ones in a word of another: learnable in a few steps from random init, and at chance
    before (the words' random rewards do not line up with the sets)."""
    path = dpo_config(root, steps=steps)
    good, bad = ["yes", "sure", "fine", "right"], ["no", "never", "wrong", "nope"]
    for name, n, seed in (("train", 96, 0), ("val", 24, 1)):
        rows = []
        for i in range(n):
            a, b = (i * 37 + seed * 11) % 100, (i * 53 + seed * 7) % 100
            rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a + b} {good[(i + seed) % 4]}",
                         "rejected": f"{a + b} {bad[(i * 3 + seed) % 4]}"})
        write_rows(root / f"{name}.jsonl", rows)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"class_path": "esft.objectives.RewardModule",
                    "init_args": {"model_config": TINY["llama"], "optim": {"lr": 1e-2, "warmup_steps": 0}}}
    if export:
        cfg["trainer"]["callbacks"].append({"class_path": "esft.callbacks.ExportHF", "init_args": {"dirpath": str(root / "hf")}})
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_reward_model_through_the_cli_learns_a_heldout_preference(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = reward_config(tmp_path, steps=5)
    before = float(main(["validate", "--config", str(path)]).trainer.callback_metrics["val/accuracy"])
    cli = main(["fit", "--config", str(path)])
    after = cli.trainer.callback_metrics
    assert before < 0.7 and float(after["val/accuracy"]) >= 0.9, (before, float(after["val/accuracy"]))
    assert after["val/rewards/margins"] > 0
    tags = set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
            "val/accuracy"} <= tags
    # the export scores the held-out pairs as the trained module does, through the HF forward
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    batches = list(cli.datamodule.val_dataloader())
    hf = torch.cat([hf_pair_rewards(exported, b) for b in batches])
    with torch.no_grad():
        ours = torch.cat([pair_rewards(cli.model.model.eval(), b) for b in batches])
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=1e-4)
    assert (hf[:, 0] > hf[:, 1]).float().mean() == pytest.approx(float(after["val/accuracy"]))


def test_model_reward_scores_as_the_exported_model_reads_its_training_pairs(tmp_path):
    path = str(export_tiny_reward_model(tmp_path / "rm"))
    records = [prompt_record(a, b) for a, b in ((2, 3), (40, 9), (7, 7))]
    texts = ["5", "<think>40+9=49</think>\n49", "fourteen, I think", "14", "13"]
    samples = [Sample(records[i % 3], t) for i, t in enumerate(texts)]
    reward = ModelReward(path, batch_size=2)  # three packed batches
    scores = reward(samples)
    exported = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = reward.encode(samples)
    with torch.no_grad():  # one completion at a time through the HF forward
        expected = [float(exported(input_ids=torch.tensor([x])).logits) for x in ids]
    assert scores == pytest.approx(expected, abs=1e-4) and torch.tensor(scores).std() > 0.1
    # the text scored is the pair document the reward model was trained on
    rows = [{"prompt": r["messages"], "chosen": t, "rejected": t + "?"} for r, t in zip(records, texts)]
    write_rows(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(path=str(tmp_path / "pairs.jsonl"), tokenizer_name=path, max_length=64, max_tokens=128)
    dm.setup("fit")
    assert [e["input_ids"] for e in dm.train_examples[::2]] == ids[:3]
    total, parts = RewardSet({"accuracy": 1.0, "model": 0.5}, {"model": {"path": path, "batch_size": 2}})(samples)
    assert parts["model"] == pytest.approx(scores, abs=1e-5)
    assert total == pytest.approx([a + 0.5 * m for a, m in zip(parts["accuracy"], scores)])
    assert parts["accuracy"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(CheckpointError, match="no such model directory"):
        ModelReward(str(tmp_path / "missing"))(samples)
