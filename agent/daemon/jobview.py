"""What callers read of the jobs: a record, a wait for its end, a page of the
history, a job's output. Running jobs are answered from the supervisor's live
records (newer than their rows), the others from the history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol

from agent.access import Caller
from agent.daemon.history import History, JobRecord
from agent.daemon.output import LiveOutput, stream_file
from agent.keeper import validation
from agent.keeper.errors import NotFound
from agent.vocabulary import JobState

# A job whose output has just closed (or whose exit just came in) is moments
# from done: the spawner's report, or the pipe's end, is on its way. A query
# then waits for it up to ENDING_WAIT rather than answering "running" and
# costing an original-protocol client one more poll interval and call; only
# within ENDING_WINDOW of that moment, so a job that closes its output and
# goes on running is answered at once after that.
ENDING_WAIT = 0.005
ENDING_WINDOW = 0.05


class RunningJob(Protocol):
    """A running job as the supervisor holds it (agent.daemon.supervisor.Job)."""

    record: JobRecord
    live: LiveOutput
    done: asyncio.Future[JobRecord]
    ending: float | None  # loop time of its output's end or its exit


class JobView:
    """The read side of the supervisor: nothing here changes a job."""

    def __init__(
        self,
        history: History,
        running: Mapping[str, RunningJob],
        loop: Callable[[], asyncio.AbstractEventLoop],
    ) -> None:
        self.history = history
        self.running = running
        self._loop = loop

    def get(self, job_id: str, caller: Caller) -> JobRecord:
        """A job's record, if the caller may see it."""
        job = self.running.get(job_id)
        rec = job.record if job is not None else self.history.get(job_id)
        if rec is None:
            raise NotFound(f"no job with id {job_id}", rule="unknown-job")
        caller.may_see(job_id, rec.owner)
        return rec

    async def query(self, job_id: str, caller: Caller) -> JobRecord:
        """A job's record, once done if it is ending right now (see ENDING_WAIT)."""
        job = self.running.get(job_id)
        ending = job.ending if job is not None else None
        if ending is not None and self._loop().time() - ending <= ENDING_WINDOW:
            return await self.wait(job_id, caller, ENDING_WAIT)
        return self.get(job_id, caller)

    async def wait(self, job_id: str, caller: Caller, timeout: float | None) -> JobRecord:
        """The record once the job is done, or as it is when ``timeout`` passes."""
        rec = self.get(job_id, caller)
        job = self.running.get(job_id)
        if job is None or rec.state.done:
            return rec
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(job.done), timeout)
        return job.record

    def list_jobs(
        self,
        caller: Caller,
        *,
        states: Sequence[JobState] = (),
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs the caller may see, newest first; returns (jobs, next token)."""
        who = caller.list_owner(owner)
        size = validation.page_size(page_size)
        before = validation.decode_page_token(page_token) if page_token else None
        # A row can be behind the job: RUNNING on disk while the job is running (its live
        # record is newer) or already ended but not yet written (history.unsaved, while
        # the disk is full). Each row is answered with the newest record, as QueryJob
        # does, and the state filter applies to that: with a filter, RUNNING rows are
        # read too, since any of them may have ended.
        fetch = tuple(states)
        if fetch and JobState.RUNNING not in fetch:
            fetch += (JobState.RUNNING,)
        out: list[JobRecord] = []
        last_seq = 0  # of the row of the last record on this page: the next page's token
        more = False
        while True:
            rows = self.history.list_jobs(
                states=fetch, owner=who, before_seq=before, limit=size + 1
            )
            for row in rows:
                rec = self._newest(row)
                if states and rec.state not in states:
                    continue
                if len(out) == size:
                    more = True
                    break
                out.append(rec)
                last_seq = row.seq
            if more or len(rows) <= size:
                break
            before = rows[-1].seq
        token = validation.encode_page_token(last_seq) if more and out else ""
        return out, token

    def _newest(self, row: JobRecord) -> JobRecord:
        """The newest record of a job whose row is ``row`` (see list_jobs)."""
        job = self.running.get(row.id)
        if job is not None:
            return job.record
        return self.history.unsaved.get(row.id) or row

    async def stream(
        self, job_id: str, caller: Caller, offset: int, follow: bool
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, data) chunks of a job's output from ``offset``."""
        rec = self.get(job_id, caller)
        validation.stream_offset(offset)

        def live() -> LiveOutput | None:
            job = self.running.get(job_id)
            return job.live if job is not None else None

        async for chunk in stream_file(
            rec.output_path, job_id, offset, follow, rec.output_bytes, live
        ):
            yield chunk
