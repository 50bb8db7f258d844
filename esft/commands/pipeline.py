"""`esft pipeline`: multi-stage runs in the DeepSeek-R1 style (arXiv 2501.12948, section 2.3):
cold-start SFT -> reasoning RL -> rejection sampling + SFT -> RL, each stage a config plus
overrides that consumes an earlier stage's model or data.

    esft pipeline --config configs/pipelines/r1_tiny.yaml
    esft pipeline --config configs/pipelines/r1_tiny.yaml --out runs/r1_seed1 --seed 1

A pipeline YAML::

    out: runs/r1_tiny                # every stage writes to <out>/<stage name>/
    seed: 0                          # seed_everything of every fit stage
    eval: {tasks: [{name: arithmetic, max_digits: 2, think: true}], num_examples: 200, max_new_tokens: 48}
    stages:
      - {name: cold_start, fit: configs/sft/r1_cold_start.yaml, overrides: {trainer.max_steps: 600}}
      - {name: rl, fit: configs/grpo/arithmetic_tiny.yaml, init_from: cold_start}
      - {name: rs, rejection_sample: {task: [...], k: 8}, model_from: rl}
      - {name: rs_sft, fit: configs/sft/r1_cold_start.yaml, data_from: rs, data_mode: add}
      - {name: rm, preference: configs/preference/reward_tiny.yaml, init_from: rs_sft}
      - {name: rl2, fit: configs/grpo/arithmetic_tiny.yaml, init_from: rs_sft, reward_from: rm}
      - {name: dpo, preference: configs/preference/dpo_tiny.yaml, init_from: rl2}

Stage kinds: ``fit`` (an ``esft fit`` config; `overrides` sets dotted keys of it, where ``{seed}``
is the pipeline's seed: ``data.init_args.seed: "{seed}"`` varies a fit stage's data with it; `init_from`
starts the model from that stage's exported ``hf/`` model, `data_from` trains on that stage's
``data.jsonl``: instead of the config's data with ``data_mode: replace`` (the default), beside it
with ``data_mode: add``; `reward_from` points a GRPO stage's ``model`` reward at that stage's reward
model: the config's ``rewards`` must weigh ``model``), ``preference`` (a fit stage whose config trains
`esft.objectives.PreferenceModule` or `esft.objectives.RewardModule` on preference pairs: DPO and kin
start from `init_from`'s model, which is also their reference; a reward model takes its decoder),
``rejection_sample`` (arguments of ``esft rejection-sample``; the model comes from `model_from`; with
``pairs: true`` it writes preference pairs whose rejected answer is a wrong sample, which a
``preference`` stage trains on with `data_from`; its ``kept`` column counts pairs). Each stage runs in
its own process (``stage.log``; a fit stage's config in ``run.yaml``); a
finished stage leaves ``done.json`` (its results) and is skipped on the next run, so an interrupted pipeline resumes at the stage it
stopped in (a fit stage continues from its ``last.ckpt``). After every stage the stage's model is
evaluated greedily on held-out prompts (pass@1, format rate, completion length; not a reward model,
which does not generate), a preference stage's model also on its config's held-out pairs
(``pref_accuracy``: the share whose chosen completion it ranks higher, by reward or by log-prob), and
``<out>/summary.md`` / ``summary.csv`` are rewritten with one row per finished stage.

A stage name is one safe directory name (letters, digits and ``._=,+-``; no ``/`` or ``..``).
One pipeline per output directory (``<out>/.lock``); stopping the pipeline (SIGTERM, Ctrl-C,
SIGKILL) ends the stage's process too, and a restart refuses a stage directory whose earlier
process is still alive (see `esft.runs`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from esft.commands.options import CommandParser
from esft.evaluation.preference import preference_accuracy
from esft.reports import markdown_table, write_csv
from esft.runconfig import (DONE, ConfigError, atomic_write, load_config, load_yaml, read_json, run_config,
                            set_callback, write_json, write_run_config)
from esft.runs import SAFE_NAME_RULE, RunDirBusy, claim, esft_child, is_safe_name, lock_dir

KINDS = ("fit", "preference", "rejection_sample")
PREFERENCE_MODULES = ("esft.objectives.PreferenceModule", "esft.objectives.RewardModule")


def load_pipeline(path: str | Path) -> dict[str, Any]:
    """Read and check a pipeline YAML."""
    return check_pipeline(load_yaml(path), str(path))


def check_pipeline(cfg: Any, path: str = "pipeline") -> dict[str, Any]:
    """Check a pipeline config (read from `path`); returns it. Stage names become directories
    under the output directory, so each must be one safe directory name (`esft.runs.safe_name`):
    ``../x``, ``/abs``, ``a/b``, ``.`` or an empty name would write elsewhere."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("stages"), list) or not cfg["stages"]:
        raise ConfigError(f"{path}: a pipeline needs a non-empty 'stages' list")
    names: list[str] = []
    for i, stage in enumerate(cfg["stages"]):
        where = f"{path}: stage {i}"
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"{where}: every stage needs a 'name'")
        if not is_safe_name(stage["name"]):
            raise ConfigError(f"{where}: name {stage['name']!r} is not a safe directory name ({SAFE_NAME_RULE})")
        if stage["name"] in names:
            raise ConfigError(f"{where}: duplicate stage name {stage['name']!r} (stage {names.index(stage['name'])} has it too)")
        where = f"{path}: stage {stage['name']!r}"
        kinds = [k for k in KINDS if k in stage]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}")
        for ref in ("init_from", "data_from", "model_from", "reward_from"):
            if stage.get(ref) is not None and stage[ref] not in names:
                raise ConfigError(f"{where}: {ref}={stage[ref]!r} is not an earlier stage ({', '.join(names) or 'none'})")
        if stage.get("data_mode", "replace") not in ("replace", "add"):
            raise ConfigError(f"{where}: data_mode must be 'replace' or 'add', got {stage['data_mode']!r}")
        if "rejection_sample" in stage and not stage.get("model_from"):
            raise ConfigError(f"{where}: a rejection_sample stage needs model_from")
        if stage.get("reward_from") is not None and "rejection_sample" in stage:
            raise ConfigError(f"{where}: reward_from applies to fit stages (GRPO's model reward)")
        names.append(stage["name"])
    return cfg


def fit_config(base: dict[str, Any], stage: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """The stage's ``esft fit`` config: the base config with the stage's overrides and its inputs,
    every output in the stage directory `out` (`esft.runconfig.run_config`), exported to ``hf/``."""
    cfg, _ = run_config(base, stage.get("overrides") or {}, seed, out, label=stage["name"])
    set_callback(cfg, "esft.callbacks.ExportHF", dirpath=str(out / "hf"))  # later stages read <stage>/hf
    model_args = cfg.setdefault("model", {}).setdefault("init_args", {})
    if stage.get("init_from"):
        model_args["model_name_or_path"] = str(out.parent / stage["init_from"] / "hf")
        model_args["model_config"] = None
        model_args["tokenizer"] = None
    if stage.get("reward_from"):
        if "model" not in (model_args.get("rewards") or {}):
            raise ConfigError(f"stage {stage['name']!r}: reward_from={stage['reward_from']!r} needs a 'model' weight in "
                              f"model.init_args.rewards (e.g. overrides: {{model.init_args.rewards: "
                              f"{{accuracy: 1.0, model: 0.5}}}}), got {model_args.get('rewards')}")
        options = dict(model_args.get("reward_options") or {})
        options["model"] = {**(options.get("model") or {}), "path": str(out.parent / stage["reward_from"] / "hf")}
        model_args["reward_options"] = options
    if stage.get("data_from"):
        data_args = cfg.setdefault("data", {}).setdefault("init_args", {})
        source = str(out.parent / stage["data_from"] / "data.jsonl")
        if stage.get("data_mode") == "add":
            data_args["extra_paths"] = [*(data_args.get("extra_paths") or []), source]
        else:
            data_args["path"] = source
    return cfg


def rejection_args(stage: dict[str, Any], out: Path, seed: int) -> list[str]:
    """``esft rejection-sample`` arguments of a stage."""
    argv = ["--model", str(out.parent / stage["model_from"] / "hf"), "--out", str(out / "data.jsonl"), "--seed", str(seed)]
    for key, value in (stage["rejection_sample"] or {}).items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool):
                if v:
                    argv.append(flag)
                continue
            argv += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return argv


def _run(argv: list[str], log: Path) -> None:
    """``esft <argv>`` in a child process (`esft.runs.esft_child`), output appended to `log`."""
    rc, _ = esft_child(argv, log.parent, log)
    if rc != 0:
        raise RuntimeError(f"stage command failed (exit {rc}); see {log}")


def evaluate_stage(model_dir: Path, eval_cfg: dict[str, Any]) -> dict[str, float]:
    """Greedy pass@1, format rate and length of the stage's model on held-out prompts."""
    import torch

    from esft.data.tasks import build_task
    from esft.objectives.loading import load_model
    from esft.rewards.evaluate import evaluate_reasoning

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(str(model_dir), device)
    records = [r for spec in eval_cfg.get("tasks", [])
               for r in build_task(spec).generate(eval_cfg.get("num_examples", 200), eval_cfg.get("seed", 0), "heldout")]
    return evaluate_reasoning(model, tokenizer, records, eval_cfg.get("max_new_tokens", 64), eval_cfg.get("batch_size", 200))


def write_summary(out: Path, stages: list[dict[str, Any]]) -> str:
    """Rewrite ``summary.md`` and ``summary.csv`` from the finished stages' ``done.json``."""
    rows = [r for stage in stages if (r := read_json(out / stage["name"] / DONE)) is not None]
    cols = ["stage", "kind", "step", "pass@1", "format", "length", "pref_accuracy", "kept", "wall_s"]
    write_csv(out / "summary.csv", cols, rows)
    table = markdown_table(cols, rows, cols[2:])
    atomic_write(out / "summary.md", table + "\n")
    return table


def run_pipeline(cfg: dict[str, Any], out: Path | None = None, seed: int | None = None) -> str:
    """Run the unfinished stages of `cfg` in order; returns the summary table. One process per
    output directory: another one holding it raises `RunDirBusy`."""
    check_pipeline(cfg)
    out = Path(out or cfg.get("out", "runs/pipeline"))
    seed = cfg.get("seed", 0) if seed is None else seed
    with lock_dir(out):
        for stage in cfg["stages"]:
            _run_stage(cfg, stage, out, seed)
        return write_summary(out, cfg["stages"])


def _run_stage(cfg: dict[str, Any], stage: dict[str, Any], out: Path, seed: int) -> None:
    d = out / stage["name"]
    if (d / DONE).exists():
        print(f"[pipeline] {stage['name']}: done, skipped")
        return
    claim(d)  # a stage child of an earlier, killed pipeline may still write here
    d.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[pipeline] {stage['name']}: running (log: {d / 'stage.log'})", flush=True)
    result: dict[str, Any] = {"stage": stage["name"]}
    eval_cfg = cfg.get("eval") or {}
    kind = next(k for k in KINDS if k in stage)
    if kind in ("fit", "preference"):
        result["kind"] = kind
        fit_cfg = fit_config(load_config(stage[kind]), stage, d, seed)
        model_class = (fit_cfg.get("model") or {}).get("class_path")
        if kind == "preference" and model_class not in PREFERENCE_MODULES:
            raise ConfigError(f"stage {stage['name']!r}: a preference stage trains one of {', '.join(PREFERENCE_MODULES)}; "
                                f"{stage[kind]} has model.class_path {model_class!r} (use a fit stage)")
        _run(["fit", "--config", str(write_run_config(fit_cfg, d)), "--ckpt_path", "last"], d / "stage.log")  # continues a killed stage
        exported = read_json(d / "hf" / "export.json")  # which step's weights (ExportHF best: the validation optimum)
        if exported:
            result["step"] = exported["step"]
        generates = not model_class or not model_class.endswith("RewardModule")
        result.update(evaluate_stage(d / "hf", eval_cfg) if eval_cfg.get("tasks") and generates else {})
        if kind == "preference":
            result["pref_accuracy"] = preference_accuracy(d / "hf", fit_cfg["data"], model_class.endswith("RewardModule"))
    else:
        result["kind"] = "rejection_sample"
        _run(["rejection-sample", *rejection_args(stage, d, seed)], d / "stage.log")
        stats = json.loads((d / "data.jsonl.stats.json").read_text())
        result.update(kept=stats["pairs" if "pairs" in stats else "kept"], correct_rate=stats["correct_rate"],
                      format_rate=stats["format_rate"])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(d / DONE, {**result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"[pipeline] {stage['name']}: finished in {result['wall_s']} s\n" + write_summary(out, cfg["stages"]), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="esft pipeline", options_flag="--options", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pipeline YAML")
    p.add_argument("--out", help="output directory (default: the config's 'out')")
    p.add_argument("--seed", type=int, help="seed of every stage (default: the config's 'seed')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    try:
        table = run_pipeline(load_pipeline(args.config), args.out, args.seed)
    except (ConfigError, RunDirBusy, OSError, yaml.YAMLError) as e:
        print(f"esft pipeline: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table)
    return table


if __name__ == "__main__":
    main()
