"""DPO step throughput and peak memory side by side with TRL's DPOTrainer, on the same pairs.

    python benchmarks/dpo_vs_trl.py --out benchmarks/results/dpo_vs_trl_cpu.json       # CPU, 2 threads
    python benchmarks/dpo_vs_trl.py --steps 6 --warmup 2 --memory-steps 3               # a quick look

Both sides: the same random-init model (built once per side by `esft.models.build_model` from the
same seed; the weights are checked equal), the same tokenized pairs (esft tokenizes them with the
built-in tokenizer and chat template; TRL's own collator gets the very same prompt / chosen /
rejected token ids), the same pairs per step (``--pairs``), DPO (sigmoid, beta 0.1) with the
reference run online (a frozen copy of the starting model), AdamW at the same learning rate, fp32.

- esft: `PreferenceModule.pair_terms` on `PreferenceDataModule`'s micro-batch of the step's pairs
  (chosen and rejected packed into rows of ``2 * max_length`` tokens, no padding between
  documents; SDPA with a block mask on CPU, flash varlen on CUDA), the loss the mean over pairs.
- TRL: `DPOTrainer.training_step` (its collator pads chosen and rejected to the longest sequence
  of the step and runs them as one batch; its fused log-prob head), then the optimizer step.

Neither trainer's outer loop is timed (no Lightning or HF Trainer loop overhead on either side):
a step is forward + loss + backward + optimizer step of the same pairs. The two sides alternate
step by step in one process (esft first on even steps, TRL first on odd ones), so load from other
processes hits both alike; tokens/s are medians over the steps after ``--warmup``. Tokens are real
tokens: every prompt + completion token of the chosen and rejected documents, no padding. Beside
wall-clock tokens/s, tokens per CPU-second (the process's CPU time in the step, all threads) show
the work each side does, which other processes' load on a shared machine does not inflate.

Peak memory cannot be split between two sides that share a process, so each side also runs
``--memory-steps`` steps alone in a fresh process: peak RSS of that process (sampled every 5 ms)
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Both processes import the same libraries
(TRL included) and hold the same pairs; the difference between them is the trainer.

Synthetic pairs: prompts and completions of random words with lognormal word counts (like the
lengths of public preference sets: most replies short, a long tail), so padding matters. TRL is an
optional dependency of this benchmark only: ``pip install trl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SIZES = {
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True),
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True),
    "0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
LR, BETA = 1e-5, 0.1


def synthetic_rows(n: int, seed: int, prompt_words: int, completion_words: int, max_words: int) -> list[dict]:
    """`n` preference rows of random lowercase words; word counts lognormal (sigma 0.8) around the
    given medians, clipped to 2..`max_words`; chosen and rejected lengths drawn independently."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(2000)]

    def text(median: int) -> str:
        k = min(max(2, round(rng.lognormvariate(0.0, 0.8) * median)), max_words)
        return " ".join(rng.choice(vocab) for _ in range(k))

    return [{"prompt": text(prompt_words), "chosen": text(completion_words), "rejected": text(completion_words)}
            for _ in range(n)]


def build(args, with_trl: bool = True, with_esft: bool = True):
    """The data module (tokenized pairs), and each side's trainer state (`None` where not built)."""
    import importlib

    import lightning as L

    importlib.import_module("trl")  # both sides import the same libraries: equal baselines for memory

    from esft.data import PreferenceDataModule
    from esft.models.attention import VARLEN
    from esft.objectives import PreferenceModule

    rows = synthetic_rows(args.pairs * args.steps, 0, args.prompt_words, args.completion_words, args.max_words)
    path = Path(args.tmp) / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    device = torch.device(args.device)
    layout = "flat" if args.esft_attn == VARLEN else "rows"
    dm = PreferenceDataModule(path=str(path), max_length=args.max_length, max_tokens=2 * args.max_length, layout=layout)
    dm.setup("fit")
    if len(dm.train_examples) != 2 * len(rows):
        raise RuntimeError("some pairs were dropped in tokenization: raise --max-length")
    dtype = args.dtype
    esft = trl_side = None
    if with_esft:
        L.seed_everything(0)
        module = PreferenceModule(model_config=SIZES[args.model_size], tokenizer="builtin", dtype=dtype, beta=BETA,
                                  loss_chunk_size=1024, attn_implementation=args.esft_attn)
        module.to(device)
        module.configure_model()  # the frozen reference: a copy of the starting model
        module.reference.to(device)
        module.train()
        esft = (module, torch.optim.AdamW(module.model.parameters(), lr=LR))
    if with_trl:
        trl_side = build_trl(args, dm, device)
        if esft is not None:
            for (name, a), b in zip(esft[0].model.state_dict().items(), trl_side[0].model.state_dict().values()):
                if not torch.equal(a, b.to(a.device)):
                    raise RuntimeError(f"the two sides start from different weights ({name})")
    return dm, esft, trl_side


def build_trl(args, dm, device):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from esft.models import build_model, load_tokenizer

    import lightning as L

    tokenizer = load_tokenizer("builtin")
    L.seed_everything(0)
    model = build_model(tokenizer, None, SIZES[args.model_size], args.dtype, "sdpa").to(device)
    reference = copy.deepcopy(model)
    dpo_args = DPOConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=None, report_to="none", save_strategy="no",
        use_cpu=device.type == "cpu", bf16=args.dtype == "bfloat16", max_grad_norm=0.0, disable_dropout=True,
        logging_steps=1, dataloader_num_workers=0,
    )
    few = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)  # the trainer's init needs one
    trainer = DPOTrainer(model=model, ref_model=reference, args=dpo_args, train_dataset=few, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop, which is not used here
    return trainer, torch.optim.AdamW(trainer.model.parameters(), lr=LR)


def step_pairs(dm, step: int, pairs: int) -> list[dict]:
    """The tokenized examples (chosen, rejected alternating) of `step`'s pairs."""
    return dm.train_examples[2 * pairs * step : 2 * pairs * (step + 1)]


def esft_batch(dm, examples: list[dict], device) -> dict:
    """The data module's packed micro-batch of exactly these pairs (all of them in one micro-batch)."""
    units, _ = dm.units(examples)
    rows = [[examples[j] for j in unit] for unit in units]
    batch = dm.collate(units, len(units))(rows)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def trl_batch(trainer, examples: list[dict], device) -> dict:
    """TRL's collator on the same token ids: prompt = the tokens before the first trained label."""
    items = []
    for i in range(0, len(examples), 2):
        chosen, rejected = examples[i], examples[i + 1]
        k = next(j for j, label in enumerate(chosen["labels"]) if label != -100)
        if chosen["input_ids"][:k] != rejected["input_ids"][:k]:
            raise RuntimeError("chosen and rejected of a pair do not share the prompt")
        # TRL trains on every completion token: end each completion at its last trained token (the
        # chat template's untrained newline after the end marker is left out, one token less for TRL)
        ends = [max(j for j, label in enumerate(e["labels"]) if label != -100) + 1 for e in (chosen, rejected)]
        items.append({"prompt_ids": chosen["input_ids"][:k], "chosen_ids": chosen["input_ids"][k:ends[0]],
                      "rejected_ids": rejected["input_ids"][k:ends[1]]})
    batch = trainer.data_collator(items)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_esft_step(esft, batch, device) -> dict:
    module, opt = esft
    t0, c0 = time.perf_counter(), time.process_time()
    losses, stats = module.pair_terms(batch)
    (losses.sum() / losses.numel()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "logps_chosen": float(stats["logps/chosen"].mean())}


def run_trl_step(trl_side, batch, device) -> dict:
    trainer, opt = trl_side
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "logps_chosen": trainer._metrics["train"]["logps/chosen"][-1]}


def real_tokens(examples: list[dict]) -> int:
    return sum(e["length"] for e in examples)


def interleaved(args) -> dict:
    """Both sides in this process, alternating step by step: tokens/s."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dm, esft, trl_side = build(args)
    times: dict[str, list[float]] = {"esft": [], "trl": []}
    cpu: dict[str, list[float]] = {"esft": [], "trl": []}
    first: dict[str, float] = {}
    padded = []
    for step in range(args.steps):
        examples = step_pairs(dm, step, args.pairs)
        batches = {"esft": esft_batch(dm, examples, device), "trl": trl_batch(trl_side[0], examples, device)}
        padded.append(batches["trl"]["input_ids"].numel() / real_tokens(examples))
        order = ("esft", "trl") if step % 2 == 0 else ("trl", "esft")
        for side in order:
            out = (run_esft_step(esft, batches[side], device) if side == "esft"
                   else run_trl_step(trl_side, batches[side], device))
            times[side].append(out["s"])
            cpu[side].append(out["cpu_s"])
            first.setdefault(side, out["logps_chosen"])  # the same pairs, the same start: equal
    tokens = [real_tokens(step_pairs(dm, s, args.pairs)) for s in range(args.warmup, args.steps)]
    rates = {side: statistics.median(t / s for t, s in zip(tokens, times[side][args.warmup:])) for side in times}
    per_cpu = {side: statistics.median(t / s for t, s in zip(tokens, cpu[side][args.warmup:])) for side in cpu}
    return {
        "esft_tokens_per_s": round(rates["esft"]), "trl_tokens_per_s": round(rates["trl"]),
        "ratio": round(rates["esft"] / rates["trl"], 2),
        "esft_tokens_per_cpu_s": round(per_cpu["esft"]), "trl_tokens_per_cpu_s": round(per_cpu["trl"]),
        "ratio_cpu_time": round(per_cpu["esft"] / per_cpu["trl"], 2),
        "esft_step_s": round(statistics.median(times["esft"][args.warmup:]), 3),
        "trl_step_s": round(statistics.median(times["trl"][args.warmup:]), 3),
        "real_tokens_per_step": round(statistics.mean(tokens)),
        "trl_padded_over_real": round(statistics.mean(padded), 2),
        "first_step_logps_chosen": {"esft": round(first["esft"], 4), "trl": round(first["trl"], 4)},
        "steps_timed": args.steps - args.warmup,
    }


class PeakRSS:
    """The largest resident set size of this process seen by a thread sampling every 5 ms."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def memory(side: str, args) -> dict:
    """One side alone in this (fresh) process for `--memory-steps` steps: its peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with PeakRSS() as rss:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dm, esft, trl_side = build(args, with_trl=side == "trl", with_esft=side == "esft")
        for step in range(args.memory_steps):
            examples = step_pairs(dm, step, args.pairs)
            if side == "esft":
                run_esft_step(esft, esft_batch(dm, examples, device), device)
            else:
                run_trl_step(trl_side, trl_batch(trl_side[0], examples, device), device)
    out = {"side": side, "peak_rss_mib": round(rss.peak / 2**20)}
    if device.type == "cuda":
        out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--esft-attn", default="esft_varlen", choices=["esft_varlen", "sdpa"],
                   help="esft's attention: esft_varlen (flat rows; per-document SDPA on CPU, flash varlen on CUDA) "
                        "or sdpa (rows of 2 * max_length with a block mask)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step (both sides)")
    p.add_argument("--prompt-words", type=int, default=20, help="median prompt length in words")
    p.add_argument("--completion-words", type=int, default=30, help="median completion length in words")
    p.add_argument("--max-words", type=int, default=250)
    p.add_argument("--max-length", type=int, default=1024, help="bound of each document (longer ones are cut; both sides get the same ids)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default="/tmp/dpo_vs_trl")
    p.add_argument("--out")
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        speed = pool.submit(interleaved, args).result()
    print(json.dumps(speed))
    peaks = {}
    for side in ("esft", "trl"):
        if args.memory_steps > 0:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                peaks[side] = pool.submit(memory, side, args).result()
            print(json.dumps(peaks[side]))
    report = {"config": vars(args), "speed": speed, "memory": peaks}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
