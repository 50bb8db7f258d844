"""Export the trained model and tokenizer in HF format (safetensors) at the end of `fit`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportHF(L.Callback):
    """Writes ``save_pretrained`` output to `dirpath` (default: ``<log_dir>/hf``).

    The files go to a sibling temporary directory that is renamed into place, so an
    interrupted export never leaves a half-written model where a finished one is expected.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        target = Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf"))
        tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        # LoRA and trained expert slices are merged: the export is a plain transformers model
        model = pl_module.export_model() if hasattr(pl_module, "export_model") else pl_module.model
        state = pl_module.export_state_dict() if hasattr(pl_module, "export_state_dict") else None
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        pl_module.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        rank_zero_info(f"[export] model and tokenizer saved to {target} (load with AutoModelForCausalLM.from_pretrained)")
