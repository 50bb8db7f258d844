"""The ESFT step benchmark (benchmarks/esft_step.py) at the tiny size: both sides run on the same
batches, each batch in both orders, and the rows report what the README's kernel table reads."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "esft_step.py"


@pytest.mark.slow
def test_tiny_run_alternates_sides_and_reports_paired_forward_ratios(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("esft_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []  # (batch, model) of every loss computed, in order
    real = bench.token_loss

    def recording(model, batch, chunk):
        calls.append((id(batch), id(model)))
        return real(model, batch, chunk)

    monkeypatch.setattr(bench, "token_loss", recording)
    steps, reps = 3, 2
    result = bench.main(["--size", "tiny", "--sides", "fft", "esft", "--steps", str(steps), "--warmup", "1",
                         "--forward-reps", str(reps), "--max-tokens", "256", "--score-tokens", "512",
                         "--out", str(tmp_path / "r.json")])
    fft, esft = result["sizes"][0]["rows"]
    assert (fft["setup"], esft["setup"]) == ("fft", "esft_token_p0.2")
    assert fft["trainable_pct"] == 100.0 and 0 < esft["trainable_pct"] < 20
    assert esft["grad_optim_mib"] < fft["grad_optim_mib"] / 5
    assert len(fft["steps_s"]) == len(esft["forwards_s"]) == steps
    assert len(fft["forwards_alone_s"]) == len(esft["forwards_alone_s"]) == steps * reps
    assert fft["forward_alone_vs_fft"] == 1.0 and esft["forward_alone_vs_fft"] > 0
    # every batch is computed by both sides, and which side goes first differs between its visits
    assert len(calls) == 2 * steps * (1 + reps)
    firsts: dict[int, set[int]] = {}
    for i in range(0, len(calls), 2):
        (batch_a, model_a), (batch_b, model_b) = calls[i], calls[i + 1]
        assert batch_a == batch_b and model_a != model_b
        firsts.setdefault(batch_a, set()).add(model_a)
    assert len(firsts) == steps and all(len(models) == 2 for models in firsts.values())
    assert (tmp_path / "r.json").stat().st_size > 0
