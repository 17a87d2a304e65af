"""The flock-protected pid file and state-directory lock (agent.daemon.lockfile), directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.daemon.lockfile import LockFile


def test_pid_file_holds_our_pid_and_goes_at_release(tmp_path: Path) -> None:
    """The pid file is 0644, names this process, and is removed when released."""
    lock = LockFile.pid_file(tmp_path / "agent.pid")
    lock.acquire()
    assert (tmp_path / "agent.pid").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "agent.pid").stat().st_mode & 0o777 == 0o644
    assert lock.stale_pid is None
    lock.release()
    assert not (tmp_path / "agent.pid").exists()
    lock.release()  # twice is harmless


def test_a_held_lock_refuses_naming_the_holder(tmp_path: Path) -> None:
    """A second taker (another open file) is refused with the holder's pid and what it is."""
    first = LockFile.state_dir(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RuntimeError) as e:
            LockFile.state_dir(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(e.value)
        assert f"state directory {tmp_path}" in str(e.value)
    finally:
        first.release()
    # The state lock stays (0600) and can be taken again once released.
    assert (tmp_path / "agent.lock").stat().st_mode & 0o777 == 0o600
    again = LockFile.state_dir(tmp_path)
    again.acquire()
    again.release()


def test_a_stale_pid_is_noticed_and_replaced(tmp_path: Path) -> None:
    """A pid file left by a dead process (no lock held) is taken over, its pid reported."""
    path = tmp_path / "agent.pid"
    path.write_text("999999999\n")
    lock = LockFile.pid_file(path)
    lock.acquire()
    assert lock.stale_pid == 999999999
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_acquire_without_writing_then_enter_writes(tmp_path: Path) -> None:
    """acquire(write_pid=False) leaves the file alone; entering the context writes our pid
    (python-daemon's protocol: the pid is written after the fork)."""
    path = tmp_path / "agent.pid"
    path.write_text("")
    lock = LockFile.pid_file(path)
    lock.acquire(write_pid=False)
    assert path.read_text() == ""
    with lock:
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists() and lock.fd == -1


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    """The lock file is opened with O_NOFOLLOW: a planted symlink is an error."""
    (tmp_path / "target").write_text("")
    (tmp_path / "agent.pid").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        LockFile.pid_file(tmp_path / "agent.pid").acquire()
