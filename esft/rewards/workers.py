"""Per-sample rewards in worker processes, with a time limit per reward call.

    model: {init_args: {reward_workers: 4, reward_timeout: 10.0}}      # GRPO (esft.objectives.GRPOModule)
    RewardSet({"accuracy": 1.0, "my_checks:run_tests": 1.0}, workers=4, timeout=10.0)

A slow reward (a code runner, a symbolic checker, a remote judge) would stall a GRPO step in the
training process, and one that hangs or raises would end the run. `RewardPool` runs each call
``fn(sample)`` in a process pool instead:

- a call that raises, returns something that is not a number, or runs past ``timeout`` seconds
  scores 0 and is counted (`PoolStats`); training goes on;
- the limit is enforced in the worker by an interval timer (``SIGALRM``) from the moment the call
  starts, so waiting in the queue does not count; the worker then takes the next call;
- a call that does not return even then (native code that never checks for signals) is cut off
  by a backstop in the parent, ``(ceil(calls / workers) + 2) * timeout + 1`` seconds after the
  batch was submitted: it is counted as a timeout, and the pool is ended and a new one started
  for the next batch.

The pool starts on first use and is warmed (every worker has imported what a call needs) before
the first batch is timed. The reward functions must be picklable: module-level functions, or
``functools.partial`` of them. Workers start by ``forkserver`` by default (a fork of the training
process, which holds threads and maybe CUDA, is unsafe): the fork server imports `esft.rewards` once
and every worker is forked from it. Starting 2 workers took 10.8 s so (27.1 s by ``spawn``, where
each imports it; 0.08 s by ``fork``) on a 2-core CPU at load average 8. ``fork`` is the fast
choice where forking the parent is known to be safe.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

StartMethod = Literal["forkserver", "spawn", "fork"]
DEFAULT_START_METHOD: StartMethod = "forkserver"
_BACKSTOP_SLACK_S = 1.0


class RewardTimeout(Exception):
    """A reward call ran past its time limit."""


def _alarm(signum, frame):
    raise RewardTimeout


def _call(fn: Callable[[Any], float], sample: Any, timeout: float | None) -> tuple[str, Any]:
    """In a worker: ``("ok", value)``, ``("timeout", None)`` or ``("error", message)``."""
    if timeout is not None:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        value = fn(sample)
        return "ok", float(value)
    except RewardTimeout:
        return "timeout", None
    except Exception as e:  # noqa: BLE001 - any failure of a reward scores 0 and is counted
        return "error", f"{type(e).__name__}: {e}"
    finally:
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _ready(_: int) -> int:
    return 0


@dataclass
class PoolStats:
    """Failed calls of one batch: per reward name, and the first error message of each."""

    timeouts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.timeouts.values()) + sum(self.errors.values())


class RewardPool:
    def __init__(self, workers: int, timeout: float | None = None, start_method: StartMethod | None = None) -> None:
        """
        Args:
            workers: worker processes (>= 1).
            timeout: seconds one reward call may take (None: no limit; failures are still caught).
            start_method: how workers start (`multiprocessing` start methods); default
                `DEFAULT_START_METHOD`.
        """
        if workers < 1:
            raise ValueError(f"RewardPool: workers must be >= 1, got {workers}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"RewardPool: timeout must be > 0 seconds, got {timeout}")
        self.workers, self.timeout, self.start_method = workers, timeout, start_method or DEFAULT_START_METHOD
        self._pool = None
        self._finalizer = None

    def _start(self):
        if self._pool is None:
            context = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                context.set_forkserver_preload(["esft.rewards"])  # imported once, in the server
            self._pool = context.Pool(self.workers)
            self._finalizer = weakref.finalize(self, self._pool.terminate)
            self._pool.map(_ready, range(self.workers), chunksize=1)  # workers up before any call is timed
        return self._pool

    def close(self) -> None:
        """End the workers (a new pool starts on the next `map`)."""
        if self._finalizer is not None:
            self._finalizer()  # terminates the pool once
        self._pool = self._finalizer = None

    def map(self, calls: Sequence[tuple[str, Callable[[Any], float], Any]]) -> tuple[list[float], PoolStats]:
        """``(name, fn, sample)`` calls -> their values (0.0 for a failed call) and the failures."""
        if not calls:
            return [], PoolStats()
        pool, stats = self._start(), PoolStats()
        submitted = time.monotonic()
        pending = [pool.apply_async(_call, (fn, sample, self.timeout)) for _, fn, sample in calls]
        deadline = None if self.timeout is None else \
            submitted + (math.ceil(len(calls) / self.workers) + 2) * self.timeout + _BACKSTOP_SLACK_S
        values, hung = [], False
        for (name, _, _), result in zip(calls, pending):
            try:
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                status, value = result.get(wait)
            except multiprocessing.TimeoutError:  # the backstop: the worker did not answer
                status, value, hung = "timeout", None, True
            except Exception as e:  # noqa: BLE001 - e.g. a call whose arguments could not be pickled
                status, value = "error", f"{type(e).__name__}: {e}"
            if status == "ok":
                values.append(value)
                continue
            values.append(0.0)
            counts = stats.timeouts if status == "timeout" else stats.errors
            counts[name] = counts.get(name, 0) + 1
            if status == "error":
                stats.messages.setdefault(name, value)
        if hung:
            self.close()
        return values, stats

    def __getstate__(self) -> dict[str, Any]:  # a module holding a pool can be pickled (the pool is not)
        return {**self.__dict__, "_pool": None, "_finalizer": None}
