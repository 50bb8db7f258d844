"""Write `esft predict` outputs as JSON Lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class JSONLPredictionWriter(BasePredictionWriter):
    """Appends every predicted row to `path` (default ``<log_dir>/predictions.jsonl``) and logs
    the mean verifier score when rows carry one."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        path = Path(self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        scores = [r["score"] for r in rows if "score" in r]
        summary = f", mean score {sum(scores) / len(scores):.3f} over {len(scores)} verifiable rows" if scores else ""
        rank_zero_info(f"[predict] {len(rows)} completions written to {path}{summary}")
