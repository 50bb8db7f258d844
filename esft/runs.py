"""The run core that `esft sweep`, `esft tune` and `esft pipeline` share (with `esft.runconfig`,
the configs and results): one process per output directory, safe directory names, and child runs
that end with their parent.

    with lock_dir(out):                     # a second process on `out` fails at once (RunDirBusy)
        claim(run_dir)                      # refuses a run dir that a live child still writes
        rc, wall_s = fit_child(cfg, run_dir)   # `esft fit` of cfg (run.yaml) in a child, log in log.txt

- **Lock.** `lock_dir` takes an exclusive, non-blocking ``flock`` on ``<out>/.lock`` and writes
  its pid into it. The kernel drops the lock when the holder dies, even by SIGKILL, so a restart
  after a crash is never blocked by a stale file.
- **Children.** `run_child` starts the command in its own session (process group), so a Ctrl-C
  at the terminal reaches the parent only. When the parent is stopped (SIGTERM, SIGINT, any
  exception) it sends SIGTERM to the child's group, SIGKILL after `grace_s` (at once when stopped
  a second time), and re-raises: the command exits non-zero. SIGKILL of the parent runs no handler; on Linux the child asks the
  kernel for SIGTERM when its parent thread dies (``prctl(PR_SET_PDEATHSIG)``). Lightning turns
  that SIGTERM into a stop after the current step.
- **Live run dirs.** While a child runs, ``<run dir>/RUNNING`` holds its pid (and, on Linux, its
  start time, so that a later process given the same pid is not mistaken for it). A child that
  outlived its parent (no PDEATHSIG off Linux, or one that ignores SIGTERM) still writes there;
  `claim` raises instead of letting a restart delete or reuse that directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from esft.runconfig import write_run_config

LOCK_FILE = ".lock"
RUNNING_FILE = "RUNNING"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SAFE_NAME_RULE = "letters, digits and ._=,+- only, not starting or ending with . or -, at most 120 characters"


class RunDirBusy(RuntimeError):
    """An output or run directory that another live process holds; the message names both."""


class Stopped(SystemExit):
    """SIGTERM (or another stop signal) received: unwinds like Ctrl-C, exits with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


# ---- names -----------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A filesystem-safe directory name: letters, digits and ``._=,+-`` only, at most 120 chars."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", name).strip("-.") or "cell"
    if len(safe) > 120:
        safe = safe[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def is_safe_name(name: object) -> bool:
    """Whether `name` is one directory name that `safe_name` leaves as it is: no ``/``, no ``..``,
    not empty, not absolute, not hidden."""
    return isinstance(name, str) and safe_name(name) == name


# ---- one process per directory ---------------------------------------------------------------
@contextlib.contextmanager
def lock_dir(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (created with `out`) for the block; raise `RunDirBusy` naming `out` and
    the holder's pid when another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{out} is in use by another run (pid {holder} holds {path}); "
                             "wait for it to end or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Inside the block, `signums` raise `Stopped` (a SystemExit) in the main thread, so that
    ``finally`` blocks and `run_child` end the children; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- live run directories --------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 on (state, ppid, ...; index 19 is the start time in clock
    ticks after boot), or None off Linux or when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` exists, is not a zombie, and (where `started` is known) is the process
    that started then, not a later one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and (not started or stat[19] == started)


def running_pid(run_dir: Path) -> int | None:
    """The pid recorded in ``run_dir/RUNNING`` when that process is still alive, else None."""
    try:
        pid, *started = (run_dir / RUNNING_FILE).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid, started[0] if started else None) else None


def claim(run_dir: Path) -> None:
    """Raise `RunDirBusy` when a live child of an earlier run still writes `run_dir`."""
    pid = running_pid(run_dir)
    if pid is not None:
        raise RunDirBusy(f"{run_dir} is still being written by pid {pid}, a run of an earlier process; "
                         f"wait for it to end (or kill it) and rerun")


# ---- child processes -------------------------------------------------------------------------
def _die_with_parent() -> object | None:
    """A `preexec_fn` that makes the child receive SIGTERM when this thread dies (Linux), or None."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the C library this interpreter links
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it (its pid, the group id, stays taken)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def end_group(proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM the child's process group, SIGKILL it after `grace_s` s (at once when a second stop
    signal or Ctrl-C interrupts the wait); returns the exit code.

    The leader is reaped last: until then its pid (the group id) cannot be given to another
    process, so the signals reach only this group."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        while time.monotonic() < deadline and not _exited(proc.pid):
            time.sleep(0.05)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # the leader if it is still there, and any straggler
    return proc.wait()


def run_child(cmd: list[str], log: Path, run_dir: Path, env: dict[str, str] | None = None,
              grace_s: float = 30.0) -> int:
    """Run `cmd` in its own process group with stdout and stderr appended to `log`, its pid in
    ``run_dir/RUNNING`` while it runs; returns its exit code. On SIGTERM, Ctrl-C or any exception
    the group is ended (`end_group`) and the exception re-raised."""
    with stop_on_signals(), log.open("a", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent())
        try:
            stat = _stat(proc.pid)
            (run_dir / RUNNING_FILE).write_text(f"{proc.pid} {stat[19] if stat else ''}\n")
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
            _signal_group(proc.pid, signal.SIGKILL)  # nothing of the group outlives the child
            return proc.wait()
        except BaseException:
            end_group(proc, grace_s)
            raise
        finally:
            (run_dir / RUNNING_FILE).unlink(missing_ok=True)


# ---- `esft` children -------------------------------------------------------------------------
def esft_command(argv: Sequence[str]) -> list[str]:
    """The command line of ``esft <argv>`` in a fresh interpreter (the same Python as this one)."""
    return [sys.executable, "-m", "esft.cli", *argv]


def esft_child(argv: Sequence[str], run_dir: Path, log: Path | None = None) -> tuple[int, float]:
    """``esft <argv>`` in a fresh interpreter (`run_child`: its own process group, ended with this
    process) with its output appended to `log` (default ``<run_dir>/log.txt``); returns the exit
    code and the seconds it ran. The child imports the same `esft` as this process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rc = run_child(esft_command(argv), log or run_dir / "log.txt", run_dir, env)
    return rc, time.perf_counter() - start


def fit_child(cfg: dict, run_dir: Path, extra_args: Sequence[str] = (), log: Path | None = None) -> tuple[int, float]:
    """``esft fit`` of `cfg`, written to ``<run_dir>/run.yaml``, in a child (`esft_child`)."""
    return esft_child(["fit", "--config", str(write_run_config(cfg, run_dir)), *extra_args], run_dir, log)
