"""Executing fan-out runs in the scheduler: one job on many workers, asyncio.

:class:`RunManager` owns the runs of this process. Each run is a task that
starts the job on its targets, never more at once than the run's
concurrency, and stops starting once the errors exceed the run's budget
(the rules are pure: :mod:`agent.scheduler.targets`); every host then streams
its output and waits for its job to end, with the same client library and
mTLS identity as the scheduler's dispatch calls.

Each host's start is recorded in the store before StartJob is sent
(STARTING) and after the worker answered (RUNNING, with the job id): see
:mod:`agent.scheduler.store` for why. A worker that cannot be reached
(UNAVAILABLE, or no longer registered) is UNREACHABLE and counts against the
budget like a failure. A start without an answer by its deadline was maybe
received: the worker is asked for it, as a takeover does (:meth:`RunManager._unanswered`).

Followers read a run's event log from its start (:meth:`ActiveRun.follow`);
the log lives in this process only (output lines are not stored), so a run
of a previous scheduler process shows its hosts and results, not its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent.client import AgentClientError, AsyncAgentClient, JobStatus
from agent.scheduler.registry import UnknownWorker, Worker, WorkerRegistry
from agent.scheduler.store import HostRecord, RunRecord, Store, StoreError
from agent.scheduler.takeover import NOT_RECEIVED, host_key, resolve_starting
from agent.scheduler.targets import budget_exceeded, may_start
from agent.vocabulary import HostState, RunState

__all__ = [
    "ActiveRun",
    "HostChange",
    "OutputLine",
    "RunEnded",
    "RunManager",
    "prune_finished",
]

log = logging.getLogger(__name__)

# What is left of a StartJobStream once its job id came (None: no such stream).
Rest = AsyncIterator[str | bytes | JobStatus] | None
# Codes that mean the worker could not be reached (as opposed to refusing).
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A run's event log in memory: past this many events, output lines are
# dropped from it (host changes and the end are always kept).
MAX_EVENTS = 200_000
MAX_LINE = 64 * 1024  # longer lines are cut into pieces of this size
WAIT_SLICE_S = 30.0  # one WaitJob long-poll while a job runs
POLL_S = 0.5  # QueryJob interval for an original worker (no WaitJob)
# StartJob calls in flight at once, over every run (each may open a TLS
# connection first): 10,000 at once overran their deadlines (measured, see
# docs/benchmarks.md). It paces starts; the run's concurrency is unchanged.
MAX_STARTS = 256
# A follower's events go several to a message (FollowRun with batch), about this
# many bytes at most: a message per event was about a third of the scheduler CPU
# of a fan-out over open connections.
BATCH_BYTES = 512 * 1024
# A finished run's event log (with its output) stays this long for late
# followers; after that they get its hosts and summary from the store.
FINISHED_KEPT_S = 300.0


@dataclass(frozen=True)
class OutputLine:
    """One line of one host's output (without its newline)."""

    worker_id: str
    host: str
    line: bytes


@dataclass(frozen=True)
class HostChange:
    """A host's new state (a copy of its record)."""

    host: HostRecord


@dataclass(frozen=True)
class RunEnded:
    """The run is over; ``run`` is its final record."""

    run: RunRecord


RunEvent = OutputLine | HostChange | RunEnded


class ActiveRun:
    """A run going on in this process: its record, its event log, its cancel flag."""

    def __init__(self, record: RunRecord, job: pb.StartJobReq) -> None:
        """``job`` is the request to send (``record.job`` is its redacted copy)."""
        self.record = record
        self.job = job
        self.cancelled = asyncio.Event()
        self.events: list[RunEvent] = []
        self._dropped = False
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stops: set[asyncio.Future[None]] = set()  # StopJob calls of a cancel
        self.running: set[asyncio.Future[object]] = set()  # the hosts' tasks under way
        # Hosts in a state that counts against the budget, kept as they change:
        # counting them before each start made a run of N hosts cost N squared.
        self.errors = sum(1 for h in record.hosts if h.state.counts_as_error)

    @property
    def finished(self) -> bool:
        """The run ended (its RunEnded is in the log)."""
        return self.record.state is not RunState.RUNNING

    def publish(self, event: RunEvent) -> None:
        """Append to the log and wake the followers."""
        if isinstance(event, OutputLine) and len(self.events) >= MAX_EVENTS:
            if not self._dropped:
                self._dropped = True
                log.warning("run %s: event log full, output lines dropped", self.record.run_id)
            return
        self.events.append(event)
        self._wake.set()
        self._wake = asyncio.Event()

    async def follow(self) -> AsyncIterator[RunEvent]:
        """Every event from the start; ends after RunEnded."""
        async for batch in self.follow_batches():
            for e in batch:
                yield e

    async def follow_batches(self, max_bytes: int = BATCH_BYTES) -> AsyncIterator[list[RunEvent]]:
        """Every event from the start, as many at once as are there (about ``max_bytes``
        of them at most, at least one); ends after RunEnded."""
        i = 0
        while True:
            wake = self._wake
            while i < len(self.events):
                j, size = i, 0
                while j < len(self.events) and (j == i or size < max_bytes):
                    e = self.events[j]
                    size += len(e.line) + 64 if isinstance(e, OutputLine) else 256
                    j += 1
                yield self.events[i:j]
                i = j
            if self.finished and i >= len(self.events):
                return
            await wake.wait()


def _copy(h: HostRecord) -> HostRecord:
    return dataclasses.replace(h)


class RunManager:
    """Starts, cancels and remembers the runs of this scheduler process."""

    def __init__(
        self,
        store: Store,
        registry: WorkerRegistry,
        client_for: Callable[[Worker], AsyncAgentClient],
        call_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Runs go to ``store``; ``client_for`` gives the (shared) client of a worker."""
        self.store = store
        self.registry = registry
        self.client_for = client_for
        # Workers that answered StartJobStream UNIMPLEMENTED: StartJob and a stream for them.
        self.one_call_lacking: set[str] = set()
        self.call_timeout = call_timeout
        self.clock = clock
        self.active: dict[str, ActiveRun] = {}
        self._starts = asyncio.Semaphore(MAX_STARTS)
        self._closed = False

    def start(
        self,
        owner: str,
        job: pb.StartJobReq,
        redacted: pb.StartJobReq,
        targets: bytes,
        workers: list[Worker],
        concurrency: int,
        budget: int,
    ) -> ActiveRun:
        """Record a new run over ``workers`` and start executing it in the background."""
        hosts = [HostRecord(w.worker_id, w.address, w.identity, i) for i, w in enumerate(workers)]
        rec = (str(uuid.uuid4()), owner, redacted.SerializeToString(), targets)
        record = RunRecord(*rec, concurrency, budget, self.clock(), hosts=hosts)
        self.store.claim_run(record.run_id)  # a new id: nobody else has it
        self.store.save_run(record)
        run = ActiveRun(record, job)
        self.active[record.run_id] = run
        run.task = asyncio.ensure_future(self._execute(run))
        run.task.add_done_callback(lambda t: self._ended(t, run))
        what = (record.run_id, owner, len(hosts), concurrency, budget)
        log.info("run %s by %s: %d hosts, %d at once, %d errors tolerated", *what)
        return run

    def adopt(self, rec: RunRecord, *, resumed: bool = False) -> ActiveRun:
        """Take over a run whose owner died (this scheduler has claimed it), or, with the
        SQLite store (``resumed``), a run this scheduler drove before it restarted.

        The rule for each host is :func:`agent.scheduler.takeover.resolve_starting`'s
        and :meth:`_execute`'s: finished hosts stay; RUNNING ones are followed
        to their end; STARTING ones (maybe sent) are looked for on their worker
        and never sent twice; PENDING ones start as in a new run, unless the job
        has secret arguments (they are not stored, so it cannot be sent again).
        """
        job = pb.StartJobReq.FromString(rec.job)
        if job.secretArgs:
            for h in rec.hosts:
                if h.state is HostState.PENDING:
                    h.state, h.end_time = HostState.NOT_STARTED, self.clock()
                    h.error = "taken over: secret arguments are not stored, so not sent again"
                    self.store.save_host(rec.run_id, h)
        run = ActiveRun(rec, job)
        self.active[rec.run_id] = run
        run.task = asyncio.ensure_future(self._execute(run))
        run.task.add_done_callback(lambda t: self._ended(t, run))
        if rec.run_id in self.store.cancel_requests():
            # Cancelled before its last owner stopped (or at another scheduler): it stays
            # so, its running jobs are stopped, nothing more starts.
            self.cancel(run)
        if resumed:
            log.warning("run %s of %s: resumed after a restart", rec.run_id, rec.owner)
        else:
            log.warning("run %s of %s: owner gone, taken over", rec.run_id, rec.owner)
        return run

    def abandon(self) -> None:
        """This scheduler lost its ownership (its session expired): stop, write nothing."""
        for run in list(self.active.values()):
            for t in (run.task, *run.running):
                if t is not None and not t.done():
                    t.cancel()
            if not run.finished:
                log.error(
                    "run %s: ownership lost (store session expired), let go", run.record.run_id
                )
                del self.active[run.record.run_id]

    def _ended(self, task: asyncio.Task[None], run: ActiveRun) -> None:
        """A run task that died (a store failure, a bug) no longer drives its run.

        It is dropped from this process; with a shared store, the next beat finds the
        run owned by nobody driving it and takes it over again from its records.
        """
        if _log_crash(task) and not run.finished:
            self.active.pop(run.record.run_id, None)

    def cancel(self, run: ActiveRun) -> None:
        """Start nothing more; stop the jobs that are running. Recorded in the store first,
        so that the run stays cancelled if this scheduler stops before it is over (it, or
        another sharing the store, resumes it cancelled)."""
        if run.finished or run.cancelled.is_set():
            return
        try:
            self.store.request_cancel(run.record.run_id)
        except StoreError as e:
            log.warning("run %s: cancel not recorded (%s); cancelled here", run.record.run_id, e)
        run.cancelled.set()
        for h in run.record.hosts:
            if h.state is HostState.RUNNING:
                self._stop_soon(run, h)

    def _stop_soon(self, run: ActiveRun, h: HostRecord) -> None:
        stop = asyncio.ensure_future(self._stop(run, h))
        run.stops.add(stop)
        stop.add_done_callback(run.stops.discard)

    async def _stop(self, run: ActiveRun, h: HostRecord) -> None:
        with contextlib.suppress(AgentClientError, UnknownWorker):
            await self.client_for(self.registry.get(h.worker_id)).stop(h.job_id)

    def _set(self, run: ActiveRun, h: HostRecord, state: HostState, **fields: object) -> None:
        """A host's new state: written to the store first, then published (the SQLite
        store commits it at the event loop's next turn: see SQLiteStore)."""
        run.errors += int(state.counts_as_error) - int(h.state.counts_as_error)
        h.state = state
        for k, v in fields.items():
            setattr(h, k, v)
        if state.final:
            h.end_time = self.clock()
        self.store.save_host(run.record.run_id, h)
        run.publish(HostChange(_copy(h)))

    async def _execute(self, run: ActiveRun) -> None:
        rec = run.record
        running = run.running
        cancel_wait: asyncio.Future[object] = asyncio.ensure_future(run.cancelled.wait())
        try:
            for h in rec.hosts:  # only in a run taken over (see adopt)
                if h.state is HostState.STARTING:
                    await self._resolve(run, h)
                if h.state is HostState.RUNNING:
                    running.add(asyncio.ensure_future(self._watch_host(run, h)))
            for h in rec.hosts:
                if h.state is not HostState.PENDING:
                    continue
                if not await _slot(run, running, cancel_wait):
                    break
                running.add(asyncio.ensure_future(self._host(run, h)))
            if running:
                await asyncio.wait(running)
        finally:
            cancel_wait.cancel()
        why = _not_started(run)
        for h in rec.hosts:
            if h.state is HostState.PENDING:
                self._set(run, h, HostState.NOT_STARTED, error=why)
        self._finish(run, RunState.CANCELLED if run.cancelled.is_set() else RunState.DONE)

    def _finish(self, run: ActiveRun, state: RunState) -> None:
        rec = run.record
        rec.state = state
        rec.end_time = self.clock()
        self.store.save_run(rec)
        self.store.release_run(rec.run_id)
        run.publish(RunEnded(dataclasses.replace(rec, hosts=[_copy(h) for h in rec.hosts])))
        asyncio.get_running_loop().call_later(FINISHED_KEPT_S, self.active.pop, rec.run_id, None)
        log.info("run %s %s", rec.run_id, state.name.lower())

    async def _host(self, run: ActiveRun, h: HostRecord) -> None:
        """Start the job on one host, relay its output, record its end."""
        async with self._starts:
            # Checked again once a start slot is free: a host left PENDING is
            # reported NOT_STARTED at the run's end, like one never tried.
            if run.cancelled.is_set() or budget_exceeded(run.errors, run.record.max_errors):
                return
            started = await self._start(run, h)
        if isinstance(started, AgentClientError):  # settled outside the start slot
            started = await self._unanswered(run, h, started)
        if started is None:
            return
        client, rest = started
        if run.cancelled.is_set():
            await self._stop(run, h)  # cancelled while the start was on its way
        await self._follow(run, h, client, rest)

    async def _resolve(self, run: ActiveRun, h: HostRecord) -> None:
        """A host left STARTING by a dead owner: RUNNING if its job is found, else UNKNOWN."""
        try:
            _, job_id, why = await self._ask_for_start(run, h)
        except AgentClientError as e:
            job_id, why = "", f"start maybe sent, cannot ask the worker ({e}): not sent again"
        if job_id:
            self._set(run, h, HostState.RUNNING, job_id=job_id)
            if run.cancelled.is_set():
                self._stop_soon(run, h)  # found running, in a cancelled run
        elif why == NOT_RECEIVED and run.job.secretArgs:
            error = "taken over: the start never arrived; secret arguments are not stored"
            self._set(run, h, HostState.NOT_STARTED, error=error)
        elif why == NOT_RECEIVED:
            self._set(run, h, HostState.PENDING, start_time=None)
        else:
            self._set(run, h, HostState.UNKNOWN, error=why)

    async def _ask_for_start(
        self, run: ActiveRun, h: HostRecord
    ) -> tuple[AsyncAgentClient, str, str]:
        """A maybe-sent start of ``h``, asked of its worker once the start's deadline is past
        (:func:`resolve_starting`, by the host's key): the worker's client, the job id or "",
        and why not. Raises AgentClientError when the worker cannot be asked."""
        client = self.client_for(_worker_of(self.registry, h))
        key = host_key(run.record.run_id, h.worker_id)
        job_id, why = await resolve_starting(client, run.job, h.start_time, self.call_timeout, key)
        return client, job_id, why

    async def _watch_host(self, run: ActiveRun, h: HostRecord) -> None:
        """Follow a job a previous owner started, to its end."""
        await self._follow(run, h, self.client_for(_worker_of(self.registry, h)))

    async def _follow(
        self,
        run: ActiveRun,
        h: HostRecord,
        client: AsyncAgentClient,
        rest: Rest = None,
    ) -> None:
        """Relay a started job's output and record its end: from ``rest``, the rest of its
        StartJobStream, else from a StreamJobOutput of its own."""
        job_id = h.job_id
        items = rest if rest is not None else client.stream_to_end(job_id)
        try:
            st = await _relay_output(run, h, items) or await _job_end(client, job_id)
        except AgentClientError as e:
            self._set(run, h, HostState.UNREACHABLE, error=f"lost after start: {e}")
            return
        if st.succeeded:
            self._set(run, h, HostState.SUCCEEDED, exit_code=st.exit_code)
        else:
            error = st.error_text or st.state
            self._set(run, h, HostState.FAILED, exit_code=st.exit_code, error=error)

    async def _start(
        self, run: ActiveRun, h: HostRecord
    ) -> tuple[AsyncAgentClient, Rest] | AgentClientError | None:
        """The start on one host: its client and the rest of its StartJobStream (None: a
        stream of its own is needed), None (its state says why), or the error of a start
        that got no answer in time (still STARTING: for :meth:`_unanswered`)."""
        try:
            w = self.registry.get(h.worker_id)
        except UnknownWorker:
            self._set(run, h, HostState.UNREACHABLE, error="no longer registered")
            return None
        client = self.client_for(w)
        # Recorded before it is sent, with when: a takeover looks for it from then.
        # (The SQLite store commits the STARTING of every host of this turn at once.)
        try:
            self._set(run, h, HostState.STARTING, start_time=self.clock())
            await self.store.flushed()
        except StoreError as e:
            # Not recorded, so not sent: a takeover must be able to trust the record.
            h.state, h.error, h.end_time = HostState.NOT_STARTED, f"not sent: {e}", self.clock()
            with contextlib.suppress(StoreError):
                self.store.save_host(run.record.run_id, h)
            run.publish(HostChange(_copy(h)))
            return None
        if run.cancelled.is_set() or budget_exceeded(run.errors, run.record.max_errors):
            # Changed while the record was committed: not sent after all.
            self._set(run, h, HostState.NOT_STARTED, start_time=None, error=_not_started(run))
            return None
        try:
            job_id, rest = await self._send_start(client, _keyed(run, h), h.worker_id)
        except AgentClientError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return e
            state = HostState.UNREACHABLE if e.code in UNREACHABLE_CODES else HostState.FAILED
            self._set(run, h, state, error=f"{e.code.name}: {e.details}")
            return None
        # Recorded once the worker answered: the job id to ask about later.
        self._set(run, h, HostState.RUNNING, job_id=job_id, start_time=self.clock())
        return client, rest

    async def _unanswered(
        self, run: ActiveRun, h: HostRecord, err: AgentClientError, *, resend: bool = True
    ) -> tuple[AsyncAgentClient, Rest] | None:
        """A start with no answer by its deadline was maybe received, and its answer may
        be late rather than lost: this scheduler's own event loop can be held past the
        deadline (a blocking store call: etcd electing a leader after a member died), or
        the worker was slow. Taking it for unreachable would leave its job running with
        nobody following it. So it is settled as a takeover settles a host left STARTING
        (:func:`resolve_starting`): once the start's deadline is past, the worker is asked
        for the job with the host's key. Found: RUNNING, followed to its end. None: it
        never arrived (a held loop may not even have sent it: gRPC's asyncio calls are
        written by the loop), so it is sent once more, as a takeover starts such a host
        again, with the same key (a first start arriving after all gets the same job);
        still none, UNREACHABLE. Several (an agent without keys): UNKNOWN, not sent
        again. The worker cannot be asked: UNREACHABLE, with both reasons."""
        failed = f"{err.code.name}: {err.details}"
        try:
            client, job_id, why = await self._ask_for_start(run, h)
        except AgentClientError as e:
            error = f"{failed}; nor could it be asked for the job: {e.code.name}: {e.details}"
            self._set(run, h, HostState.UNREACHABLE, error=error)
            return None
        if job_id:
            self._set(run, h, HostState.RUNNING, job_id=job_id)
            return client, None
        if why == NOT_RECEIVED and resend:
            async with self._starts:
                again = await self._start(run, h)  # recorded STARTING again, then sent
            if isinstance(again, AgentClientError):
                return await self._unanswered(run, h, again, resend=False)
            return again
        if why == NOT_RECEIVED:
            self._set(run, h, HostState.UNREACHABLE, error=failed)
        else:
            self._set(run, h, HostState.UNKNOWN, error=f"{failed}; {why}")
        return None

    async def _send_start(
        self, client: AsyncAgentClient, req: pb.StartJobReq, worker_id: str
    ) -> tuple[str, Rest]:
        """The job id, and the rest of its output stream when the worker took the one-call
        start (StartJobStream: one call a host); a worker without it (UNIMPLEMENTED before
        anything started: an older agent, the original worker) gets StartJob, and is not
        asked the one call again. Raises AgentClientError."""
        if worker_id not in self.one_call_lacking:
            items = client.start_stream(req)
            try:
                first = await asyncio.wait_for(items.__anext__(), self.call_timeout)
            except AgentClientError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.one_call_lacking.add(worker_id)
            except (TimeoutError, asyncio.TimeoutError):
                await items.aclose()  # type: ignore[attr-defined]
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                raise AgentClientError("no answer to the start", code) from None
            except StopAsyncIteration:
                code = grpc.StatusCode.UNKNOWN
                raise AgentClientError("the start's stream ended empty", code) from None
            else:
                if isinstance(first, str) and first:
                    return first, items
                await items.aclose()  # type: ignore[attr-defined]
                raise AgentClientError("the start's stream named no job", grpc.StatusCode.UNKNOWN)
        return await client.start_pb(req, timeout=self.call_timeout), None

    async def close(self) -> None:
        """Stop executing (the scheduler stops), leaving each run going on as recorded: with a
        shared store another scheduler takes it over (it is released), with SQLite this one
        resumes it at its next start. A cancelled run's hosts not started are NOT_STARTED
        first, so that neither starts them. Once only.
        """
        if self._closed:
            return
        self._closed = True
        for run in list(self.active.values()):
            tasks = [t for t in (run.task, *run.running) if t is not None and not t.done()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if run.finished:
                continue
            if run.cancelled.is_set():
                with contextlib.suppress(StoreError):
                    for h in run.record.hosts:
                        if h.state is HostState.PENDING:
                            self._set(run, h, HostState.NOT_STARTED, error=_not_started(run))
                    await self.store.flushed()
            if self.store.shared:
                self.store.release_run(run.record.run_id)


async def _slot(
    run: ActiveRun,
    running: set[asyncio.Future[object]],
    cancel_wait: asyncio.Future[object],
) -> bool:
    """Wait until the next host may start (True) or nothing more may (False)."""
    rec = run.record
    while True:
        errors = run.errors
        if run.cancelled.is_set() or budget_exceeded(errors, rec.max_errors):
            return False
        if may_start(
            running=len(running),
            errors=errors,
            concurrency=rec.max_concurrency,
            budget=rec.max_errors,
            cancelled=False,
        ):
            return True
        done, _ = await asyncio.wait(running | {cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
        running -= done


def _keyed(run: ActiveRun, h: HostRecord) -> pb.StartJobReq:
    """The run's StartJob with the host's own key: a second StartJob for it (a takeover
    resending a start that seemed never to arrive while a frozen owner's was still on its
    way) gets the job of the first from an agent that knows keys, never a second job."""
    req = pb.StartJobReq()
    req.CopyFrom(run.job)
    req.requestKey = host_key(run.record.run_id, h.worker_id)
    return req


def _worker_of(registry: WorkerRegistry, h: HostRecord) -> Worker:
    """The worker of a started host, registered or not: its job is at that address.

    Just after its scheduler died, a worker may be between two registrations; asking it
    is still right (if it is gone, the call says so).
    """
    try:
        return registry.get(h.worker_id)
    except UnknownWorker:
        return Worker(h.worker_id, h.identity, h.address, 0.0, 0.0)


def _not_started(run: ActiveRun) -> str:
    """Why a host of ``run`` is not started (its run was cancelled or is past its budget)."""
    return "cancelled" if run.cancelled.is_set() else "past the error budget"


def _line(run: ActiveRun, h: HostRecord, line: bytes) -> None:
    run.publish(OutputLine(h.worker_id, h.address, line))


async def _relay_output(
    run: ActiveRun, h: HostRecord, items: AsyncIterator[str | bytes | JobStatus]
) -> JobStatus | None:
    """Publish the job's output line by line, each labelled with its host; the job's
    status if the stream's end carried it (an agent that knows ``endStatus``), else None.

    An original worker has no output stream (UNIMPLEMENTED): no lines then.
    """
    pending = b""
    status = None
    try:
        async for item in items:
            if isinstance(item, JobStatus):
                status = item
                continue
            if isinstance(item, str):
                continue  # a job id (StartJobStream's first item, taken already)
            pending += item
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _line(run, h, line)
            while len(pending) > MAX_LINE:
                _line(run, h, pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
    except AgentClientError as e:
        if e.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
    if pending:
        _line(run, h, pending)
    return status if status is not None and status.done else None


async def _job_end(client: AsyncAgentClient, job_id: str) -> JobStatus:
    """The job's status once it is done (WaitJob, or QueryJob polls on an original worker)."""
    try:
        st = await client.wait(job_id, timeout=WAIT_SLICE_S)
        while not st.done:
            st = await client.wait(job_id, timeout=WAIT_SLICE_S)
        return st
    except AgentClientError as e:
        if e.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
    st = await client.query(job_id)
    while not st.done:
        await asyncio.sleep(POLL_S)
        st = await client.query(job_id)
    return st


def _log_crash(task: asyncio.Task[None]) -> bool:
    """A run task that died of a bug or a store failure says so (else it would be silent)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a run stopped executing", exc_info=task.exception())
        return True
    return False


def prune_finished(store: Store, keep_days: float, keep_count: int, now: float) -> int:
    """Retention (``[runs]``): delete the finished runs older than ``keep_days`` or past the
    newest ``keep_count`` (0: no such limit), with their hosts; how many went."""
    if not keep_days and not keep_count:
        return 0
    return store.prune_runs(now - keep_days * 86400.0 if keep_days else 0.0, keep_count)
