"""Known-answer tests of `GRPOModule` through Lightning: a reward that favours one token must
raise that token's probability, and the loss must cover exactly the completion's next-token
targets (the prompt and the padding never count)."""

import json
from pathlib import Path

import lightning as L
import torch

from esft.data.prompts import PromptDataModule
from esft.evaluation import Rollout
from esft.models.forward import target_logprobs
from esft.objectives import GRPOModule
from esft.objectives.grpo import rollout_batch
from esft.rewards import REWARDS, Sample

from conftest import TINY

PROMPT = [{"role": "user", "content": "Name a word."}]


def prompt_file(root: Path, n: int = 8) -> Path:
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": PROMPT[0]["content"], "response": "x", "answer": "x"}) + "\n"
                            for _ in range(n)))
    return path


def fit(module: GRPOModule, root: Path, steps: int) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(module, PromptDataModule(path=str(prompt_file(root)), batch_size=1, num_val_per_task=0))


def prompt_ids(tokenizer) -> list[int]:
    """The prompt as `esft.evaluation.rollout` tokenizes it."""
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_token_logp(module: GRPOModule, prompt: list[int], token: int) -> float:
    """log p(token | prompt) through the production forward (`target_logprobs`)."""
    batch = rollout_batch([Rollout(prompt, [token], "", False)], module.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _, _ = target_logprobs(module.model, batch)
    return float(logp[0, len(prompt) - 1])


def test_grpo_raises_the_probability_of_the_rewarded_token(tmp_path, monkeypatch):
    """One-token completions; the reward is 1 when the completion is a chosen token. Three GRPO
    steps must make that token far more likely after the prompt (negated advantages drive its
    log-prob below -20 instead)."""
    chosen = {}
    monkeypatch.setitem(REWARDS, "chosen", lambda s: float(s.text == chosen["text"]))
    L.seed_everything(0)
    # a wider init than the default 0.02 makes the random model's next-token distribution peaked
    # enough that 16 samples of the prompt contain the chosen token (p = 0.17) most steps
    module = GRPOModule(model_config=dict(TINY["llama"], initializer_range=0.5), tokenizer="builtin",
                        num_generations=16, max_completion_length=1, rewards={"chosen": 1.0}, optim={"lr": 1e-2})
    prompt = prompt_ids(module.tokenizer)
    with torch.no_grad():
        probs = torch.softmax(module.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
    token = int(probs.argmax())
    chosen["text"] = module.tokenizer.decode([token], skip_special_tokens=True).strip()
    assert chosen["text"] and 0.05 < float(probs[token]) < 0.5  # a normal token, neither rare nor certain
    before = first_token_logp(module, prompt, token)
    fit(module, tmp_path, steps=3)
    after = first_token_logp(module, prompt, token)
    assert after > before + 1.0 and after > -0.5, (before, after)


def test_grpo_loss_mask_is_the_completion_targets(tmp_path, monkeypatch):
    """Hand-made rollouts through `GRPOModule.training_step`: the mask passed to the update is 1
    at the positions whose next-token target is a completion token, i.e. the labels shifted left
    by one, and 0 on the prompt, after the last token and on the padding."""
    rollouts = [Rollout([5, 6, 7], [8, 9, 2], "good", False), Rollout([5, 6], [10], "bad", True)]

    def generate(self, records):
        return rollouts, [Sample(records[0], r.text, len(r.completion_ids), r.truncated) for r in rollouts]

    seen = {}
    update = GRPOModule._update

    def spy(self, batch, mask, advantages):
        seen.update(input_ids=batch["input_ids"].clone(), mask=mask.clone(), advantages=advantages.clone())
        return update(self, batch, mask, advantages)

    monkeypatch.setitem(REWARDS, "good", lambda s: float(s.text == "good"))
    monkeypatch.setattr(GRPOModule, "generate", generate)
    monkeypatch.setattr(GRPOModule, "_update", spy)
    torch.manual_seed(0)
    module = GRPOModule(model_config=TINY["llama"], tokenizer="builtin", num_generations=2,
                        max_completion_length=3, rewards={"good": 1.0})
    fit(module, tmp_path, steps=1)
    pad = module.tokenizer.pad_token_id
    assert seen["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 10, pad, pad, pad]]
    assert seen["mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert seen["advantages"][0] > 0 > seen["advantages"][1]

