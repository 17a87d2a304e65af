"""Registration with the scheduler: register, keep alive, deregister.

The original worker dialled the scheduler without TLS and exited when it was
down. Here the agent calls ``RegisterWorker`` over mTLS (its own client
certificate, the scheduler's certificate verified against the configured
CA; plaintext only on loopback with ``[scheduler] use_tls = false`` and
``allow_plaintext_loopback = true``), retries with exponential backoff and
full jitter for as long as it takes, never exits because of the scheduler,
sends ``Heartbeat`` to keep the registration alive and registers again when
the scheduler has forgotten it (a restart, or a network cut longer than the
scheduler's expiry), and calls ``DeregisterWorker`` on shutdown. With
``[scheduler] addrs`` (several schedulers sharing one etcd store), a failed
registration or heartbeat moves on to the next address and registers there:
the schedulers share the registry, so the worker keeps its id.

With ``[scheduler] link = true`` (the default) the heartbeats go over the
scheduler's ``Link`` stream (:mod:`agent.daemon.link`), opened on the same
connection after each registration; it also carries the scheduler's Worker
calls when ``calls_as`` is set. A link that breaks is a failed heartbeat, one
the scheduler refuses (it forgot the worker) an unknown worker; a scheduler
without ``Link`` (UNIMPLEMENTED) gets ``Heartbeat`` calls until the agent
registers with it again.

An original scheduler (the Go one this protocol comes from) differs in two
ways, and the agent adapts once, quietly: its ``RegisterWorker`` answers a
``workerID`` without setting ``success`` (a non-empty id is taken as
registered), and it has no ``Heartbeat`` (UNIMPLEMENTED). It never forgets a
worker either, so there the agent registers exactly once per connection to
it: it re-registers only when that connection is lost (the scheduler went
away, so a new one knows nothing of us), never on a timer. Its probes are
calls the scheduler answers (UNIMPLEMENTED counts as an answer), and its
channel sends no keepalive pings between calls: a Go server closes a
connection that pings more often than every five minutes without calls,
which would look like a lost connection and register the agent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import backoff, merge_options, reconnecting_channel_options
from agent.daemon.link import Ended, LinkSession
from agent.daemon.service import WorkerService
from agent.tls import KeyPair

__all__ = ["Registrar", "backoff", "reconnecting_channel_options"]

log = logging.getLogger(__name__)


# A channel to an original scheduler: keepalive pings only during calls and
# no sooner than Go's default permitted interval (5 min), and no idle
# timeout (the channel going idle would read as a lost connection).
_LEGACY_OPTIONS = [
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.client_idle_timeout_ms", 2**31 - 1),
]


class Registrar:
    """Keeps this agent registered with the scheduler."""

    def __init__(
        self,
        *,
        scheduler_addr: str,
        fallback_addrs: Sequence[str] = (),
        advertise_addr: str,
        pair: KeyPair | None,
        ca_pem: bytes | None,
        server_name: str = "",
        heartbeat: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        call_timeout: float = 5.0,
        on_event: Callable[..., None] | None = None,
        labels: Mapping[str, str] | None = None,
        link: bool = False,
        service: WorkerService | None = None,
        calls_as: str = "",
    ) -> None:
        """Register ``advertise_addr``; ``pair`` and ``ca_pem`` None: plaintext (loopback).

        ``link``: heartbeats over Scheduler.Link, which carries ``service``'s calls as
        ``calls_as`` when it is set (empty: none)."""
        self.scheduler_addr = scheduler_addr
        # Schedulers sharing a store: registering with any one is enough.
        self._addrs = [scheduler_addr, *(a for a in fallback_addrs if a != scheduler_addr)]
        self._addr_index = 0
        self.advertise_addr = advertise_addr
        self.labels = dict(labels or {})  # an original scheduler ignores the field
        self.heartbeat = heartbeat
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.call_timeout = call_timeout
        self.link = link
        self._service = service
        self._calls_as = calls_as
        self._no_link: set[str] = set()  # schedulers said to have no Link (logged once)
        self._delay = backoff(retry_initial, retry_max)
        self.worker_id = ""
        self.legacy = False  # an original scheduler (no success flag, no Heartbeat)
        self.registered = asyncio.Event()
        self._on_event = on_event or (lambda **kw: None)
        self._creds: grpc.ChannelCredentials | None = None
        if pair is not None and ca_pem is not None:
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=ca_pem, private_key=pair.key_pem, certificate_chain=pair.cert_pem
            )
        self._options = reconnecting_channel_options(server_name)
        self._channel = self._open(self._options)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._last_problem = ""

    def _open(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if self._creds is None:
            return grpc.aio.insecure_channel(self.scheduler_addr, options=options)
        return grpc.aio.secure_channel(self.scheduler_addr, self._creds, options=options)

    async def _next_scheduler(self) -> None:
        """Fail over to the next scheduler of ``[scheduler] addrs`` (if there is one)."""
        if len(self._addrs) < 2 or self.legacy:
            return
        self._addr_index = (self._addr_index + 1) % len(self._addrs)
        self.scheduler_addr = self._addrs[self._addr_index]
        log.info("trying scheduler %s", self.scheduler_addr)
        old = self._channel
        self._channel = self._open(self._options)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._last_problem = ""
        await old.close()

    def start(self) -> None:
        """Run the registration loop in the background."""
        self._task = asyncio.ensure_future(self._loop())

    def _problem(self, text: str) -> None:
        # Log a failure once per kind, not at every retry.
        if text != self._last_problem:
            self._last_problem = text
            log.warning("scheduler %s: %s (retrying with backoff)", self.scheduler_addr, text)
            self._on_event(decision="error", reason=text, rpc="RegisterWorker")

    async def _become_legacy(self, why: str) -> None:
        """Switch to the original protocol's rules, once (see the module docstring)."""
        if self.legacy:
            return
        self.legacy = True
        log.info(
            "scheduler %s speaks the original protocol (%s): keeping the registration "
            "until the connection to it is lost, no heartbeats",
            self.scheduler_addr,
            why,
        )
        self._on_event(decision="ok", reason=f"original scheduler: {why}", rpc="RegisterWorker")
        old = self._channel
        self._channel = self._open(merge_options(self._options, _LEGACY_OPTIONS))
        self._stub = pb_grpc.SchedulerStub(self._channel)
        await old.close()

    async def _register(self) -> float:
        """Register until it works; returns the heartbeat interval to use."""
        delay = backoff(self.retry_initial, self.retry_max)
        while True:
            try:
                res = await self._stub.RegisterWorker(
                    pb.RegisterReq(address=self.advertise_addr, labels=self.labels),
                    timeout=self.call_timeout,
                )
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    self._problem(f"registration refused: {e.details()}")
                else:
                    self._problem(f"cannot register: {code.name}: {e.details()}")
                    await self._next_scheduler()
            else:
                # An original scheduler never sets success: its workerID is
                # the whole answer. Refusing it would register again and
                # again, each time adding an entry it never removes.
                if res.workerID:
                    self.worker_id = res.workerID
                    self._last_problem = ""
                    self.registered.set()
                    log.info(
                        "registered with scheduler %s as worker %s (address %s)",
                        self.scheduler_addr,
                        res.workerID,
                        self.advertise_addr,
                    )
                    self._on_event(
                        decision="ok", reason=f"registered as {res.workerID}", rpc="RegisterWorker"
                    )
                    if not res.success:
                        await self._become_legacy("success not set")
                    return float(res.heartbeatSeconds or self.heartbeat)
                self._problem("registration refused (no workerID)")
            await asyncio.sleep(delay())

    async def _loop(self) -> None:
        while True:
            interval = await self._register()
            if not self.legacy:
                await self._keep_alive(interval)
            if self.legacy:
                await self._watch_connection(interval)
            self.registered.clear()

    async def _keep_alive(self, interval: float) -> None:
        """Heartbeat (on the link, where the scheduler has one) until it no longer knows us."""
        self._delay = backoff(self.retry_initial, self.retry_max)
        linked = self.link
        while True:
            if linked:
                kind, text = await self._link_session(interval)
            else:
                await asyncio.sleep(interval)
                kind, text = await self._heartbeat()
            if kind == "unimplemented":
                if not linked:
                    await self._become_legacy("no Heartbeat")
                    return
                linked = False  # Heartbeat calls to this one, until we register again
                if self.scheduler_addr not in self._no_link:
                    self._no_link.add(self.scheduler_addr)
                    log.info("scheduler %s has no Link: heartbeats as calls", self.scheduler_addr)
            elif kind == "unknown":
                log.info(
                    "scheduler %s no longer knows worker %s: registering again",
                    self.scheduler_addr,
                    self.worker_id,
                )
                log.debug("scheduler %s: %s", self.scheduler_addr, text)
                return
            elif kind == "broken":
                self._problem(text)
                if len(self._addrs) > 1:
                    await self._next_scheduler()
                    return  # register with the next one (it shares the registry)
                # Unreachable: keep trying; the scheduler may forget us
                # meanwhile, which the next heartbeat (or the link's hello) tells.
                await asyncio.sleep(max(0.0, self._delay() - (0.0 if linked else interval)))

    def _alive(self) -> None:
        """A heartbeat was answered: the scheduler knows us."""
        if self._last_problem:
            log.info("scheduler %s reachable again", self.scheduler_addr)
            self._last_problem = ""
        self._delay = backoff(self.retry_initial, self.retry_max)

    async def _heartbeat(self) -> tuple[str, str]:
        """One Heartbeat call: "ok", "unknown", "unimplemented" or "broken", and why."""
        try:
            res = await self._stub.Heartbeat(
                pb.HeartbeatReq(workerID=self.worker_id), timeout=self.call_timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "unimplemented", ""
            return "broken", f"heartbeat failed: {e.code().name}: {e.details()}"
        if not res.known:
            return "unknown", ""
        self._alive()
        return "ok", ""

    async def _link_session(self, interval: float) -> Ended:
        """Heartbeats (and the scheduler's calls) over one Link stream, until it ends."""
        session = LinkSession(
            self._stub,
            worker_id=self.worker_id,
            interval=interval,
            answer_timeout=self.call_timeout,
            peer=f"link:{self.scheduler_addr}",
            service=self._service,
            calls_as=self._calls_as,
            on_alive=self._alive,
        )
        return await session.run()

    async def _probe(self) -> bool:
        """True if the scheduler answers a call (UNIMPLEMENTED is an answer)."""
        try:
            await self._stub.Heartbeat(
                pb.HeartbeatReq(workerID=self.worker_id), timeout=self.call_timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                self._problem(f"connection lost: {e.code().name}: {e.details()}")
                return False
        return True

    async def _connection_lost(self) -> None:
        """Return once the channel leaves READY (the connection is gone)."""
        state = self._channel.get_state()
        while state == grpc.ChannelConnectivity.READY:
            await self._channel.wait_for_state_change(state)
            state = self._channel.get_state()

    async def _watch_connection(self, interval: float) -> None:
        """An original scheduler: return when the registration may be lost."""
        # The probe also connects the (new) legacy channel.
        if not await self._probe():
            return
        lost = asyncio.ensure_future(self._connection_lost())
        try:
            while True:
                done, _ = await asyncio.wait({lost}, timeout=interval)
                if done:
                    log.info(
                        "connection to scheduler %s lost: registering again", self.scheduler_addr
                    )
                    return
                if not await self._probe():
                    return
        finally:
            lost.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lost

    async def stop(self, *, deregister: bool) -> None:
        """Stop the loop; tell the scheduler we are leaving (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if deregister and self.worker_id:
            try:
                await self._stub.DeregisterWorker(
                    pb.DeregisterReq(workerID=self.worker_id), timeout=min(self.call_timeout, 3.0)
                )
                log.info("deregistered from scheduler %s", self.scheduler_addr)
                self._on_event(decision="ok", reason="deregistered", rpc="DeregisterWorker")
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "could not deregister from scheduler %s: %s", self.scheduler_addr, e.code().name
                )
        await self._channel.close()
