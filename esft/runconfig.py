"""Run configs and results, the part of the run core (with `esft.runs`) that `esft sweep`,
`esft tune` and `esft pipeline` share.

    base = load_yaml("configs/sft/quickstart.yaml")             # 1e-3 is a float, as jsonargparse reads it
    cfg, sha = run_config(base, {"model.init_args.optim.lr": 3e-3}, seed=1, run_dir=Path("out/lr/seed1"))
    rc, wall = fit_child(cfg, run_dir)                          # esft.runs: `esft fit` in a child process
    metrics = read_metrics(run_dir, cfg)                        # metrics.json + eval.json of the run
    write_json(run_dir / DONE, {"metrics": metrics, ...})       # a rerun skips it

- **Dotted keys.** ``set_dotted(cfg, "trainer.callbacks.TaskEvaluation.init_args.num_examples", 8)``:
  a number indexes a list, a class name picks the one list item of that ``class_path``; missing
  mappings are created; an unknown top-level key or a path through a scalar is a `ConfigError`.
- **One directory a run.** `run_config` points every output of the base config into the run
  directory: ``trainer.default_root_dir``; the user's loggers (TensorBoard, CSV, W&B, MLflow, ...:
  kept, with their ``save_dir`` there; TensorBoard when the base names none); and every callback
  path (``dirpath``, ``output``, ``path``) under the base run's directories, moved to the same
  place under the run directory (other paths to ``<run dir>/<name>``).
- **Results.** Every ``esft fit`` writes ``metrics.json`` (the last value of every logged metric,
  `esft.loggers.MetricsFile`, whatever logger the user chose); `read_metrics` reads it and the
  task scores of ``eval.json``. A finished run holds ``done.json``, a failed one ``failed.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path")
PATH_ARGS = ("dirpath", "output", "path")  # callback init_args that name a place to write
DONE, FAILED, RUN_YAML = "done.json", "failed.json", "run.yaml"  # run.yaml: LightningCLI writes config.yaml
METRICS_FILE = "metrics.json"
# loggers whose files go to `save_dir` (name and version: subdirectories of it for the first two)
FILE_LOGGERS = ("TensorBoardLogger", "CSVLogger", "WandbLogger", "MLFlowLogger", "CometLogger")
RUN_NAME_ARG = {"WandbLogger": "name", "MLFlowLogger": "run_name"}  # where a tracker shows the run's label


class ConfigError(ValueError):
    """A bad grid, search space, pipeline, override or base config: reported before any run starts."""


# ---- files -----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``), as jsonargparse does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> Any:
    """A YAML file as `esft fit` reads it (``1e-3`` is a float, not the string ``safe_load`` gives)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def load_config(path: str | Path) -> dict:
    """A LightningCLI config (a mapping), or `ConfigError` naming the file."""
    cfg = load_yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping (a LightningCLI config), got {type(cfg).__name__}")
    return cfg


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `path` through a temporary file and a rename: readers see the old or the new file. The
    temporary file is the writer's own (process and thread), so concurrent writers of one path, e.g.
    a study's processes sharing a cache, do not write into each other's file; the last rename wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run_config(cfg: dict, run_dir: Path) -> Path:
    """`cfg` as the run's ``run.yaml`` (created with `run_dir`), the file ``esft fit --config`` reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_YAML
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_json(path: Path, record: dict) -> None:
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON mapping in `path`, or None when it is missing or unreadable (a half-written marker)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---- dotted keys -----------------------------------------------------------------------------
def _child(node: Any, part: str, key: str, done: str) -> tuple[Any, Any]:
    """(container, index) of `part` inside `node`, for the dotted `key` traversed up to `done`."""
    if isinstance(node, dict):
        return node, part
    if isinstance(node, list):
        if re.fullmatch(r"-?\d+", part):
            i = int(part)
            if not -len(node) <= i < len(node):
                raise ConfigError(f"cannot set {key!r}: index {i} is out of range for {done!r} ({len(node)} items)")
            return node, i
        matches = [i for i, item in enumerate(node) if _class_name(item) == part]
        if len(matches) != 1:
            names = [_class_name(item) or repr(item) for item in node]
            what = "no item" if not matches else f"{len(matches)} items"
            raise ConfigError(f"cannot set {key!r}: {done!r} has {what} of class {part!r} (it has {names}); "
                              "use a list index instead")
        return node, matches[0]
    raise ConfigError(f"cannot set {key!r}: {done!r} is {node!r} ({type(node).__name__}), not a mapping or list")


def _class_name(item: Any) -> str:
    return str(item.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(item, dict) else ""


def base_seed(cfg: dict) -> int:
    """The base config's ``seed_everything`` when it is a number, else 0: the seed a run uses unless told."""
    seed = cfg.get("seed_everything")
    return seed if isinstance(seed, int) else 0


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``key = "a.b.c"``, creating missing (or null) mappings.

    A number indexes a list, a class name picks the one list item with that ``class_path``
    (``trainer.callbacks.ModelCheckpoint.init_args.dirpath``). Raises `ConfigError` naming the key
    for an unknown top-level key or a path through a scalar."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad override key {key!r}: expected a dotted path like 'trainer.max_steps'")
    if parts[0] not in cfg and parts[0] not in TOP_LEVEL_KEYS:
        raise ConfigError(f"cannot set {key!r}: unknown top-level key {parts[0]!r} "
                          f"(the base config has {sorted(cfg)}; LightningCLI knows {list(TOP_LEVEL_KEYS)})")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        container, index = _child(node, part, key, ".".join(parts[:depth]) or "<config>")
        if isinstance(container, dict) and container.get(index) is None:
            container[index] = {}
        node = container[index]
    container, index = _child(node, parts[-1], key, ".".join(parts[:-1]) or "<config>")
    container[index] = value


def get_dotted(cfg: dict, key: str) -> Any:
    """``cfg[a][b][c]`` for ``key = "a.b.c"`` (list indices and class names as in `set_dotted`),
    or None when any part is missing."""
    node: Any = cfg
    for part in key.split("."):
        try:
            container, index = _child(node, part, key, "")
            node = container[index]
        except (ConfigError, KeyError):
            return None
    return node


def format_value(value: Any) -> str:
    """A value as cell names and tables show it: ``3e-3``, ``true``, ``[1,2]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among `keys` (cell and parameter names)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        short[key] = suffix
    return short


# ---- one run's config ------------------------------------------------------------------------
def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _roots(base: dict) -> list[str]:
    """Directories of the base run (root dir, logger dirs): callback paths under them are moved."""
    trainer = base.get("trainer") or {}
    roots = [str(trainer["default_root_dir"])] if trainer.get("default_root_dir") else []
    for lg in _as_list(trainer.get("logger")):
        args = (lg.get("init_args") or {}) if isinstance(lg, dict) else {}
        if args.get("save_dir"):
            parts = [str(args["save_dir"])]
            if args.get("name"):
                parts.append(str(args["name"]))
                if isinstance(args.get("version"), str) and args["version"]:
                    parts.append(args["version"])
            roots.append(os.path.join(*parts))
    return sorted({os.path.abspath(r) for r in roots}, key=len, reverse=True)


def _relocate(path: str, roots: list[str], run_dir: Path) -> str:
    p = os.path.abspath(path)
    for root in roots:
        if p == root:
            return str(run_dir)
        if p.startswith(root + os.sep):
            return str(run_dir / os.path.relpath(p, root))
    return str(run_dir / os.path.basename(p.rstrip(os.sep)))


def run_loggers(logger: Any, run_dir: Path, label: str | None) -> Any:
    """The base config's loggers writing into `run_dir`: each keeps its class and options, with
    ``save_dir`` set (and, for TensorBoard and CSV, no name/version subdirectories, so events sit
    in the run directory) and the run's `label` as a tracker's run name unless one is given.
    No logger in the base: TensorBoard. ``logger: false`` stays off (``metrics.json`` is written
    all the same)."""
    if logger is False:
        return False
    if logger is None or logger is True:
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}
    out = []
    for lg in _as_list(copy.deepcopy(logger)):
        if not isinstance(lg, dict) or "class_path" not in lg:
            raise ConfigError(f"trainer.logger: expected a mapping with class_path, got {lg!r}")
        name = _class_name(lg)
        args = lg.setdefault("init_args", {}) or {}
        lg["init_args"] = args
        if name in FILE_LOGGERS or "save_dir" in args:
            args["save_dir"] = str(run_dir)
        if name in ("TensorBoardLogger", "CSVLogger"):
            args.update(name="", version="")
        if name in RUN_NAME_ARG and label and not args.get(RUN_NAME_ARG[name]):
            args[RUN_NAME_ARG[name]] = label
        out.append(lg)
    return out if isinstance(logger, list) else out[0]


SEED = "{seed}"


def with_seed(value: Any, seed: int) -> Any:
    """`value` with the run's seed for ``{seed}``: a string that is exactly ``{seed}`` becomes the
    integer, one that contains it gets its digits (``cache_seed{seed}.safetensors``); mappings
    and lists are walked."""
    if isinstance(value, str):
        return seed if value == SEED else value.replace(SEED, str(seed))
    if isinstance(value, dict):
        return {k: with_seed(v, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [with_seed(v, seed) for v in value]
    return value


def run_config(base: dict, overrides: dict[str, Any], seed: int, run_dir: Path,
               seed_keys: Sequence[str] = (), label: str | None = None) -> tuple[dict, str]:
    """The run's full config (base + overrides + seed, every output in `run_dir`) and a hash of
    its run-independent part (base + overrides + seed), which tells a changed config from the
    one a finished run was made with. ``{seed}`` in an override's value is the run's seed
    (`with_seed`): a per-seed file, or a data seed (``data.init_args.seed: "{seed}"``)."""
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(cfg, str(key), with_seed(copy.deepcopy(value), seed))
    cfg["seed_everything"] = seed
    for key in seed_keys:
        set_dotted(cfg, key, seed)
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    trainer = cfg.setdefault("trainer", {})
    if not isinstance(trainer, dict):
        raise ConfigError(f"'trainer' must be a mapping, got {trainer!r}")
    roots = _roots(cfg)
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = run_loggers(trainer.get("logger"), run_dir, label)
    for cb in _as_list(trainer.get("callbacks")):
        args = cb.get("init_args") if isinstance(cb, dict) else None
        if isinstance(args, dict):
            for key in PATH_ARGS:
                if isinstance(args.get(key), str) and args[key]:
                    args[key] = _relocate(args[key], roots, run_dir)
    return cfg, sha


def set_callback(cfg: dict, class_path: str, **init_args: Any) -> None:
    """Give the config's callback of `class_path` these `init_args`, adding the callback if absent."""
    trainer = cfg.setdefault("trainer", {})
    callbacks = _as_list(trainer.get("callbacks"))
    name = class_path.rsplit(".", 1)[-1]
    found = [cb for cb in callbacks if _class_name(cb) == name]
    if not found:
        found = [{"class_path": class_path}]
        callbacks.append(found[0])
    for cb in found:
        cb["init_args"] = {**(cb.get("init_args") or {}), **init_args}
    trainer["callbacks"] = callbacks


# ---- results ---------------------------------------------------------------------------------
def eval_paths(run_dir: Path, cfg: dict) -> list[Path]:
    """Where the run's task scores are: its TaskEvaluation ``output``, then ``<run dir>/eval.json``."""
    paths = [run_dir / "eval.json"]
    for cb in _as_list((cfg.get("trainer") or {}).get("callbacks")):
        if _class_name(cb) == "TaskEvaluation" and (cb.get("init_args") or {}).get("output"):
            paths.insert(0, Path(cb["init_args"]["output"]))
    return paths


def read_metrics(run_dir: Path, cfg: dict) -> dict[str, float]:
    """The run's results: the last value of every metric it logged (``metrics.json``, written by
    every ``esft fit``) and the scores after training from its ``eval.json``
    (``eval/<task>/<metric>``; ``eval/<task>`` from a file written before tasks named their metric)."""
    metrics = dict((read_json(run_dir / METRICS_FILE) or {}).get("metrics") or {})
    for path in eval_paths(run_dir, cfg):
        results = read_json(path)
        if results is not None:
            after = (results.get("scalars") or {}).get("after")
            if after is None:
                after = {f"eval/{task}": v for task, v in (results.get("after") or {}).items()}
            metrics.update({k: float(v) for k, v in after.items()})
            break
    return metrics


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
