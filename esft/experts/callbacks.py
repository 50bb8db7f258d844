"""Save the ESFT adapter (trained expert slices + expert config) at the end of `fit`."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from esft.experts.adapter import Layout, save_adapter
from esft.experts.trainable import trainable_state_dict


class ExportExpertAdapter(L.Callback):
    """Writes `esft.experts.adapter.save_adapter` output to `dirpath` (default ``<log_dir>/adapter``).

    A run without an expert config (``model.init_args.experts``) saves nothing and says so, so
    one callback list serves the FFT, LoRA and ESFT cells of a sweep."""

    def __init__(self, dirpath: str | None = None, layout: Layout = "esft") -> None:
        """`layout`: this project's adapter files or deepseek-ai/ESFT's (`esft.experts.adapter`)."""
        self.dirpath = dirpath
        self.layout = layout

    def on_fit_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "expert_config", None) is None:
            rank_zero_info("[export] no expert config (model.init_args.experts): no ESFT adapter to save")
            return
        tensors = trainable_state_dict(pl_module.model)  # every rank: FSDP2 shards are gathered
        if trainer.is_global_zero:
            target = Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "adapter"))
            save_adapter(pl_module.model, pl_module.expert_config, target, tensors, layout=self.layout)
            rank_zero_info(f"[export] ESFT adapter saved to {target}")
        trainer.strategy.barrier("esft-adapter")
