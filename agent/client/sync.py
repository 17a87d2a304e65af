"""The synchronous clients: one agent (:class:`AgentClient`), the scheduler."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import CLIENT_KEEPALIVE_S
from agent.client import _calls as calls
from agent.client import runs as fanout
from agent.client.errors import convert
from agent.client.model import JobStatus, RetryPolicy, TLSFiles, WorkerInfo

__all__ = ["AgentClient", "SchedulerClient"]

R = TypeVar("R")


def _open(spec: calls.ChannelSpec) -> grpc.Channel:
    if spec.credentials is None:
        return grpc.insecure_channel(spec.address, options=spec.options)
    return grpc.secure_channel(spec.address, spec.credentials, options=spec.options)


class _Transport:
    """A channel, a stub, and the deadline/retry rule every call goes through."""

    def __init__(
        self,
        stub: Any,
        channel: grpc.Channel,
        address: str,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = channel
        self._stub = stub(channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _invoke(self, call: calls.Call[R]) -> R:
        """One call with a deadline; retried with backoff only if the call allows it."""
        fn = getattr(self._stub, call.method)
        attempts = calls.Attempts(self.retry if call.retry else None, call.timeout)
        while True:
            try:
                return call.result(fn(call.request, timeout=attempts.remaining()))
            except grpc.RpcError as e:
                time.sleep(attempts.after(e))


class AgentClient(_Transport):
    """A synchronous client of one agent."""

    def __init__(
        self,
        address: str,
        tls: TLSFiles | None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        insecure: bool = False,
        keepalive_s: float = CLIENT_KEEPALIVE_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Connect lazily to ``address`` with mTLS (``insecure`` only for plaintext dev).

        ``options`` are extra gRPC channel arguments (they win over the defaults).
        """
        spec = calls.channel_spec(
            address, tls, insecure=insecure, keepalive_s=keepalive_s, options=options
        )
        super().__init__(pb_grpc.WorkerStub, _open(spec), address, timeout, retry)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        command: str,
        path: str = "",
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_seconds: int | None = None,
        limits: Mapping[str, int] | None = None,
        secret_args: Iterable[int] = (),
        timeout: float | None = None,
    ) -> str:
        """Start a job; returns its id. Never retried (a job must not start twice)."""
        req = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return self._invoke(calls.start(req, self._t(timeout)))

    def run(
        self,
        command: str,
        path: str = "",
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_seconds: int | None = None,
        limits: Mapping[str, int] | None = None,
        secret_args: Iterable[int] = (),
        timeout: float = 3600.0,
    ) -> JobStatus:
        """Start a job and wait for it in one call (RunJob); never retried.

        Returns the final status, or (done = False) the status just before
        ``timeout``; keep waiting with :meth:`wait` on ``status.job_id``.
        """
        req = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return self._invoke(calls.run(req, timeout))

    def query(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status."""
        return self._invoke(calls.query(job_id, self._t(timeout)))

    def stop(self, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job (SIGTERM to its group, SIGKILL after the agent's grace)."""
        self._invoke(calls.stop(job_id, self._t(timeout)))

    def wait(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """Wait until the job is done or ``timeout`` passes; returns the status then."""
        return self._invoke(calls.wait(job_id, self._t(timeout)))

    def list(
        self,
        *,
        states: Iterable[str] = (),
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[JobStatus], str]:
        """One page of jobs, newest first: (jobs, next page token or '')."""
        return self._invoke(calls.list_page(states, owner, page_size, page_token, self._t(timeout)))

    def list_all(self, **kw: Any) -> Iterator[JobStatus]:
        """Every job across pages (keywords as for :meth:`list`)."""
        token = ""
        while True:
            jobs, token = self.list(page_token=token, **kw)
            yield from jobs
            if not token:
                return

    def stream(
        self, job_id: str, *, offset: int = 0, follow: bool = False, timeout: float | None = None
    ) -> Iterator[bytes]:
        """The job's output from ``offset``; with ``follow``, until the job ends.

        ``timeout`` bounds the whole stream (default: none when following).
        A dropped connection is resumed from the last byte received.
        """
        out = calls.OutputStream(
            job_id, offset, follow, calls.stream_timeout(timeout, follow, self.timeout)
        )
        attempts = calls.Attempts(self.retry, out.timeout)
        while True:
            try:
                for msg in self._stub.StreamJobOutput(out.request(), timeout=attempts.remaining()):
                    yield out.accept(msg)
                return
            except grpc.RpcError as e:
                time.sleep(attempts.after(e))


class SchedulerClient(_Transport):
    """A synchronous client of the reference scheduler (users' side)."""

    def __init__(
        self,
        address: str,
        tls: TLSFiles,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Connect lazily to the scheduler at ``address`` with mTLS."""
        spec = calls.channel_spec(address, tls)
        super().__init__(pb_grpc.SchedulerStub, _open(spec), address, timeout, retry)

    def __enter__(self) -> SchedulerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workers(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        """Registered workers, oldest registration first."""
        return self._invoke(calls.list_workers(self._t(timeout)))

    def start(
        self,
        worker_id: str,
        command: str,
        path: str = "",
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_seconds: int | None = None,
        limits: Mapping[str, int] | None = None,
        secret_args: Iterable[int] = (),
        timeout: float | None = None,
    ) -> str:
        """Start a job on a worker through the scheduler; never retried."""
        job = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return self._invoke(calls.dispatch_start(worker_id, job, self._t(timeout)))

    def query(self, worker_id: str, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status on a worker."""
        return self._invoke(calls.dispatch_query(worker_id, job_id, self._t(timeout)))

    def stop(self, worker_id: str, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job on a worker."""
        self._invoke(calls.dispatch_stop(worker_id, job_id, self._t(timeout)))

    def wait(
        self, worker_id: str, job_id: str, *, timeout: float = 60.0, poll: float = 0.05
    ) -> JobStatus:
        """Poll until the job is done or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            st = self.query(worker_id, job_id)
            if st.done or time.monotonic() + delay > deadline:
                return st
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    # ------------------------------------------------------------ fan-out runs

    def start_run(
        self,
        select: str,
        command: str,
        path: str = "",
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_seconds: int | None = None,
        limits: Mapping[str, int] | None = None,
        secret_args: Iterable[int] = (),
        max_concurrency: int | str | None = None,
        max_errors: int | str | None = None,
        timeout: float | None = None,
    ) -> fanout.RunInfo:
        """Start one job on the workers ``select`` names; never retried.

        ``select``: ``label:K=V,...``, ``id:PATTERN`` or ``list:A,B``;
        ``max_concurrency`` / ``max_errors``: a count or ``"N%"`` (ValueError
        for a malformed one). Answers once the run is under way.
        """
        job = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        req = fanout.start_request(job, select, max_concurrency, max_errors)
        return self._invoke(fanout.start_run(req, self._t(timeout)))

    def run_info(self, run_id: str, *, timeout: float | None = None) -> fanout.RunInfo:
        """One run with its hosts."""
        return self._invoke(fanout.get_run(run_id, self._t(timeout)))

    def cancel_run(self, run_id: str, *, timeout: float | None = None) -> fanout.RunInfo:
        """Stop a run's running jobs and start nothing more."""
        return self._invoke(fanout.cancel_run(run_id, self._t(timeout)))

    def runs(self, *, limit: int = 0, timeout: float | None = None) -> list[fanout.RunInfo]:
        """Runs, newest first, without their hosts."""
        return self._invoke(fanout.list_runs(limit, self._t(timeout)))

    def follow_run(self, run_id: str, *, timeout: float | None = None) -> Iterator[fanout.RunEvent]:
        """A run's events from its start until its end (the last is its RunInfo).

        ``timeout`` bounds the whole stream (default: none). Not resumed after a
        dropped connection: follow again, the events start over.
        """
        try:
            # Batches when the scheduler sends them (an original one sends events one by one).
            for m in self._stub.FollowRun(pb.RunReq(runID=run_id, batch=True), timeout=timeout):
                yield from fanout.events(m)
        except grpc.RpcError as e:
            raise convert(e) from None
