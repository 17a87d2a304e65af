"""Fan-out runs on the client's side: the selector and quantity syntax, the calls, the values.

The command line's syntax lives here, once, for every caller of the library:
a selector is ``label:role=web,zone=a`` (every label must match),
``id:PATTERN`` (a shell-style glob on the worker's certificate identity) or
``list:A,B`` (worker ids or addresses); a quantity is a count (``10``) or a
percentage (``25%``). They become the wire's TargetSelector and Quantity;
the scheduler applies them (and answers INVALID_ARGUMENT for what it cannot).
Transport-free like :mod:`agent.client._calls`, whose :class:`Call` these
calls are.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from agent._proto import jobscheduler_pb2 as pb
from agent.client._calls import Call
from agent.client.model import timestamp
from agent.vocabulary import HostState, RunState

__all__ = [
    "RunHostInfo",
    "RunInfo",
    "RunOutputLine",
    "describe_targets",
    "parse_quantity",
    "parse_selector",
]


def parse_selector(text: str) -> pb.TargetSelector:
    """``label:k=v,...`` | ``id:PATTERN`` | ``list:a,b`` -> TargetSelector (ValueError)."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"selector {text!r}: expected label:K=V,..., id:PATTERN or list:A,B")
    if kind == "id":
        return pb.TargetSelector(identityPattern=rest)
    items = [x.strip() for x in rest.split(",")]
    if any(not x for x in items):
        raise ValueError(f"selector {text!r}: an empty item")
    if kind == "list":
        return pb.TargetSelector(workers=pb.WorkerList(names=items))
    if kind == "label":
        match: dict[str, str] = {}
        for item in items:
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise ValueError(f"selector {text!r}: {item!r} is not KEY=VALUE")
            if k in match:
                raise ValueError(f"selector {text!r}: label {k!r} given twice")
            match[k] = v
        return pb.TargetSelector(labels=pb.LabelSelector(match=match))
    raise ValueError(f"selector {text!r}: unknown kind {kind!r} (label, id or list)")


def parse_quantity(value: int | str | None) -> pb.Quantity | None:
    """``10`` or ``"25%"`` -> Quantity; None stays None (ValueError for the rest)."""
    if value is None:
        return None
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value}: must not be negative")
        return pb.Quantity(count=value)
    text = value.strip()
    pct = text.endswith("%")
    digits = text[:-1] if pct else text
    if not digits.isdigit():
        raise ValueError(f"{value!r}: expected a count (10) or a percentage (25%)")
    n = int(digits)
    if pct:
        if not 1 <= n <= 100:
            raise ValueError(f"{value!r}: a percentage must be 1-100")
        return pb.Quantity(percent=n)
    return pb.Quantity(count=n)


def describe_targets(m: pb.TargetSelector) -> str:
    """A selector in the command line's syntax (the inverse of :func:`parse_selector`)."""
    by = m.WhichOneof("by")
    if by == "identityPattern":
        return f"id:{m.identityPattern}"
    if by == "labels":
        return "label:" + ",".join(f"{k}={v}" for k, v in sorted(m.labels.match.items()))
    if by == "workers":
        return "list:" + ",".join(m.workers.names)
    return "-"


@dataclass(frozen=True)
class RunHostInfo:
    """One host of a run; ``state`` is a HostState name (PENDING, SUCCEEDED, ...)."""

    worker_id: str
    address: str
    identity: str
    state: str
    job_id: str
    exit_code: int | None
    error_text: str
    start_time: datetime.datetime | None
    end_time: datetime.datetime | None

    @classmethod
    def from_pb(cls, m: pb.RunHost) -> RunHostInfo:
        """From the wire's RunHost."""
        return cls(
            m.workerID,
            m.address,
            m.identity,
            _name(HostState, m.state),
            m.jobID,
            m.exitCode if m.HasField("exitCode") else None,
            m.errorText,
            timestamp(m, "startTime"),
            timestamp(m, "endTime"),
        )


@dataclass(frozen=True)
class RunInfo:
    """A run; ``state`` is a RunState name (RUNNING, DONE, CANCELLED, INTERRUPTED)."""

    run_id: str
    owner: str
    state: str
    command: str
    path: str
    args: tuple[str, ...]
    targets: str  # in the command line's syntax
    max_concurrency: int
    max_errors: int
    created_at: datetime.datetime | None
    end_time: datetime.datetime | None
    hosts: tuple[RunHostInfo, ...]
    summary: dict[str, int]  # succeeded, failed, not_started, unreachable, unknown, pending

    @property
    def all_succeeded(self) -> bool:
        """Every target host ran the job and it succeeded."""
        s = self.summary
        return sum(s.values()) == s["succeeded"] and s["succeeded"] > 0

    @classmethod
    def from_pb(cls, m: pb.RunInfo) -> RunInfo:
        """From the wire's RunInfo."""
        s = m.summary
        return cls(
            m.runID,
            m.owner,
            _name(RunState, m.state),
            m.job.command,
            m.job.path,
            tuple(m.job.args),
            describe_targets(m.targets),
            m.maxConcurrency,
            m.maxErrors,
            timestamp(m, "createdAt"),
            timestamp(m, "endTime"),
            tuple(RunHostInfo.from_pb(h) for h in m.hosts),
            {
                "succeeded": s.succeeded,
                "failed": s.failed,
                "not_started": s.notStarted,
                "unreachable": s.unreachable,
                "unknown": s.unknown,
                "pending": s.pending,
            },
        )


@dataclass(frozen=True)
class RunOutputLine:
    """One line of one host's output, without its newline."""

    worker_id: str
    host: str
    line: bytes


RunEvent = RunOutputLine | RunHostInfo | RunInfo


def _name(enum: Any, number: int) -> str:
    try:
        return str(enum(number).name)
    except ValueError:
        return "UNSPECIFIED"


def events(m: pb.RunEvent) -> list[RunEvent]:
    """The events of one FollowRun message (several if it is a batch) as plain values."""
    if m.WhichOneof("event") == "batch":
        return [event(e) for e in m.batch.events]
    return [event(m)]


def event(m: pb.RunEvent) -> RunEvent:
    """One event of FollowRun as a plain value."""
    which = m.WhichOneof("event")
    if which == "output":
        return RunOutputLine(m.output.workerID, m.output.host, bytes(m.output.line))
    if which == "host":
        return RunHostInfo.from_pb(m.host)
    return RunInfo.from_pb(m.done)


def _run(res: Any) -> RunInfo:
    return RunInfo.from_pb(res)


def start_request(
    job: pb.StartJobReq,
    select: str,
    max_concurrency: int | str | None,
    max_errors: int | str | None,
) -> pb.StartRunReq:
    """The StartRunReq (ValueError for a bad selector or quantity)."""
    req = pb.StartRunReq(job=job, targets=parse_selector(select))
    for name, value in (("maxConcurrency", max_concurrency), ("maxErrors", max_errors)):
        q = parse_quantity(value)
        if q is not None:
            getattr(req, name).CopyFrom(q)
    return req


def start_run(req: pb.StartRunReq, timeout: float) -> Call[RunInfo]:
    """StartRun; never retried (a second run would start every job again)."""
    return Call("StartRun", req, timeout, False, _run)


def get_run(run_id: str, timeout: float) -> Call[RunInfo]:
    """GetRun."""
    return Call("GetRun", pb.RunReq(runID=run_id), timeout, True, _run)


def cancel_run(run_id: str, timeout: float) -> Call[RunInfo]:
    """CancelRun (safe to repeat)."""
    return Call("CancelRun", pb.RunReq(runID=run_id), timeout, True, _run)


def list_runs(limit: int, timeout: float) -> Call[list[RunInfo]]:
    """ListRuns, newest first."""
    return Call(
        "ListRuns",
        pb.ListRunsReq(limit=limit),
        timeout,
        True,
        lambda res: [RunInfo.from_pb(r) for r in res.runs],
    )
