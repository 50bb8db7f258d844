"""SFT throughput side by side with TRL's SFTTrainer: same data, same model, same run.

    python benchmarks/sft_vs_trl.py --out benchmarks/results/sft_vs_trl_cpu.json     # CPU, tiny model
    python benchmarks/sft_vs_trl.py --device cuda --model-size 0.5b --max-length 2048 --rows 8

Data: one JSONL file of chat records mixed from the built-in tasks (lengths from ~20 to ~150
tokens), written once and read by both sides; full-sequence loss; the same random-init model
config and seed; AdamW at the same learning rate. Tokens per optimizer step are equal: esft packs
`--rows` rows of `--max-length` tokens per micro-batch, TRL packs the same (`packing=True`, best-fit
decreasing, padding-free), and TRL's padded baseline takes as many documents per step as fill
that budget on average. Every side reports real (non-pad) tokens/s as the median over the timed
steps (after `--warmup` steps) and peak memory (accelerator memory, or the peak RSS of the
setup's own process on CPU: each setup runs in a fresh process); each row carries its ratio to
TRL packed. TRL is an optional dependency of this benchmark only:
``pip install trl``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from esft.callbacks.throughput import peak_memory_gib
from esft.data.tasks import get_task

TASK_MIX = ("math_word", "extract_fields", "verdict", "intent_json", "list_ops", "translate", "reverse_words", "arithmetic")
SIZES = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True),
    "0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}


def summarize(name: str, times: list[float], tokens: list[int], warmup: int, device: torch.device) -> dict:
    rates = [n / t for n, t in zip(tokens[warmup:], times[warmup:])]
    return {"setup": name, "tokens_per_s": round(statistics.median(rates)), "tokens_per_step": round(statistics.mean(tokens[warmup:])),
            "steps_timed": len(rates), "peak_gib": round(peak_memory_gib(device), 2)}


def run_esft(data: Path, cfg: dict, args, device: torch.device) -> dict:
    import lightning as L

    from esft.data import SFTDataModule
    from esft.objectives import SFTModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.tokens = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(batch["num_tokens"])

    torch.manual_seed(0)
    module = SFTModule(model_config=cfg, tokenizer="builtin", dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    module.optim.lr = args.lr
    dm = SFTDataModule(path=str(data), tokenizer_name="builtin", train_on="all", max_length=args.max_length,
                       max_tokens=args.max_length * args.rows)
    timer = StepTimer()
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=args.steps + args.warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer], precision=args.precision)
    trainer.fit(module, dm)
    return summarize(f"esft packed ({args.rows} x {args.max_length}, {module.model.config._attn_implementation})",
                     timer.times, timer.tokens, args.warmup, device)


def run_trl(data: Path, cfg: dict, args, device: torch.device, packing: bool, batch_size: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from esft.models import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    fields = dict(cfg)
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation=args.trl_attn)
    dataset = load_dataset("json", data_files=str(data), split="train").select_columns(["messages"])
    counts: list[int] = []

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    sft_args = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps + args.warmup, per_device_train_batch_size=batch_size,
        learning_rate=args.lr, max_length=args.max_length, packing=packing, report_to=[], save_strategy="no",
        logging_steps=10_000, use_cpu=device.type == "cpu", bf16=args.precision.startswith("bf16"),
        dataloader_num_workers=0, seed=0, disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing,
    )
    timer = Timer()
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    name = f"TRL SFTTrainer packed (bfd, {batch_size} x {args.max_length})" if packing else f"TRL SFTTrainer padded (batch {batch_size})"
    return summarize(name, timer.times, counts[: len(timer.times)], args.warmup, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch (tokens per step = rows x max-length)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--trl-attn", default="sdpa", help="attention implementation for TRL's model")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing on both sides (TRL's own default turns it on; off here unless set)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = SIZES[args.model_size]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mix.jsonl"
        per_task = args.records // len(TASK_MIX)
        with data.open("w") as f:
            for name in TASK_MIX:
                for r in get_task(name).generate(per_task, seed=0):
                    f.write(json.dumps({"messages": r["messages"]}) + "\n")
        from esft.data.records import load_records
        from esft.data.tokenize import tokenize_records
        from esft.models import load_tokenizer

        examples, _ = tokenize_records(load_records(str(data))[0], load_tokenizer("builtin"), args.max_length, "all")
        mean_len = statistics.mean(e["length"] for e in examples)
        padded_batch = max(1, round(args.rows * args.max_length * 0.95 / mean_len))
        rows = []
        for fn, kwargs in ((run_trl, {"packing": True, "batch_size": args.rows}),
                           (run_trl, {"packing": False, "batch_size": padded_batch}),
                           (run_esft, {})):
            # a fresh process per setup: peak memory (and allocator state) belongs to that setup alone
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows.append(pool.submit(fn, data, cfg, args, device, **kwargs).result())
            print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    print(f"\n{args.model_size} model, {len(examples)} documents (mean {mean_len:.0f} tokens), device {device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} on both sides, "
          f"medians of {args.steps} steps after {args.warmup} warm-up\n")
    print("| setup | real tokens/s | x TRL packed | tokens/step | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['tokens_per_s']:,} | {r['tokens_per_s'] / base:.2f} | {r['tokens_per_step']:,} | {r['peak_gib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "mean_doc_tokens": mean_len, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
