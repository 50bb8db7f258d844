"""The `esft` command: LightningCLI's subcommands (`esft.commands.fit`) and the project's commands
(`esft.commands.<name>`), each a module whose ``main(argv)`` runs it.

    esft fit --config configs/sft/quickstart.yaml
    esft fit --config configs/sft/quickstart.yaml --data.path my.jsonl --trainer.max_steps 100
    esft fit --config configs/sft/quickstart.yaml --ckpt_path last     # resume
    esft fit --config configs/sft/quickstart.yaml --print_config       # the full, resolved config
    esft eval --model runs/quickstart/hf --tasks reverse_words          # generation-based evaluation
    esft eval --config eval.yaml --num-examples 50                      # options from a file (--print_config writes one)
    esft sweep --config BASE.yaml --grid GRID.yaml --out DIR             # ablation grid x seeds
    esft export --tasks reverse_words --n 1000 --out data/               # built-in tasks as JSONL
    esft tune --config BASE.yaml --space SPACE.yaml --out DIR            # Optuna search (or --lr-find)
    esft bench --layout rows padded --out runs/bench                     # throughput suite beside TRL
    esft distill-data responses|topk ...                                 # sequence-level KD data, teacher cache
    esft rejection-sample --model runs/grpo_arithmetic/hf --task arithmetic --k 8 --out rs.jsonl
    esft pipeline --config configs/pipelines/r1_tiny.yaml                 # R1-style multi-stage run
    esft base --config configs/base/dense.yaml                           # build (once) a pretrained base
    esft experts score|select|save|merge ...                            # expert-specialized FT (MoE)
    esft curate --input data.jsonl --config configs/sft/curated.yaml --out curated/   # curation + report
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from esft.callbacks.export import ExportError
from esft.callbacks.guards import NonFiniteError
from esft.checkpoint import CheckpointError
from esft.commands.fit import main
from esft.data.records import DataFormatError

__all__ = ["PROJECT_COMMANDS", "LIGHTNING_COMMANDS", "main", "run", "usage"]

# Project commands beside LightningCLI's subcommands: `esft <name> ...` runs `<module>.main(argv)`.
PROJECT_COMMANDS = {
    "eval": ("esft.commands.eval", "generation-based evaluation of a model on tasks or a data file"),
    "sweep": ("esft.commands.sweep", "an ablation grid x seeds over a base config, with a results table"),
    "tune": ("esft.commands.tune", "hyperparameter search with Optuna (or a learning-rate range test)"),
    "pipeline": ("esft.commands.pipeline", "a multi-stage run (SFT -> RL -> rejection sampling -> ...)"),
    "base": ("esft.commands.base", "build a pretrained base once (text, then chat), cached by its config"),
    "bench": ("esft.commands.bench", "the throughput and memory suite beside TRL's SFTTrainer"),
    "experts": ("esft.commands.experts", "expert-specialized fine-tuning: score, select, save, merge experts"),
    "curate": ("esft.commands.curate", "data curation (filters, dedup, scored selection) with a report"),
    "distill-data": ("esft.commands.distill_data", "teacher responses or a teacher top-k cache for distillation"),
    "rejection-sample": ("esft.commands.rejection_sample", "sample k answers per prompt and keep the verified ones"),
    "export": ("esft.commands.export", "write built-in tasks as JSON Lines"),
    "train-tokenizer": ("esft.commands.train_tokenizer", "train the built-in BPE tokenizer on the built-in tasks"),
}
LIGHTNING_COMMANDS = {
    "fit": "train an objective on a DataModule (LightningCLI; --config, --print_config)",
    "validate": "the validation loss of a checkpoint",
    "test": "the test loss of a checkpoint",
    "predict": "generations for the validation records",
}


def usage() -> str:
    """The overview ``esft``, ``esft -h`` and ``esft --help`` print: every command, one line each."""
    width = max(map(len, [*PROJECT_COMMANDS, *LIGHTNING_COMMANDS])) + 2
    lines = ["usage: esft <command> [options]   (esft <command> --help for a command's options)", "",
             "training (LightningCLI subcommands):"]
    lines += [f"  {name:<{width}}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "project commands:"]
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in PROJECT_COMMANDS.items()]
    return "\n".join(lines)


def _project_command(name: str):
    entry = PROJECT_COMMANDS.get(name)
    return None if entry is None else importlib.import_module(entry[0]).main


# OS errors that are the environment's, not the program's: one line naming the path, status 2
PATH_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _message(error: Exception) -> str:
    """`error` in one line; an OS error as ``PATH: reason`` (``data.jsonl: permission denied``)."""
    if isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno)
        reason = reason[0].lower() + reason[1:]
        return f"{error.filename}: {reason}" if error.filename is not None else reason
    return str(error)


def run() -> None:
    """Console-script entry point. Bad data, an unreadable checkpoint, a missing file, a full disk
    or a refused permission ends the run with its one-line message (naming the file) and status 2;
    a non-finite loss or gradient (`NonFiniteGuard`) with status 1."""
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    command = _project_command(argv[0])
    try:
        if command is not None:
            command(argv[1:])
        else:
            main(argv)
    except (DataFormatError, FileNotFoundError, CheckpointError, ExportError) as e:
        print(f"esft: error: {_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in PATH_ERRNOS:
            raise
        print(f"esft: error: {_message(e)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"esft: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
