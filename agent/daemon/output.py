"""Job output: recording a job's pipe into its file, and streaming the file.

Recording: the first byte creates ``<output_dir>/<job id>.out`` (0600,
``O_EXCL|O_NOFOLLOW``), so a job that prints nothing costs no file; the cap
(``output_bytes``) truncates; a write error (disk full) fails only that job.
The descriptor is taken before the job starts (an unnamed ``O_TMPFILE`` that the
first byte links into place): an agent out of descriptors refuses the start
instead of starting a job that then fails for want of its output file.

Streaming reads the file, never the job: readers do not slow the job or
each other, each may start anywhere, and a finished job streams the same
way as a running one.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from agent.daemon.errors import FailedPrecondition, SpawnFailure, agent_condition

STREAM_CHUNK = 64 * 1024


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

    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.size = 0
        self.truncated = False
        self._fd: int | None = None
        self._unnamed = False  # _fd is an O_TMPFILE not yet linked at path

    def reserve(self) -> None:
        """Take the file's descriptor now, before the job starts, unnamed (O_TMPFILE).

        Raises the agent's-condition AgentError when the agent is out of descriptors or
        memory. Any other failure (a file system without O_TMPFILE, no inode left) is
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

    def close(self) -> None:
        """Close the file (idempotent); an unnamed reservation just goes."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unnamed = False


class Followers:
    """Waiters for more output of one job (``StreamJobOutput`` with follow)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._waiters)

    def wake(self) -> None:
        """Wake every waiter (new output, or the output closed)."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        """Return at the next :meth:`wake`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)


class LiveOutput:
    """What a stream needs to know of a running job (None once it is done)."""

    def __init__(self) -> None:
        self.size = 0
        self.closed = False
        self.followers = Followers()

    async def wait_beyond(self, offset: int) -> None:
        """Return once output beyond ``offset`` exists or the output closed."""
        while self.size <= offset and not self.closed:
            await self.followers.wait()


async def stream_file(
    path: str,
    job_id: str,
    offset: int,
    follow: bool,
    recorded_size: int,
    live: Callable[[], LiveOutput | None],
) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (offset, data) chunks of a job's output file from ``offset``.

    ``live()`` is the job's :class:`LiveOutput` while it runs, else None.
    """
    fd = -1
    try:
        pos = offset
        while True:
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    # No file: the job has written nothing yet (the file is
                    # made at its first byte), or retention removed it.
                    lv = live()
                    if lv is None or lv.closed:
                        if recorded_size or (lv is not None and lv.size):
                            raise FailedPrecondition(
                                f"the output of job {job_id} is no longer available",
                                rule="output-missing",
                            ) from None
                        return
                    if not follow:
                        return
                    await lv.wait_beyond(0)
                    continue
            data = os.pread(fd, STREAM_CHUNK, pos)
            if data:
                yield pos, data
                pos += len(data)
                continue
            # No await since the read: if the output is closed now, the read
            # above saw the final end of the file.
            lv = live()
            if not follow or lv is None or lv.closed:
                return
            await lv.wait_beyond(pos)
    finally:
        if fd >= 0:
            os.close(fd)
