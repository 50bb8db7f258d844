"""Time to the first training step on large chat data, cold and warm, beside TRL's SFTTrainer.

    python benchmarks/data_scale.py --sizes 100000 1000000 --out benchmarks/results/data_scale_cpu.json

For each size, synthetic multi-turn conversations (`esft.data.tasks.chats`: the built-in tasks as
1–4-turn chats with a system prompt) are written to a JSON Lines file, and each row below runs as
its own process, timed from its start to the start of its first training step (a callback records
the time and the peak resident memory there, then ends the process):

- ``esft cold``: ``esft fit --config configs/sft/data_scale.yaml`` with an empty data cache: the
  file is read, tokenized with assistant-only masking in one worker per core, cached and packed;
- ``esft warm``: the same command again: the cache is mapped, the packing plan built;
- ``TRL cold`` / ``TRL warm``: TRL's `SFTTrainer` on the same file (``load_dataset("json")``),
  the same tokenizer with the same ChatML rendering (written with ``{% generation %}`` blocks,
  which TRL's ``assistant_only_loss`` needs), the same model, ``packing=True`` (best-fit
  decreasing) and the same ``max_length``; once with an empty datasets cache, then again; with
  ``--trl-num-proc``, also with ``dataset_num_proc`` set.

Peak RSS is that of the training process (the one rank); the preparation workers' peak is
reported beside it. The ratio column divides TRL's cold time by esft's. Results go to `--out`
(JSON) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
CHATML_GENERATION = (  # the built-in ChatML template, with the assistant text in generation blocks
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _first_step(out: str) -> None:
    """Record the time and peak RSS (this process, and its finished children) and end the process."""
    usage = {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    Path(out).write_text(json.dumps({"t": time.time(), "rss_kib": usage}))
    os._exit(0)


class FirstStep(L.Callback):
    """Ends an ``esft fit`` run at the start of its first training step (see `_first_step`)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _first_step(self.out)


def trl_main(data: str, out: str, max_length: int, num_proc: int | None) -> None:
    """TRL's SFTTrainer on `data` up to its first step (run in its own process)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from esft.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    tokenizer.chat_template = CHATML_GENERATION
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_length,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    dataset = load_dataset("json", data_files=data, split="train").select_columns(["messages"])

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _first_step(out)

    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=max_length, packing=True, assistant_only_loss=True,
                     per_device_train_batch_size=1, max_steps=1, report_to=[], use_cpu=True, bf16=False,
                     dataset_num_proc=num_proc, save_strategy="no")
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Stop()]).train()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "esft_data_scale",
                   help="where the chat files, caches and logs go (the chat files are reused)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--trl-num-proc", type=int, nargs="*", default=[], help="extra TRL rows with dataset_num_proc")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]),
           "TOKENIZERS_PARALLELISM": "true"}
    results = []
    for n in args.sizes:
        data = args.work / f"chats_{n}.jsonl"
        if not data.exists():
            from esft.data.tasks.chats import write_chats

            write_chats(data.with_suffix(".tmp"), n).rename(data)
        cache = Path(tempfile.mkdtemp(dir=args.work, prefix=f"cache_{n}_"))
        esft = [sys.executable, "-c", "from esft.cli import run; run()", "fit",
                "--config", str(ROOT / "configs/sft/data_scale.yaml"), "--data.init_args.path", str(data),
                "--data.init_args.cache_dir", str(cache), "--data.init_args.max_length", str(args.max_length),
                "--trainer.default_root_dir", str(args.work / f"run_{n}"), "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false", "--trainer.callbacks", json.dumps(
                    [{"class_path": "data_scale.FirstStep", "init_args": {"out": str(args.work / f"esft_{n}.json")}}])]
        rows = {}
        for name in ("esft cold", "esft warm"):
            rows[name] = timed_esft(esft, env, args.work / f"{name.replace(' ', '_')}_{n}.log")
        if not args.no_trl:
            for num_proc in [None, *args.trl_num_proc]:
                hf_cache = tempfile.mkdtemp(dir=args.work, prefix=f"hf_{n}_")
                trl_env = {**env, "HF_DATASETS_CACHE": hf_cache, "HF_DATASETS_OFFLINE": "1"}
                suffix = f" (dataset_num_proc={num_proc})" if num_proc else ""
                for kind in ("cold", "warm") if num_proc is None else ("cold",):
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(data),
                           str(args.work / f"trl_{n}.json"), str(args.max_length), str(num_proc or 0)]
                    rows[f"TRL {kind}{suffix}"] = timed_trl(cmd, trl_env, args.work / f"trl_{kind}_{num_proc}_{n}.log")
        for name, row in rows.items():
            results.append({"size": n, "row": name, **row})
            print(f"{n:>9,} {name:<36} {row['seconds']:>8.1f} s  {row['rss_gib']:.2f} GiB "
                  f"(workers {row['workers_rss_gib']:.2f} GiB)", flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": results, "cpus": os.cpu_count(), "load": os.getloadavg()}, indent=1))


def timed_esft(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    return _timed(cmd, env, log, Path(json.loads(cmd[-1])[0]["init_args"]["out"]))


def timed_trl(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    return _timed(cmd, env, log, Path(cmd[4]))


def _timed(cmd: list[str], env: dict[str, str], log: Path, out: Path) -> dict:
    """Run `cmd` up to its first step: seconds from launch, and peak RSS in GiB."""
    out.unlink(missing_ok=True)
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if not out.exists():
        raise RuntimeError(f"the run ended (status {proc.returncode}) before its first step; see {log}")
    result = json.loads(out.read_text())
    return {"seconds": round(result["t"] - start, 1), "rss_gib": round(result["rss_kib"]["self"] / 2**20, 2),
            "workers_rss_gib": round(result["rss_kib"]["children"] / 2**20, 2)}


def markdown(results: list[dict]) -> str:
    lines = ["| conversations | run | to first step (s) | peak RSS (GiB) | workers' peak RSS (GiB) | TRL cold / this |",
             "|---|---|---|---|---|---|"]
    for r in results:
        trl = next((x["seconds"] for x in results if x["size"] == r["size"] and x["row"] == "TRL cold"), None)
        ratio = f"{trl / r['seconds']:.2f}" if trl and r["row"].startswith("esft") else ""
        lines.append(f"| {r['size']:,} | {r['row']} | {r['seconds']:.1f} | {r['rss_gib']:.2f} | "
                     f"{r['workers_rss_gib']:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        data, out, max_length, num_proc = sys.argv[2:6]
        trl_main(data, out, int(max_length), int(num_proc) or None)
    else:
        main()
