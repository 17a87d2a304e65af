"""A running job's output file: the job keeper records each job's pipe into it.

The first byte creates ``<output_dir>/<job id>.out`` (0600, never replacing or
following an existing name), so a job that prints nothing costs no file; the cap
(``output_bytes``) truncates; a write error (disk full) fails only that job. The
descriptor is taken before the job starts (an unnamed ``O_TMPFILE`` that the first
byte links into place): a keeper out of descriptors refuses the start instead of
starting a job that then fails for want of its output file.

Standard library only (no asyncio): the keeper (:mod:`agent.keeper.keeper`) imports
it, and the agent's streaming side (its ``output`` module) reads what it wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from agent.keeper.errors import SpawnFailure, agent_condition


def describe_oserror(e: OSError) -> str:
    """``Exec format error (ENOEXEC)``-style text for a failed operation."""
    if isinstance(e, SpawnFailure):
        return e.reason  # already names the step: "execve: Exec format error (ENOEXEC)"
    code = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or str(e)
    return f"{text} ({code})" if code else text


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def _link_fd(fd: int, path: str) -> None:
    """Give the unnamed (O_TMPFILE) file ``fd`` the name ``path``; raises OSError.

    linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) documents: os.link() calls
    plain link() here, which would link the magic symlink itself (EXDEV).
    """
    src = f"/proc/self/fd/{fd}".encode()
    if _libc.linkat(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@dataclass
class WriteResult:
    """What one :meth:`OutputFile.write` did."""

    written: int
    cap_reached: bool = False
    failure: str = ""


class OutputFile:
    """The output file of one running job."""

    def __init__(self, path: str, cap: int, owner: int = -1) -> None:
        self.path = path
        self.cap = cap
        # A root keeper whose agent is another user (the privileged deployment) hands the
        # file to the agent, which reads and removes it; -1: the keeper's own.
        self.owner = owner
        self.size = 0
        self.truncated = False
        self._fd: int | None = None
        self._unnamed = False  # _fd is an O_TMPFILE not yet linked at path

    def reserve(self) -> None:
        """Take the file's descriptor now, before the job starts, unnamed (O_TMPFILE).

        Raises the agent's-condition AgentError when the process is out of descriptors
        or memory. Any other failure (a file system without O_TMPFILE, no inode left) is
        left to the first byte, as without a reservation: a job that writes nothing
        still succeeds.
        """
        try:
            self._fd = os.open(
                os.path.dirname(self.path), os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise agent_condition(e) or e from None
            return
        self._unnamed = True
        self._give()

    def write(self, data: bytes) -> WriteResult:
        """Append ``data`` (up to the cap); never raises."""
        if self._unnamed and self._fd is not None:
            try:
                # The reserved file gets its name at the first byte. link() never
                # replaces an existing name (like O_EXCL) and never follows one.
                _link_fd(self._fd, self.path)
            except OSError as e:
                return WriteResult(
                    0, failure=f"its output file could not be created: {describe_oserror(e)}"
                )
            self._unnamed = False
        if self._fd is None:
            try:
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as e:
                return WriteResult(
                    0, failure=f"its output file could not be created: {describe_oserror(e)}"
                )
            self._give()
        cap_reached = False
        if self.cap and self.size + len(data) > self.cap:
            data = data[: self.cap - self.size]
            self.truncated = cap_reached = True
        view = memoryview(data)
        start = self.size
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            # Disk full (or quota, or I/O error): this job fails, clearly;
            # the agent and every other job carry on.
            return WriteResult(
                self.size - start, failure=f"its output could not be written: {describe_oserror(e)}"
            )
        return WriteResult(self.size - start, cap_reached=cap_reached)

    def _give(self) -> None:
        if self.owner >= 0 and self._fd is not None:
            with contextlib.suppress(OSError):
                os.fchown(self._fd, self.owner, -1)

    def state(self) -> dict[str, Any]:
        """What the keeper hands across ``execve`` (agent.keeper.keeperstate)."""
        return {
            "path": self.path,
            "cap": self.cap,
            "size": self.size,
            "truncated": self.truncated,
            "fd": -1 if self._fd is None else self._fd,
            "unnamed": self._unnamed,
            "owner": self.owner,
        }

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> OutputFile:
        """The file :meth:`state` described, its descriptor inherited across ``execve``."""
        out = cls(str(st["path"]), int(st["cap"]), int(st.get("owner", -1)))
        out.size = int(st["size"])
        out.truncated = bool(st["truncated"])
        fd = int(st["fd"])
        out._fd = None if fd < 0 else fd
        out._unnamed = bool(st["unnamed"])
        return out

    @classmethod
    def reopen(cls, path: str, cap: int, owner: int = -1) -> OutputFile:
        """The file of a job a previous keeper was recording (an adopted job): what it
        wrote stays, what comes next is appended at the file's current size (a missing
        file is created at the first byte, as for a new job). Raises OSError."""
        out = cls(path, cap, owner)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return out
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
        except OSError:
            os.close(fd)
            raise
        out._fd = fd
        out.size = st.st_size
        out.truncated = bool(cap) and st.st_size >= cap
        return out

    def close(self) -> None:
        """Close the file (idempotent); an unnamed reservation just goes."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unnamed = False
