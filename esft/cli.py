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

from esft.callbacks.guards import NonFiniteError
from esft.checkpoint import CheckpointError
from esft.data.records import DataFormatError
from esft.models.tokenizer import resolve_tokenizer_name
from esft.objectives import CausalLMModule

TRAINER_DEFAULTS = {
    # Atomic checkpoint writes; packing batches with our own rank-aware sampler.
    "plugins": [{"class_path": "esft.checkpoint.AtomicCheckpointIO"}],
    "use_distributed_sampler": False,
}


class ESFTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data is tokenized with the model's tokenizer
        parser.link_arguments(
            ("model.init_args.tokenizer", "model.init_args.model_name_or_path"),
            "data.init_args.tokenizer_name",
            compute_fn=resolve_tokenizer_name,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters first: an unreadable file fails here
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            raise CheckpointError.unreadable(self.config[self.config.subcommand].get("ckpt_path"), e) from e


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
    "eval": "esft.evaluation.run",
    "sweep": "esft.sweep",
    "export": "esft.data.tasks.export",
    "bench": "esft.bench",
    "distill-data": "esft.distill_data",
    "tune": "esft.tune",
    "rejection-sample": "esft.rejection",
    "pipeline": "esft.pipeline",
    "experts": "esft.experts.cli",
    "curate": "esft.curation.command",
}


def _project_command(name: str):
    module = PROJECT_COMMANDS.get(name)
    return None if module is None else importlib.import_module(module).main


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
    command = _project_command(argv[0]) if argv else None
    try:
        if command is not None:
            command(argv[1:])
        else:
            main(argv)
    except (DataFormatError, FileNotFoundError, CheckpointError) as e:
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
