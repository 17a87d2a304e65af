"""Python client library for worker agents (and the reference scheduler).

Synchronous::

    from agent.client import AgentClient, TLSFiles

    with AgentClient("10.0.0.5:50000", TLSFiles("ca.crt", "me.crt", "me.key")) as c:
        job = c.start("bash", "/opt/scripts/backup.sh", args=["--full"])
        status = c.wait(job, timeout=60)
        print(status.state, status.exit_code)
        for chunk in c.stream(job):
            sys.stdout.buffer.write(chunk)

Asynchronous: :class:`AsyncAgentClient` has the same methods as coroutines
(``stream`` is an async iterator).

Every call has a deadline (``timeout`` argument, else the client's
default). Calls that are safe to repeat (query, stop, wait, list, and
stream resumed from its last offset) are retried with backoff while the
agent is UNAVAILABLE; ``start`` is never retried, so a job is never
started twice. Errors are :class:`AgentClientError` subclasses named after
the gRPC status (:class:`NotFound`, :class:`PermissionDenied`, ...).
"""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc

__all__ = [
    "STATES",
    "AgentClient",
    "AgentClientError",
    "AsyncAgentClient",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "JobStatus",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TLSFiles",
    "Unauthenticated",
    "Unavailable",
    "channel_credentials",
    "channel_options",
]

STATES = {1: "RUNNING", 2: "SUCCEEDED", 3: "FAILED", 4: "STOPPED", 5: "TIMED_OUT", 6: "LOST"}
STATE_NUMBERS = {v: k for k, v in STATES.items()}
LIMIT_FIELDS = {"cpu_seconds": "cpuSeconds", "memory_bytes": "memoryBytes",
                "open_files": "openFiles", "processes": "processes",
                "output_bytes": "outputBytes"}


# ---------------------------------------------------------------- errors


class AgentClientError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the agent's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name.lower().replace('_', ' ')}: {self.details}"


class InvalidArgument(AgentClientError):
    """The request was malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AgentClientError):
    """No such job (or script)."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(AgentClientError):
    """The identity or the request is not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(AgentClientError):
    """The client certificate was not accepted as an identity."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(AgentClientError):
    """The request is valid but cannot be carried out now."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AgentClientError):
    """A limit was reached (running jobs, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AgentClientError):
    """The agent could not be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AgentClientError):
    """The call did not complete before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_ERRORS: dict[grpc.StatusCode, type[AgentClientError]] = {
    c.code: c for c in (InvalidArgument, NotFound, PermissionDenied, Unauthenticated,
                        FailedPrecondition, ResourceExhausted, Unavailable, DeadlineExceeded)
}


def _convert(e: grpc.RpcError) -> AgentClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    cls = _ERRORS.get(code, AgentClientError)
    return cls(details, code) if cls is AgentClientError else cls(details)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TLSFiles:
    """CA bundle, client certificate and key (paths or PEM bytes)."""

    ca: str | Path | bytes
    cert: str | Path | bytes | None = None
    key: str | Path | bytes | None = None
    server_name: str = ""  # expected name in the server certificate, if not the host

    def load(self) -> tuple[bytes, bytes | None, bytes | None]:
        """The three PEM blobs."""
        def rd(v: str | Path | bytes | None) -> bytes | None:
            if v is None or isinstance(v, bytes):
                return v
            return Path(v).read_bytes()
        ca = rd(self.ca)
        assert ca is not None
        return ca, rd(self.cert), rd(self.key)


@dataclass(frozen=True)
class JobStatus:
    """A job's status as QueryJob / WaitJob / ListJobs report it."""

    job_id: str
    state: str  # RUNNING, SUCCEEDED, FAILED, STOPPED, TIMED_OUT, LOST
    done: bool
    error: bool
    error_text: str
    exit_code: int | None
    signal: int | None
    pid: int
    owner: str
    command: str
    path: str
    args: tuple[str, ...]
    start_time: datetime.datetime | None
    end_time: datetime.datetime | None
    user_cpu: float
    system_cpu: float
    max_rss: int
    output_bytes: int
    output_truncated: bool
    timeout_seconds: int

    @classmethod
    def from_pb(cls, m: pb.QueryJobRes, job_id: str = "") -> JobStatus:
        """Build from a QueryJobRes."""
        return cls(
            job_id=m.jobID or job_id,
            state=STATES.get(m.state, "UNSPECIFIED"),
            done=m.done, error=m.error, error_text=m.errorText,
            exit_code=m.exitCode if m.HasField("exitCode") else None,
            signal=m.signal if m.HasField("signal") else None,
            pid=m.pid, owner=m.owner, command=m.command, path=m.path, args=tuple(m.args),
            start_time=_ts(m, "startTime"),
            end_time=_ts(m, "endTime"),
            user_cpu=m.rusage.userCpuSeconds, system_cpu=m.rusage.systemCpuSeconds,
            max_rss=m.rusage.maxRssBytes, output_bytes=m.outputBytes,
            output_truncated=m.outputTruncated, timeout_seconds=m.timeoutSeconds)


def _ts(m: pb.QueryJobRes, name: str) -> datetime.datetime | None:
    if not m.HasField(name):
        return None
    return getattr(m, name).ToDatetime(datetime.timezone.utc)  # type: ignore[no-any-return]


@dataclass
class RetryPolicy:
    """Backoff for calls that are safe to repeat (never StartJob)."""

    attempts: int = 4
    initial: float = 0.1
    maximum: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def delays(self) -> Iterator[float]:
        """Sleep times between attempts (full jitter)."""
        d = self.initial
        for _ in range(self.attempts - 1):
            yield random.uniform(0, d)  # noqa: S311 - jitter, not a secret
            d = min(self.maximum, d * 2)


def channel_options(*, server_name: str = "", keepalive_s: float = 10.0,
                    max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Channel arguments used by the clients."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        # Notice a dead peer (host cut from the network) within seconds,
        # rather than when TCP gives up minutes later.
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Our own retries (only for safe calls) instead of gRPC's.
        ("grpc.enable_retries", 0),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def _merge(base: list[tuple[str, Any]], extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    names = {k for k, _ in extra}
    return [(k, v) for k, v in base if k not in names] + list(extra)


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """mTLS channel credentials from files."""
    ca, cert, key = tls.load()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def start_request(command: str, path: str, args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, timeout_seconds: int | None = None,
                  limits: Mapping[str, int] | None = None,
                  secret_args: Iterable[int] = ()) -> pb.StartJobReq:
    """Build a StartJobReq."""
    req = pb.StartJobReq(command=command, path=path, args=list(args), env=dict(env or {}),
                         secretArgs=list(secret_args))
    if timeout_seconds is not None:
        req.timeoutSeconds = timeout_seconds
    for name, value in (limits or {}).items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {name!r} (known: {', '.join(LIMIT_FIELDS)})")
        setattr(req.limits, LIMIT_FIELDS[name], value)
    return req


def list_request(states: Iterable[str] = (), owner: str = "", page_size: int = 0,
                 page_token: str = "") -> pb.ListJobsReq:
    """Build a ListJobsReq."""
    nums = []
    for s in states:
        if s.upper() not in STATE_NUMBERS:
            raise ValueError(f"unknown state {s!r} (known: {', '.join(STATE_NUMBERS)})")
        nums.append(STATE_NUMBERS[s.upper()])
    return pb.ListJobsReq(states=nums, owner=owner, pageSize=page_size, pageToken=page_token)  # type: ignore[arg-type]


T = TypeVar("T")


# ---------------------------------------------------------------- sync client


def _sync_call(fn: Callable[..., T], req: Any, timeout: float,
               retry: RetryPolicy | None) -> T:
    """One call with a deadline; retried with backoff only if ``retry`` is given."""
    deadline = time.monotonic() + timeout
    delays = retry.delays() if retry else iter(())
    codes = retry.codes if retry else frozenset()
    while True:
        try:
            return fn(req, timeout=max(0.001, deadline - time.monotonic()))
        except grpc.RpcError as e:
            err = _convert(e)
            if e.code() not in codes:
                raise err from None
            d = next(delays, None)
            if d is None or time.monotonic() + d >= deadline:
                raise err from None
            time.sleep(d)


class AgentClient:
    """A synchronous client of one agent."""

    def __init__(self, address: str, tls: TLSFiles | None, *, timeout: float = 10.0,
                 retry: RetryPolicy | None = None, insecure: bool = False,
                 keepalive_s: float = 10.0,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        """Connect lazily to ``address`` with mTLS (``insecure`` only for plaintext dev).

        ``options`` are extra gRPC channel arguments (they win over the defaults).
        """
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        opts = _merge(channel_options(server_name=tls.server_name if tls else "",
                                      keepalive_s=keepalive_s), options)
        if insecure:
            self._channel = grpc.insecure_channel(address, options=opts)
        else:
            if tls is None:
                raise ValueError("tls is required unless insecure=True")
            self._channel = grpc.secure_channel(address, channel_credentials(tls), options=opts)
        self._stub = pb_grpc.WorkerStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., T], req: Any, timeout: float | None,
              *, retry: bool) -> T:
        return _sync_call(fn, req, self.timeout if timeout is None else timeout,
                          self.retry if retry else None)

    def start(self, command: str, path: str = "", *, args: Sequence[str] = (),
              env: Mapping[str, str] | None = None, timeout_seconds: int | None = None,
              limits: Mapping[str, int] | None = None, secret_args: Iterable[int] = (),
              timeout: float | None = None) -> str:
        """Start a job; returns its id. Never retried (a job must not start twice)."""
        req = start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return str(self._call(self._stub.StartJob, req, timeout, retry=False).jobID)

    def run(self, command: str, path: str = "", *, args: Sequence[str] = (),
            env: Mapping[str, str] | None = None, timeout_seconds: int | None = None,
            limits: Mapping[str, int] | None = None, secret_args: Iterable[int] = (),
            timeout: float = 3600.0) -> JobStatus:
        """Start a job and wait for it in one call (RunJob); never retried.

        Returns the final status, or (done = False) the status just before
        ``timeout``; keep waiting with :meth:`wait` on ``status.job_id``.
        """
        req = start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return JobStatus.from_pb(self._call(self._stub.RunJob, req, timeout, retry=False))

    def query(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status."""
        res = self._call(self._stub.QueryJob, pb.QueryJobReq(jobID=job_id), timeout, retry=True)
        return JobStatus.from_pb(res, job_id)

    def stop(self, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job (SIGTERM to its group, SIGKILL after the agent's grace)."""
        self._call(self._stub.StopJob, pb.StopJobReq(jobID=job_id), timeout, retry=True)

    def wait(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """Wait until the job is done or ``timeout`` passes; returns the status then."""
        t = self.timeout if timeout is None else timeout
        req = pb.WaitJobReq(jobID=job_id, waitMillis=max(1, int(t * 1000)))
        res = self._call(self._stub.WaitJob, req, t + 2.0, retry=True)
        return JobStatus.from_pb(res, job_id)

    def list(self, *, states: Iterable[str] = (), owner: str = "", page_size: int = 0,
             page_token: str = "", timeout: float | None = None) -> tuple[list[JobStatus], str]:
        """One page of jobs, newest first: (jobs, next page token or '')."""
        res = self._call(self._stub.ListJobs, list_request(states, owner, page_size, page_token),
                         timeout, retry=True)
        return [JobStatus.from_pb(j) for j in res.jobs], res.nextPageToken

    def list_all(self, **kw: Any) -> Iterator[JobStatus]:
        """Every job across pages."""
        token = ""
        while True:
            jobs, token = self.list(page_token=token, **kw)
            yield from jobs
            if not token:
                return

    def stream(self, job_id: str, *, offset: int = 0, follow: bool = False,
               timeout: float | None = None) -> Iterator[bytes]:
        """The job's output from ``offset``; with ``follow``, until the job ends.

        ``timeout`` bounds the whole stream (default: none when following).
        A dropped connection is resumed from the last byte received.
        """
        t = timeout if timeout is not None else (None if follow else self.timeout)
        deadline = None if t is None else time.monotonic() + t
        delays = self.retry.delays()
        pos = offset
        while True:
            req = pb.StreamJobOutputReq(jobID=job_id, offset=pos, follow=follow)
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                for msg in self._stub.StreamJobOutput(req, timeout=remaining):
                    if msg.offset != pos:  # pragma: no cover - agent guarantees order
                        raise AgentClientError(f"output out of order at {pos}")
                    pos += len(msg.data)
                    yield msg.data
                return
            except grpc.RpcError as e:
                err = _convert(e)
                d = next(delays, None)
                if e.code() not in self.retry.codes or d is None:
                    raise err from None
                time.sleep(d)


# ---------------------------------------------------------------- asyncio client


class AsyncAgentClient:
    """An asyncio client of one agent; same methods as :class:`AgentClient`."""

    def __init__(self, address: str, tls: TLSFiles | None, *, timeout: float = 10.0,
                 retry: RetryPolicy | None = None, insecure: bool = False,
                 keepalive_s: float = 10.0,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        opts = _merge(channel_options(server_name=tls.server_name if tls else "",
                                      keepalive_s=keepalive_s), options)
        if insecure:
            self._channel = grpc.aio.insecure_channel(address, options=opts)
        else:
            if tls is None:
                raise ValueError("tls is required unless insecure=True")
            self._channel = grpc.aio.secure_channel(address, channel_credentials(tls),
                                                    options=opts)
        self._stub = pb_grpc.WorkerStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[..., Any], req: Any, timeout: float | None,
                    *, retry: bool) -> Any:
        t = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + t
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                return await fn(req, timeout=max(0.001, deadline - loop.time()))
            except grpc.RpcError as e:
                err = _convert(e)
                if e.code() not in self.retry.codes:
                    raise err from None
                d = next(delays, None)
                if d is None or loop.time() + d >= deadline:
                    raise err from None
                await asyncio.sleep(d)

    async def start(self, command: str, path: str = "", *, args: Sequence[str] = (),
                    env: Mapping[str, str] | None = None, timeout_seconds: int | None = None,
                    limits: Mapping[str, int] | None = None, secret_args: Iterable[int] = (),
                    timeout: float | None = None) -> str:
        """Start a job; returns its id. Never retried."""
        req = start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        res = await self._call(self._stub.StartJob, req, timeout, retry=False)
        return str(res.jobID)

    async def run(self, command: str, path: str = "", *, args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, timeout_seconds: int | None = None,
                  limits: Mapping[str, int] | None = None, secret_args: Iterable[int] = (),
                  timeout: float = 3600.0) -> JobStatus:
        """Start a job and wait for it in one call (RunJob); never retried."""
        req = start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return JobStatus.from_pb(await self._call(self._stub.RunJob, req, timeout, retry=False))

    async def start_pb(self, req: pb.StartJobReq, *, timeout: float | None = None) -> str:
        """Start from a prepared StartJobReq (for proxies); never retried."""
        res = await self._call(self._stub.StartJob, req, timeout, retry=False)
        return str(res.jobID)

    async def query_pb(self, job_id: str, *, timeout: float | None = None) -> pb.QueryJobRes:
        """The raw QueryJobRes (for proxies)."""
        res: pb.QueryJobRes = await self._call(self._stub.QueryJob,
                                               pb.QueryJobReq(jobID=job_id), timeout,
                                               retry=True)
        return res

    async def query(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status."""
        return JobStatus.from_pb(await self.query_pb(job_id, timeout=timeout), job_id)

    async def stop(self, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job."""
        await self._call(self._stub.StopJob, pb.StopJobReq(jobID=job_id), timeout, retry=True)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """Wait until done or ``timeout``; returns the status then."""
        t = self.timeout if timeout is None else timeout
        req = pb.WaitJobReq(jobID=job_id, waitMillis=max(1, int(t * 1000)))
        res = await self._call(self._stub.WaitJob, req, t + 2.0, retry=True)
        return JobStatus.from_pb(res, job_id)

    async def list(self, *, states: Iterable[str] = (), owner: str = "", page_size: int = 0,
                   page_token: str = "", timeout: float | None = None
                   ) -> tuple[list[JobStatus], str]:
        """One page of jobs: (jobs, next page token or '')."""
        res = await self._call(self._stub.ListJobs,
                               list_request(states, owner, page_size, page_token), timeout,
                               retry=True)
        return [JobStatus.from_pb(j) for j in res.jobs], res.nextPageToken

    async def stream(self, job_id: str, *, offset: int = 0, follow: bool = False,
                     timeout: float | None = None) -> AsyncIterator[bytes]:
        """The job's output from ``offset`` (resumed after a dropped connection)."""
        loop = asyncio.get_running_loop()
        t = timeout if timeout is not None else (None if follow else self.timeout)
        deadline = None if t is None else loop.time() + t
        delays = self.retry.delays()
        pos = offset
        while True:
            req = pb.StreamJobOutputReq(jobID=job_id, offset=pos, follow=follow)
            remaining = None if deadline is None else max(0.001, deadline - loop.time())
            try:
                async for msg in self._stub.StreamJobOutput(req, timeout=remaining):
                    pos += len(msg.data)
                    yield msg.data
                return
            except grpc.RpcError as e:
                err = _convert(e)
                d = next(delays, None)
                if e.code() not in self.retry.codes or d is None:
                    raise err from None
                await asyncio.sleep(d)


# ---------------------------------------------------------------- scheduler client


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the scheduler lists it."""

    worker_id: str
    address: str
    identity: str
    registered_at: datetime.datetime | None
    last_seen: datetime.datetime | None


class SchedulerClient:
    """A synchronous client of the reference scheduler (users' side)."""

    def __init__(self, address: str, tls: TLSFiles, *, timeout: float = 10.0,
                 retry: RetryPolicy | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = grpc.secure_channel(address, channel_credentials(tls),
                                            options=channel_options(server_name=tls.server_name))
        self._stub = pb_grpc.SchedulerStub(self._channel)  # type: ignore[no-untyped-call]

    def _call(self, fn: Callable[..., T], req: Any, timeout: float | None,
              *, retry: bool) -> T:
        return _sync_call(fn, req, self.timeout if timeout is None else timeout,
                          self.retry if retry else None)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> SchedulerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workers(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        """Registered workers, oldest registration first."""
        res = self._call(self._stub.ListWorkers, pb.ListWorkersReq(), timeout, retry=True)
        return [WorkerInfo(w.workerID, w.address, w.identity,
                           w.registeredAt.ToDatetime(datetime.timezone.utc),
                           w.lastSeen.ToDatetime(datetime.timezone.utc)) for w in res.workers]

    def start(self, worker_id: str, command: str, path: str = "", *,
              args: Sequence[str] = (), env: Mapping[str, str] | None = None,
              timeout_seconds: int | None = None, limits: Mapping[str, int] | None = None,
              secret_args: Iterable[int] = (), timeout: float | None = None) -> str:
        """Start a job on a worker through the scheduler; never retried."""
        job = start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        res = self._call(self._stub.DispatchStartJob,
                         pb.DispatchStartJobReq(workerID=worker_id, job=job), timeout,
                         retry=False)
        return str(res.jobID)

    def query(self, worker_id: str, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status on a worker."""
        res = self._call(self._stub.DispatchQueryJob,
                         pb.DispatchJobReq(workerID=worker_id, jobID=job_id), timeout,
                         retry=True)
        return JobStatus.from_pb(res, job_id)

    def stop(self, worker_id: str, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job on a worker."""
        self._call(self._stub.DispatchStopJob,
                   pb.DispatchJobReq(workerID=worker_id, jobID=job_id), timeout, retry=True)

    def wait(self, worker_id: str, job_id: str, *, timeout: float = 60.0,
             poll: float = 0.05) -> JobStatus:
        """Poll until the job is done or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            st = self.query(worker_id, job_id)
            if st.done or time.monotonic() + delay > deadline:
                return st
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
