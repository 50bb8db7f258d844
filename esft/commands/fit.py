"""`esft fit` (and validate, test, predict): LightningCLI subcommands over any objective and
DataModule, with the project's run conventions (`ESFTCLI`).

    esft fit --config configs/sft/quickstart.yaml
    esft fit --config configs/sft/quickstart.yaml --data.path my.jsonl --trainer.max_steps 100
    esft fit --config configs/sft/quickstart.yaml --ckpt_path last     # resume
    esft fit --config configs/sft/quickstart.yaml --print_config       # the full, resolved config
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from esft.callbacks.guards import NonFiniteGuard
from esft.checkpoint import CheckpointError, checkpoint_dirs, config_changes, load_meta, resolve_last
from esft.loggers import MetricsFile
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
    - Every run writes ``metrics.json`` (`esft.loggers.MetricsFile`) into the run directory,
      beside whatever loggers the config names.
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
        trainer = super()._instantiate_trainer(config, callbacks)
        # metrics.json in the run directory beside the user's loggers (after them: the first
        # logger still decides log_dir and the checkpoint directory)
        self.metrics_file = MetricsFile(trainer.log_dir if trainer.loggers else trainer.default_root_dir)
        self.metrics_file.resume = self.subcommand != "fit"  # validate / test add to a run's metrics; fit: before_fit
        trainer.loggers = [*trainer.loggers, self.metrics_file]
        return trainer

    def before_fit(self) -> None:
        args = self.config_init[self.subcommand]
        path = args.get("ckpt_path")
        if path == "last":
            dirs = checkpoint_dirs(self.trainer)
            path = resolve_last(dirs)
            if path is None:
                rank_zero_info(f"--ckpt_path last: no checkpoint in {', '.join(dirs) or 'any checkpoint directory'} yet; starting from scratch")
            args["ckpt_path"] = path
        self.metrics_file.resume = path is not None  # a resumed run keeps the metrics on file
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
