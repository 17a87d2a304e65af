"""The asyncio client of one agent (:class:`AsyncAgentClient`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import CLIENT_KEEPALIVE_S
from agent.client import _calls as calls
from agent.client.errors import AgentClientError, convert
from agent.client.model import JobStatus, RetryPolicy, TLSFiles

__all__ = ["AsyncAgentClient"]

R = TypeVar("R")


class AsyncAgentClient:
    """An asyncio client of one agent; same methods as :class:`AgentClient`, awaited."""

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
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        spec = calls.channel_spec(
            address, tls, insecure=insecure, keepalive_s=keepalive_s, options=options
        )
        self._channel: grpc.aio.Channel | None = self._open(spec)
        self._stub: Any = pb_grpc.WorkerStub(self._channel)

    @staticmethod
    def _open(spec: calls.ChannelSpec) -> grpc.aio.Channel:
        if spec.credentials is None:
            return grpc.aio.insecure_channel(spec.address, options=spec.options)
        return grpc.aio.secure_channel(spec.address, spec.credentials, options=spec.options)

    @classmethod
    def over_stub(
        cls,
        stub: Any,
        address: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> AsyncAgentClient:
        """A client whose calls go through ``stub`` (the generated WorkerStub's shape: the
        scheduler's calls down a worker's link), without a channel of its own.

        ``address`` only names the worker in messages; :meth:`close` does nothing.
        """
        self = cls.__new__(cls)
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = None
        self._stub = stub
        return self

    async def close(self) -> None:
        """Close the channel (if the client has one)."""
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def _invoke(self, call: calls.Call[R]) -> R:
        """One call with a deadline; retried with backoff only if the call allows it."""
        fn = getattr(self._stub, call.method)
        attempts = calls.Attempts(self.retry if call.retry else None, call.timeout)
        while True:
            try:
                return call.result(await fn(call.request, timeout=attempts.remaining()))
            except grpc.RpcError as e:
                await asyncio.sleep(attempts.after(e))

    async def start(
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
        """Start a job; returns its id. Never retried."""
        req = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return await self.start_pb(req, timeout=timeout)

    async def run(
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
        """Start a job and wait for it in one call (RunJob); never retried."""
        req = calls.start_request(command, path, args, env, timeout_seconds, limits, secret_args)
        return await self._invoke(calls.run(req, timeout))

    async def start_pb(self, req: pb.StartJobReq, *, timeout: float | None = None) -> str:
        """Start from a prepared StartJobReq (for proxies); never retried."""
        return await self._invoke(calls.start(req, self._t(timeout)))

    async def query_pb(self, job_id: str, *, timeout: float | None = None) -> pb.QueryJobRes:
        """The raw QueryJobRes (for proxies)."""
        return await self._invoke(calls.query_pb(job_id, self._t(timeout)))

    async def query(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """A job's status."""
        return await self._invoke(calls.query(job_id, self._t(timeout)))

    async def stop(self, job_id: str, *, timeout: float | None = None) -> None:
        """Stop a job."""
        await self._invoke(calls.stop(job_id, self._t(timeout)))

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        """Wait until done or ``timeout``; returns the status then."""
        return await self._invoke(calls.wait(job_id, self._t(timeout)))

    async def list(
        self,
        *,
        states: Iterable[str] = (),
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[JobStatus], str]:
        """One page of jobs: (jobs, next page token or '')."""
        return await self._invoke(
            calls.list_page(states, owner, page_size, page_token, self._t(timeout))
        )

    async def list_all(self, **kw: Any) -> AsyncIterator[JobStatus]:
        """Every job across pages (keywords as for :meth:`list`)."""
        token = ""
        while True:
            jobs, token = await self.list(page_token=token, **kw)
            for job in jobs:
                yield job
            if not token:
                return

    async def stream(
        self, job_id: str, *, offset: int = 0, follow: bool = False, timeout: float | None = None
    ) -> AsyncIterator[bytes]:
        """The job's output from ``offset`` (resumed after a dropped connection)."""
        out = calls.OutputStream(
            job_id, offset, follow, calls.stream_timeout(timeout, follow, self.timeout)
        )
        async for msg in self._stream(out):
            yield out.accept(msg)

    async def stream_to_end(self, job_id: str) -> AsyncIterator[bytes | JobStatus]:
        """The job's output, following it to its end, then its status as the last item.

        The status comes in the stream's last message (``endStatus``); an agent
        without it sends none, and the iteration then ends without a status.
        """
        out = calls.OutputStream(job_id, 0, True, None, end_status=True)
        async for msg in self._stream(out):
            st = out.status(msg)
            yield out.accept(msg) if st is None else st

    async def start_stream(
        self, req: pb.StartJobReq, *, timeout: float | None = None
    ) -> AsyncIterator[str | bytes | JobStatus]:
        """StartJobStream: the new job's id (a str) first, then its output, then its
        status (the last item). One attempt, never retried (a start); ``timeout`` bounds
        the whole call (default: none, the job may run long). An agent without the call
        raises UNIMPLEMENTED before any item: nothing was started."""
        out: calls.OutputStream | None = None  # the job's output, once its id came
        try:
            async for msg in self._stub.StartJobStream(req, timeout=timeout):
                if out is None:
                    if not msg.jobID:
                        raise AgentClientError("StartJobStream: the first message names no job")
                    out = calls.OutputStream(msg.jobID, 0, True, None, end_status=True)
                    yield msg.jobID
                    continue
                st = out.status(msg)
                yield out.accept(msg) if st is None else st
        except grpc.RpcError as e:
            raise convert(e) from None

    async def _stream(self, out: calls.OutputStream) -> AsyncIterator[Any]:
        """StreamJobOutput's messages, resumed from ``out``'s position after a drop."""
        attempts = calls.Attempts(self.retry, out.timeout)
        while True:
            try:
                async for msg in self._stub.StreamJobOutput(
                    out.request(), timeout=attempts.remaining()
                ):
                    yield msg
                return
            except grpc.RpcError as e:
                await asyncio.sleep(attempts.after(e))
