"""`esft base`: build a pretrained base model once, keyed by its config, and reuse it.

    esft base --config configs/base/dense.yaml              # build, or reuse the cached build
    esft base --config configs/base/moe.yaml --seed 1 --out /data/bases

Studies that fine-tune "a pretrained model" start from a base instead of random init: set
``model.init_args.model_name_or_path`` to the ``hf/`` path printed on the last line (and
``model_config: null``); in a pipeline, set both in a stage's ``overrides`` (a pipeline's
``init_from`` names a stage of the same pipeline).

A base config is a pipeline config (`esft.commands.pipeline`) of ``fit`` stages, plus::

    name: dense                      # the cache directory is <name>-<hash> (default: the file's stem)
    specialised:                     # tasks studies evaluate on: kept out of every stage's data
      - intent_json
      - {name: arithmetic, max_digits: 2, ops: "+"}
    decontaminate: {ngram: 8, field: all}            # options of esft.curation.filters.Decontaminate
    report: {num_examples: 100, max_new_tokens: 48}  # held-out problems per task in base.json
    stages:
      - {name: text, fit: dense_text.yaml}           # paths relative to the base config's directory
      - {name: chat, fit: dense_chat.yaml, init_from: text}

A build, in ``<root>/<name>-<hash>/``:

1. Decontamination: every stage's training records (its built-in tasks, or the files it reads) go
   through `Decontaminate` against the held-out problems of ``specialised``; a flagged record
   stops the build before anything trains, naming it.
2. `run_pipeline` trains the stages into ``stages/`` (a finished stage is skipped and an
   interrupted fit continues from its ``last.ckpt``, so a killed build resumes).
3. The last stage's model is copied to ``hf/``, and ``base.json`` records the base's held-out loss
   under each stage's objective (per built-in task of the stage: its rendering, its trained
   tokens), its greedy score per task (its own tasks, and the specialised ones: a study's
   "vanilla" row), the decontamination check, the parameter count, each stage's wall time and
   the config with its stage configs inlined.

The hash is a SHA-256 prefix over the base config and the content (not the path) of each stage
config it names, as parsed YAML (comments and layout do not count), and the seed. The root is
``--out``, else ``$ESFT_BASE_CACHE``, else ``~/.cache/esft/bases``. A directory holding
``base.json`` is a finished base: a rerun prints where it is and trains nothing. The code and the
data files a stage reads are not part of the key: after changing them, delete the directory.

One build per directory (``<dir>/.lock``): a second process on the same base stops at once,
naming the holder (`esft.runs.RunDirBusy`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from esft.commands.options import CommandParser
from esft.commands.pipeline import check_pipeline, run_pipeline
from esft.data import SFTDataModule
from esft.data.mixture import parse_sources
from esft.data.records import load_records
from esft.data.tasks import TaskSpec, build_task
from esft.models.tokenizer import BUILTIN
from esft.runconfig import DONE, ConfigError, load_yaml, read_json, write_json
from esft.runs import SAFE_NAME_RULE, RunDirBusy, is_safe_name, lock_dir

BASE_KEYS = ("name", "specialised", "decontaminate", "report")  # a base config's keys beside the pipeline's
BASE_JSON = "base.json"
DATA_CLASS = "esft.data.SFTDataModule"
REPORT_DEFAULTS = {"num_examples": 100, "max_new_tokens": 48, "batch_size": 100, "seed": 0}


# ---- the config and its key ------------------------------------------------------------------
def load_base(path: str | Path) -> dict[str, Any]:
    """Read and check a base config; each stage's ``fit`` becomes the absolute path of its file
    (a relative one is relative to the base config's directory)."""
    path = Path(path)
    cfg = load_yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a base config is a mapping with 'stages'")
    if "out" in cfg:
        raise ConfigError(f"{path}: a base config has no 'out': its directory is named by its content "
                          "(choose the cache root with --out)")
    cfg.setdefault("name", path.stem)
    if not is_safe_name(cfg["name"]):
        raise ConfigError(f"{path}: name {cfg['name']!r} is not a safe directory name ({SAFE_NAME_RULE})")
    check_pipeline(cfg, str(path))
    for stage in cfg["stages"]:
        where = f"{path}: stage {stage['name']!r}"
        if "fit" not in stage:
            raise ConfigError(f"{where}: a base is built from fit stages")
        file = Path(stage["fit"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise ConfigError(f"{where}: no config file {file} (stage configs are relative to the base config's directory)")
        stage["fit"] = str(file.resolve())
        for key in stage.get("overrides") or {}:
            if key.startswith("data.") and (not key.startswith("data.init_args.") or key.count(".") != 2):
                raise ConfigError(f"{where}: override {key!r}: data options are overridden one "
                                  "data.init_args.<name> at a time (the decontamination check reads them)")
    return cfg


def inline_stages(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with each stage's ``fit`` path replaced by that file's parsed content."""
    inlined = copy.deepcopy(cfg)
    for stage in inlined["stages"]:
        stage["fit"] = load_yaml(stage["fit"])
    return inlined


def base_key(inlined: dict[str, Any], seed: int) -> str:
    """12 hex digits of SHA-256 over the inlined config (`inline_stages`) and the seed."""
    blob = json.dumps({"config": inlined, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root(out: str | Path | None = None) -> Path:
    """Where bases live: `out`, else ``$ESFT_BASE_CACHE``, else ``~/.cache/esft/bases``."""
    return Path(out or os.environ.get("ESFT_BASE_CACHE") or Path.home() / ".cache" / "esft" / "bases").expanduser()


def base_dir(config: str | Path, out: str | Path | None = None, seed: int | None = None) -> Path:
    """The directory a base config builds into (nothing is built)."""
    cfg = load_base(config)
    return _base_dir(cfg, inline_stages(cfg), out, _seed(cfg, seed))


def _seed(cfg: dict[str, Any], seed: int | None) -> int:
    return cfg.get("seed", 0) if seed is None else seed


def _base_dir(cfg: dict[str, Any], inlined: dict[str, Any], out: str | Path | None, seed: int) -> Path:
    return cache_root(out) / f"{cfg['name']}-{base_key(inlined, seed)}"


# ---- the data of a stage ---------------------------------------------------------------------
def task_label(spec: TaskSpec) -> str:
    """A task spec as one name: ``sort_words``, ``arithmetic(max_digits=2,ops=+)``."""
    if isinstance(spec, str):
        return spec
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else spec["name"]


def stage_data(stage: dict[str, Any]) -> dict[str, Any]:
    """The data options an inlined stage trains with: `SFTDataModule`'s defaults, its fit
    config's ``data.init_args`` and the stage's ``data.init_args.*`` overrides."""
    data = stage["fit"].get("data") or {}
    if data.get("class_path") != DATA_CLASS:
        raise ConfigError(f"stage {stage['name']!r}: a base stage trains on {DATA_CLASS}, "
                          f"got {data.get('class_path')!r}")
    defaults = {k: p.default for k, p in inspect.signature(SFTDataModule.__init__).parameters.items() if k != "self"}
    overrides = {k.removeprefix("data.init_args."): v for k, v in (stage.get("overrides") or {}).items()
                 if k.startswith("data.init_args.")}
    return {**defaults, **(data.get("init_args") or {}), **overrides}


def builtin_tasks(stage: dict[str, Any], args: dict[str, Any]) -> list[TaskSpec]:
    """The built-in tasks a stage generates its data from (none when it reads files)."""
    if args["path"] != BUILTIN or args["sources"]:
        return []
    if not args["tasks"]:
        raise ConfigError(f"stage {stage['name']!r}: list the built-in tasks it trains on (data.init_args.tasks)")
    return list(args["tasks"])


def training_records(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The records an inlined stage trains on, before tokenization: its built-in tasks' training
    problems, or the records of its files (``path`` or ``sources``, and ``extra_paths``)."""
    args = stage_data(stage)
    tasks = builtin_tasks(stage, args)
    records = [r for spec in tasks for r in build_task(spec).generate(args["num_train_per_task"], args["seed"], "train")]
    files = [(s.path, s.format, s.split, s.name) for s in parse_sources(args["sources"])] if args["sources"] else \
        [] if tasks else [(args["path"], args["format"], args["split"], args["name"])]
    files += [(path, args["format"], args["split"], None) for path in args["extra_paths"] or []]
    for path, fmt, split, name in files:
        records += load_records(path, fmt, args["on_bad_record"], split=split, name=name)[0]
    return records


def decontamination(cfg: dict[str, Any], inlined: dict[str, Any]) -> dict[str, Any]:
    """Check that no stage trains on a ``specialised`` task: none of its built-in tasks is one by
    name, and none of its training records shares a word n-gram with their held-out problems
    (`Decontaminate`); raise `ConfigError` naming the first offence. Records the counts, the
    check's power (the share of each specialised task's own training problems, as many as its
    held-out ones and disjoint from them, that it flags: records shorter than the n-gram are
    compared whole, so short templated tasks slip through it, hence the name check) and the
    `vocabulary` the data covers."""
    from esft.curation.filters import Decontaminate

    tasks = list(cfg.get("specialised") or [])
    result: dict[str, Any] = {"tasks": [task_label(t) for t in tasks], "stages": {}}
    if not tasks:
        return {**result, "checked": 0, "flagged": 0, "note": "no specialised tasks named"}
    names = {build_task(t).name for t in tasks}
    check = Decontaminate(tasks=tasks, **(cfg.get("decontaminate") or {}))
    result["options"] = {"ngram": check.ngram, "field": check.field, "num_examples": check.num_examples, "seed": check.seed}
    records: list[dict[str, Any]] = []
    for stage in inlined["stages"]:
        same = sorted({build_task(t).name for t in builtin_tasks(stage, stage_data(stage))} & names)
        if same:
            raise ConfigError(f"stage {stage['name']!r} trains on {', '.join(same)}, which the base config names "
                              "specialised (evaluation) tasks; take them out of the stage's data")
        stage_records = training_records(stage)
        result["stages"][stage["name"]] = {"checked": len(stage_records), "flagged": 0}
        records += [dict(r, stage=stage["name"]) for r in stage_records]
    flagged = [r for r, keep in zip(records, check(records).tolist()) if not keep]
    if flagged:
        ids = ", ".join(f"{r['stage']}: {r.get('id', '?')}" for r in flagged[:5])
        raise ConfigError(f"{len(flagged)} of {len(records)} training records share a word {check.ngram}-gram "
                          f"({check.field}) with held-out problems of {', '.join(result['tasks'])} (e.g. {ids}); "
                          "take them out of the stages' data")
    result["vocabulary"] = vocabulary(inlined, records, {label: build_task(t).generate(check.num_examples, check.seed, "heldout")
                                                        for label, t in zip(result["tasks"], tasks)})
    own = [r for t in tasks for r in build_task(t).generate(check.num_examples, check.seed, "train")]
    power = (~check(own)).view(len(tasks), check.num_examples).float().mean(1).tolist()
    result["power"] = {label: round(share, 3) for label, share in zip(result["tasks"], power)}
    return {**result, "checked": len(records), "flagged": 0}


def vocabulary(inlined: dict[str, Any], records: list[dict[str, Any]],
               heldout: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """How much of the vocabulary the training records hold (token ids of their message texts,
    with the first stage's tokenizer), and per specialised task the share of its held-out text
    tokens that no training record holds: their embeddings stay as initialised."""
    from esft.models.tokenizer import load_tokenizer, resolve_tokenizer_name

    model = inlined["stages"][0]["fit"].get("model", {}).get("init_args", {})
    tokenizer = load_tokenizer(resolve_tokenizer_name(model.get("tokenizer"), model.get("model_name_or_path")))

    def ids(rs: list[dict[str, Any]]) -> list[int]:
        texts = [m["content"] for r in rs for m in r["messages"] if m["content"]]
        return [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]

    seen = set(ids(records))
    unseen = {label: sum(i not in seen for i in toks) / max(len(toks), 1) for label, toks in
              ((label, ids(rs)) for label, rs in heldout.items())}
    return {"tokens_seen": len(seen), "vocab_size": len(tokenizer),
            "unseen_share": {label: round(v, 3) for label, v in unseen.items()}}


# ---- what base.json records ------------------------------------------------------------------
def measure(hf: Path, cfg: dict[str, Any], inlined: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss per stage objective and task, greedy scores on the base's own tasks and on
    the specialised ones (and their answer loss), and the parameter count of the model in `hf`."""
    import torch

    from esft.evaluation import evaluate_tasks, perplexity
    from esft.models.chat_templates import resolve_chat_template
    from esft.models.tokenizer import load_tokenizer
    from esft.objectives.loading import load_model

    opts = {**REPORT_DEFAULTS, **(cfg.get("report") or {})}
    model, tokenizer = load_model(str(hf), torch.device("cuda" if torch.cuda.is_available() else "cpu"), "float32")

    def heldout(spec: TaskSpec) -> list[dict[str, Any]]:
        return build_task(spec).generate(opts["num_examples"], opts["seed"], "heldout")

    def score(spec: TaskSpec) -> float:
        name = build_task(spec).name
        return evaluate_tasks(model, tokenizer, {name: heldout(spec)}, opts["max_new_tokens"], opts["batch_size"])[name]

    losses, own = {}, []
    for stage in inlined["stages"]:
        args = stage_data(stage)
        tasks = builtin_tasks(stage, args)
        if not tasks:
            continue
        tok = load_tokenizer(str(hf))
        if args["chat_template"]:
            tok.chat_template = resolve_chat_template(args["chat_template"], tok)
        per_task = {task_label(t): perplexity(model, tok, heldout(t), args["max_length"], args["max_tokens"],
                                              args["train_on"])["loss"] for t in tasks}
        losses[stage["name"]] = {**per_task, "mean": statistics.mean(per_task.values())}
        own += [t for t in tasks if t not in own]
    specialised = list(cfg.get("specialised") or [])
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_loss": losses,
        "scores": {task_label(t): score(t) for t in own},
        "specialised_scores": {task_label(t): score(t) for t in specialised},
        "specialised_loss": {task_label(t): perplexity(model, tokenizer, heldout(t))["loss"] for t in specialised},
        "report": opts,
    }


def _publish(src: Path, dst: Path) -> None:
    """Copy the directory `src` to `dst` through a temporary sibling renamed into place."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


# ---- the build -------------------------------------------------------------------------------
def build_base(config: str | Path, out: str | Path | None = None, seed: int | None = None) -> tuple[Path, bool]:
    """Build the base of `config` unless its directory holds a finished one; returns the
    directory and whether this call built it."""
    cfg = load_base(config)
    seed = _seed(cfg, seed)
    inlined = inline_stages(cfg)
    d = _base_dir(cfg, inlined, out, seed)
    if (d / BASE_JSON).exists():
        return d, False
    with lock_dir(d):
        if (d / BASE_JSON).exists():  # another process finished it between the check above and the lock
            return d, False
        start = time.perf_counter()
        print(f"[base] {cfg['name']}: building {d} (seed {seed})", flush=True)
        checked = decontamination(cfg, inlined)
        print(f"[base] decontamination: {checked['checked']} training records checked against held-out "
              f"{', '.join(checked['tasks']) or '(no specialised tasks named)'}: none flagged; share of each "
              f"one's own training problems the check flags: {checked.get('power', {})}", flush=True)
        pipeline_cfg = {k: v for k, v in cfg.items() if k not in BASE_KEYS}
        run_pipeline(pipeline_cfg, d / "stages", seed)
        _publish(d / "stages" / cfg["stages"][-1]["name"] / "hf", d / "hf")
        walls = {s["name"]: (read_json(d / "stages" / s["name"] / DONE) or {}).get("wall_s") for s in cfg["stages"]}
        record = {"name": cfg["name"], "key": d.name, "seed": seed, "model_name_or_path": str((d / "hf").resolve()),
                  **measure(d / "hf", cfg, inlined), "decontamination": checked, "stage_wall_s": walls,
                  "build_wall_s": round(time.perf_counter() - start, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "config": inlined}
        write_json(d / BASE_JSON, record)
    return d, True


def summary(record: dict[str, Any]) -> str:
    """Two lines: held-out loss per stage objective, and the scores."""
    loss = ", ".join(f"{stage} {v['mean']:.3f}" for stage, v in record["heldout_loss"].items())
    scores = ", ".join(f"{t} {v:.2f}" for t, v in {**record["scores"], **record["specialised_scores"]}.items())
    return f"[base] held-out loss (mean over tasks): {loss or '-'}\n[base] exact match: {scores or '-'}"


def main(argv: list[str] | None = None) -> Path:
    p = CommandParser(prog="esft base", options_flag="--options", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base config YAML (configs/base/dense.yaml)")
    p.add_argument("--out", help="cache root (default: $ESFT_BASE_CACHE, else ~/.cache/esft/bases)")
    p.add_argument("--seed", type=int, help="seed of every stage (default: the config's 'seed', else 0); part of the key")
    args = p.parse_args(argv)
    try:
        d, built = build_base(args.config, args.out, args.seed)
    except (ConfigError, RunDirBusy, OSError, yaml.YAMLError) as e:
        print(f"esft base: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    record = json.loads((d / BASE_JSON).read_text())
    if built:
        print(f"[base] {record['name']}: built {d} in {record['build_wall_s']} s")
    else:
        print(f"[base] {record['name']}: reused {d} (built {record['built']}); nothing trained")
    print(summary(record))
    print("[base] model_name_or_path (with model_config: null) of studies that start from this base:")
    print(record["model_name_or_path"], flush=True)
    return Path(record["model_name_or_path"])


if __name__ == "__main__":
    main()
