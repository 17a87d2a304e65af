"""Workers' links (``Scheduler.Link``): the open ones, and Worker calls carried down them.

A worker opens its link after RegisterWorker, on the same connection, and
keeps it open (docs/fleet.md "The worker link"). Its first message is a hello
naming its worker id, which must be registered under this link's caller
identity; then its heartbeats come up the link and are answered in order
(the registry's heartbeat, as the Heartbeat RPC answers). When the hello says
the worker accepts calls, the scheduler sends the Worker calls of its runs and
dispatches down the link (:class:`LinkStub`, which has the generated
``WorkerStub``'s shape, so :class:`~agent.client.AsyncAgentClient` works over it
unchanged) instead of connecting to the worker's address.

:class:`Links` remembers the open link of each worker id (of this scheduler
process: with several replicas, each knows only the links it holds); a newer
link of a worker replaces and ends its older one, and a link is forgotten when
it ends. What one link can make the scheduler hold is bounded: calls in flight
(the worker's ``maxCalls``, at most :data:`MAX_CALLS`), answers received but
not yet read (:data:`HELD_BYTES`, then the link is read no further until they
are), messages waiting to go down it (:data:`OUT_QUEUED`), and each message (gRPC's
receive limit, 4 MiB).

A carried call fails as a direct call would: its status and details as the
worker answered; UNAVAILABLE once the link is closed (every pending call at
once); DEADLINE_EXCEEDED at its deadline, and then the worker is told to cancel
it (LinkCancel), as it is when a caller abandons a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from agent._proto import jobscheduler_pb2 as pb
from agent.client import AsyncAgentClient
from agent.refusal import InvalidArgument, NotFound, PermissionDenied, Refusal, Unavailable
from agent.scheduler.linklog import LinkLog
from agent.scheduler.registry import UnknownWorker, WorkerRegistry
from agent.scheduler.store import StoreError

__all__ = ["HELD_BYTES", "MAX_CALLS", "OUT_QUEUED", "Link", "LinkStub", "Links"]

log = logging.getLogger(__name__)

# Calls in flight on one link at most, whatever the worker's maxCalls says.
MAX_CALLS = 64
# Answers received on one link and not yet read by their callers: past this,
# the link is not read until they are (the worker waits, as under gRPC flow control).
HELD_BYTES = 4 * 1024 * 1024
# Messages waiting to go down one link: past this, the link's heartbeats are
# not read until the worker reads what it was sent.
OUT_QUEUED = 64
_ITEM_COST = 64  # bytes counted for an answer beyond its payload

# The response message of each Worker method a link carries.
RESPONSES: dict[str, type[Message]] = {
    "StartJob": pb.StartJobRes,
    "StopJob": pb.StopJobRes,
    "QueryJob": pb.QueryJobRes,
    "WaitJob": pb.QueryJobRes,
    "ListJobs": pb.ListJobsRes,
    "RunJob": pb.QueryJobRes,
    "StreamJobOutput": pb.StreamJobOutputRes,
    "StartJobStream": pb.StreamJobOutputRes,
}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a direct call with this status raises (the client converts it the same)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Call:
    """One call in flight on a link: its answers as they come, until its end."""

    __slots__ = ("call_id", "items", "ready", "timer")

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id
        self.items: deque[pb.LinkReply | grpc.aio.AioRpcError] = deque()
        self.ready = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    def put(self, item: pb.LinkReply | grpc.aio.AioRpcError) -> None:
        self.items.append(item)
        self.ready.set()


class Link:
    """One open link: the worker, its calls in flight, what waits to go down it.

    Messages go down through one writer, a task that runs only while some
    wait (an idle link holds no task of its own but its handler's).
    """

    __slots__ = (
        "_calls",
        "_held",
        "_next_id",
        "_out",
        "_room_waiter",
        "_write",
        "_writer",
        "accepts_calls",
        "closed",
        "evicted",
        "handler",
        "identity",
        "max_calls",
        "peer",
        "worker_id",
    )

    def __init__(
        self,
        worker_id: str,
        identity: str,
        peer: str,
        accepts_calls: bool,
        max_calls: int,
        write: Callable[[pb.LinkDown], Awaitable[None]],
    ) -> None:
        """A link that ``identity`` (from ``peer``) opened for ``worker_id``; ``write``
        sends one message down it (the call's ``context.write``)."""
        self.worker_id = worker_id
        self.identity = identity
        self.peer = peer
        self.accepts_calls = accepts_calls
        self.max_calls = min(max_calls, MAX_CALLS) if max_calls > 0 else MAX_CALLS
        self.closed: str | None = None  # why, once closed
        self.evicted = False  # closed by the scheduler (replaced, stopping), not the worker
        self._write = write
        self._out: deque[pb.LinkDown] | None = None  # made when something waits
        self._writer: asyncio.Task[None] | None = None
        self.handler: asyncio.Task[Any] | None = None  # the task reading the link
        self._room_waiter: asyncio.Future[None] | None = None
        self._calls: dict[int, _Call] = {}
        self._next_id = 0
        self._held = 0

    # ---------------------------------------------------------- the handler's side

    async def room(self) -> None:
        """Wait while too much waits to go down or to be read (the reader, between messages)."""
        while self.closed is None and (self._queued() >= OUT_QUEUED or self._held >= HELD_BYTES):
            self._room_waiter = asyncio.get_running_loop().create_future()
            await self._room_waiter

    def _queued(self) -> int:
        return len(self._out) if self._out is not None else 0

    def _wake_room(self) -> None:
        w = self._room_waiter
        if w is not None:
            self._room_waiter = None
            if not w.done():
                w.set_result(None)

    def send(self, msg: pb.LinkDown) -> None:
        """Queue a message to go down (bounded: heartbeats wait in :meth:`room`, calls in
        :data:`MAX_CALLS`)."""
        if self.closed is not None:
            return
        if self._out is None:
            self._out = deque()
        self._out.append(msg)
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """The one writer: sends what waits, in order, then ends."""
        try:
            while self._out and self.closed is None:
                await self._write(self._out.popleft())
                self._wake_room()
        except Exception as e:  # the stream broke under the write
            self.close(f"broken ({e.__class__.__name__})")
        finally:
            self._writer = None
            self._out = None  # an idle link keeps no queue

    def deliver(self, reply: pb.LinkReply) -> None:
        """An answer came up; one for no call in flight (ended, cancelled) is dropped."""
        call = self._calls.get(reply.callID)
        if call is None:
            return
        if reply.last:
            self._end(call)
        self._held += len(reply.response) + _ITEM_COST
        call.put(reply)

    def close(self, why: str) -> None:
        """End the link: every call in flight fails UNAVAILABLE, nothing more goes down."""
        if self.closed is not None:
            return
        self.closed = why
        err = rpc_error(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: link {why}")
        for call in list(self._calls.values()):
            self._end(call)
            call.put(err)
        self._out = None
        self._wake_room()

    def evict(self, why: str) -> None:
        """Closed by the scheduler: the handler stops reading and tells the worker ``why``."""
        if self.closed is None:
            self.evicted = True
            self.close(why)
            if self.handler is not None and self.handler is not asyncio.current_task():
                self.handler.cancel()

    def stop_writer(self) -> None:
        """The call is over: a write still under way is abandoned."""
        w = self._writer
        if w is not None and w is not asyncio.current_task():
            w.cancel()

    # ---------------------------------------------------------- the callers' side

    def _open_call(self, method: str, request: Message, timeout: float | None) -> _Call:
        if self.closed is not None:
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: link {self.closed}"
            )
        if len(self._calls) >= self.max_calls:
            raise rpc_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"worker {self.worker_id}: {len(self._calls)} calls in flight on its link",
            )
        self._next_id += 1
        call = _Call(self._next_id)
        self._calls[call.call_id] = call
        millis = 0
        if timeout is not None:
            millis = max(1, int(timeout * 1000))
            call.timer = asyncio.get_running_loop().call_later(timeout, self._expire, call)
        self.send(
            pb.LinkDown(
                call=pb.LinkCall(
                    callID=call.call_id,
                    method=method,
                    request=request.SerializeToString(),
                    timeoutMillis=millis,
                )
            )
        )
        return call

    def _end(self, call: _Call) -> None:
        """The call is over (answered, expired, abandoned, or the link closed)."""
        self._calls.pop(call.call_id, None)
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None

    def _expire(self, call: _Call) -> None:
        call.timer = None
        if self._calls.get(call.call_id) is call:
            self._cancel(call)
            call.put(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _cancel(self, call: _Call) -> None:
        """Stop waiting for a call in flight and tell the worker to cancel it."""
        self._end(call)
        self.send(pb.LinkDown(cancel=pb.LinkCancel(callID=call.call_id)))

    def _drop(self, call: _Call) -> None:
        """Forget what a call holds (its caller is gone)."""
        while call.items:
            self._take(call)

    def _take(self, call: _Call) -> pb.LinkReply | grpc.aio.AioRpcError:
        item = call.items.popleft()
        if isinstance(item, pb.LinkReply):
            self._held -= len(item.response) + _ITEM_COST
            self._wake_room()
        return item

    async def _next(self, call: _Call) -> pb.LinkReply:
        """The call's next answer (raises its error)."""
        while not call.items:
            call.ready.clear()
            await call.ready.wait()
        item = self._take(call)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        if item.last and item.code != 0:
            raise rpc_error(_CODES.get(item.code, grpc.StatusCode.UNKNOWN), item.details)
        return item

    async def unary(self, method: str, request: Message, timeout: float | None) -> Message:
        """One unary Worker call down the link: its response (or its error raised)."""
        call = self._open_call(method, request, timeout)
        try:
            reply = await self._next(call)
            return _parse(method, reply.response)
        finally:
            if self._calls.get(call.call_id) is call:
                self._cancel(call)  # answered but not ended, or the caller gave up
            self._drop(call)

    async def stream(
        self, method: str, request: Message, timeout: float | None
    ) -> AsyncIterator[Message]:
        """A server-streaming Worker call down the link: its responses, then its end."""
        call = self._open_call(method, request, timeout)
        try:
            while True:
                reply = await self._next(call)
                if reply.response or not reply.last:
                    yield _parse(method, reply.response)
                if reply.last:
                    return
        finally:
            if self._calls.get(call.call_id) is call:
                self._cancel(call)  # abandoned before its end
            self._drop(call)


def _parse(method: str, data: bytes) -> Message:
    try:
        return RESPONSES[method].FromString(data)
    except DecodeError:
        raise rpc_error(
            grpc.StatusCode.INTERNAL, f"{method}: the worker's answer on its link is malformed"
        ) from None


class LinkStub:
    """``WorkerStub``'s shape over a worker's link (what AsyncAgentClient calls).

    Each call goes down the worker's link open at that moment (a retry finds a
    newer link); with none open it fails UNAVAILABLE.
    """

    __slots__ = ("_links", "_worker_id")

    def __init__(self, links: Links, worker_id: str) -> None:
        """Calls to ``worker_id`` through ``links``."""
        self._links = links
        self._worker_id = worker_id

    def _link(self) -> Link:
        link = self._links.get(self._worker_id)
        if link is None or not link.accepts_calls:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"worker {self._worker_id}: no link open")
        return link

    async def StartJob(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("StartJob", request, timeout)

    async def StopJob(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("StopJob", request, timeout)

    async def QueryJob(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("QueryJob", request, timeout)

    async def WaitJob(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("WaitJob", request, timeout)

    async def ListJobs(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("ListJobs", request, timeout)

    async def RunJob(self, request: Message, timeout: float | None = None) -> Message:
        """As the generated stub's."""
        return await self._link().unary("RunJob", request, timeout)

    async def StreamJobOutput(
        self, request: pb.StreamJobOutputReq, timeout: float | None = None
    ) -> AsyncIterator[Message]:
        """The job's output messages, as the generated stub's stream gives them."""
        async for msg in self._link().stream("StreamJobOutput", request, timeout):
            yield msg

    async def StartJobStream(
        self, request: pb.StartJobReq, timeout: float | None = None
    ) -> AsyncIterator[Message]:
        """The new job's id, output and status messages, as the generated stub's stream."""
        async for msg in self._link().stream("StartJobStream", request, timeout):
            yield msg


class Links:
    """The open link of each worker id, at this scheduler process."""

    def __init__(self, call_timeout: float) -> None:
        """No links yet; clients over them have ``call_timeout`` as their default deadline."""
        self.call_timeout = call_timeout
        self._links: dict[str, Link] = {}
        self._clients: dict[str, AsyncAgentClient] = {}
        self.said = LinkLog(log, self._counts)  # one INFO line a period

    def _counts(self) -> tuple[int, int]:
        """Links open, and how many of them accept calls."""
        return len(self._links), sum(link.accepts_calls for link in self._links.values())

    def __len__(self) -> int:
        return len(self._links)

    def get(self, worker_id: str) -> Link | None:
        """The worker's open link, if it has one here."""
        return self._links.get(worker_id)

    def client(self, worker_id: str) -> AsyncAgentClient | None:
        """A client whose calls go down the worker's link, if it has one accepting calls."""
        link = self._links.get(worker_id)
        if link is None or not link.accepts_calls:
            return None
        c = self._clients.get(worker_id)
        if c is None:
            c = AsyncAgentClient.over_stub(
                LinkStub(self, worker_id), f"link:{worker_id}", timeout=self.call_timeout
            )
            self._clients[worker_id] = c
        return c

    def open(
        self,
        registry: WorkerRegistry,
        identity: str,
        peer: str,
        hello: pb.LinkHello,
        write: Callable[[pb.LinkDown], Awaitable[None]],
    ) -> Link:
        """A new link from a hello (Refusal if the hello may not open one); it replaces
        and ends the worker's older link."""
        try:
            w = registry.get(hello.workerID)
        except UnknownWorker:
            raise NotFound(
                f"worker {hello.workerID[:100]!r}: not registered: register again"
            ) from None
        if w.identity != identity:
            raise PermissionDenied(
                f"worker {w.worker_id} is registered by another identity than {identity!r}"
            )
        link = Link(w.worker_id, identity, peer, hello.acceptsCalls, hello.maxCalls, write)
        old = self._links.get(w.worker_id)
        self._links[w.worker_id] = link
        if old is not None:
            old.evict("replaced by a newer link of the worker")
        return link

    def remove(self, link: Link) -> None:
        """A link ended: forgotten (unless a newer one replaced it)."""
        if self._links.get(link.worker_id) is link:
            del self._links[link.worker_id]
            self._clients.pop(link.worker_id, None)

    def close_all(self, why: str) -> None:
        """End every link (the scheduler stops)."""
        for link in list(self._links.values()):
            link.evict(why)
        self.said.close()


async def serve_link(links: Links, registry: WorkerRegistry, identity: str, context: Any) -> None:
    """One Link call (``context`` is its gRPC context): check its hello, then answer
    heartbeats and carry calls until it ends.

    Raises a Refusal for a bad hello, a message out of place, or a link the
    scheduler ended (the caller aborts the call with its status), StoreError when
    a heartbeat could not be kept.
    """
    first = await context.read()
    if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
        raise InvalidArgument("a link starts with a hello")
    peer = context.peer()
    link = links.open(registry, identity, peer, first.hello, context.write)
    del first
    link.handler = asyncio.current_task()
    links.said.opened_one(link.worker_id, peer, link.accepts_calls)
    why = "broken"
    try:
        while True:
            up = await context.read()
            if up is grpc.aio.EOF:
                why = "ended by the worker"
                return
            kind = up.WhichOneof("kind")
            if kind == "heartbeat":
                known = registry.heartbeat(up.heartbeat.workerID, identity)
                link.send(pb.LinkDown(heartbeat=pb.HeartbeatRes(known=known)))
            elif kind == "reply":
                link.deliver(up.reply)
            else:
                raise InvalidArgument(f"link: a {kind or 'empty'} message after the hello")
            await link.room()
    except asyncio.CancelledError:
        if not link.evicted:
            raise  # the worker went away
        raise Unavailable(f"link {link.closed}") from None
    except Refusal as e:
        why = e.message
        raise
    except StoreError:
        why = "ended: the scheduler's store is unavailable"
        raise
    finally:
        link.close(why)
        link.stop_writer()
        links.remove(link)
        links.said.closed_one(link.worker_id, peer, link.closed or why)
