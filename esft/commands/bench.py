"""`esft bench`: SFT training throughput, MFU and peak memory across precision x packing x
compile, side by side with TRL's SFTTrainer on identical data, in one invocation.

    esft bench                                            # CPU: tiny model, built-in task mix
    esft bench --layout rows padded --compile off on      # more esft rows
    esft bench --device cuda --shape 0.5b --data lognormal --docs 4096 --max-length 2048 \\
        --rows 8 --dtype bfloat16 --precision bf16-true --out runs/bench   # the H200 anchor
    esft bench --no-trl --steps 200 --precision 32-true bf16-mixed   # loss curves side by side

Data: ``builtin`` tokenizes a mix of eight built-in tasks with the built-in tokenizer;
``lognormal`` draws random token ids with lognormal lengths (median 270, mean ~405, clipped to
16..max-length: the anchor of the throughput issue). Both sides get the same token ids (TRL as a
pre-tokenized ``input_ids`` dataset) and train on every token. The model is random-init from the
shape's config and the same seed; AdamW at the same learning rate; activation checkpointing off on
both sides unless ``--gradient-checkpointing`` (TRL's own default turns it on).

Equal tokens per optimizer step: packed rows take ``--rows`` rows of ``--max-length`` tokens
(esft's packer and TRL's ``packing=True`` best-fit-decreasing); padded rows take as many
documents as fill that budget on average (95%). Every row reports real (non-pad) tokens/s as the
median over the timed steps after ``--warmup`` steps, model TFLOP/s and MFU (`esft.flops`: active
matmul weights plus causal attention of the real documents, against the device's dense BF16 peak
or ``--peak-tflops``), tokens per step, peak memory (accelerator memory, or the peak RSS of the
row's own process on CPU: every row runs in a fresh process), the mean loss of its last 10
steps, the largest gap of its loss curve to the first esft row's (10-step moving averages: with
``--steps 200`` a bf16-vs-fp32 check), and its ratio to TRL packed when that row ran. Writes ``bench.json`` and ``bench.md`` to --out.
TRL is an optional dependency of the benchmark only (``pip install esft[bench]``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esft.commands.options import CommandParser

SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True),
    # Qwen2-0.5B (494M parameters with its 151,936-token vocabulary)
    "0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True),
    # Llama-3.2-1B (1.24B parameters)
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
               rope_theta=500000.0),
}
TASK_MIX = ("math_word", "extract_fields", "verdict", "intent_json", "list_ops", "translate", "reverse_words", "arithmetic")


@dataclass
class Setup:
    """One row of the table: who trains (esft or TRL) and how."""

    side: str  # "esft" | "trl"
    layout: str  # esft: "flat" | "rows" | "padded" | "auto"; TRL: "packed" | "padded"
    precision: str = "32-true"
    compile: bool = False
    attn: str = "auto"
    loss: str = "chunked"
    fp8: str | None = None

    @property
    def name(self) -> str:
        if self.side == "trl":
            return f"TRL SFTTrainer {self.layout}"
        parts = [self.layout, self.precision, f"attn {self.attn}", f"{self.loss} CE"]
        parts += ["compiled"] * self.compile + [f"fp8 {self.fp8}"] * bool(self.fp8)
        return "esft " + ", ".join(parts)


# ---- data ------------------------------------------------------------------------------------
def lognormal_examples(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random token ids with lognormal lengths: median e^5.6 = 270, mean ~405, in [16, max_length]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(max_length, max(16, rng.lognormvariate(5.6, 0.9))))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": list(ids), "length": length})
    return out


def builtin_examples(n: int, max_length: int) -> list[dict[str, Any]]:
    """The built-in task mix, tokenized with the built-in tokenizer, every token trained."""
    from esft.data.tasks import get_task
    from esft.data.tokenize import tokenize_records
    from esft.models import load_tokenizer

    records = [r for name in TASK_MIX for r in get_task(name).generate(n // len(TASK_MIX), seed=0)]
    examples, _ = tokenize_records(records, load_tokenizer("builtin"), max_length, "all")
    return examples


# ---- one row, in its own process -------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(setup: Setup, times: list[float], tokens: list[int], pairs: list[int], losses: list[float], model,
         args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from esft.callbacks.throughput import peak_memory_gib
    from esft.flops import attention_flops_per_pair, matmul_params, peak_bf16_tflops, training_flops

    w = args.warmup
    rates = [n / t for n, t in zip(tokens[w:], times[w:])]
    tok_s = statistics.median(rates)
    params, per_pair = matmul_params(model), attention_flops_per_pair(model.config)
    flops_per_token = training_flops(params, per_pair, sum(tokens[w:]), sum(pairs[w:])) / sum(tokens[w:])
    tflops = tok_s * flops_per_token / 1e12
    peak = args.peak_tflops or peak_bf16_tflops(device)
    return {
        **asdict(setup), "setup": setup.name, "tokens_per_s": round(tok_s), "tflops": round(tflops, 3),
        "mfu_pct": round(100 * tflops / peak, 1) if peak else None, "tokens_per_step": round(statistics.mean(tokens[w:])),
        "peak_gib": round(peak_memory_gib(device), 2), "steps_timed": len(rates),
        "final_loss": round(statistics.mean(losses[-10:]), 4) if losses else None, "losses": [round(x, 4) for x in losses],
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_esft(setup: Setup, examples: list[dict], args: argparse.Namespace, per_step_docs: int) -> dict[str, Any]:
    import lightning as L

    from esft.data import SFTDataModule
    from esft.objectives import SFTModule
    from esft.optim import OptimConfig

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    times: list[float] = []
    tokens: list[int] = []
    pairs: list[int] = []
    losses: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            _sync(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            _sync(device)
            times.append(time.perf_counter() - self.start)
            tokens.append(batch["num_tokens"])
            pairs.append(batch["num_causal_pairs"])
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    module = SFTModule(model_config=SHAPES[args.shape], tokenizer="builtin", dtype=args.dtype, attn_implementation=setup.attn,
                       loss_impl="liger" if setup.loss == "liger" else "chunked", loss_chunk_size=0 if setup.loss == "full" else 1024,
                       gradient_checkpointing=args.gradient_checkpointing, compile=setup.compile, fp8=setup.fp8,
                       optim=OptimConfig(lr=args.lr, warmup_steps=0, schedule="constant"))  # as TRL's rows
    packed = setup.layout != "padded"
    dm = SFTDataModule(tokenizer_name="builtin", max_length=args.max_length, max_tokens=args.max_length * args.rows,
                       packing=packed, layout=setup.layout if setup.layout in ("flat", "rows") else "auto",
                       batch_size=per_step_docs, num_val_per_task=0)
    dm.train_examples = examples  # pre-tokenized: `setup` keeps them
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=args.steps + args.warmup, precision=setup.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[StepTimer()], limit_val_batches=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, dm)
    return _row(setup, times, tokens, pairs, losses, module.model, args, device)


def _batch_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Real tokens and causal pairs of a TRL batch: padded (attention mask) or padding-free
    (positions restarting at 0 per document)."""
    from esft.data.packing import causal_pairs

    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(1).tolist()
    else:
        pos = batch["position_ids"].flatten()
        starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    return int(sum(lengths)), causal_pairs(lengths)


def run_trl(setup: Setup, examples: list[dict], args: argparse.Namespace, per_step_docs: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from esft.models import load_tokenizer

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tokenizer = load_tokenizer("builtin")
    fields = dict(SHAPES[args.shape])
    fields.setdefault("vocab_size", len(tokenizer))
    config = AutoConfig.for_model(fields.pop("model_type"), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation=args.trl_attn)
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples]})
    times: list[float] = []
    tokens: list[int] = []
    pairs: list[int] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(device)
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    packed = setup.layout == "packed"
    # padded: the step's documents in micro-batches of at most --trl-padded-batch (gradient accumulation)
    accum = 1 if packed else -(-per_step_docs // args.trl_padded_batch)
    sft_args = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps + args.warmup, gradient_accumulation_steps=accum,
        per_device_train_batch_size=args.rows if packed else -(-per_step_docs // accum), learning_rate=args.lr, lr_scheduler_type="constant",
        max_length=args.max_length, packing=packed, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=device.type == "cpu", bf16=device.type == "cuda" and args.dtype == "bfloat16", dataloader_num_workers=0, seed=0,
        disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        n, p = _batch_stats(batch)
        tokens.append(n)
        pairs.append(p)
        return batch

    trainer.data_collator = counting
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    steps = len(times)
    tokens = [sum(tokens[i * accum : (i + 1) * accum]) for i in range(steps)]
    pairs = [sum(pairs[i * accum : (i + 1) * accum]) for i in range(steps)]
    return _row(setup, times, tokens, pairs, losses, model, args, device)


# ---- the table -------------------------------------------------------------------------------
def moving_average(xs: list[float], window: int = 10) -> list[float]:
    return [sum(xs[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))]


def add_loss_gaps(rows: list[dict[str, Any]]) -> None:
    """``loss_gap_pct``: the largest gap between a row's 10-step moving-average loss and the
    first esft row's, in % of the latter, over all steps (the same data order: a precision or
    kernel check such as bf16 vs fp32)."""
    esft = [r for r in rows if r["side"] == "esft" and r.get("losses")]
    if not esft:
        return
    ref = moving_average(esft[0]["losses"])
    for r in esft:
        ma = moving_average(r["losses"])
        r["loss_gap_pct"] = round(max(abs(a - b) / abs(b) for a, b in zip(ma, ref)) * 100, 2)

def setups(args: argparse.Namespace) -> list[Setup]:
    rows = [Setup("trl", layout) for layout in args.trl]
    for layout, precision, compiled, attn, loss, fp8 in itertools.product(
            args.layout, args.precision, args.compile, args.attn, args.loss, args.fp8):
        rows.append(Setup("esft", layout, precision, compiled == "on", attn, loss, None if fp8 == "none" else fp8))
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows, base = result["rows"], result["baseline_tokens_per_s"]
    head = (f"{result['shape']} shape ({rows[0]['params'] / 1e6:.1f}M parameters), {result['device_name']}, "
            f"{result['num_docs']} documents (mean {result['mean_doc_tokens']:.0f} tokens, data `{result['data']}`), "
            f"{result['rows_per_step']} x {result['max_length']} tokens per step, medians of {result['steps']} steps "
            f"after {result['warmup']} warm-up, gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}\n\n")
    lines = ["| setup | real tokens/s | x TRL packed | TFLOP/s | MFU % | tokens/step | peak GiB | loss (last 10) | loss gap % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setup']} | failed: {r['error']} | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {r['setup']} | {r['tokens_per_s']:,} | {ratio} | {r['tflops']} | {r['mfu_pct'] if r['mfu_pct'] is not None else '-'} "
                     f"| {r['tokens_per_step']:,} | {r['peak_gib']} | {r['final_loss']} | {r.get('loss_gap_pct', '-')} |")
    return head + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--data", choices=["builtin", "lognormal"], default="builtin")
    p.add_argument("--docs", type=int, default=4000, help="documents in the data set")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="packed rows per step (tokens per step = rows x max-length)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default=None, help="weight dtype of every row (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--layout", nargs="+", default=["auto"], choices=["auto", "flat", "rows", "padded"], help="esft rows")
    p.add_argument("--precision", nargs="+", default=None, help="Lightning precisions of the esft rows (default: 32-true on cpu, bf16-true on cuda)")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--attn", nargs="+", default=["auto"], help="attention of the esft rows (auto, sdpa, esft_varlen, eager)")
    p.add_argument("--loss", nargs="+", default=["chunked"], choices=["chunked", "full", "liger"])
    p.add_argument("--fp8", nargs="+", default=["none"], choices=["none", "tensorwise", "rowwise"], help="torchao FP8 of the esft rows")
    p.add_argument("--trl", nargs="*", default=["packed", "padded"], choices=["packed", "padded"], help="TRL rows (none: --no-trl)")
    p.add_argument("--no-trl", dest="trl", action="store_const", const=[])
    p.add_argument("--trl-attn", default="sdpa")
    p.add_argument("--trl-padded-batch", type=int, default=64,
                   help="largest TRL padded micro-batch; a step with more documents accumulates gradients")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: the device's dense BF16 peak)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row on CPU")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.precision = args.precision or (["bf16-true"] if args.device.startswith("cuda") else ["32-true"])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("esft bench: trl is not installed (pip install 'esft[bench]'); running the esft rows only", file=sys.stderr)
            args.trl = []
    vocab = SHAPES[args.shape].get("vocab_size")
    examples = (lognormal_examples(args.docs, vocab or 1620, args.max_length) if args.data == "lognormal"
                else builtin_examples(args.docs, args.max_length))
    mean_len = statistics.mean(e["length"] for e in examples)
    per_step_docs = max(1, round(args.rows * args.max_length * 0.95 / mean_len))
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for setup in setups(args):
        fn = run_trl if setup.side == "trl" else run_esft
        # a fresh process per row: peak memory, allocator and compile caches belong to that row alone
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                row = pool.submit(fn, setup, examples, args, per_step_docs).result()
            except Exception as e:  # one failing row (a missing kernel, OOM) does not end the table
                row = {**asdict(setup), "setup": setup.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        rows.append(row)
        print(f"[bench] {row['setup']}: " + (row.get("error") or f"{row['tokens_per_s']:,} tokens/s, {row['peak_gib']} GiB"),
              file=sys.stderr, flush=True)
    add_loss_gaps(rows)
    trl_packed = next((r for r in rows if r["side"] == "trl" and r["layout"] == "packed" and "error" not in r), None)
    result = {
        "shape": args.shape, "device_name": device_name, "data": args.data, "num_docs": len(examples), "mean_doc_tokens": mean_len,
        "rows_per_step": args.rows, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
        "gradient_checkpointing": args.gradient_checkpointing, "baseline_tokens_per_s": trl_packed["tokens_per_s"] if trl_packed else None,
        "args": vars(args), "rows": rows,
    }
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
