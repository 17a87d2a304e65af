"""The supervisor: the agent's side of every job, a mirror of what the job keeper runs.

Runs entirely on the asyncio event loop's thread. The agent's part of admission
(accepting, ``max_running``) happens here; the rest (the request, the limits, the
timeout, the policy) is the job keeper's decision (:mod:`agent.keeper.decision`).
The job the keeper admits is recorded in the history and run by
the job keeper (:mod:`agent.keeper.keeper`, through
:class:`~agent.daemon.keeperclient.KeeperClient`), which owns everything about it
from then on: its process, its output file, its timeout and output cap, and the
lifecycle that decides how it ended. The supervisor keeps a mirror of each
running job (its record, how far its output got, who waits for it) and records
what the keeper reports; a finished job is acknowledged to the keeper once the
history has it, so that an agent that dies first is told again by the keeper.

A job's path::

    start(): capacity -> keeper decides ("admitted") -> history insert -> keeper spawns
             ("started") -> RUNNING (recorded)
    keeper "output": size -> followers woken       "ending": exit or end of output seen
    keeper "finished": state, text, exit -> history, waiters, audit -> ack

At start-up, :meth:`Supervisor.adopt` takes over the jobs a keeper kept running
while no agent was attached, and records those that ended meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from agent.access import Caller
from agent.daemon import procfs
from agent.daemon.history import History, JobRecord, record_to_wire
from agent.daemon.jobview import JobView
from agent.daemon.keeperwire import Admission, Finished
from agent.daemon.output import LiveOutput, describe_oserror
from agent.daemon.startkeys import StartKeys
from agent.keeper import admission
from agent.keeper import lifecycle as lc
from agent.keeper import policy as policy_mod
from agent.keeper.decision import NO_CGROUP_NOTE as NO_CGROUP_NOTE
from agent.keeper.decision import cgroup_limits as cgroup_limits
from agent.keeper.errors import (
    AgentError,
    Unavailable,
    agent_condition,
)
from agent.keeper.jobsettings import INSTANCE_ENV as INSTANCE_ENV
from agent.keeper.jobsettings import JobUser as JobUser
from agent.keeper.jobsettings import Settings as Settings
from agent.keeper.jobsettings import instance_id as instance_id
from agent.vocabulary import JobState

log = logging.getLogger(__name__)

# After the main process exits, how long the keeper waits for the output pipe to close
# (processes that escaped the group may hold it open): shutdown waits that long too.
OUTPUT_CLOSE_GRACE = 2.0
# At shutdown, how long starts already handed to the keeper may take to be answered.
START_DRAIN = 10.0
BOOT_ID = procfs.boot_id()


class JobOps(Protocol):
    """What the supervisor needs of the job keeper (:class:`KeeperClient`; a fake in
    unit tests)."""

    async def start(
        self,
        job_id: str,
        req: admission.StartRequest,
        record: dict,  # type: ignore[type-arg]
        sink: Job,
    ) -> Admission: ...
    def watch(self, job_id: str, sink: Job) -> None: ...
    def stop(self, job_id: str, how: str) -> None: ...
    def ack(self, job_id: str) -> None: ...
    def close(self, *, keep_jobs: bool = False) -> None: ...


class JobHooks(Protocol):
    """What watches the jobs come and go (the metrics, when enabled): called by the
    supervisor, never a subclass of it."""

    def job_started(self, rec: JobRecord, entry: str, seconds: float) -> None:
        """A start returned ``rec`` (admitted under policy ``entry``; "" when the keeper
        never answered) after ``seconds``; a refused start is not a start."""

    def job_finished(self, rec: JobRecord) -> None:
        """``rec`` reached its final state (before or after ``job_started``)."""


class Job:
    """A running job as the agent sees it: its record, its output's progress, its
    waiters. The keeper's reports arrive through the ``on_*`` methods."""

    def __init__(self, record: JobRecord, sup: Supervisor) -> None:
        self.record = record
        self.sup = sup
        self.live = LiveOutput()
        self.timers: list[asyncio.TimerHandle] = []
        self.done: asyncio.Future[JobRecord] = sup.loop.create_future()
        self.ending: float | None = None  # loop time of its output's end or its exit

    @property
    def id(self) -> str:
        return self.record.id

    def on_output(self, size: int, truncated: bool) -> None:
        self.record.output_bytes = self.live.size = size
        self.record.output_truncated = truncated
        self.live.followers.wake()

    def on_ending(self) -> None:
        if self.ending is None:
            self.ending = self.sup.loop.time()

    def on_finished(self, fin: Finished) -> None:
        self.sup.finish(self, fin)


class Supervisor:
    """Owns every running job of this agent."""

    def __init__(
        self,
        settings: Settings,
        history: History,
        ops: JobOps,
        *,
        on_change: Callable[[], None] | None = None,
        on_finish: Callable[[JobRecord], None] | None = None,
        hooks: JobHooks | None = None,
    ) -> None:
        self.settings = settings
        self.history = history
        self.ops = ops
        self.running: dict[str, Job] = {}
        self.accepting = True
        self._starting = 0
        self._started_all = asyncio.Event()  # set whenever no start is in flight
        self._started_all.set()
        self._unacked: set[str] = set()  # finished jobs written, their commit not yet seen
        # What callers read: records, waits, pages and output (running or in the history).
        self.view = JobView(history, self.running, lambda: self.loop)
        history.on_commit = self._committed
        self.keys = StartKeys(history.job_of_key, self._record_of)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change = on_change or (lambda: None)
        self._hooks = hooks
        finish = on_finish or (lambda rec: None)
        self._on_finish: Callable[[JobRecord], None] = finish
        if hooks is not None:
            job_finished = hooks.job_finished

            def both(rec: JobRecord) -> None:
                job_finished(rec)
                finish(rec)

            self._on_finish = both

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the jobs live on (the one running when first asked)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def stop_accepting(self) -> None:
        """Refuse every new start from now on (UNAVAILABLE): the agent is stopping."""
        self.accepting = False

    # ------------------------------------------------------------ start

    async def start_keyed(self, req: admission.StartRequest, key: str) -> tuple[JobRecord, bool]:
        """:meth:`start` with StartJob's requestKey: the job this identity's ``key``
        started before (True), or a new one (False) recorded with the key
        (:mod:`agent.daemon.startkeys`)."""
        return await self.keys.start(req.identity, key, lambda: self.start(req, key=key))

    def _record_of(self, job_id: str) -> JobRecord | None:
        job = self.running.get(job_id)
        return job.record if job is not None else self.history.get(job_id)

    async def start(self, req: admission.StartRequest, *, key: str = "") -> JobRecord:
        """Start a job or raise an AgentError saying why not.

        The agent decides what only it knows (accepting, ``max_running``); the job
        keeper decides the rest (:mod:`agent.keeper.decision`: the policy, the limits,
        the timeout) and answers with a refusal, raised here as is, or with what the
        record needs (the canonical program, the resolved timeout and limits).

        Returns the job's record once it is durably recorded: RUNNING, or
        FAILED when the program could not be started (the original protocol
        reports start failures through QueryJob, so such a job gets an id
        like any other).
        """
        admission.capacity(
            self.settings.rules, busy=len(self.running) + self._starting, accepting=self.accepting
        )
        # The slot is taken before the first await, so concurrent starts can
        # never exceed max_running.
        self._starting += 1
        self._started_all.clear()
        t0 = time.monotonic()
        try:
            rec, entry = await self._spawn(req, key)
            if self._hooks is not None:
                self._hooks.job_started(rec, entry, time.monotonic() - t0)
            return rec
        finally:
            self._starting -= 1
            if not self._starting:
                self._started_all.set()

    async def _spawn(self, req: admission.StartRequest, key: str) -> tuple[JobRecord, str]:
        """The job's record and the policy entry the keeper admitted it under."""
        record = self._new_record(req)
        record.request_key = key
        job = Job(record, self)
        try:
            admitted = await self.ops.start(record.id, req, record_to_wire(record), job)
        except OSError as e:
            # Never admitted (the keeper died, or could not be written to): nothing ran.
            # Answered as before the keeper decided: a FAILED job, recorded.
            _mark_not_started(record, describe_oserror(e))
            self.history.insert_now(record)
            self._not_started(record, e)
            return record, ""
        record.command = admitted.command
        record.timeout_seconds = admitted.timeout
        record.limits = dict(admitted.limits)
        # Recorded as soon as the keeper admitted it: the insert is made now and its
        # commit runs while the keeper sets the job up, not after (one round trip less
        # before StartJob is answered). Until then the row's pid is 0. An agent that
        # dies meanwhile loses nothing: the keeper holds the job with its record and
        # hands both to the next agent (adopt).
        try:
            committed = self.history.insert_new(record)
        except BaseException:
            admitted.abandon()  # started or not, it must not run unrecorded
            raise
        pid = await self._started(record, admitted, committed)
        if pid is None:
            return record, admitted.entry
        record.pid = pid
        self.running[record.id] = job
        # The leader's start time (for crash recovery) is read a moment
        # later: right after exec, reading /proc/PID/stat waits for the
        # child's exec to finish.
        job.timers.append(self.loop.call_later(0.02, self._read_leader_start, job))
        try:
            await self.history.committed(committed)
        except Unavailable:
            # Never leave a job running that the history does not know.
            self.ops.stop(record.id, "not_recorded")
            raise
        self._on_change()
        return record, admitted.entry

    def _new_record(self, req: admission.StartRequest) -> JobRecord:
        job_id = str(uuid.uuid4())
        # command, timeout and limits are the keeper's to say (its "admitted").
        return JobRecord(
            id=job_id,
            owner=req.identity,
            command=req.command,
            path=req.path,
            args=policy_mod.redact_args(req.args, req.secret_args),
            state=JobState.RUNNING,
            start_time=time.time(),
            output_path=str(self.settings.output_dir / f"{job_id}.out"),
            timeout_seconds=0,
            limits={},
            boot_id=BOOT_ID,
        )

    async def _started(
        self, record: JobRecord, admitted: Admission, committed: asyncio.Future[None]
    ) -> int | None:
        """The admitted job's pid, or None: it could not start (recorded so)."""
        try:
            return await admitted.started
        except OSError as e:
            _mark_not_started(record, describe_oserror(e))
            await self.history.committed(committed)
            await self.history.record_change(record)
            self._not_started(record, e)
            return None
        except BaseException as e:
            # The caller went away mid-start (the keeper client has a job whose start
            # nobody awaits killed), or a bug: the row inserted above must not stay
            # RUNNING.
            admitted.abandon()
            cancelled = isinstance(e, asyncio.CancelledError)
            _mark_not_started(record, "the start was cancelled" if cancelled else "internal error")
            self.history.save(record)
            self._on_finish(record)
            raise

    def _not_started(self, record: JobRecord, e: OSError) -> None:
        """A job that never ran is over; the keeper's running out is the agent's
        condition (descriptors, memory, processes), raised as such; the record says the
        job never started (logged once, with the RPC, by the service)."""
        self._on_finish(record)
        cond = _spawner_condition(e)
        if cond is not None:
            raise cond from None
        log.info("job %s could not start: %s", record.id, record.error_text)

    def _read_leader_start(self, job: Job) -> None:
        if job.done.done():
            return
        st = procfs.read_stat(job.record.pid)
        if st is not None and st.pgid == job.record.pid:
            job.record.leader_start = st.start_ticks
            self.history.save(job.record)

    # ------------------------------------------------------------ the keeper's reports

    def finish(self, job: Job, fin: Finished) -> None:
        """Record how a job ended (the keeper's report): history, waiters, audit, ack."""
        for t in job.timers:
            t.cancel()
        job.timers.clear()
        rec, ex = job.record, fin.exit
        if job.done.done():
            return
        log.debug("job %s: %s -> %s", rec.id, rec.state.name, fin.state.name)
        lc.check_transition(rec.state, fin.state)
        rec.state = fin.state
        # The keeper's time of the reap: an agent that was away hears of an exit late.
        rec.end_time = ex.end_time if ex.end_time is not None else time.time()
        rec.exit_code = ex.exit_code
        rec.signal = ex.signal
        rec.error_text = fin.text
        rec.user_cpu, rec.system_cpu, rec.max_rss = ex.user_cpu, ex.system_cpu, ex.max_rss
        if fin.size >= 0:  # -1: the keeper died, and the output is what it told so far
            rec.output_bytes = job.live.size = fin.size
            rec.output_truncated = fin.truncated
        job.live.closed = True
        self.running.pop(rec.id, None)
        if fin.persist:
            self._save_then_ack(rec)
        job.done.set_result(rec)
        job.live.followers.wake()
        self._on_change()
        self._on_finish(rec)

    def _save_then_ack(self, rec: JobRecord) -> None:
        """Write a finished job; tell the keeper it may forget it once it is committed
        (by this write's group commit or, after a failed one, by the history's retry)."""
        self._unacked.add(rec.id)
        if self.history.save(rec) is None and rec.id not in self.history.unsaved:
            self._committed([rec])  # written and committed already (outside the loop)

    def _committed(self, records: list[JobRecord]) -> None:
        for rec in records:
            if rec.id in self._unacked:
                self._unacked.discard(rec.id)
                self.ops.ack(rec.id)

    # ------------------------------------------------------------ stop

    def stop(self, job_id: str, caller: Caller) -> JobRecord:
        """Stop a job (SIGTERM, SIGKILL after the grace). A finished job is fine."""
        job = self.running.get(job_id)
        if job is None:
            return self.view.get(job_id, caller)
        caller.may_stop(job_id, job.record.owner)
        self.ops.stop(job_id, "stop")
        return job.record

    def stop_all(self, *, force: bool = False) -> None:
        """Stop every running job because the agent shuts down (``force``: SIGKILL now)."""
        for job in list(self.running.values()):
            self.ops.stop(job.id, "shutdown")
            if force:
                self.ops.stop(job.id, "kill")

    # ------------------------------------------------------------ shutdown

    async def shutdown(self, *, mode: str, deadline: float) -> None:
        """Stop taking jobs; wait for or stop the running ones; return when all ended.

        ``mode``: "stop", "wait" (up to ``deadline``, then stop) or "keep" (leave them to
        the keeper). Starts already handed to the keeper are waited for first: a job
        whose start is in flight is running too, and must be stopped (or kept) with the
        others, never left to run with nobody watching.
        """
        self.stop_accepting()
        if self._starting:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._started_all.wait(), START_DRAIN)
        if mode == "keep":
            if self.running:
                log.info("leaving %d running job(s) to the job keeper", len(self.running))
            return
        jobs = list(self.running.values())
        if not jobs:
            return
        if mode == "wait" and deadline > 0:
            log.info("waiting up to %.0f s for %d running job(s)", deadline, len(jobs))
            await asyncio.wait([j.done for j in jobs], timeout=deadline)
        self.stop_all()
        pending = [j.done for j in self.running.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.stop_grace + OUTPUT_CLOSE_GRACE + 5)

    def close(self, *, keep_jobs: bool = False) -> None:
        """Detach from the keeper (telling it to exit unless ``keep_jobs``) and close the
        history (after :meth:`shutdown`)."""
        self.ops.close(keep_jobs=keep_jobs)
        self.history.close()


def _spawner_condition(e: OSError) -> AgentError | None:
    """The agent's-condition refusal for a start the job spawner could not make for want
    of its own resources (descriptors anywhere; memory or processes at its fork), None
    when the job itself failed to start (its set-up or its execve)."""
    reason = getattr(e, "reason", "")
    if e.errno in (errno.EMFILE, errno.ENFILE) or (
        e.errno in (errno.ENOMEM, errno.EAGAIN) and reason.startswith("fork")
    ):
        return agent_condition(OSError(e.errno, os.strerror(e.errno or 0)))
    return None


def _mark_not_started(record: JobRecord, why: str) -> None:
    """Mark a job that never ran: FAILED at its start time, "start failed: <why>"."""
    lc.check_transition(record.state, JobState.FAILED)
    record.state = JobState.FAILED
    record.end_time = record.start_time
    record.error_text = f"start failed: {why}"
