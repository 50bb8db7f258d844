"""The ESFT paper's tables (arXiv 2407.01906, Tables 1-4) at a scale that runs on a CPU.

    python experiments/esft_paper/run.py                      # everything, resumable
    python experiments/esft_paper/run.py --seeds 0 --no-ablations
    python experiments/esft_paper/run.py --report-only         # rebuild tables and plots
    python experiments/esft_paper/run.py --lr-check extract_fields # FFT, ESFT-Token x 4 learning rates
    python experiments/esft_paper/run.py --base runs/bases/moe-<hash>/hf --name moe --seeds 0 1 2
        # another base (an HF directory, e.g. `esft base --config configs/base/moe.yaml`'s) instead
        # of pretraining base.yaml: runs/esft_paper_moe/, results_moe/, experts_moe/
    python experiments/esft_paper/run.py --base ... --name moe_balanced --lr-select \
        --lr-methods fft lora esft_token esft_gate        # each method's rate per task on a validation split
                                                          # (--lr-seeds 0 1: by the mean over seeds);
                                                          # the tables' runs then use those rates
    python experiments/esft_paper/run.py --base ... --p-ablation --ablation-seeds 0 1 2  # paper Figure 4

1. Base: `base.yaml` pretrains a tiny DeepSeek-V2-shaped MoE on the general mixture plus three
   domains (`base_data`: 4 general tasks x 6000 problems + 300 of each specialized task), once
   (cached in runs/esft_paper/base/hf); its held-out scores are the "vanilla" row.
2. Experts, per held-out specialized task: `esft experts score` on 32,768 tokens of its training
   data, then `esft experts select` for ESFT-Token (p=0.2), ESFT-Gate (p=0.1), the Table 3 variants
   (token selection + shared experts; + non-expert modules) and the Table 4 controls (random
   experts, same count per layer: `random_*` one draw for every seed, `random_*_x` a draw per seed
   that excludes the selected experts). Configs and heatmaps: experts/<task>/.
3. Fine-tuning, per task and seed: `esft sweep` over `finetune.yaml` with one cell per method
   (FFT, LoRA r=8, ESFT-Token, ESFT-Gate, and the ablations), into runs/esft_paper/sweep/<task>.
4. Report: results/results.csv (one row per run), results/tables.md (our numbers beside the
   paper's, and how concentrated and task-specific the base's routing is), results/methods.png.

With --base, steps 2-4 run on that model instead (its vanilla row, expert scores and sizes too),
into runs/esft_paper_<name>/, experts_<name>/ and results_<name>/; the own base's stay untouched.

Runs on a GPU with a real MoE by editing base.yaml / finetune.yaml (model_name_or_path, data
paths, steps): nothing here assumes the tiny model.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = ROOT / "runs" / "esft_paper"
TASKS = ["intent_json", "extract_fields", "translate"]
GENERAL = ["general", {"name": "arithmetic", "max_digits": 2, "ops": "+"}, "sort_words", "list_ops"]
GENERAL_NAMES = ["general", "arithmetic", "sort_words", "list_ops"]
MAIN = ["fft", "lora", "esft_token", "esft_gate"]
ABLATIONS = ["esft_token_shared", "esft_token_nonexpert", "random_token", "random_gate", "random_token_x", "random_gate_x"]
# the p ablation (paper Figure 4): token p 0.1-0.4, gate p 0.05-0.3
P_VALUES = {"token": [0.1, 0.2, 0.3, 0.4], "gate": [0.05, 0.1, 0.2, 0.3]}
TABLE_P = {"token": 0.2, "gate": 0.1}  # the tables' ESFT-Token and ESFT-Gate (the paper's setting)
P_COLUMNS = ["specialized", "general", "spec. loss", "general loss"]  # its table's measured columns
DRAWS = range(5)  # random_*_x: one draw per seed, none of them a selected expert
EXTEND = 2  # lr_select: rates tried beyond the grid's edge when the best one is on it
VAL_PROBLEMS = 200  # lr_select: validation problems per task (after the training ones)
FINETUNE = yaml.safe_load((HERE / "finetune.yaml").read_text())
FINETUNE_LR = FINETUNE["model"]["init_args"]["optim"]["lr"]
# ESFT paper (DeepSeek-V2-Lite), Tables 1-4
PAPER = {
    "vanilla": {"specialized": 33.6, "general": 62.4},
    "fft": {"specialized": 51.0, "general": 58.8, "train_min": 28.5, "storage_gb": 28.6},
    "lora": {"specialized": 44.9, "general": 59.1, "train_min": 16.5},
    "esft_token": {"specialized": 49.4, "general": 61.5, "train_min": 19.8, "storage_gb": 2.57},
    "esft_gate": {"specialized": 50.2, "general": 60.6, "train_min": 20.9, "storage_gb": 3.20},
    "random_token": {"specialized_delta": -2.8},
    "random_gate": {"specialized_delta": -4.4},
    "random_token_x": {"specialized_delta": -2.8},
    "random_gate_x": {"specialized_delta": -4.4},
}


@dataclass(frozen=True)
class Study:
    """Where one reproduction reads its base and writes its runs, expert configs and results: the
    study's own base (pretrained from base.yaml when missing) or a given HF directory, whose
    results stay apart from the own base's."""

    base: Path
    runs: Path
    results: Path
    experts: Path
    own_base: bool

    @classmethod
    def own(cls) -> Study:
        return cls(RUNS / "base" / "hf", RUNS, HERE / "results", HERE / "experts", own_base=True)

    @classmethod
    def given(cls, base: Path, name: str | None = None) -> Study:
        """A study on `base`, named `name` (default: the base's directory, or its parent's when the
        directory is an ``hf`` export)."""
        base = base.resolve()
        if not (base / "model.safetensors").exists():
            raise SystemExit(f"run.py --base: no model.safetensors in {base} (give an HF model directory)")
        name = name or (base.parent.name if base.name == "hf" else base.name)
        return cls(base, ROOT / "runs" / f"esft_paper_{name}", HERE / f"results_{name}", HERE / f"experts_{name}",
                   own_base=False)


def sh(*cmd: str) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def base_data() -> Path:
    """The base's pretraining mixture: 6000 problems of each general task, plus 300 of each
    specialized task (from another seed than the fine-tuning data), so that the base has seen the
    domains' vocabulary and format a little, as a real base has (the paper's vanilla scores are
    not 0), while the tasks stay mostly new."""
    from esft.data.tasks import build_task

    path = RUNS / "base_data.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [r for spec in GENERAL for r in build_task(spec).generate(6000, seed=0, split="train")]
        rows += [r for spec in TASKS for r in build_task(spec).generate(300, seed=1, split="train")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ensure_base(study: Study) -> None:
    if study.own_base and not (study.base / "model.safetensors").exists():
        sh("-m", "esft.cli", "fit", "--config", str(HERE / "base.yaml"), "--data.init_args.path", str(base_data()))


def vanilla(study: Study) -> dict[str, float]:
    path = study.results / "vanilla.json"
    if path.exists():
        return json.loads(path.read_text())
    from esft.callbacks.evaluation import TaskEvaluation
    from esft.data.tasks import build_task
    from esft.evaluation import evaluate_tasks
    from esft.objectives.loading import load_model

    import torch

    cb = TaskEvaluation(tasks=[], num_examples=100)  # the fine-tuning runs' evaluation settings
    settings = yaml.safe_load((HERE / "finetune.yaml").read_text())["trainer"]["callbacks"][1]["init_args"]
    model, tokenizer = load_model(str(study.base), torch.device("cpu"), "float32")
    records = {t.name: t.generate(settings["num_examples"], cb.seed, "heldout")
               for t in (build_task(s) for s in TASKS + GENERAL)}
    scores = evaluate_tasks(model, tokenizer, records, settings["max_new_tokens"])
    study.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def answer_losses(model_dir: Path, records: dict[str, list[dict]]) -> dict[str, float]:
    """The mean next-token loss of the model in `model_dir` on the answers of each named list of
    records, cut to finetune.yaml's max_length as the fine-tuning runs cut them."""
    from esft.evaluation.perplexity import perplexity
    from esft.objectives.loading import load_model

    import torch

    model, tokenizer = load_model(str(model_dir), torch.device("cpu"), "float32")
    max_length = FINETUNE["data"]["init_args"]["max_length"]
    return {name: perplexity(model, tokenizer, recs, max_length=max_length)["loss"] for name, recs in records.items()}


def heldout_losses(model_dir: Path, cache: Path | None = None) -> dict[str, float]:
    """Mean next-token loss on the answers of the same held-out problems as the exact-match
    evaluation (a continuous signal where exact match is still 0 at this scale); cached in
    `cache` (default: the model directory's heldout_loss.json)."""
    cache = cache or model_dir / "heldout_loss.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from esft.callbacks.evaluation import TaskEvaluation
    from esft.data.tasks import build_task
    from esft.runconfig import atomic_write

    seed = TaskEvaluation(tasks=[]).seed
    losses = answer_losses(model_dir, {t.name: t.generate(100, seed, "heldout") for t in map(build_task, TASKS + GENERAL)})
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps(losses, indent=1) + "\n")  # parallel run.py processes may read it meanwhile
    return losses


def base_losses(study: Study) -> dict[str, float]:
    """The base's held-out losses, cached in the study's runs (a given base's directory is not ours
    to write)."""
    return heldout_losses(study.base, study.runs / "base_heldout_loss.json")


def expert_configs(study: Study, task: str) -> dict[str, Path]:
    out = study.experts / task
    if not (out / "scores.json").exists():
        sh("-m", "esft.cli", "experts", "score", "--model", str(study.base), "--tokenizer", "builtin", "--tasks", task,
           "--num-per-task", "4000", "--tokens", "32768", "--max-length", "256", "--max-tokens", "2048",
           "--out", str(out))
    table = {m: ["--method", m, "--p", str(p)] for m, p in TABLE_P.items()}  # the tables' two selections
    variants = {
        **{f"esft_{m}": table[m] for m in table},
        "esft_token_shared": [*table["token"], "--shared-experts"],
        "esft_token_nonexpert": [*table["token"], "--non-expert-modules"],
        **{f"random_{m}": [*table[m], "--random-seed", "0"] for m in table},
        **{f"random_{m}_x_seed{d}": [*table[m], "--random-seed", str(d), "--exclude-selected"] for m in table for d in DRAWS},
        **{f"esft_{m}_p{p:g}": ["--method", m, "--p", str(p)] for m, ps in P_VALUES.items() for p in ps},
    }
    from esft.commands.experts import main as select  # in this process: ~20 selections per task

    paths = {}
    for name, args in variants.items():
        paths[name] = out / f"{name}.json"
        if not paths[name].exists():
            select(["select", "--scores", str(out / "scores.json"), *args, "--out", str(paths[name])])
    for m in ("token", "gate"):  # the sweep puts each seed's draw in: `{seed}` in an override value
        paths[f"random_{m}_x"] = out / f"random_{m}_x_seed{{seed}}.json"
    return paths


def grid(study: Study, task: str, configs: dict[str, Path], cells: list[str], lrs: list[float] | None = None,
         stem: str | None = None, cell_lrs: dict[str, float] | None = None) -> Path:
    """The sweep grid of `cells` on `task` (crossed with the learning rates `lrs` when given, or
    each cell at its own rate from `cell_lrs`), written to the study's grids/<stem or task>.yaml."""
    ft = "model.init_args"
    cell_overrides = {"fft": {}, "lora": {f"{ft}.lora": {"r": 8, "alpha": 16.0}}}
    cell_overrides.update({name: {f"{ft}.experts": str(configs[name].relative_to(ROOT))} for name in configs})
    for cell, lr in (cell_lrs or {}).items():
        if cell in cells:
            cell_overrides[cell] = {**cell_overrides[cell], f"{ft}.optim.lr": lr}
    spec = {
        "seeds": [0, 1],
        # the seed also draws the training problems and their order: the weights come from the
        # base, so seed_everything alone would make FFT and ESFT runs of two seeds identical
        "seed_keys": ["data.init_args.seed"],
        "set": {"model.init_args.model_name_or_path": str(study.base), "data.init_args.tasks": [task],
                "trainer.callbacks.TaskEvaluation.init_args.tasks": [task, *GENERAL]},
        "cells": {c: cell_overrides[c] for c in cells},
    }
    if lrs:
        spec["axes"] = {f"{ft}.optim.lr": lrs}
    path = study.runs / "grids" / f"{stem or task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(grid_path: Path, out: Path, seed: int) -> None:
    """One `esft sweep` of a grid's cells at `seed` over finetune.yaml, into `out` (resumable)."""
    sh("-m", "esft.commands.sweep", "--config", str(HERE / "finetune.yaml"), "--grid", str(grid_path),
       "--out", str(out), "--seeds", str(seed), "--metrics", "eval/*", "wall_s")


def lr_check(study: Study, task: str, cells: list[str], lrs: list[float], seed: int) -> None:
    """The learning-rate check: `cells` x `lrs` on one task and seed, into the study's
    lr/<task> sweep and results/lr_<task>.md (a row per method, a column per learning rate)."""
    from esft.reports import markdown_table

    configs = expert_configs(study, task)
    out = study.runs / "lr" / task
    sweep(grid(study, task, configs, cells, lrs, stem=f"lr_{task}"), out, seed)
    done = {}
    for d in runs_of(out, seed):
        m = d["metrics"]
        method = d["cell"].split(",")[0]  # the sweep names a cell "<method>,lr=<lr>"
        done[method, d["overrides"]["model.init_args.optim.lr"]] = (
            100 * task_score(m, task), 100 * statistics.mean(task_score(m, g) for g in GENERAL_NAMES))
    columns = ["method", *(f"lr {lr:g}" for lr in lrs)]
    rows = [{"method": c, **{f"lr {lr:g}": f"{v[0]:.1f} / {v[1]:.1f}" for lr in lrs if (v := done.get((c, lr)))}}
            for c in cells]
    lines = [f"Learning-rate check on {task}, seed {seed}: specialized exact match % / general avg % "
             "(100 held-out problems per task).", "", markdown_table(columns, rows)]
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / f"lr_{task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def runs_of(out: Path, seed: int | None = None) -> list[dict]:
    """The done.json of every finished run of a sweep directory (one seed, or all), each with the
    run's directory under "dir"."""
    pattern = f"*/seed{seed}/done.json" if seed is not None else "*/seed*/done.json"
    return [{**json.loads(path.read_text()), "dir": path.parent} for path in sorted(out.glob(pattern))]


def validation_loss(run: dict, task: str) -> float:
    """A finished run's (`runs_of`) mean answer loss on `VAL_PROBLEMS` problems of `task` that follow
    the ones it trained on: the training split past finetune.yaml's `num_train_per_task`, at the
    run's data seed, as `SFTDataModule(val_split="train")` builds them (none of them a training
    prompt or one of the held-out problems the tables score). Computed on the run's export after
    its last step; cached in the run's validation_loss.json."""
    cache = run["dir"] / "validation_loss.json"
    if cache.exists():
        return json.loads(cache.read_text())["loss"]
    from esft.data import SFTDataModule
    from esft.runconfig import atomic_write

    _, records = SFTDataModule(tasks=[task], num_train_per_task=FINETUNE["data"]["init_args"]["num_train_per_task"],
                               num_val_per_task=VAL_PROBLEMS, val_split="train", seed=run["seed"]).load_records()
    loss = answer_losses(run["dir"] / "hf", {task: records})[task]
    atomic_write(cache, json.dumps({"task": task, "problems": len(records), "loss": loss}, indent=1) + "\n")
    return loss


def lr_select(study: Study, tasks: list[str], cells: list[str], lrs: list[float],
              seeds: list[int]) -> dict[str, dict[str, float]]:
    """Each method's learning rate per task, chosen by validation loss: `cells` x `lrs` on each
    task at each of `seeds`, each run's final model scored by `validation_loss` (problems that
    follow the training ones, not the held-out test problems the tables score), a rate's loss the
    mean over the seeds. Where a method's best rate is the grid's highest (lowest), the next one out
    at the grid's spacing is tried too, up to `EXTEND` rates beyond the grid in all (reruns add
    none). Writes results/lr_select.md (validation loss and, for reference only, the test score
    per rate) and lr_select.json ({task: {method: lr}}, other tasks' entries kept), which the main
    runs read (`selected_lrs`)."""
    from esft.reports import markdown_table
    from esft.runconfig import atomic_write

    chosen: dict[str, dict[str, float]] = {}
    rows, tried = [], set(lrs)
    for task in tasks:
        out = study.runs / "lr_select" / task
        configs = expert_configs(study, task)
        for seed in seeds:
            sweep(grid(study, task, configs, cells, lrs, stem=f"lr_select_{task}"), out, seed)

        def validated() -> dict[tuple[str, float], tuple[float, float]]:
            """(method, rate) -> mean validation loss and test score over `seeds`, where all ran."""
            per_seed = defaultdict(list)
            for d in runs_of(out):
                if d["seed"] in seeds:
                    per_seed[d["cell"].split(",")[0], d["overrides"]["model.init_args.optim.lr"]].append(
                        (validation_loss(d, task), 100 * task_score(d["metrics"], task)))
            return {key: (statistics.mean(v[0] for v in runs), statistics.mean(v[1] for v in runs))
                    for key, runs in per_seed.items() if len(runs) == len(seeds)}

        val = validated()
        for cell in cells:
            while True:  # a best rate at the edge of the grid: try the next one out, up to EXTEND beyond it
                done = {lr: v for (c, lr), v in val.items() if c == cell}
                if len(done) < len(lrs) or sum(not min(lrs) <= lr <= max(lrs) for lr in done) >= EXTEND:
                    break
                best, edge = min(done, key=lambda lr: done[lr][0]), sorted(done)
                if best not in (edge[0], edge[-1]):
                    break
                step = edge[-1] / edge[-2] if best == edge[-1] else edge[0] / edge[1]
                nxt = float(f"{best * step:.1g}")
                tried.add(nxt)
                for seed in seeds:
                    sweep(grid(study, task, configs, [cell], [nxt], stem=f"lr_select_{task}_{cell}_{nxt:g}"), out, seed)
                val = validated()
        tried |= {lr for (c, lr) in val if c in cells}  # also the rates an earlier run added
        for cell in cells:
            done = {lr: v for (c, lr), v in val.items() if c == cell}
            if len(done) < len(lrs):
                continue
            chosen.setdefault(task, {})[cell] = min(done, key=lambda lr: done[lr][0])
            rows.append({"task": task, "method": cell, "chosen lr": f"{chosen[task][cell]:g}",
                         **{f"lr {lr:g}": f"{v[0]:.3f} ({v[1]:.1f})" for lr, v in sorted(done.items())}})
    lrs = sorted(tried)
    over = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"
    lines = [f"Learning rate per method and task by validation loss ({over}; the final model's answer loss on "
             f"{VAL_PROBLEMS} problems per task that follow the training ones, none of them a held-out test problem). "
             "Cells: validation loss (held-out test score %, not used to choose).", "",
             markdown_table(["task", "method", "chosen lr", *(f"lr {lr:g}" for lr in lrs)], rows)]
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "lr_select.md").write_text("\n".join(lines) + "\n")
    path = study.results / "lr_select.json"  # other tasks' choices (another process's) are kept
    atomic_write(path, json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **chosen}, indent=1) + "\n")
    print("\n".join(lines))
    return chosen


def selected_lrs(study: Study, task: str, cells: list[str]) -> dict[str, float]:
    """Each cell's rate on `task` from `lr_select`'s choice ({} before it ran: finetune.yaml's rate
    for all): a method's own, else ESFT-Token's for the token-selected variants and controls,
    ESFT-Gate's for the gate ones."""
    path = study.results / "lr_select.json"
    chosen = json.loads(path.read_text()).get(task, {}) if path.exists() else {}
    out = {}
    for cell in cells:
        kind = "esft_gate" if "gate" in cell else "esft_token" if cell.startswith(("esft_token", "random_token")) else cell
        if (lr := chosen.get(cell, chosen.get(kind))) is not None:
            out[cell] = lr
    return out


def refuse_stale(study: Study, tasks: list[str], cells: dict[str, list[str]]) -> None:
    """Stop, listing them, where finished runs of `cells` ({sweep directory: cells}, e.g. the
    tables' "sweep") are at another rate than the chosen one (`stale_runs`): nothing is deleted,
    the user moves them."""
    if stale := [r for where, cs in cells.items() for t in tasks for r in stale_runs(study, t, cs, where)]:
        raise SystemExit(f"run.py: {len(stale)} finished runs used another learning rate than lr_select.json "
                         f"now gives (run, its rate, the chosen one):\n  " + "\n  ".join(stale) +
                         f"\nMove them out of {study.runs} (e.g. to a sibling directory) to rerun them at the chosen "
                         "rates, or --report-only to tabulate them as they are.")


def stale_runs(study: Study, task: str, cells: list[str], where: str = "sweep") -> list[str]:
    """The finished runs of `cells` on `task` in the study's `where` sweeps (the tables' "sweep",
    "p_ablation") whose learning rate is no longer the one they would run at now (`lr_select` chose
    another since): "<run dir> (<used>, now <chosen>)". The sweep skips finished runs, so these would
    stay in the tables under the old rate."""
    want = selected_lrs(study, task, cells)
    stale = []
    for d in runs_of(study.runs / where / task):
        if d["cell"] in cells:
            used, now = d["overrides"].get("model.init_args.optim.lr", FINETUNE_LR), want.get(d["cell"], FINETUNE_LR)
            if used != now:
                stale.append(f"{d['dir'].relative_to(study.runs)} ({used:g}, now {now:g})")
    return stale


def p_ablation(study: Study, tasks: list[str], seeds: list[int]) -> None:
    """The paper's Figure 4: ESFT-Token at p 0.1-0.4 and ESFT-Gate at p 0.05-0.3, each at the rate
    `lr_select` chose for that method; results/p_ablation.md (exact match and held-out loss, mean
    over the tasks per seed) and p_ablation.png. The tables' p (`TABLE_P`) is the tables' own
    ESFT-Token / ESFT-Gate cell: those runs (sweep/<task>, run here where missing) serve both."""
    from esft.reports import markdown_table

    cells = [f"esft_{m}_p{p:g}" for m, ps in P_VALUES.items() for p in ps]
    tables = {f"esft_{m}": f"esft_{m}_p{p:g}" for m, p in TABLE_P.items()}  # the tables' cell -> its p cell
    own = [c for c in cells if c not in tables.values()]
    refuse_stale(study, tasks, {"sweep": list(tables), "p_ablation": own})
    for seed in seeds:
        for task in tasks:
            configs = expert_configs(study, task)
            sweep(grid(study, task, configs, own, stem=f"p_{task}", cell_lrs=selected_lrs(study, task, own)),
                  study.runs / "p_ablation" / task, seed)
            sweep(grid(study, task, configs, list(tables), stem=f"{task}_esft",
                       cell_lrs=selected_lrs(study, task, list(tables))), study.runs / "sweep" / task, seed)
    finished = {task: [d for d in runs_of(study.runs / "p_ablation" / task) if d["cell"] in own] +
                [{**d, "cell": tables[d["cell"]]} for d in runs_of(study.runs / "sweep" / task) if d["cell"] in tables]
                for task in tasks}  # (earlier versions ran the tables' p here too: those runs are not read)
    rows, series = [], []
    for cell in cells:
        per_seed = defaultdict(list)
        for task in tasks:
            for d in finished[task]:
                if d["cell"] == cell:
                    m, loss = d["metrics"], heldout_losses(d["dir"] / "hf")
                    config = json.loads((study.experts / task / f"{cell}.json").read_text())
                    per_seed[d["seed"]].append({
                        "specialized": 100 * task_score(m, task),
                        "general": 100 * statistics.mean(task_score(m, g) for g in GENERAL_NAMES),
                        "spec. loss": loss[task], "general loss": statistics.mean(loss[g] for g in GENERAL_NAMES),
                        "experts": sum(len(v) for v in config["experts"].values()) / len(config["experts"])})
        full = [v for v in per_seed.values() if len(v) == len(tasks)]
        if full:
            # per key, one value per seed (the mean over the tasks): the table and the plot read these
            by_seed = {key: [statistics.mean(x[key] for x in v) for v in full] for key in P_COLUMNS}
            experts = statistics.mean(x["experts"] for v in full for x in v)
            method, p = cell.rsplit("_", 1)[0], cell.rsplit("_p", 1)[1]
            series.append({"method": method, "p": p, "experts": experts, **by_seed})
            rows.append({"method": method, "p": p, "experts / layer": f"{experts:.2f}",
                         **{key: _mean_std(by_seed[key], 1 if key in ("specialized", "general") else 3)
                            for key in P_COLUMNS}, "seeds": len(full)})
    lines = ["p ablation (paper Figure 4): exact match % and held-out loss (mean over the tasks per seed; "
             "mean ± std over seeds).", "",
             markdown_table(["method", "p", "experts / layer", *P_COLUMNS, "seeds"], rows)]
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "p_ablation.md").write_text("\n".join(lines) + "\n")
    if series:
        plot_p(study.results / "p_ablation.png", series)
    print("\n".join(lines))


def plot_p(path: Path, series: list[dict]) -> None:
    """The p ablation against experts per layer, one line per method: exact match and held-out loss
    on the specialized and general tasks, mean over seeds with their std as error bars (`series`:
    per cell its method, p, experts per layer and one value per seed of each of `P_COLUMNS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["specialized exact match %", "general exact match %", "specialized held-out loss", "general held-out loss"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, key, title in zip(axes, P_COLUMNS, titles):
        for method in dict.fromkeys(c["method"] for c in series):
            mine = [c for c in series if c["method"] == method]
            x = [c["experts"] for c in mine]
            y = [statistics.mean(c[key]) for c in mine]
            err = [statistics.stdev(c[key]) if len(c[key]) > 1 else 0.0 for c in mine]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
            for c, xi, yi in zip(mine, x, y):
                ax.annotate(f"p={c['p']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("experts trained per layer")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def specialisation(study: Study) -> list[str]:
    """How concentrated and how task-specific the base's routing is, from the expert scores (the
    paper's Figure 2): per task the effective number of experts per layer and the top expert's
    token share, mean over layers; between tasks the total-variation distance of their token
    scores (0 = the same experts, 1 = none shared) and the overlap of their ESFT-Token selections."""
    from esft.experts.scoring import concentration, load_scores, score_distance

    scores = {t: load_scores(study.experts / t / "scores.json") for t in TASKS
              if (study.experts / t / "scores.json").exists() and (study.experts / t / "esft_token.json").exists()}
    if not scores:
        return []
    first = next(iter(scores.values()))
    lines = ["", f"Expert specialisation of the base ({first['num_experts']} routed experts, top-{first.get('top_k', '?')}; "
             "token scores):", "", "| task | effective experts / layer | top expert's share | ESFT-Token experts / layer |",
             "|---|---|---|---|"]
    selected = {}
    for task, sc in scores.items():
        conc = concentration(sc).values()
        chosen = json.loads((study.experts / task / "esft_token.json").read_text())["experts"]
        selected[task] = {(int(i), e) for i, v in chosen.items() for e in v}
        lines.append(f"| {task} | {statistics.mean(c['effective_experts'] for c in conc):.1f} "
                     f"| {statistics.mean(c['top_share'] for c in conc):.2f} | {len(selected[task]) / len(chosen):.1f} |")
    names = list(scores)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if pairs:
        lines += ["", "| tasks | score distance | ESFT-Token experts shared (Jaccard) |", "|---|---|---|"]
        for a, b in pairs:
            jaccard = len(selected[a] & selected[b]) / len(selected[a] | selected[b])
            lines.append(f"| {a} / {b} | {score_distance(scores[a], scores[b]):.2f} | {jaccard:.2f} |")
    return lines


def sizes(study: Study, run_dir: Path, cell: str) -> dict[str, float]:
    """Trainable parameters and stored bytes of what a run ships."""
    from safetensors import safe_open

    full = study.base / "model.safetensors"
    with safe_open(full, "pt") as f:
        total = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    if cell.startswith(("esft", "random")):
        adapter = run_dir / "adapter" / "adapter.safetensors"
        with safe_open(adapter, "pt") as f:
            trainable = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
        stored = adapter.stat().st_size
    elif cell == "lora":
        trainable = lora_params(study.base)
        stored = trainable * 4
    else:
        trainable, stored = total, full.stat().st_size
    return {"trainable": trainable, "trainable_pct": 100 * trainable / total, "stored_mb": stored / 1e6}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_LORA: dict[Path, int] = {}


def lora_params(base: Path) -> int:
    if base not in _LORA:
        from transformers import AutoModelForCausalLM

        from esft.models.lora import apply_lora

        model = apply_lora(AutoModelForCausalLM.from_pretrained(base), {"r": 8, "alpha": 16.0})
        _LORA[base] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _LORA[base]


def task_score(metrics: dict, task: str) -> float | None:
    """A task's held-out score in a done.json: ``eval/<task>/<metric>`` under the task's own
    metric (translate also logs BLEU beside its chrF), or ``eval/<task>`` in runs recorded
    before tasks named their metric."""
    from esft.data.tasks import get_task

    own = f"eval/{task}/{get_task(task).metric}"
    return metrics[own] if own in metrics else metrics.get(f"eval/{task}")


def collect(study: Study) -> list[dict]:
    rows = []
    for done in sorted((study.runs / "sweep").glob("*/*/seed*/done.json")):
        d = json.loads(done.read_text())
        task = done.parents[2].name
        m = d["metrics"]
        scores = {t: task_score(m, t) for t in [task, *GENERAL_NAMES]}
        general = [scores[g] for g in GENERAL_NAMES if scores[g] is not None]
        loss = heldout_losses(done.parent / "hf")
        rows.append({"task": task, "method": d["cell"], "seed": d["seed"],
                     "lr": d["overrides"].get("model.init_args.optim.lr", FINETUNE_LR),
                     "specialized": 100 * (scores[task] if scores[task] is not None else float("nan")),
                     "general": 100 * statistics.mean(general) if general else float("nan"),
                     **{f"general_{g}": 100 * scores[g] for g in GENERAL_NAMES if scores[g] is not None},
                     "specialized_loss": loss[task], "general_loss": statistics.mean(loss[g] for g in GENERAL_NAMES),
                     "train_loss": m.get("train/loss"), "tokens_per_s": m.get("perf/tokens_per_s"),
                     "wall_s": m["wall_s"], **sizes(study, done.parent, d["cell"])})
    return rows


def _mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(study: Study, rows: list[dict], base: dict[str, float]) -> None:
    study.results.mkdir(parents=True, exist_ok=True)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(study.results / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    seeds = sorted({r["seed"] for r in rows})
    van_spec = 100 * statistics.mean(base[t] for t in TASKS)
    van_gen = 100 * statistics.mean(base[g] for g in GENERAL_NAMES)
    lines = [f"Exact match (%) on 100 held-out problems per task; mean ± sample std over seeds {seeds} "
             f"(each seed's value is the mean over the {len(TASKS)} tasks). Paper: DeepSeek-V2-Lite, Tables 1-2.", "",
             "| method | " + " | ".join(TASKS) + " | specialized avg | paper | general avg | paper | "
             "specialized loss | general loss | trainable % | stored MB | paper GB | wall s / run | train tok/s |",
             "|---|" + "---|" * (len(TASKS) + 11)]
    van_loss = base_losses(study)
    lines.append("| vanilla (base) | " + " | ".join(f"{100 * base[t]:.1f}" for t in TASKS) +
                 f" | {van_spec:.1f} | 33.6 | {van_gen:.1f} | 62.4 "
                 f"| {statistics.mean(van_loss[t] for t in TASKS):.3f} "
                 f"| {statistics.mean(van_loss[g] for g in GENERAL_NAMES):.3f} | - | - | - | - | - |")

    def seed_avg(method, key):
        per_seed = defaultdict(list)
        for r in by[method]:
            per_seed[r["seed"]].append(r[key])
        return [statistics.mean(v) for s, v in sorted(per_seed.items()) if len(v) == len(TASKS)]

    for method in MAIN + ABLATIONS:
        if not by[method]:
            continue
        per_task = [_mean_std([r["specialized"] for r in by[method] if r["task"] == t]) for t in TASKS]
        p = PAPER.get(method, {})
        lines.append(
            f"| {method} | " + " | ".join(per_task) +
            f" | {_mean_std(seed_avg(method, 'specialized'))} | {p.get('specialized', '-')} "
            f"| {_mean_std(seed_avg(method, 'general'))} | {p.get('general', '-')} "
            f"| {_mean_std(seed_avg(method, 'specialized_loss'), 3)} | {_mean_std(seed_avg(method, 'general_loss'), 3)} "
            f"| {statistics.mean(r['trainable_pct'] for r in by[method]):.1f} "
            f"| {statistics.mean(r['stored_mb'] for r in by[method]):.3f} | {p.get('storage_gb', '-')} "
            f"| {statistics.mean(r['wall_s'] for r in by[method]):.0f} "
            f"| {statistics.mean(r['tokens_per_s'] for r in by[method] if r['tokens_per_s']):,.0f} |")
    lines += ["", "Held-out loss per specialized task (mean ± std over seeds):", "",
              "| method | " + " | ".join(TASKS) + " | general loss |", "|---|" + "---|" * (len(TASKS) + 1),
              "| vanilla (base) | " + " | ".join(f"{van_loss[t]:.3f}" for t in TASKS) +
              f" | {statistics.mean(van_loss[g] for g in GENERAL_NAMES):.3f} |"]
    for method in MAIN + ABLATIONS:
        if by[method]:
            lines.append(f"| {method} | " + " | ".join(
                _mean_std([r["specialized_loss"] for r in by[method] if r["task"] == t], 3) for t in TASKS) +
                f" | {_mean_std([r['general_loss'] for r in by[method]], 3)} |")
    lines += ["", "Losses: mean next-token cross-entropy on the answers of the same held-out problems (lower is "
              "better; the general loss averages the base's four tasks).",
              "", "Paper training time (min): FFT 28.5, LoRA 16.5, ESFT-Token 19.8, ESFT-Gate 20.9. "
              "Paper Table 4: random experts of the same count lose 2.8 (token) and 4.4 (gate) points.",
              "random_*_x: a different draw per seed, none of them a selected expert."]
    rates = sorted({(r["method"], r["task"], r["lr"]) for r in rows})
    if any(lr != FINETUNE_LR for *_, lr in rates):
        lines += ["", "Learning rates (chosen per method and task by validation loss, lr_select.md): " + "; ".join(
            f"{m} {', '.join(f'{t} {lr:g}' for mm, t, lr in rates if mm == m)}" for m in dict.fromkeys(r[0] for r in rates))]
    lines += specialisation(study)
    (study.results / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(study.results / "methods.png", by, {"exact match %": (van_gen, van_spec),
              "held-out loss": (statistics.mean(van_loss[g] for g in GENERAL_NAMES), statistics.mean(van_loss[t] for t in TASKS))})


def plot(path: Path, by: dict, vanilla: dict[str, tuple[float, float]]) -> None:
    """Specialized vs general, per method (mean over tasks and seeds): exact match and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in MAIN + ABLATIONS if by[m]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = [("general", "specialized", "exact match %", "higher is better"),
              ("general_loss", "specialized_loss", "held-out loss", "lower is better")]
    for ax, (gx, sy, what, better) in zip(axes, panels):
        vx, vy = vanilla[what]
        ax.scatter([vx], [vy], marker="*", s=160, color="k", label="vanilla")
        for m in methods:
            x = statistics.mean(r[gx] for r in by[m])
            y = statistics.mean(r[sy] for r in by[m])
            ax.scatter([x], [y], s=70, label=m)
            ax.annotate(m, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"general tasks ({what})")
        ax.set_ylabel(f"specialized tasks ({what})")
        ax.set_title(f"{what} ({better})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="seeds of the main methods (none: ablations only)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS,
                        help="the specialized tasks to fine-tune on (default: all; the report shows every finished run)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ablations", nargs="+", choices=ABLATIONS, default=ABLATIONS,
                        help="which ablation cells to run (default: all)")
    parser.add_argument("--base", type=Path, help="an HF model directory to fine-tune instead of pretraining base.yaml")
    parser.add_argument("--name", help="with --base: names its runs/esft_paper_<name>, results_<name>, experts_<name> "
                                       "(default: the base's directory name)")
    parser.add_argument("--lr-check", metavar="TASK", choices=TASKS,
                        help="instead of the tables: --lr-methods x --lrs on TASK, at one --lr-seeds seed")
    parser.add_argument("--lr-methods", nargs="+", choices=MAIN + ABLATIONS, default=["fft", "esft_token"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--lr-seeds", "--lr-seed", type=int, nargs="+", default=[0],
                        help="--lr-select: the seeds whose mean validation loss chooses a rate (default: 0)")
    parser.add_argument("--lr-select", action="store_true",
                        help="instead of the tables: choose each --lr-methods' rate per task by validation loss "
                             "(--lrs, --lr-seeds); later runs of the tables use the chosen rates")
    parser.add_argument("--p-ablation", action="store_true",
                        help="instead of the tables: ESFT-Token / ESFT-Gate over p (paper Figure 4), --ablation-seeds")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.name and not args.base:
        parser.error("--name needs --base")
    study = Study.given(args.base, args.name) if args.base else Study.own()
    if args.lr_check:
        if len(args.lr_seeds) > 1:
            parser.error("--lr-check runs one seed: give one --lr-seeds")
        ensure_base(study)
        lr_check(study, args.lr_check, args.lr_methods, args.lrs, args.lr_seeds[0])
        return
    if args.lr_select:
        ensure_base(study)
        lr_select(study, args.tasks, args.lr_methods, args.lrs, args.lr_seeds)
        return
    if args.p_ablation:
        ensure_base(study)
        p_ablation(study, args.tasks, args.ablation_seeds)
        return
    if not args.report_only:
        plan = [(MAIN, s) for s in args.seeds]
        if not args.no_ablations:
            plan += [(args.ablations, s) for s in args.ablation_seeds]
        refuse_stale(study, args.tasks, {"sweep": list(dict.fromkeys(c for cells, _ in plan for c in cells))})
        ensure_base(study)
        base = vanilla(study)
        configs = {t: expert_configs(study, t) for t in args.tasks}
        for cells, seed in plan:
            for task in args.tasks:
                sweep(grid(study, task, configs[task], cells, cell_lrs=selected_lrs(study, task, cells)),
                      study.runs / "sweep" / task, seed)
                report(study, collect(study), base)
    report(study, collect(study), vanilla(study))


if __name__ == "__main__":
    main()
