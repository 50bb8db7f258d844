"""The single-GPU DeepSeek-V2-Lite ESFT benchmark (benchmarks/esft_v2lite.py), as a CPU dry run at
a reduced depth and width: scoring, selection, ESFT and FFT steps, and the out-of-memory report."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "esft_v2lite.py"
DRY = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--experts", "8", "--expert-width", "32",
       "--dense-width", "128", "--heads", "4", "--vocab", "0", "--max-tokens", "128", "--score-tokens", "256",
       "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("esft_v2lite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_trains_the_selected_experts_then_everything(bench, tmp_path):
    result = bench.main(DRY + ["--out", str(tmp_path / "r.json")])
    cfg = result["config"]
    # the reductions apply, everything else is DeepSeek-V2-Lite's
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["n_routed_experts"]) == (2, 64, 8)
    assert (cfg["first_k_dense_replace"], cfg["n_shared_experts"], cfg["num_experts_per_tok"]) == (1, 2, 6)
    assert 0 < result["experts_selected"] < result["experts_total"] == 8  # one sparse layer
    esft, fft = result["esft"], result["fft"]
    assert fft["trainable"] == result["params"] and 0 < esft["trainable"] < result["params"] / 10
    for row in (esft, fft):
        assert row["steps_timed"] == 1 and row["tokens_per_s"] > 0 and len(row["losses"]) == 2
    assert esft["losses"][0] == pytest.approx(fft["losses"][0], abs=2e-4)  # same weights, same first batch
    assert (tmp_path / "r.json").stat().st_size > 0


def test_out_of_memory_is_reported_not_raised(bench, monkeypatch):
    real = bench.train

    def fft_runs_out(model, batches, args, device):
        if all(p.requires_grad for p in model.parameters()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
        return real(model, batches, args, device)

    monkeypatch.setattr(bench, "train", fft_runs_out)
    result = bench.main(DRY + ["--sides", "fft"])
    assert result["fft"]["oom"] and "Tried to allocate" in result["fft"]["error"] and "esft" not in result
