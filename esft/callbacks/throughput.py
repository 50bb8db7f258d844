"""Real-token throughput, MFU, padding fraction and peak memory, logged every N optimizer steps."""

from __future__ import annotations

import resource
import time

import lightning as L
import torch

from esft.flops import attention_flops_per_pair, matmul_params, peak_bf16_tflops, training_flops


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TokenThroughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (real, non-pad tokens, all ranks), ``perf/tflops`` (model
    FLOPs per second per device, attention included: `esft.flops`), ``perf/mfu`` (against
    `peak_tflops`), ``perf/padding_fraction``, ``perf/peak_memory_gib`` and ``perf/tokens_seen``;
    reads ``num_tokens`` / ``num_padding`` / ``num_causal_pairs`` from each batch.

    Args:
        log_every_n_steps: logging interval in optimizer steps.
        peak_tflops: the device's dense peak for MFU; default: the BF16 peak of a known CUDA
            device (`esft.flops.PEAK_BF16_TFLOPS`), none on CPU (no MFU logged).
    """

    def __init__(self, log_every_n_steps: int = 10, peak_tflops: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.peak_tflops = peak_tflops
        self.tokens_seen = 0
        self._params = self._per_pair = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._tokens = self._padding = self._pairs = 0
        self._start: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        self._params, self._per_pair = matmul_params(model), attention_flops_per_pair(model.config)
        if self.peak_tflops is None:
            self.peak_tflops = peak_bf16_tflops(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["num_tokens"]
        self._padding += batch["num_padding"]
        self._pairs += batch.get("num_causal_pairs", 0)
        self.tokens_seen += batch["num_tokens"] * trainer.world_size
        if trainer.global_step % self.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._start
        total = self._tokens + self._padding
        tflops = training_flops(self._params, self._per_pair, self._tokens, self._pairs) / max(elapsed, 1e-9) / 1e12
        metrics = {
            "perf/tokens_per_s": self._tokens * trainer.world_size / max(elapsed, 1e-9),
            "perf/tflops": tflops,
            "perf/padding_fraction": self._padding / max(total, 1),
            "perf/peak_memory_gib": peak_memory_gib(pl_module.device),
            "perf/tokens_seen": float(self.tokens_seen),
        }
        if self.peak_tflops:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("tok/s", metrics["perf/tokens_per_s"], prog_bar=True, logger=False, batch_size=1)
        self._reset_window()

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = state_dict.get("tokens_seen", 0)
