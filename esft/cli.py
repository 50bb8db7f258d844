"""The `esft` command: LightningCLI subcommands over any objective and DataModule.

    esft fit --config configs/sft/quickstart.yaml
    esft fit --config configs/sft/quickstart.yaml --data.path my.jsonl --trainer.max_steps 100
    esft fit --config configs/sft/quickstart.yaml --ckpt_path last     # resume
    esft fit --config configs/sft/quickstart.yaml --print_config       # the full, resolved config
    esft eval --model runs/quickstart/hf --tasks reverse_words          # generation-based evaluation
    esft sweep --config BASE.yaml --grid GRID.yaml --out DIR             # ablation grid x seeds
    esft export --tasks reverse_words --n 1000 --out data/               # built-in tasks as JSONL
    esft tune --config BASE.yaml --space SPACE.yaml --out DIR            # Optuna search (or --lr-find)
    esft bench --layout rows padded --out runs/bench                     # throughput suite beside TRL
    esft distill-data responses|topk ...                                 # sequence-level KD data, teacher cache
    esft rejection-sample --model runs/grpo_arithmetic/hf --task arithmetic --k 8 --out rs.jsonl
    esft pipeline --config configs/pipelines/r1_tiny.yaml                 # R1-style multi-stage run
    esft experts score|select|save|merge ...                            # expert-specialized FT (MoE)
    esft curate --input data.jsonl --config configs/sft/curated.yaml --out curated/   # curation + report
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from esft.callbacks.export import ExportError
from esft.callbacks.guards import NonFiniteError, NonFiniteGuard
from esft.checkpoint import CheckpointError, checkpoint_dirs, config_changes, load_meta, resolve_last
from esft.data.records import DataFormatError
from esft.models.tokenizer import resolve_tokenizer_name
from esft.objectives import CausalLMModule

TRAINER_DEFAULTS = {
    # Atomic checkpoint writes; packing batches with our own rank-aware sampler.
    "plugins": [{"class_path": "esft.checkpoint.AtomicCheckpointIO"}],
    "use_distributed_sampler": False,
}


def run_directory(default_root_dir: str | None) -> str:
    """The run directory: ``trainer.default_root_dir``, or the working directory as in Lightning."""
    return default_root_dir or os.getcwd()


class ESFTCLI(LightningCLI):
    """LightningCLI with the project's run conventions.

    - ``trainer.default_root_dir`` is the run directory: the logger's ``save_dir`` follows it,
      and with the logger's directory checkpoints (``checkpoints/``), evaluation (``eval.json``)
      and the export (``hf/``), so one option moves every output of a run.
    - Every run has a `NonFiniteGuard` (stop on a non-finite loss or gradient) unless the config
      lists its own.
    - ``fit --ckpt_path last`` resumes the newest intact checkpoint, and a resume whose model or
      data options differ from the checkpoint's is refused, naming the differences
      (``--allow_config_change true`` resumes anyway).
    """

    def add_arguments_to_parser(self, parser) -> None:
        # the data is tokenized with the model's tokenizer
        parser.link_arguments(
            ("model.init_args.tokenizer", "model.init_args.model_name_or_path"),
            "data.init_args.tokenizer_name",
            compute_fn=resolve_tokenizer_name,
        )
        # the run directory holds the logs too (and with them checkpoints, eval.json, hf/)
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=run_directory)
        parser.add_argument("--allow_config_change", type=bool, default=False,
                            help="fit: resume a checkpoint even when model or data options differ from its own")

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") == "fit":
            return  # fit keeps this run's options and checks them against the checkpoint (before_fit)
        # LightningCLI reads the checkpoint's hyperparameters first: an unreadable file fails here
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            raise CheckpointError.unreadable(self.config[self.config.subcommand].get("ckpt_path"), e) from e

    def _instantiate_trainer(self, config, callbacks):
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if not any(isinstance(c, NonFiniteGuard) for c in [*listed, *callbacks]):
            callbacks = [*callbacks, NonFiniteGuard()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        args = self.config_init[self.subcommand]
        if args.get("ckpt_path") is None:
            return
        path = args["ckpt_path"]
        if path == "last":
            dirs = checkpoint_dirs(self.trainer)
            path = resolve_last(dirs)
            if path is None:
                rank_zero_info(f"--ckpt_path last: no checkpoint in {', '.join(dirs) or 'any checkpoint directory'} yet; starting from scratch")
            args["ckpt_path"] = path
        if path is None or os.path.isdir(path) or args.get("allow_config_change"):
            return
        changes = config_changes(load_meta(path), self.model.hparams, getattr(self.datamodule, "hparams", None))
        if changes:
            raise CheckpointError(
                f"{path} was written with other options ({'; '.join(changes)}): resuming it would mix two runs; "
                "use another trainer.default_root_dir for a new run, or pass --allow_config_change true"
            )


def main(args: list[str] | None = None) -> ESFTCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return ESFTCLI(
        CausalLMModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args if args is not None else sys.argv[1:],
    )


# Project commands beside LightningCLI's subcommands: `esft <name> ...` runs `<module>.main(argv)`.
PROJECT_COMMANDS = {
    "eval": ("esft.evaluation.run", "generation-based evaluation of a model on tasks or a data file"),
    "sweep": ("esft.sweep", "an ablation grid x seeds over a base config, with a results table"),
    "tune": ("esft.tune", "hyperparameter search with Optuna (or a learning-rate range test)"),
    "pipeline": ("esft.pipeline", "a multi-stage run (SFT -> RL -> rejection sampling -> ...)"),
    "bench": ("esft.bench", "the throughput and memory suite beside TRL's SFTTrainer"),
    "experts": ("esft.experts.cli", "expert-specialized fine-tuning: score, select, save, merge experts"),
    "curate": ("esft.curation.command", "data curation (filters, dedup, scored selection) with a report"),
    "distill-data": ("esft.distill_data", "teacher responses or a teacher top-k cache for distillation"),
    "rejection-sample": ("esft.rejection", "sample k answers per prompt and keep the verified ones"),
    "export": ("esft.data.tasks.export", "write built-in tasks as JSON Lines"),
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
