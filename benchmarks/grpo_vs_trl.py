"""GRPO step throughput side by side with TRL's GRPOTrainer: rollout tokens/s and update tokens/s.

    python benchmarks/grpo_vs_trl.py --out benchmarks/results/grpo_vs_trl_cpu.json          # CPU, tiny model
    python benchmarks/grpo_vs_trl.py --system --sides esft esft-plain trl   # 195-token prompts
    python benchmarks/grpo_vs_trl.py --device cuda --model-size 0.5b --prompts 32 --max-completion-length 256

Both sides: the same random-init model config and seed, the built-in tokenizer and chat template,
the same prompts (2-digit arithmetic with the reasoning format), G samples per prompt at
temperature 1 (top-k off, top-p 1), ``max_completion_length`` new tokens, one optimizer step per
generation (mu = 1, beta = 0: no reference model), AdamW at the same learning rate, the same
accuracy reward. A random-init model rarely emits its end-of-turn token, so nearly every
completion runs to the limit: generation work is the same on both sides. Its rewards are all 0,
so esft's skipping of zero-advantage rows is turned off here: both sides update every completion.

Rollout tokens/s = completion tokens / generation time; update tokens/s = real (non-pad) prompt +
completion tokens / (step time - generation time), so the update includes rewards, advantages and
the log-prob forward/backward on both sides. Medians over the timed steps after `--warmup` steps;
each side runs in a fresh process. ``--system`` puts an R1-style system prompt before every
prompt (195 tokens each); side ``esft-plain`` is esft without shared-prefix sampling. TRL is an optional dependency of this benchmark only:
``pip install trl``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SIZES = {
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=True),
    "0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
TASK = {"name": "arithmetic", "max_digits": 2, "think": True}
SYSTEM = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
          "The Assistant first thinks about the reasoning process in the mind and then provides the user with "
          "the answer. The reasoning process is enclosed within <think> </think> tags, followed by the answer, "
          "i.e., <think> reasoning process here </think> answer here.")


def prompts(n: int, seed: int = 0, system: bool = False) -> list[dict]:
    from esft.data.tasks import build_task

    return [with_system(r) if system else r for r in build_task(TASK).generate(n, seed, "train")]


def with_system(record: dict) -> dict:
    return {**record, "messages": [{"role": "system", "content": SYSTEM}, *record["messages"]]}


def median_rates(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    return {
        "rollout_tokens_per_s": round(statistics.median(r["completion_tokens"] / r["gen_s"] for r in timed)),
        "update_tokens_per_s": round(statistics.median(r["update_tokens"] / r["update_s"] for r in timed)),
        "step_s": round(statistics.median(r["gen_s"] + r["update_s"] for r in timed), 3),
        "generation_fraction": round(statistics.median(r["gen_s"] / (r["gen_s"] + r["update_s"]) for r in timed), 3),
        "completion_tokens_per_step": round(statistics.mean(r["completion_tokens"] for r in timed)),
        "steps_timed": len(timed),
    }


def run_esft(args) -> dict:
    import lightning as L

    from esft.data import PromptDataModule
    from esft.objectives import GRPOModule

    class Data(PromptDataModule):
        def setup(self, stage: str | None = None) -> None:
            fresh = not self.train_records
            super().setup(stage)
            if fresh and args.system:
                self.train_records = [with_system(r) for r in self.train_records]

    L.seed_everything(0)
    module = GRPOModule(model_config=SIZES[args.model_size], tokenizer="builtin", num_generations=args.generations,
                        share_prefix=args.side != "esft-plain",
                        max_completion_length=args.max_completion_length, rewards={"accuracy": 1.0},
                        generation_batch_size=args.prompts, max_grad_norm=None, dtype=args.dtype,
                        optim={"lr": 1e-5}, skip_zero_advantage=False)
    data = Data(tasks=[TASK], num_train_per_task=args.prompts * (args.steps + 1), num_val_per_task=0,
                            batch_size=args.prompts)
    rows: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            gen, upd = float(m["time/generation_s"]), float(m["time/update_s"])
            rows.append({"gen_s": gen, "update_s": upd,
                         "completion_tokens": float(m["throughput/rollout_tokens_per_s"]) * gen,
                         "update_tokens": float(m["throughput/update_tokens_per_s"]) * upd})

    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    name = "esft GRPOModule" + (", no shared prefix" if args.side == "esft-plain" else "")
    return {"setup": name, **median_rates(rows, args.warmup)}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from esft.models import load_tokenizer
    from esft.rewards import Sample, accuracy

    torch.manual_seed(0)
    tokenizer = load_tokenizer("builtin")
    cfg = dict(SIZES[args.model_size])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    records = prompts(args.prompts * (args.steps + 1), system=args.system)
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "answer": r["answer"]} for r in records])

    def reward(completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [accuracy(Sample({"task": "arithmetic", "answer": a}, t)) for t, a in zip(texts, answer)]

    rows: list[dict] = []
    current: dict = {}

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.update(start=time.perf_counter(), gen_s=0.0, completion_tokens=0)

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - current["start"]
            rows.append({"gen_s": current["gen_s"], "update_s": total - current["gen_s"],
                         "completion_tokens": current["completion_tokens"], "update_tokens": current.get("update_tokens", 0)})

    grpo_args = GRPOConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_completion_length, steps_per_generation=1,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-5, beta=0.0, temperature=1.0, top_k=0,
        top_p=1.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16", max_grad_norm=0.0, loss_type="grpo", scale_rewards="group",
        shuffle_dataset=False, disable_dropout=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Steps()])
    generate = trainer._generate_single_turn
    prepare = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        current["gen_s"] += time.perf_counter() - t0
        current["completion_tokens"] += sum(len(c) for c in out[0])
        return out

    def counted_prepare(*a, **k):
        out = prepare(*a, **k)
        current["update_tokens"] = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
        return out

    trainer._generate_single_turn = timed_generate
    trainer._generate_and_score_completions = counted_prepare
    trainer.train()
    return {"setup": "TRL GRPOTrainer (transformers generate)", **median_rates(rows, args.warmup)}


def _run(side: str, args) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(args.threads)
    args.side = side
    return (run_trl if side == "trl" else run_esft)(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G, samples per prompt")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", nargs="+", default=["esft", "trl"], choices=["esft", "esft-plain", "trl"])
    p.add_argument("--system", action="store_true", help="an R1-style system prompt before every prompt")
    p.add_argument("--tmp", default="/tmp/grpo_vs_trl")
    p.add_argument("--out")
    args = p.parse_args()
    results = []
    ctx = multiprocessing.get_context("spawn")
    for side in args.sides:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results.append(pool.submit(_run, side, args).result())
        print(json.dumps(results[-1]))
    if "trl" in args.sides and len(results) > 1:
        trl = results[args.sides.index("trl")]
        for r in results:
            r["rollout_vs_trl"] = round(r["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"], 2)
            r["update_vs_trl"] = round(r["update_tokens_per_s"] / trl["update_tokens_per_s"], 2)
    report = {"config": vars(args), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
