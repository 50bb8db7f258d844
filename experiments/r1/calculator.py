"""Multi-turn GRPO on the calculator task: held-out greedy pass@1 and sampled reward before and after.

    python experiments/r1/calculator.py experiments/r1/runs            # run what is missing, then collect

For each seed k: the cold start ``esft fit --config configs/sft/calculator_cold_start.yaml`` in
``<runs>/calculator/seed<k>/cold_start``, then ``esft fit --config configs/grpo/calculator_tiny.yaml``
from its ``hf`` export in ``<runs>/calculator/seed<k>/grpo`` (``seed_everything`` k, one thread).
A stage whose output is there already is not run again. Writes ``calculator.csv`` (every held-out
evaluation) and ``calculator.md`` (per seed: held-out greedy pass@1 at the start and the end; the
accuracy of 8 episodes sampled per held-out prompt at the training temperature, from the cold start
and from the GRPO model, which is what GRPO maximises; the mean sampled reward and policy turns of
the first and last 10 steps; the stages' wall times).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from temperature import val_curve  # noqa: E402

HERE = Path(__file__).parent
CONFIGS = HERE.parent.parent / "configs"
COLD_START = CONFIGS / "sft" / "calculator_cold_start.yaml"
GRPO = CONFIGS / "grpo" / "calculator_tiny.yaml"


def fit(config: Path, out: Path, seed: int, *args: str) -> float:
    """Run ``esft fit`` in `out` (its relative run directory lands there) unless it ran before;
    its wall seconds (kept in ``out/wall_s``)."""
    if (out / "hf" / "config.json").exists():
        return float((out / "wall_s").read_text())
    out.mkdir(parents=True, exist_ok=True)
    argv = ["esft", "fit", "--config", str(config.resolve()), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(out.resolve()), "--trainer.enable_progress_bar", "false", *args]
    t0 = time.perf_counter()
    with (out / "fit.log").open("w") as log:
        subprocess.run(argv, cwd=out, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    (out / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return float((out / "wall_s").read_text())


def sampled_accuracy(model_dir: Path, temperature: float, n: int = 200, k: int = 8) -> float:
    """Mean verifier score of `k` episodes per held-out prompt (the GRPO config's `n` held-out
    calculator prompts, seed 0) sampled at `temperature`, up to 12 tokens a turn, the task's 4 turns."""
    import torch
    from transformers import AutoModelForCausalLM

    from esft.data.tasks import get_task
    from esft.evaluation import evaluate
    from esft.models import load_tokenizer

    torch.manual_seed(0)
    records = {"calculator": get_task("calculator").generate(n, seed=0, split="heldout")}
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(str(model_dir))
    return evaluate(model, tokenizer, records, 12, n, k, do_sample=True, temperature=temperature, top_k=0)["calculator"]["exact_match"]


def train_scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sorted(run.rglob("events.out.tfevents.*"))[-1])).Reload()
    return [e.value for e in acc.Scalars(tag)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="?", default=HERE / "runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--temperature", type=float, default=1.0, help="the GRPO config's sampling temperature")
    args = p.parse_args()
    rows, table = [], []
    for seed in args.seeds:
        root = args.runs / "calculator" / f"seed{seed}"
        cold_s = fit(COLD_START, root / "cold_start", seed)
        grpo_s = fit(GRPO, root / "grpo", seed, "--model.init_args.model_name_or_path",
                     str((root / "cold_start" / "hf").resolve()), "--trainer.log_every_n_steps", "1")
        curve = val_curve(root / "grpo")
        rows += [{"seed": seed, "step": s, "pass@1": v} for s, v, _ in curve]
        reward, turns = train_scalars(root / "grpo", "train/reward"), train_scalars(root / "grpo", "train/turns")
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        before, after = (sampled_accuracy(root / stage / "hf", args.temperature) for stage in ("cold_start", "grpo"))
        table.append(f"| {seed} | {curve[0][1]:.3f} | {curve[-1][1]:.3f} | {before:.3f} | {after:.3f} | "
                     f"{mean(reward[:10]):.3f} | "
                     f"{mean(reward[-10:]):.3f} | {mean(turns[:10]):.2f} / {mean(turns[-10:]):.2f} | "
                     f"{cold_s:.0f} s / {grpo_s:.0f} s |")
    with (HERE / "calculator.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "step", "pass@1"])
        writer.writeheader()
        writer.writerows(rows)
    head = ("| seed | greedy pass@1, cold start | after GRPO | sampled accuracy, cold start | after GRPO | "
            "train reward, first 10 steps | last 10 steps | turns (first / last 10) | wall: cold start / GRPO |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    (HERE / "calculator.md").write_text(head + "\n".join(table) + "\n")
    print(head + "\n".join(table))


if __name__ == "__main__":
    main()
