"""StartJob's requestKey: a start sent twice starts one job.

A scheduler cannot always know whether its StartJob arrived: the answer can be lost, and
a scheduler that takes a run over from a frozen or dead one cannot tell a start that is
still on its way from one never sent. With a key of its choosing in the request, the
agent answers a repeat with the job the first one started (``existing``), so the caller
may always send again. Keys are per identity (one caller cannot reach another's job
through a key) and live as long as the job's record: in memory for the starts under way
(a repeat that arrives while the first is being started waits for it), in the history
database after (so a restarted agent knows them too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from agent.daemon.history import JobRecord

__all__ = ["StartKeys"]


class StartKeys:
    """The starts under way by (identity, key); the history answers the others."""

    def __init__(
        self,
        job_of_key: Callable[[str, str], str | None],
        record: Callable[[str], JobRecord | None],
    ) -> None:
        self.job_of_key = job_of_key  # (owner, key) -> job id, from the history
        self.record = record  # job id -> its record (running or recorded)
        self.pending: dict[tuple[str, str], asyncio.Future[JobRecord]] = {}

    async def start(
        self, owner: str, key: str, start: Callable[[], Awaitable[JobRecord]]
    ) -> tuple[JobRecord, bool]:
        """``start()``'s record and False, or the record of the job this key started
        before and True. A start that raised (refused: nothing ran) leaves the key free:
        the repeats waiting for it raise the same."""
        k = (owner, key)
        under_way = self.pending.get(k)
        if under_way is not None:
            return await asyncio.shield(under_way), True
        job_id = self.job_of_key(owner, key)
        rec = self.record(job_id) if job_id is not None else None
        if rec is not None:
            return rec, True
        fut: asyncio.Future[JobRecord] = asyncio.get_running_loop().create_future()
        self.pending[k] = fut
        try:
            rec = await start()
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: a start nobody repeated must not log it again
            raise
        else:
            fut.set_result(rec)
            return rec, False
        finally:
            del self.pending[k]
