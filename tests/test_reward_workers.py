"""Rewards in worker processes: a slow reward is cut off at its timeout, a raising one scores 0,
both are counted; a reward that ignores the timer is cut off by the parent's backstop and the pool
restarts; GRPO logs the failures (``train/reward_failures``)."""

import signal
import time

import pytest

from esft.rewards import RewardSet, Sample

from conftest import TINY

ARITH = {"task": "arithmetic", "answer": "<think>2+3=5</think>\n5"}
HERE = __name__  # rewards below are imported by name in the workers


def slow(sample: Sample) -> float:
    if sample.text == "slow":
        time.sleep(60)
    return 1.0


def boom(sample: Sample) -> float:
    if sample.text == "bad":
        raise ValueError("no verdict for 'bad'")
    return 2.0


def deaf(sample: Sample) -> float:
    """Hangs with the timer's signal ignored, like native code that never checks for signals."""
    if sample.text == "slow":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(60)
    return 1.0


def flaky(sample: Sample) -> float:
    """Fails on every other sample (by text length): GRPO's rollouts hit it."""
    if len(sample.text) % 2:
        raise RuntimeError("flaky")
    return 0.0


@pytest.fixture
def rewards():
    """RewardSets whose workers start by fork (well under a second; the default forkserver takes
    about 10 s here: `test_forkserver_workers`), closed after the test."""
    made = []
    yield lambda *a, **k: made.append(RewardSet(*a, **{"start_method": "fork", **k})) or made[-1]
    for r in made:
        r.close()


def test_slow_and_raising_rewards_score_zero_and_are_counted(rewards):
    rs = rewards({"accuracy": 1.0, f"{HERE}:slow": 1.0, f"{HERE}:boom": 0.5}, workers=2, timeout=0.5)
    samples = [Sample(ARITH, t) for t in ("<think>2+3=5</think>\n5", "slow", "bad", "7")]
    rs(samples[:1])  # workers started
    start = time.monotonic()
    total, parts = rs(samples)
    elapsed = time.monotonic() - start
    assert parts == {"accuracy": [1.0, 0.0, 0.0, 0.0], f"{HERE}:slow": [1.0, 0.0, 1.0, 1.0],
                     f"{HERE}:boom": [2.0, 2.0, 0.0, 2.0]}
    assert total == pytest.approx([3.0, 1.0, 1.0, 2.0])
    stats = rs.last_stats
    assert stats.timeouts == {f"{HERE}:slow": 1} and stats.errors == {f"{HERE}:boom": 1} and stats.failures == 2
    assert stats.messages[f"{HERE}:boom"] == "ValueError: no verdict for 'bad'"
    assert elapsed < 5.0, elapsed  # cut at 0.5 s, not 60
    pool = rs.pool._pool
    total, _ = rs(samples[:1])  # the worker that timed out serves the next call; no restart
    assert total == [3.0] and rs.last_stats.failures == 0 and rs.pool._pool is pool


def test_a_reward_that_ignores_the_timer_is_cut_off_and_the_pool_restarts(rewards):
    rs = rewards({f"{HERE}:deaf": 1.0}, workers=2, timeout=0.3)
    rs([Sample(ARITH, "x")])
    pool = rs.pool._pool
    start = time.monotonic()
    total, _ = rs([Sample(ARITH, "slow"), Sample(ARITH, "x")])
    assert total == [0.0, 1.0] and rs.last_stats.timeouts == {f"{HERE}:deaf": 1}
    assert time.monotonic() - start < 5.0
    assert rs.pool._pool is None  # the hung pool was ended
    assert rs([Sample(ARITH, "x")])[0] == [1.0] and rs.pool._pool is not pool


def test_in_process_rewards_raise_and_a_timeout_needs_workers():
    with pytest.raises(ValueError, match="no verdict"):
        RewardSet({f"{HERE}:boom": 1.0})([Sample(ARITH, "bad")])
    with pytest.raises(ValueError, match="timeout needs reward workers"):
        RewardSet({"accuracy": 1.0}, timeout=1.0)
    with pytest.raises(KeyError, match="cannot import 'nope'"):
        RewardSet({f"{HERE}:nope": 1.0})


@pytest.mark.slow
def test_forkserver_workers():
    rs = RewardSet({f"{HERE}:slow": 1.0, f"{HERE}:boom": 1.0}, workers=2, timeout=0.5)
    try:
        assert rs.pool.start_method == "forkserver"
        assert rs([Sample(ARITH, t) for t in ("slow", "bad", "x")])[0] == [2.0, 1.0, 3.0]
        assert rs.last_stats.failures == 2
    finally:
        rs.close()


def test_grpo_scores_rollouts_with_a_reward_model_and_rule_rewards_in_workers(tmp_path, monkeypatch):
    """GRPO's sampling: the `model` reward beside a failing per-sample reward run in a worker; every
    failure is counted."""
    from esft.objectives import GRPOModule
    from esft.rewards import ModelReward, workers

    from test_reward_model import export_tiny_reward_model, prompt_record

    monkeypatch.setattr(workers, "DEFAULT_START_METHOD", "fork")
    path = str(export_tiny_reward_model(tmp_path / "rm"))
    module = GRPOModule(model_config=TINY["llama"], tokenizer="builtin", num_generations=4, max_completion_length=6,
                        rewards={"model": 0.5, f"{HERE}:flaky": 1.0}, reward_options={"model": {"path": path}},
                        reward_workers=1, reward_timeout=10.0)
    try:
        outs, total, info = module._sample([prompt_record(2, 3), prompt_record(4, 5)])
    finally:
        module.rewards.close()
    samples = info["samples"]
    assert len(samples) == len(total) == 8
    assert info["reward_failures"] == sum(len(s.text) % 2 for s in samples) > 0
    model_scores = ModelReward(path)(samples)
    assert info["parts"]["model"] == pytest.approx(model_scores, abs=1e-5)
    assert total == pytest.approx([0.5 * m for m in model_scores])  # flaky scores 0 or fails (0)


@pytest.mark.slow
def test_grpo_logs_reward_failures(tmp_path, monkeypatch):
    from esft.cli import main
    from esft.rewards import workers

    monkeypatch.setattr(workers, "DEFAULT_START_METHOD", "fork")
    from test_grpo import grpo_config, scalars

    path = grpo_config(tmp_path, rewards={"accuracy": 1.0, f"{HERE}:flaky": 1.0}, reward_options=None,
                       reward_workers=1, reward_timeout=5.0)
    cli = main(["fit", "--config", str(path), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    assert cli.model.rewards.pool._pool is None  # the workers ended with the fit
    logged = scalars(tmp_path)
    failures = logged["train/reward_failures"]
    assert len(failures) == 2 and all(f == f // 1 for f in failures) and sum(failures) > 0  # counts of calls
    assert all(f <= 12 for f in failures)  # at most every sample of a step (3 prompts x 4)
    assert max(logged[f"train/reward/{HERE}:flaky"]) == 0.0  # a failure scores 0
