"""Export the trained model and tokenizer in HF format (safetensors) at the end of `fit`.

An export directory holds a marker file (`MARKER`); an existing `dirpath` is replaced only when
it holds that marker, i.e. when an earlier export wrote it: a directory with other files, or a
base model, is never deleted. Non-finite weights are never exported. With LoRA the export is the
merged model (unsharded, a 4-bit QLoRA base dequantized: `esft.models.lora.merged_copy`) plus the
adapter alone in peft's format under ``adapter/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from esft.callbacks.guards import NonFiniteError, non_finite
from esft.models.lora import is_lora
from esft.models.sharding import gathered

MARKER = ".esft-export"


class ExportError(RuntimeError):
    """The export directory cannot be written without destroying something the export did not write."""


class ExportHF(L.Callback):
    """Writes ``save_pretrained`` output to `dirpath` (default: ``<log_dir>/hf``).

    The files go to a sibling temporary directory that is renamed into place, so an
    interrupted export never leaves a half-written model where a finished one is expected.
    Sharded models (FSDP2, DeepSpeed ZeRO-3) are gathered on every rank and written once.
    """

    def __init__(self, dirpath: str | None = None, best: bool = False) -> None:
        """
        Args:
            dirpath: where the model goes (default ``<log_dir>/hf``).
            best: export the weights of the best checkpoint of the run's ``ModelCheckpoint`` (by
                its ``monitor``, e.g. ``val/loss``) instead of the last step's, so that a run trained
                past its validation optimum exports that optimum; the module holds those weights
                after `fit`. ``export.json`` in the export says which step was written.
        """
        self.dirpath = dirpath
        self.best = best

    def _target(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf"))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.best:
            monitored = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.monitor
            if not monitored:
                raise ValueError("ExportHF(best=True) exports the best checkpoint of a ModelCheckpoint with a "
                                 "monitor (add one to trainer.callbacks, e.g. monitor: val/loss, save_top_k: 1)")
            if isinstance(pl_module.model, FSDPModule) or "deepspeed" in type(trainer.strategy).__name__.lower():
                raise ValueError("ExportHF(best=True) reloads whole weights from a checkpoint: not with "
                                 f"{type(trainer.strategy).__name__} (sharded); export the last step instead")
        if trainer.is_global_zero:  # refuse before training, not after it
            check_replaceable(self._target(trainer))

    def _restore_best(self, trainer, pl_module) -> dict:
        """Load the best checkpoint's weights into `pl_module`; returns what `export.json` records."""
        cb = trainer.checkpoint_callback
        if not cb.best_model_path:
            raise ValueError(f"ExportHF(best=True): no checkpoint was selected by {cb.monitor!r} (did validation run? "
                             "set trainer.val_check_interval and data with validation records); nothing exported")
        ckpt = torch.load(cb.best_model_path, map_location="cpu", weights_only=False)
        pl_module.load_state_dict(ckpt["state_dict"])
        score = cb.best_model_score
        rank_zero_info(f"[export] best checkpoint: step {ckpt['global_step']} ({cb.monitor} = {float(score):.4f}), "
                       f"of {trainer.global_step} steps")
        return {"weights": "best", "step": ckpt["global_step"], "monitor": cb.monitor, "score": float(score),
                "steps_trained": trainer.global_step, "checkpoint": cb.best_model_path}

    def on_fit_end(self, trainer, pl_module) -> None:
        source = (self._restore_best(trainer, pl_module) if self.best
                  else {"weights": "last", "step": trainer.global_step, "steps_trained": trainer.global_step})
        model = pl_module.model
        if isinstance(model, FSDPModule):  # FSDP2: every rank takes part in gathering the full weights
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            self._write(trainer, pl_module, state, source)
        else:  # DeepSpeed ZeRO-3 partitions are gathered for the write (a no-op for whole weights)
            with gathered(list(model.parameters())):
                self._write(trainer, pl_module, None, source)
        trainer.strategy.barrier("esft-export")

    def _write(self, trainer, pl_module, state_dict: dict | None, source: dict) -> None:
        """Write the export; `source` (which step's weights) goes to ``export.json``."""
        if not trainer.is_global_zero:
            return
        target = self._target(trainer)
        tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
        for path in (target, tmp, old):
            check_replaceable(path)
        shutil.rmtree(tmp, ignore_errors=True)
        full_state = state_dict  # the gathered state of a sharded model (peft picks the adapter's keys)
        # LoRA and trained expert slices are merged: the export is a plain transformers model
        model = pl_module.export_model(state_dict) if hasattr(pl_module, "export_model") else pl_module.model
        if hasattr(pl_module, "export_state_dict"):
            state_dict = pl_module.export_state_dict(state_dict)
        bad = non_finite(state_dict if state_dict is not None else model.state_dict())
        if bad is not None:
            raise NonFiniteError(f"non-finite weights ({bad}): not exported; {target} left as it was")
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        pl_module.tokenizer.save_pretrained(tmp)
        if is_lora(pl_module.model):  # the adapter alone too, in peft's format (`PeftModel.from_pretrained`)
            pl_module.model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=full_state)
        (tmp / MARKER).write_text("written by esft.callbacks.ExportHF; replaced by the next export\n")
        (tmp / "export.json").write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        auto = "AutoModelForSequenceClassification" if type(model).__name__.endswith("ForSequenceClassification") \
            else "AutoModelForCausalLM"  # a reward model (`esft.objectives.RewardModule`) or an LM
        rank_zero_info(f"[export] model and tokenizer saved to {target} (load with {auto}.from_pretrained)")


def check_replaceable(path: Path) -> None:
    """Raise unless `path` is absent, or a directory an export wrote (it holds `MARKER`)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ExportError(f"{path}: exists and is not an export directory; refusing to replace it "
                          "(set ExportHF's dirpath to a new directory)")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).exists():
        raise ExportError(f"{path}: holds files that no esft export wrote (no {MARKER} marker); refusing to delete it "
                          "(set ExportHF's dirpath to a new directory, or move those files)")
