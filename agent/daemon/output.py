"""Job output as the agent serves it: streaming a job's file while the keeper writes it.

Recording is the job keeper's (:mod:`agent.keeper.outputfile`): it reads each job's
pipe into ``<output_dir>/<job id>.out`` and tells the agent how far it got.

Streaming reads the file, never the job: readers do not slow the job or
each other, each may start anywhere, and a finished job streams the same
way as a running one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

from agent.keeper.errors import FailedPrecondition
from agent.keeper.outputfile import OutputFile, WriteResult, describe_oserror

__all__ = ["LiveOutput", "OutputFile", "WriteResult", "describe_oserror", "stream_file"]

STREAM_CHUNK = 64 * 1024


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
