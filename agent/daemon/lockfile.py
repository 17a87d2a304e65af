"""One flock-protected lock file: the pid file and the state-directory lock.

``flock`` is released by the kernel when the holder dies, so a lock that
can be taken means whoever wrote the file is gone: a stale pid file is
detected (and replaced), never trusted. The holder's pid is written into
the file so a refusal can name the agent that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path


class LockFile:
    """An exclusive lock on ``path`` holding the owner's pid."""

    def __init__(self, path: Path, *, mode: int, what: str, remove_on_release: bool) -> None:
        self.path = path
        self.mode = mode
        self.what = what  # "pid file ...", "state directory ...": for the refusal
        self.remove_on_release = remove_on_release
        self.fd = -1
        self.stale_pid: int | None = None

    @classmethod
    def pid_file(cls, path: Path) -> LockFile:
        """The daemon's pid file (0644, removed when the daemon stops)."""
        return cls(path, mode=0o644, what=f"pid file {path}", remove_on_release=True)

    @classmethod
    def state_dir(cls, state_dir: Path) -> LockFile:
        """One agent per state directory: what makes start-up recovery safe."""
        return cls(
            state_dir / "agent.lock",
            mode=0o600,
            what=f"state directory {state_dir}",
            remove_on_release=False,
        )

    def acquire(self, *, write_pid: bool = True) -> None:
        """Take the lock or raise RuntimeError naming the holder's pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RuntimeError(
                    f"another agent is already running (pid {holder or '?'}, {self.what})"
                ) from None
            raise RuntimeError(f"{self.path}: cannot lock: {e.strerror}") from None
        old = self._read(fd)
        if old is not None and old != os.getpid():
            # The lock was free, so whoever wrote this pid is gone.
            self.stale_pid = old
        self.fd = fd
        if write_pid:
            self.write_pid()

    @staticmethod
    def _read(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def write_pid(self) -> None:
        """Record the current process as the holder."""
        assert self.fd >= 0
        os.set_inheritable(self.fd, False)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        with contextlib.suppress(OSError):
            os.fsync(self.fd)

    def release(self) -> None:
        """Drop the lock (and remove the file if it is still ours and meant to go)."""
        if self.fd < 0:
            return
        if self.remove_on_release:
            with contextlib.suppress(OSError):
                if self._read(self.fd) == os.getpid():
                    os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    # python-daemon's pidfile protocol: a context manager entered after detaching.
    def __enter__(self) -> LockFile:
        self.write_pid()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
