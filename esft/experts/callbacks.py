"""Save the ESFT adapter (trained expert slices + expert config) at the end of `fit`."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from esft.experts.adapter import save_adapter


class ExportExpertAdapter(L.Callback):
    """Writes `esft.experts.adapter.save_adapter` output to `dirpath` (default ``<log_dir>/adapter``).

    Needs a model with an expert config (``model.init_args.experts``)."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "expert_config", None) is None:
            raise ValueError("ExportExpertAdapter needs an expert config: set model.init_args.experts")

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        target = Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "adapter"))
        save_adapter(pl_module.model, pl_module.expert_config, target)
        rank_zero_info(f"[export] ESFT adapter saved to {target}")
