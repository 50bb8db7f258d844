"""`esft bench`: rows measured at equal tokens per step, MFU inputs, TRL batch accounting, output."""

import json

import pytest
import torch

from esft.commands.bench import (Setup, _batch_stats, add_loss_gaps, builtin_examples, lognormal_examples, markdown, moving_average,
                        parse_args, run_esft, setups)


def test_setups_cross_precision_layout_compile_and_put_trl_first():
    args = parse_args(["--layout", "rows", "padded", "--precision", "32-true", "bf16-mixed", "--compile", "off", "on"])
    rows = setups(args)
    assert [r.side for r in rows[:2]] == ["trl", "trl"] and len(rows) == 2 + 2 * 2 * 2
    assert Setup("esft", "rows", "bf16-mixed", True).name == "esft rows, bf16-mixed, attn auto, chunked CE, compiled"
    assert parse_args(["--no-trl"]).trl == [] and parse_args(["--device", "cuda"]).precision == ["bf16-true"]


def test_lognormal_documents_match_the_anchor_distribution():
    lengths = sorted(e["length"] for e in lognormal_examples(4096, 151936, 2048))
    median, mean = lengths[len(lengths) // 2], sum(lengths) / len(lengths)
    assert 250 <= median <= 290 and 370 <= mean <= 430 and lengths[0] >= 16 and lengths[-1] <= 2048


def test_trl_batches_count_real_tokens_and_causal_pairs():
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    free = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}  # documents of 3, 2, 1 tokens
    assert _batch_stats(padded) == (5, 6 + 3)
    assert _batch_stats(free) == (6, 6 + 3 + 1)


def test_loss_gap_compares_moving_averages_with_the_first_esft_row():
    assert moving_average([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    rows = [{"side": "trl", "losses": [9.0] * 20}, {"side": "esft", "losses": [2.0] * 20},
            {"side": "esft", "losses": [2.0] * 19 + [2.2]}]
    add_loss_gaps(rows)
    assert "loss_gap_pct" not in rows[0] and rows[1]["loss_gap_pct"] == 0.0
    assert rows[2]["loss_gap_pct"] == pytest.approx(1.0)  # the last 10-step average is 2.02


def test_esft_rows_take_equal_tokens_per_step_and_report_flops(tmp_path):
    args = parse_args(["--steps", "3", "--warmup", "1", "--max-length", "64", "--rows", "4", "--threads", "1"])
    examples = builtin_examples(200, args.max_length)
    per_step = max(1, round(args.rows * args.max_length * 0.95 / (sum(e["length"] for e in examples) / len(examples))))
    packed = run_esft(Setup("esft", "rows"), examples, args, per_step)
    padded = run_esft(Setup("esft", "padded"), examples, args, per_step)
    for row in (packed, padded):
        assert row["steps_timed"] == 3 and len(row["losses"]) == 4 and row["tflops"] > 0 and row["mfu_pct"] is None
        assert 0.6 * 256 <= row["tokens_per_step"] <= 256  # short rows of 64 pack loosely
    table = markdown({"rows": [packed, padded], "baseline_tokens_per_s": None, "shape": "tiny", "device_name": "cpu",
                      "num_docs": 200, "mean_doc_tokens": 40.0, "data": "builtin", "rows_per_step": 4, "max_length": 64,
                      "steps": 3, "warmup": 1, "gradient_checkpointing": False})
    assert "| esft rows, 32-true, attn auto, chunked CE |" in table and table.count("\n|") == 4  # header, rule, two rows


@pytest.mark.slow
def test_bench_command_side_by_side_with_trl(tmp_path):
    pytest.importorskip("trl")
    from esft.commands.bench import main

    result = main(["--docs", "240", "--steps", "3", "--warmup", "1", "--max-length", "64", "--rows", "4", "--threads", "1",
                   "--out", str(tmp_path)])
    rows = {r["setup"]: r for r in result["rows"]}
    assert set(rows) == {"TRL SFTTrainer packed", "TRL SFTTrainer padded", "esft auto, 32-true, attn auto, chunked CE"}
    assert all("error" not in r for r in rows.values())
    budget = rows["TRL SFTTrainer packed"]["tokens_per_step"]
    assert all(abs(r["tokens_per_step"] - budget) <= 0.2 * budget for r in rows.values())
    assert json.loads((tmp_path / "bench.json").read_text())["baseline_tokens_per_s"] == rows["TRL SFTTrainer packed"]["tokens_per_s"]
    assert "x TRL packed" in (tmp_path / "bench.md").read_text()
