"""The fan-out RPCs of the ``Scheduler`` service, between protobuf and the run manager.

:class:`~agent.scheduler.service.SchedulerService` checks the caller and
hands each run RPC here; this module converts the wire messages to plain
values (a :class:`~agent.scheduler.targets.Selector`, two
:class:`~agent.scheduler.targets.Quantity`), asks the pure rules which
workers and how many at once, and converts the runs back. Every bad input is
a :class:`~agent.refusal.Refusal` (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION), answered by the one status table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from agent._proto import jobscheduler_pb2 as pb
from agent.refusal import FailedPrecondition, InvalidArgument, NotFound
from agent.scheduler.registry import WorkerRegistry
from agent.scheduler.runs import ActiveRun, HostChange, OutputLine, RunEvent, RunManager
from agent.scheduler.store import HostRecord, RunRecord, Store
from agent.scheduler.targets import (
    Quantity,
    Selector,
    TargetError,
    error_budget,
    max_concurrency,
    select,
)
from agent.vocabulary import HostState, RunState

__all__ = ["RunService", "run_info"]

SECRET = "<secret>"  # noqa: S105 - the placeholder shown instead of a secret argument
LIST_DEFAULT = 100
LIST_MAX = 1000
PAST_BATCH = 1000  # a past run's hosts, to a message when the follower takes batches
ELSEWHERE_POLL_S = 1.0  # a run another scheduler drives: how often its record is read


def _selector(m: pb.TargetSelector) -> Selector:
    by = m.WhichOneof("by")
    if by == "identityPattern":
        return Selector(identity_pattern=m.identityPattern)
    if by == "labels":
        return Selector(labels=dict(m.labels.match))
    if by == "workers":
        return Selector(names=list(m.workers.names))
    raise InvalidArgument("no targets: choose them by identity pattern, labels or a list")


def _quantity(parent: pb.StartRunReq, name: str) -> Quantity | None:
    if not parent.HasField(name):
        return None
    q = getattr(parent, name)
    kind = q.WhichOneof("kind")
    if kind == "count":
        return Quantity(count=q.count)
    if kind == "percent":
        return Quantity(percent=q.percent)
    raise InvalidArgument(f"{name}: give a count or a percentage")


def _redacted(job: pb.StartJobReq) -> pb.StartJobReq:
    out = pb.StartJobReq()
    out.CopyFrom(job)
    for i in job.secretArgs:
        if i < len(out.args):
            out.args[i] = SECRET
    return out


def _summary(hosts: Iterable[HostRecord]) -> pb.RunSummary:
    s = pb.RunSummary()
    field = {
        HostState.SUCCEEDED: "succeeded",
        HostState.FAILED: "failed",
        HostState.NOT_STARTED: "notStarted",
        HostState.UNREACHABLE: "unreachable",
        HostState.UNKNOWN: "unknown",
    }
    for h in hosts:
        name = field.get(h.state, "pending")
        setattr(s, name, getattr(s, name) + 1)
    return s


def host_pb(h: HostRecord) -> pb.RunHost:
    """The wire form of one host of a run."""
    m = pb.RunHost(
        workerID=h.worker_id,
        address=h.address,
        identity=h.identity,
        state=h.state.value,  # type: ignore[arg-type]
        jobID=h.job_id,
        errorText=h.error,
    )
    if h.exit_code is not None:
        m.exitCode = h.exit_code
    if h.start_time is not None:
        m.startTime.FromNanoseconds(int(h.start_time * 1e9))
    if h.end_time is not None:
        m.endTime.FromNanoseconds(int(h.end_time * 1e9))
    return m


def run_info(rec: RunRecord, *, hosts: bool = True) -> pb.RunInfo:
    """The wire form of a run (``hosts`` False: the summary only)."""
    m = pb.RunInfo(
        runID=rec.run_id,
        owner=rec.owner,
        state=rec.state.value,  # type: ignore[arg-type]
        maxConcurrency=rec.max_concurrency,
        maxErrors=rec.max_errors,
        summary=_summary(rec.hosts),
    )
    m.job.ParseFromString(rec.job)
    m.targets.ParseFromString(rec.targets)
    m.createdAt.FromNanoseconds(int(rec.created_at * 1e9))
    if rec.end_time is not None:
        m.endTime.FromNanoseconds(int(rec.end_time * 1e9))
    if hosts:
        m.hosts.extend(host_pb(h) for h in rec.hosts)
    return m


def event_pb(e: RunEvent) -> pb.RunEvent:
    """The wire form of one event of a run."""
    if isinstance(e, OutputLine):
        return pb.RunEvent(output=pb.RunOutput(workerID=e.worker_id, host=e.host, line=e.line))
    if isinstance(e, HostChange):
        return pb.RunEvent(host=host_pb(e.host))
    return pb.RunEvent(done=run_info(e.run))


class RunService:
    """StartRun, FollowRun, CancelRun, ListRuns and GetRun for an identified caller."""

    def __init__(self, manager: RunManager, registry: WorkerRegistry, store: Store) -> None:
        """Runs execute in ``manager``; finished ones are read back from ``store``."""
        self.manager = manager
        self.registry = registry
        self.store = store

    def start(self, owner: str, req: pb.StartRunReq) -> pb.RunInfo:
        """Plan the run from the request and the registered workers, and start it."""
        if not req.HasField("job") or not req.job.command:
            raise InvalidArgument("job.command is required")
        if not req.HasField("targets"):
            raise InvalidArgument("no targets: choose them by identity pattern, labels or a list")
        try:
            workers = select(_selector(req.targets), self.registry.live())
            n = len(workers)
            concurrency = max_concurrency(_quantity(req, "maxConcurrency"), n)
            budget = error_budget(_quantity(req, "maxErrors"), n)
        except TargetError as e:
            if e.kind == "none":
                raise FailedPrecondition(str(e)) from None
            raise InvalidArgument(str(e)) from None
        run = self.manager.start(
            owner,
            req.job,
            _redacted(req.job),
            req.targets.SerializeToString(),
            workers,
            concurrency,
            budget,
        )
        return run_info(run.record)

    def _record(self, run_id: str) -> RunRecord:
        active = self.manager.active.get(run_id)
        if active is not None:
            return active.record
        rec = self.store.run(run_id) if run_id else None
        if rec is None:
            raise NotFound(f"no run with id {run_id[:100]!r}")
        return rec

    def get(self, req: pb.RunReq) -> pb.RunInfo:
        """One run with its hosts."""
        return run_info(self._record(req.runID))

    def cancel(self, req: pb.RunReq) -> pb.RunInfo:
        """Cancel a run (FAILED_PRECONDITION if it is over). One driven by another
        scheduler sharing the store is cancelled there, at its next beat: the request is
        recorded in the store, and the answer is the run as it is now (follow it to see
        it end CANCELLED)."""
        rec = self._record(req.runID)
        active = self.manager.active.get(req.runID)
        if active is None and rec.state is RunState.RUNNING:
            self.store.request_cancel(req.runID)
            return run_info(rec)
        if active is None or active.finished:
            raise FailedPrecondition(f"run {req.runID} is over ({rec.state.name.lower()})")
        self.manager.cancel(active)
        return run_info(active.record)

    def list(self, req: pb.ListRunsReq) -> pb.ListRunsRes:
        """The newest runs, newest first, without their hosts."""
        if req.limit > LIST_MAX:
            raise InvalidArgument(f"limit: at most {LIST_MAX}, got {req.limit}")
        out = pb.ListRunsRes()
        for rec in self.store.runs(req.limit or LIST_DEFAULT):
            active = self.manager.active.get(rec.run_id)
            out.runs.append(run_info(active.record if active else rec, hosts=False))
        return out

    async def follow(self, req: pb.RunReq) -> AsyncIterator[pb.RunEvent]:
        """The run's events from its start; a past run: its hosts, then its end.

        With ``req.batch``, several events to a message (as many as are ready).
        """
        rec = self._record(req.runID)
        active: ActiveRun | None = self.manager.active.get(req.runID)
        if active is None and rec.state is RunState.RUNNING and self.store.shared:
            async for m in self._follow_elsewhere(rec, req.batch):
                yield m
            return
        if active is None:
            past = [pb.RunEvent(host=host_pb(h)) for h in rec.hosts]
            past.append(pb.RunEvent(done=run_info(rec)))
            if req.batch:
                for i in range(0, len(past), PAST_BATCH):
                    yield pb.RunEvent(batch=pb.RunEvents(events=past[i : i + PAST_BATCH]))
            else:
                for m in past:
                    yield m
            return
        if not req.batch:
            async for e in active.follow():
                yield event_pb(e)
            return
        async for batch in active.follow_batches():
            yield pb.RunEvent(batch=pb.RunEvents(events=[event_pb(e) for e in batch]))

    async def _follow_elsewhere(self, rec: RunRecord, batch: bool) -> AsyncIterator[pb.RunEvent]:
        """A run another scheduler sharing the store drives: its hosts as the store has
        them, then each change as it is written (read every ELSEWHERE_POLL_S), then its
        end. The output lines stay at the scheduler that drives it (they are not stored)."""
        seen: dict[int, tuple[object, ...]] = {}
        while True:
            events = []
            for h in rec.hosts:
                now = (h.state, h.job_id, h.exit_code, h.error)
                if seen.get(h.position) != now:
                    seen[h.position] = now
                    events.append(pb.RunEvent(host=host_pb(h)))
            if rec.state is not RunState.RUNNING:
                events.append(pb.RunEvent(done=run_info(rec)))
            if batch and events:
                for i in range(0, len(events), PAST_BATCH):
                    yield pb.RunEvent(batch=pb.RunEvents(events=events[i : i + PAST_BATCH]))
            else:
                for m in events:
                    yield m
            if rec.state is not RunState.RUNNING:
                return
            await asyncio.sleep(ELSEWHERE_POLL_S)
            rec = self._record(rec.run_id)
