"""The scheduler link: one stream for this worker's heartbeats and the scheduler's calls.

After registering, the agent opens ``Scheduler.Link`` on its registration
connection (see the ``Link`` comments in ``proto/jobscheduler.proto``): a hello
first, then a heartbeat every interval, each answered in order. With
``[scheduler] calls_as`` set, the scheduler also sends Worker calls down it
instead of connecting to the agent; each runs through the same
:class:`~agent.daemon.service.WorkerService` code as a direct call (validation,
``[auth]`` and the policy for the ``calls_as`` identity, audit with the peer
``link:<scheduler address>``, stream slots, limits), with a :class:`LinkContext`
in place of gRPC's. Its answers go back as ``LinkReply`` messages: one per
response, the last with the call's status.

One :class:`LinkSession` is one stream; it ends, saying why (:class:`Ended`),
when the scheduler forgets the worker, has no Link, or the stream breaks, and
:class:`~agent.daemon.registration.Registrar` acts on that as on a heartbeat's
outcome. gRPC allows one write at a time on a stream: every message goes through
one bounded queue to one writer task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, NoReturn

import grpc
from google.protobuf import message as pb_message

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.access import identity_sans
from agent.daemon.service import CarriedCall, WorkerService, worker_methods
from agent.tls import PeerCert

__all__ = ["MAX_CALLS", "Ended", "LinkAbort", "LinkContext", "LinkSession"]

log = logging.getLogger(__name__)

MAX_CALLS = 256  # calls run at once on one link; more are refused RESOURCE_EXHAUSTED
SEND_QUEUE = 64  # messages waiting for the writer (a full queue holds the senders back)

OK = grpc.StatusCode.OK


class Ended(NamedTuple):
    """Why a link ended: ``kind`` "unknown" (register again), "unimplemented" (the
    scheduler has no Link) or "broken" (a failed heartbeat); ``text`` says more."""

    kind: str
    text: str


def _ended(code: grpc.StatusCode, details: str | None) -> Ended:
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Ended("unimplemented", details or "")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
        # Not registered (any more), or the id is another identity's: register again.
        return Ended("unknown", f"link refused: {code.name}: {details}")
    if code == OK:
        return Ended("broken", "link closed by the scheduler")
    return Ended("broken", f"link failed: {code.name}: {details}")


def _reply(
    call_id: int,
    *,
    response: bytes = b"",
    last: bool = False,
    code: grpc.StatusCode = OK,
    details: str = "",
) -> pb.LinkUp:
    return pb.LinkUp(
        reply=pb.LinkReply(
            callID=call_id, response=response, last=last, code=code.value[0], details=details
        )
    )


class LinkAbort(Exception):
    """A carried call ended with a status (what ``abort`` raises on a :class:`LinkContext`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class LinkContext(CarriedCall):
    """What the Worker service reads from a call's context, for one call on the link.

    ``caller``: the ``calls_as`` identity; ``peer``: ``link:<scheduler address>``;
    ``timeout``: the call's deadline from now (None: none); ``send``: puts a message on
    the link. :meth:`abort` raises :class:`LinkAbort`, which the session sends as the
    call's final reply.
    """

    def __init__(
        self,
        caller: PeerCert,
        call_id: int,
        peer: str,
        timeout: float | None,
        send: Callable[[pb.LinkUp], Awaitable[None]],
    ) -> None:
        super().__init__(caller)
        self.call_id = call_id
        self._peer = peer
        now = asyncio.get_running_loop().time()
        self._deadline = None if timeout is None else now + timeout
        self._send = send
        self.finished = False
        self.expired = False  # ended by its deadline
        self.cancelled = False  # ended by the scheduler's LinkCancel

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def done(self) -> bool:
        return self.finished

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise LinkAbort(code, details)

    async def write(self, message: pb_message.Message) -> None:
        if self.finished:
            raise LinkAbort(grpc.StatusCode.CANCELLED, "the call is over")
        await self._send(_reply(self.call_id, response=message.SerializeToString()))

    async def end(
        self, code: grpc.StatusCode = OK, details: str = "", response: bytes = b""
    ) -> None:
        """Send the call's final reply (once)."""
        if not self.finished:
            self.finished = True
            up = _reply(self.call_id, response=response, last=True, code=code, details=details)
            await self._send(up)


class LinkSession:
    """One Link stream: the hello, the heartbeats, the calls; :meth:`run` until it ends."""

    def __init__(
        self,
        stub: pb_grpc.SchedulerStub,
        *,
        worker_id: str,
        interval: float,
        answer_timeout: float,
        peer: str,
        service: WorkerService | None,
        calls_as: str,
        on_alive: Callable[[], None],
    ) -> None:
        """``peer`` names the scheduler in the audit log; ``on_alive`` runs at each
        answered heartbeat; ``calls_as`` empty (or no ``service``): no calls."""
        self._stub = stub
        self._worker_id = worker_id
        self._interval = interval
        self._answer_timeout = answer_timeout
        self._peer = peer
        self._service = service
        self._caller = None
        if calls_as and service is not None:
            self._caller = PeerCert(calls_as, True, "", identity_sans(calls_as))
        self._methods = worker_methods(service) if service is not None else {}
        self._on_alive = on_alive
        self._out: asyncio.Queue[pb.LinkUp] = asyncio.Queue(SEND_QUEUE)
        self._calls: dict[int, tuple[asyncio.Task[None], LinkContext]] = {}
        self._answer: asyncio.Future[bool] | None = None
        self._closing = False
        self._linked = False

    async def run(self) -> Ended:
        """Open the link and serve it; returns why it ended (closes it first)."""
        call = self._stub.Link()
        hello = pb.LinkHello(
            workerID=self._worker_id,
            acceptsCalls=self._caller is not None,
            maxCalls=MAX_CALLS if self._caller is not None else 0,
        )
        self._out.put_nowait(pb.LinkUp(hello=hello))
        reader = asyncio.ensure_future(self._read(call))
        others = [asyncio.ensure_future(self._write(call)), asyncio.ensure_future(self._beat())]
        try:
            done, _ = await asyncio.wait([reader, *others], return_when=asyncio.FIRST_COMPLETED)
            # The reader knows the stream's status best: its word first.
            first = reader if reader in done else done.pop()
            error = first.exception()
            if error is not None:  # a bug: the registration goes on, as after a break
                log.error("scheduler link failed", exc_info=error)
                return Ended("broken", f"link failed: {error!r}")
            return first.result()
        finally:
            self._closing = True
            running = [task for task, _ in self._calls.values()]
            for task in (reader, *others, *running):
                task.cancel()
            call.cancel()
            await asyncio.gather(reader, *others, *running, return_exceptions=True)

    async def _send(self, up: pb.LinkUp) -> None:
        await self._out.put(up)

    async def _write(self, call: Any) -> Ended:
        try:
            while True:
                up = await self._out.get()
                await call.write(up)
        except grpc.aio.AioRpcError as e:
            return _ended(e.code(), e.details())
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            return Ended("broken", f"link write failed: {e!r}")

    async def _read(self, call: Any) -> Ended:
        try:
            while True:
                down = await call.read()
                if down is grpc.aio.EOF:
                    return _ended(await call.code(), await call.details())
                await self._take(down)
        except grpc.aio.AioRpcError as e:
            return _ended(e.code(), e.details())

    async def _beat(self) -> Ended:
        """A heartbeat every interval, each answered within the answer timeout."""
        heartbeat = pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=self._worker_id))

        async def ask() -> bool:
            answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._answer = answer
            await self._send(heartbeat)
            return await answer

        while True:
            await asyncio.sleep(self._interval)
            try:
                known = await asyncio.wait_for(ask(), self._answer_timeout)
            except asyncio.TimeoutError:
                return Ended("broken", f"heartbeat not answered within {self._answer_timeout:g} s")
            if not known:
                return Ended("unknown", "the scheduler no longer knows this worker")
            if not self._linked:
                self._linked = True
                log.info(
                    "heartbeats go over the link to scheduler %s (%s)",
                    self._peer.removeprefix("link:"),
                    f"Worker calls accepted as {self._caller.identity!r}"
                    if self._caller is not None
                    else "no Worker calls: [scheduler] calls_as is not set",
                )
            self._on_alive()

    async def _take(self, down: pb.LinkDown) -> None:
        kind = down.WhichOneof("kind")
        if kind == "heartbeat":
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(down.heartbeat.known)
        elif kind == "call":
            await self._start(down.call)
        elif kind == "cancel":
            running = self._calls.get(down.cancel.callID)
            if running is not None and not running[1].finished:
                running[1].cancelled = True
                running[0].cancel()

    async def _start(self, call: pb.LinkCall) -> None:
        """Run ``call`` in a task of its own, or refuse it at once."""
        if call.callID in self._calls:
            log.warning("scheduler link: call %d is already running; ignored", call.callID)
            return
        refusal = self._refusal(call)
        if refusal is not None:
            code, details = refusal
            await self._send(_reply(call.callID, last=True, code=code, details=details))
            return
        assert self._caller is not None
        timeout = call.timeoutMillis / 1000.0 if call.timeoutMillis else None
        ctx = LinkContext(self._caller, call.callID, self._peer, timeout, self._send)
        task = asyncio.ensure_future(self._serve(call, ctx))
        self._calls[call.callID] = (task, ctx)
        task.add_done_callback(lambda _: self._calls.pop(call.callID, None))

    def _refusal(self, call: pb.LinkCall) -> tuple[grpc.StatusCode, str] | None:
        if self._caller is None:
            text = (
                "this agent takes no Worker calls over the link ([scheduler] calls_as is not set)"
            )
            if self._service is not None:
                self._service.audit.record(
                    "rpc",
                    decision="deny",
                    identity="",
                    peer=self._peer,
                    rpc=call.method[:64],
                    reason=text,
                    rule="link-calls-not-accepted",
                )
            return grpc.StatusCode.PERMISSION_DENIED, text
        if len(self._calls) >= MAX_CALLS:
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._calls)} calls are running on the link, the agent's limit is "
                f"{MAX_CALLS}; try again later",
            )
        if call.method not in self._methods:
            return grpc.StatusCode.UNIMPLEMENTED, f"unknown Worker method {call.method[:64]!r}"
        return None

    async def _serve(self, call: pb.LinkCall, ctx: LinkContext) -> None:
        """One call through the Worker service's own handler; its answer on the link."""
        handler = self._methods[call.method]
        timer = None
        if call.timeoutMillis:
            task = asyncio.current_task()
            assert task is not None
            timer = asyncio.get_running_loop().call_later(
                call.timeoutMillis / 1000.0, functools.partial(_expire, ctx, task)
            )
        try:
            # The service's own decoder: bad bytes are its Malformed (INVALID_ARGUMENT).
            request = handler.request_deserializer(call.request)
            if handler.unary_unary is not None:
                res = await handler.unary_unary(request, ctx)
                await ctx.end(response=handler.response_serializer(res))
            else:
                await handler.unary_stream(request, ctx)
                await ctx.end()
        except LinkAbort as e:
            await ctx.end(e.code, e.details)
        except asyncio.CancelledError:
            if self._closing or not (ctx.expired or ctx.cancelled):
                raise  # the link is closing: nobody to answer
            if ctx.expired:
                await ctx.end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            else:
                await ctx.end(grpc.StatusCode.CANCELLED, "cancelled by the scheduler")
        except Exception as e:  # a bug: what gRPC answers a direct call, and the traceback
            log.exception("%s over the scheduler link failed", call.method)
            await ctx.end(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e)}: {e}")
        finally:
            if timer is not None:
                timer.cancel()


def _expire(ctx: LinkContext, task: asyncio.Task[None]) -> None:
    if not ctx.finished:
        ctx.expired = True
        task.cancel()
