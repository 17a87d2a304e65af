"""What every client call sends, how it is retried, and what it returns.

Transport-free: the sync (:mod:`agent.client.sync`) and asyncio
(:mod:`agent.client.aio`) clients only carry out the :class:`Call` values
built here, with the same retry rule (:class:`Attempts`), so the two cannot
drift apart. A call is retried only if it is safe to repeat: StartJob,
RunJob and DispatchStartJob are never retried, so a job never starts twice.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent.channel import CLIENT_KEEPALIVE_S, Deadline, client_channel_options, merge_options
from agent.client.errors import AgentClientError, convert, status_of
from agent.client.model import JobStatus, RetryPolicy, TLSFiles, WorkerInfo
from agent.vocabulary import LIMIT_BY_NAME, LIMIT_NAMES, state_named

R = TypeVar("R")

# The extra time a WaitJob call gets beyond the wait it asks the agent for.
WAIT_MARGIN_S = 2.0


# ---------------------------------------------------------------- requests


def start_request(
    command: str,
    path: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_seconds: int | None = None,
    limits: Mapping[str, int] | None = None,
    secret_args: Iterable[int] = (),
) -> pb.StartJobReq:
    """Build a StartJobReq; ValueError for an unknown limit name."""
    req = pb.StartJobReq(
        command=command,
        path=path,
        args=list(args),
        env=dict(env or {}),
        secretArgs=list(secret_args),
    )
    if timeout_seconds is not None:
        req.timeoutSeconds = timeout_seconds
    for name, value in (limits or {}).items():
        if name not in LIMIT_BY_NAME:
            raise ValueError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        setattr(req.limits, LIMIT_BY_NAME[name].wire, value)
    return req


def list_request(
    states: Iterable[str] = (), owner: str = "", page_size: int = 0, page_token: str = ""
) -> pb.ListJobsReq:
    """Build a ListJobsReq; ValueError for an unknown state name."""
    nums = [state_named(s).value for s in states]
    return pb.ListJobsReq(
        states=nums,  # type: ignore[arg-type]
        owner=owner,
        pageSize=page_size,
        pageToken=page_token,
    )


# ---------------------------------------------------------------- calls


@dataclass(frozen=True)
class Call(Generic[R]):
    """One unary RPC: the stub method, the request, its deadline, whether to retry."""

    method: str
    request: Any
    timeout: float
    retry: bool
    result: Callable[[Any], R]


def _job_status(job_id: str = "") -> Callable[[Any], JobStatus]:
    return lambda res: JobStatus.from_pb(res, job_id)


def _job_id(res: Any) -> str:
    return str(res.jobID)


def _nothing(res: Any) -> None:
    return None


def _same(res: Any) -> Any:
    return res


def start(req: pb.StartJobReq, timeout: float) -> Call[str]:
    """StartJob; never retried."""
    return Call("StartJob", req, timeout, False, _job_id)


def run(req: pb.StartJobReq, timeout: float) -> Call[JobStatus]:
    """RunJob (start and wait); never retried."""
    return Call("RunJob", req, timeout, False, _job_status())


def query(job_id: str, timeout: float) -> Call[JobStatus]:
    """QueryJob."""
    return Call("QueryJob", pb.QueryJobReq(jobID=job_id), timeout, True, _job_status(job_id))


def query_pb(job_id: str, timeout: float) -> Call[pb.QueryJobRes]:
    """QueryJob, answering the raw QueryJobRes (for proxies)."""
    return Call("QueryJob", pb.QueryJobReq(jobID=job_id), timeout, True, _same)


def stop(job_id: str, timeout: float) -> Call[None]:
    """StopJob (safe to repeat: stopping a stopped job changes nothing)."""
    return Call("StopJob", pb.StopJobReq(jobID=job_id), timeout, True, _nothing)


def wait(job_id: str, timeout: float) -> Call[JobStatus]:
    """WaitJob for ``timeout`` seconds; the call's own deadline is a little longer."""
    req = pb.WaitJobReq(jobID=job_id, waitMillis=max(1, int(timeout * 1000)))
    return Call("WaitJob", req, timeout + WAIT_MARGIN_S, True, _job_status(job_id))


def _page(res: Any) -> tuple[list[JobStatus], str]:
    return [JobStatus.from_pb(j) for j in res.jobs], str(res.nextPageToken)


def list_page(
    states: Iterable[str], owner: str, page_size: int, page_token: str, timeout: float
) -> Call[tuple[list[JobStatus], str]]:
    """ListJobs, one page: (jobs, next page token or '')."""
    req = list_request(states, owner, page_size, page_token)
    return Call("ListJobs", req, timeout, True, _page)


def _workers(res: Any) -> list[WorkerInfo]:
    return [
        WorkerInfo(
            w.workerID,
            w.address,
            w.identity,
            w.registeredAt.ToDatetime(datetime.timezone.utc),
            w.lastSeen.ToDatetime(datetime.timezone.utc),
            dict(w.labels),
        )
        for w in res.workers
    ]


def list_workers(timeout: float) -> Call[list[WorkerInfo]]:
    """The scheduler's ListWorkers."""
    return Call("ListWorkers", pb.ListWorkersReq(), timeout, True, _workers)


def dispatch_start(worker_id: str, job: pb.StartJobReq, timeout: float) -> Call[str]:
    """The scheduler's DispatchStartJob; never retried."""
    req = pb.DispatchStartJobReq(workerID=worker_id, job=job)
    return Call("DispatchStartJob", req, timeout, False, _job_id)


def dispatch_query(worker_id: str, job_id: str, timeout: float) -> Call[JobStatus]:
    """The scheduler's DispatchQueryJob."""
    req = pb.DispatchJobReq(workerID=worker_id, jobID=job_id)
    return Call("DispatchQueryJob", req, timeout, True, _job_status(job_id))


def dispatch_stop(worker_id: str, job_id: str, timeout: float) -> Call[None]:
    """The scheduler's DispatchStopJob."""
    req = pb.DispatchJobReq(workerID=worker_id, jobID=job_id)
    return Call("DispatchStopJob", req, timeout, True, _nothing)


# ---------------------------------------------------------------- retries


class Attempts:
    """The attempts of one call within its deadline, with backoff between them."""

    def __init__(self, policy: RetryPolicy | None, timeout: float | None) -> None:
        """``policy`` None: a single attempt (the call is not safe to repeat)."""
        self.deadline = Deadline(timeout)
        self._delays = policy.delays() if policy else iter(())
        self._codes = policy.codes if policy else frozenset()

    def remaining(self) -> float | None:
        """The deadline of the next attempt."""
        return self.deadline.remaining()

    def after(self, e: grpc.RpcError) -> float:
        """How long to sleep before the next attempt; raises the converted error if none."""
        err = convert(e)
        if status_of(e) not in self._codes:
            raise err from None
        d = next(self._delays, None)
        if d is None or not self.deadline.allows(d):
            raise err from None
        return d


class OutputStream:
    """StreamJobOutput from an offset, resumed from the last byte after a drop."""

    def __init__(
        self,
        job_id: str,
        offset: int,
        follow: bool,
        timeout: float | None,
        end_status: bool = False,
    ) -> None:
        """``timeout`` bounds the whole stream (None: no bound); ``end_status`` asks for
        the job's status in a last message (following only; an older agent sends none)."""
        self.job_id = job_id
        self.pos = offset
        self.follow = follow
        self.timeout = timeout
        self.end_status = end_status

    def request(self) -> pb.StreamJobOutputReq:
        """The request that continues from the last byte received."""
        return pb.StreamJobOutputReq(
            jobID=self.job_id, offset=self.pos, follow=self.follow, endStatus=self.end_status
        )

    def status(self, msg: Any) -> JobStatus | None:
        """The job's status if ``msg`` is an endStatus stream's last message, else None."""
        return JobStatus.from_pb(msg.status, self.job_id) if msg.HasField("status") else None

    def accept(self, msg: Any) -> bytes:
        """The data of one received chunk (checked to continue where the last ended)."""
        if msg.offset != self.pos:  # pragma: no cover - the agent guarantees order
            raise AgentClientError(f"output out of order at {self.pos}")
        self.pos += len(msg.data)
        return bytes(msg.data)


def stream_timeout(timeout: float | None, follow: bool, default: float) -> float | None:
    """A stream's bound: the one given, else none when following, else ``default``."""
    if timeout is not None:
        return timeout
    return None if follow else default


# ---------------------------------------------------------------- channels


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """mTLS channel credentials from files (OSError if one cannot be read)."""
    ca, cert, key = tls.load()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


@dataclass(frozen=True)
class ChannelSpec:
    """How to open a channel: credentials (None: plaintext) and options."""

    address: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]


def channel_spec(
    address: str,
    tls: TLSFiles | None,
    *,
    insecure: bool = False,
    keepalive_s: float = CLIENT_KEEPALIVE_S,
    options: Sequence[tuple[str, Any]] = (),
) -> ChannelSpec:
    """The channel of a client; ValueError if ``tls`` is missing and not ``insecure``.

    ``options`` are extra gRPC channel arguments (they win over the defaults).
    """
    opts = merge_options(
        client_channel_options(server_name=tls.server_name if tls else "", keepalive_s=keepalive_s),
        options,
    )
    if insecure:
        return ChannelSpec(address, None, opts)
    if tls is None:
        raise ValueError("tls is required unless insecure=True")
    return ChannelSpec(address, channel_credentials(tls), opts)
