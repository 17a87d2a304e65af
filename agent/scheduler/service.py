"""The reference scheduler's ``Scheduler`` service: registration and dispatch.

Workers (agents) register over mTLS; only certificate identities listed in
``[auth] workers`` are accepted. Each worker keeps its id across
re-registrations and is forgotten when it stops sending heartbeats (the
:mod:`~agent.scheduler.registry` decides both); calls naming a recently
forgotten worker fail with UNAVAILABLE (saying when it was last seen),
unknown ids with NOT_FOUND.

Legacy mode (``[legacy] addr``, loopback only): a second, plaintext listener
where workers of the original system, which dial without TLS and send no
heartbeats, may register and deregister. They have no identity (they show
as ``LEGACY_IDENTITY``), must advertise a loopback address (they are driven
without TLS too) and are never expired, as in the original scheduler.
Users still come through the mTLS listener and drive them like any worker.

Users listed in ``[auth] users`` may list workers and run, query and stop
jobs on a chosen worker through the scheduler, which drives the agent with
the same client library as ``agentctl`` (``agent.client.AsyncAgentClient``),
under its own identity and with a deadline on every call. They may also run
one job on many workers (fan-out runs: StartRun, FollowRun, CancelRun,
ListRuns, GetRun), which :mod:`agent.scheduler.runservice` serves once the
caller is checked here.

A registered worker may keep a link open (Link, :mod:`agent.scheduler.links`):
its heartbeats come up it, and when it accepts calls there, the dispatch calls
and fan-out runs reach it down its link instead of over a connection to its
address.

The caller is read from the call as the daemon reads it, and every refusal
is answered by the one status table (both in :mod:`agent.rpc`); an agent's
own answer to a dispatched call is relayed with the agent's status.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent.access import AccessDenied, AccessRules
from agent.channel import merge_options, reconnecting_channel_options
from agent.client import AgentClientError, AsyncAgentClient, TLSFiles
from agent.configfile import is_loopback_host, split_host_port
from agent.refusal import InvalidArgument, NotFound, PermissionDenied, Refusal, Unavailable
from agent.rpc import abort, peer_certificate
from agent.scheduler.config import SchedulerConfig
from agent.scheduler.links import Links, serve_link
from agent.scheduler.registry import LEGACY_IDENTITY, UnknownWorker, Worker, WorkerRegistry
from agent.scheduler.runs import RunManager
from agent.scheduler.runservice import RunService
from agent.scheduler.store import Store, StoreError
from agent.vocabulary import MAX_LABELS, label_problem

__all__ = ["SchedulerService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The scheduler's channels to agents, over the fast reconnects of a link.
AGENT_CHANNEL_OPTIONS = merge_options(
    reconnecting_channel_options(),
    [
        # gRPC takes its minimum reconnect backoff as the connect deadline too
        # (TCP and TLS handshake): half a second is too short when a fan-out
        # opens thousands of connections at once (measured: most of 1,000 new
        # hosts UNREACHABLE). Reconnects still start after half a second.
        ("grpc.min_reconnect_backoff_ms", 20_000),
        # An open connection to an agent costs the scheduler about 130 KiB and
        # a keepalive ping every few seconds: one idle for a minute is closed
        # (the next call reconnects), so a fan-out to 10,000 does not keep them.
        ("grpc.client_idle_timeout_ms", 60_000),
    ],
)


class SchedulerService:
    """Implements ``jobscheduler.Scheduler``."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        registry: WorkerRegistry,
        store: Store,
        *,
        legacy: bool = False,
    ) -> None:
        """Serve ``cfg`` with ``registry`` and ``store``; reads the agents' TLS files now.

        ``legacy``: this instance serves the plaintext listener (workers only).
        """
        self.cfg = cfg
        self.registry = registry
        self.legacy = legacy
        # One list per role, deny by default (the shared access rules).
        self.rules = {
            "worker": AccessRules(clients=frozenset(cfg.auth.workers)),
            "user": AccessRules(clients=frozenset(cfg.auth.users)),
        }
        self._clients: dict[tuple[str, bool], AsyncAgentClient] = {}  # by (address, legacy)
        a = cfg.agents
        assert a.ca_file and a.crt_file and a.key_file
        self._tls = TLSFiles(
            ca=a.ca_file.read_bytes(), cert=a.crt_file.read_bytes(), key=a.key_file.read_bytes()
        )
        # Workers' open links: their calls go down them rather than to their address.
        self.links = Links(a.call_timeout_seconds)
        self.runs = RunManager(store, registry, self._client, a.call_timeout_seconds)
        self._run_rpcs = RunService(self.runs, registry, store)

    # ---------------------------------------------------------- plumbing

    def _require(self, context: Any, role: str) -> str:
        """The caller's identity if the ``role`` list matches it, else a refusal."""
        if self.legacy:
            # The plaintext listener knows no identities: workers only.
            if role != "worker":
                raise PermissionDenied(
                    "the legacy (plaintext) listener serves workers only: use the mTLS one"
                )
            return LEGACY_IDENTITY
        _, peer = peer_certificate(context)
        ident = peer.identity
        try:
            # Patterns (*.agents.example.com, spiffe://td/worker/) match the SANs.
            self.rules[role].caller(ident, peer.sans).may_act_as(role)
        except AccessDenied:
            log.warning("refused %s %r from %s", role, ident, context.peer())
            raise
        return ident

    async def _guard(self, context: Any, body: Callable[[], Awaitable[T]]) -> T:
        try:
            return await body()
        except Refusal as e:
            await abort(context, e)
        except StoreError as e:
            # etcd without a quorum (or a broken SQLite file): try again later.
            log.error("store: %s", e)
            await abort(context, Unavailable(f"the scheduler's store is unavailable: {e}"))

    def _worker(self, worker_id: str) -> Worker:
        try:
            return self.registry.get(worker_id)
        except UnknownWorker as e:
            if e.forgotten is not None:
                ago = time.time() - e.forgotten.last_seen
                raise Unavailable(
                    f"worker {worker_id} ({e.forgotten.address}) is not registered: "
                    f"last heard from {ago:.0f} s ago"
                ) from None
            raise NotFound(f"no worker with id {worker_id}") from None

    def _client(self, w: Worker) -> AsyncAgentClient:
        """The client of a worker: down its link if it has one accepting calls here, else
        over a (shared) connection to its address."""
        linked = self.links.client(w.worker_id)
        if linked is not None:
            return linked
        c = self._clients.get((w.address, w.legacy))
        if c is None:
            # Fast reconnects: a worker back from a network cut is usable at once.
            # An original worker (legacy, loopback) only speaks plaintext.
            c = AsyncAgentClient(
                w.address,
                None if w.legacy else self._tls,
                insecure=w.legacy,
                timeout=self.cfg.agents.call_timeout_seconds,
                options=AGENT_CHANNEL_OPTIONS,
            )
            self._clients[(w.address, w.legacy)] = c
        return c

    async def _dispatch(
        self, context: Any, worker_id: str, call: Callable[[AsyncAgentClient], Awaitable[T]]
    ) -> T:
        self._require(context, "user")
        w = self._worker(worker_id)
        try:
            return await call(self._client(w))
        except AgentClientError as e:
            # Not a refusal of ours: the agent's own status, relayed as it answered.
            await context.abort(e.code, f"worker {worker_id} ({w.address}): {e.details}")
            raise AssertionError("unreachable") from None  # abort() raises

    # ---------------------------------------------------------- RPCs

    async def RegisterWorker(self, request: pb.RegisterReq, context: Any) -> pb.RegisterRes:
        """A worker (on the ``workers`` list) registers; its id is stable."""

        async def body() -> pb.RegisterRes:
            ident = self._require(context, "worker")
            try:
                host, _ = split_host_port(request.address)
            except ValueError as e:
                raise InvalidArgument(f"address {request.address[:200]!r}: {e}") from None
            if self.legacy and not is_loopback_host(host):
                # Jobs for it would travel in plaintext: never off the machine.
                raise InvalidArgument(
                    f"address {request.address[:200]!r}: a legacy worker must be on loopback"
                )
            labels = dict(request.labels)
            if len(labels) > MAX_LABELS:
                raise InvalidArgument(f"labels: at most {MAX_LABELS}, got {len(labels)}")
            for k, v in labels.items():
                problem = label_problem(k, v)
                if problem:
                    raise InvalidArgument(problem)
            w = self.registry.register(ident, request.address, legacy=self.legacy, labels=labels)
            log.info("worker %s registered: identity %s, address %s", w.worker_id, ident, w.address)
            return pb.RegisterRes(
                success=True,
                workerID=w.worker_id,
                heartbeatSeconds=self.cfg.registry.heartbeat_seconds,
            )

        return await self._guard(context, body)

    async def DeregisterWorker(self, request: pb.DeregisterReq, context: Any) -> pb.DeregisterRes:
        """A worker leaves; only its own identity may remove it."""

        async def body() -> pb.DeregisterRes:
            ident = self._require(context, "worker")
            ok = self.registry.deregister(request.workerID, ident)
            if ok:
                log.info("worker %s deregistered", request.workerID)
            return pb.DeregisterRes(success=ok)

        return await self._guard(context, body)

    async def Heartbeat(self, request: pb.HeartbeatReq, context: Any) -> pb.HeartbeatRes:
        """A worker renews its registration; ``known`` False tells it to register again."""

        async def body() -> pb.HeartbeatRes:
            ident = self._require(context, "worker")
            return pb.HeartbeatRes(known=self.registry.heartbeat(request.workerID, ident))

        return await self._guard(context, body)

    async def Link(self, request_iterator: Any, context: Any) -> None:
        """A registered worker's link: heartbeats, and the Worker calls it accepts.

        Read and written through ``context`` (``request_iterator`` is not used).
        """
        if self.legacy:
            # Original workers know no links; an agent here keeps its Heartbeat calls.
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "the legacy (plaintext) listener has no links"
            )
        try:
            ident = self._require(context, "worker")
            await serve_link(self.links, self.registry, ident, context)
        except Refusal as e:
            await abort(context, e)
        except StoreError as e:
            log.error("store: %s", e)
            await abort(context, Unavailable(f"the scheduler's store is unavailable: {e}"))

    async def ListWorkers(self, request: pb.ListWorkersReq, context: Any) -> pb.ListWorkersRes:
        """Registered workers, oldest first (users only)."""

        async def body() -> pb.ListWorkersRes:
            self._require(context, "user")
            out = pb.ListWorkersRes()
            for w in self.registry.live():
                info = out.workers.add(
                    workerID=w.worker_id, address=w.address, identity=w.identity, labels=w.labels
                )
                info.registeredAt.FromNanoseconds(int(w.registered_at * 1e9))
                info.lastSeen.FromNanoseconds(int(w.last_seen * 1e9))
            return out

        return await self._guard(context, body)

    async def DispatchStartJob(
        self, request: pb.DispatchStartJobReq, context: Any
    ) -> pb.StartJobRes:
        """Start a job on a worker (users only); never retried."""
        job = request.job

        async def call(c: AsyncAgentClient) -> pb.StartJobRes:
            # start_pb is never retried by the client library: never twice.
            return pb.StartJobRes(jobID=await c.start_pb(job))

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    async def DispatchQueryJob(self, request: pb.DispatchJobReq, context: Any) -> pb.QueryJobRes:
        """A job's status on a worker (users only)."""

        async def call(c: AsyncAgentClient) -> pb.QueryJobRes:
            return await c.query_pb(request.jobID)

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    async def DispatchStopJob(self, request: pb.DispatchJobReq, context: Any) -> pb.StopJobRes:
        """Stop a job on a worker (users only)."""

        async def call(c: AsyncAgentClient) -> pb.StopJobRes:
            await c.stop(request.jobID)
            return pb.StopJobRes()

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    # ---------------------------------------------------------- fan-out runs

    async def StartRun(self, request: pb.StartRunReq, context: Any) -> pb.RunInfo:
        """Start one job on many workers (users only); answers once it is under way."""

        async def body() -> pb.RunInfo:
            return self._run_rpcs.start(self._require(context, "user"), request)

        return await self._guard(context, body)

    async def FollowRun(self, request: pb.RunReq, context: Any) -> AsyncIterator[pb.RunEvent]:
        """A run's host changes and output lines from its start, then its summary."""
        try:
            self._require(context, "user")
            events = self._run_rpcs.follow(request)
            async for e in events:
                yield e
        except Refusal as e:
            await abort(context, e)
        except StoreError as e:
            await abort(context, Unavailable(f"the scheduler's store is unavailable: {e}"))

    async def CancelRun(self, request: pb.RunReq, context: Any) -> pb.RunInfo:
        """Stop a run's running jobs and start nothing more (users only)."""

        async def body() -> pb.RunInfo:
            self._require(context, "user")
            return self._run_rpcs.cancel(request)

        return await self._guard(context, body)

    async def ListRuns(self, request: pb.ListRunsReq, context: Any) -> pb.ListRunsRes:
        """Runs, newest first (users only)."""

        async def body() -> pb.ListRunsRes:
            self._require(context, "user")
            return self._run_rpcs.list(request)

        return await self._guard(context, body)

    async def GetRun(self, request: pb.RunReq, context: Any) -> pb.RunInfo:
        """One run with every host (users only)."""

        async def body() -> pb.RunInfo:
            self._require(context, "user")
            return self._run_rpcs.get(request)

        return await self._guard(context, body)

    async def close(self) -> None:
        """Interrupt the runs going on and close the channels to agents."""
        await self.runs.close()
        self.links.close_all("closed: the scheduler stops")
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
