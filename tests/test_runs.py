"""The run core of sweep, tune and pipeline: safe names, the directory lock, live run dirs."""

import subprocess
import sys

import pytest

from esft.runs import RunDirBusy, claim, is_safe_name, lock_dir, running_pid, safe_name


def test_safe_names_are_single_directory_names():
    for name in ("cold_start", "lr=0.001,packing=true", "rs-sft.2", "a+b"):
        assert is_safe_name(name) and safe_name(name) == name
    for name in ("", ".", "..", "../x", "/abs", "a/b", "-a", ".hidden", "a b", "x" * 121, 3, None):
        assert not is_safe_name(name)


def test_the_lock_is_exclusive_and_released_at_the_end(tmp_path):
    with lock_dir(tmp_path / "out"):
        assert (tmp_path / "out" / ".lock").read_text().strip().isdigit()
        with pytest.raises(RunDirBusy, match=r"out is in use by another run \(pid \d+ holds"):
            with lock_dir(tmp_path / "out"):  # a second open file: flock treats it as another holder
                pass
    with lock_dir(tmp_path / "out"):  # released: a restart gets it
        pass


def test_a_recorded_pid_counts_only_while_that_very_process_lives(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (tmp_path / "RUNNING").write_text(f"{proc.pid} {started}\n")
        assert running_pid(tmp_path) == proc.pid
        with pytest.raises(RunDirBusy, match=f"still being written by pid {proc.pid}"):
            claim(tmp_path)
        (tmp_path / "RUNNING").write_text(f"{proc.pid} {int(started) - 1}\n")  # the pid, given to another process
        assert running_pid(tmp_path) is None
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "RUNNING").write_text(f"{proc.pid} {started}\n")
    assert running_pid(tmp_path) is None
    claim(tmp_path)
    (tmp_path / "RUNNING").write_text("garbage\n")
    assert running_pid(tmp_path) is None
