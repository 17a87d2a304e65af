"""A reference scheduler: the ``Scheduler`` service, a worker registry, dispatch.

Workers (agents) register over mTLS; only certificate identities listed in
``[auth] workers`` are accepted. Each worker is identified by an id that is
stable for its (identity, address): a worker that re-registers, for example
after a network cut made the scheduler forget it, gets its old id back, so
jobs started through the scheduler stay addressable. Workers that stop
sending heartbeats are forgotten after ``expire_seconds``; calls naming a
recently forgotten worker fail with UNAVAILABLE (saying when it was last
seen), unknown ids with NOT_FOUND.

Legacy mode (``[legacy] addr``, loopback only): a second, plaintext listener
where workers of the original system, which dial without TLS and send no
heartbeats, may register and deregister. They have no identity (they show
as ``LEGACY_IDENTITY``), must advertise a loopback address (they are driven
without TLS too) and are never expired, as in the original scheduler.
Users still come through the mTLS listener and drive them like any worker.

Users listed in ``[auth] users`` may list workers and run, query and stop
jobs on a chosen worker through the scheduler, which drives the agent with
the same client library as ``agentctl`` (``agent.client.AsyncAgentClient``),
under its own identity and with a deadline on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.access import AccessDenied, AccessRules, pattern_problem
from agent.channel import reconnecting_channel_options, server_keepalive_options
from agent.client import AgentClientError, AsyncAgentClient, TLSFiles
from agent.configfile import (
    ConfigError,
    is_loopback_host,
    option,
    parse_tables,
    read_text,
    split_host_port,
)
from agent.credentials import reloading_server_credentials
from agent.tls import CertificateReloader, PeerCert, identity_from_cert

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServerSection:
    """``[server]``: where the scheduler listens (always mTLS)."""

    addr: str = option("127.0.0.1:50001", "host:port to listen on")
    crt_file: Path | None = option(None, "the scheduler's server certificate")
    key_file: Path | None = option(None, "its private key (0600)")
    ca_file: Path | None = option(None, "CA that signed workers' and users' certificates")


@dataclass(frozen=True)
class AuthSection:
    """``[auth]``: who may do what."""

    workers: list[str] = option(
        [],
        "certificate identities allowed to register as workers: exact names, "
        "*.dns.wildcards or spiffe://trust-domain/prefix/ (matched on SANs)",
    )
    users: list[str] = option(
        [], "identities allowed to list workers and dispatch jobs (same patterns as workers)"
    )


@dataclass(frozen=True)
class RegistrySection:
    """``[registry]``: liveness of registrations."""

    heartbeat_seconds: int = option(10, "heartbeat interval told to workers", lo=1, hi=3600)
    expire_seconds: float = option(
        30.0, "forget a worker not heard from for this long", lo=0.5, hi=86400
    )


@dataclass(frozen=True)
class AgentsSection:
    """``[agents]``: how the scheduler calls agents."""

    crt_file: Path | None = option(None, "client certificate presented to agents")
    key_file: Path | None = option(None, "its private key")
    ca_file: Path | None = option(None, "CA that signed the agents' server certificates")
    call_timeout_seconds: float = option(5.0, "deadline of every call to an agent", lo=0.1, hi=600)


@dataclass(frozen=True)
class LegacySection:
    """``[legacy]``: original workers (plaintext, no heartbeats), loopback only."""

    addr: str = option(
        "",
        "loopback host:port of a plaintext listener for original workers "
        "(development only; warns at every start); empty: off",
    )


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's whole configuration."""

    path: Path
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    agents: AgentsSection = field(default_factory=AgentsSection)
    legacy: LegacySection = field(default_factory=LegacySection)


_SECTIONS = {
    "server": ServerSection,
    "auth": AuthSection,
    "registry": RegistrySection,
    "agents": AgentsSection,
    "legacy": LegacySection,
}

# The identity of every worker registered on the legacy (plaintext) listener.
LEGACY_IDENTITY = "(legacy, no certificate)"


def load_config(path: str | Path) -> SchedulerConfig:
    """Read and validate a scheduler config; ConfigError names file, section and key."""
    p = Path(path)
    cfg = SchedulerConfig(path=p.resolve(), **parse_tables(read_text(p), p, _SECTIONS))
    try:
        split_host_port(cfg.server.addr)
    except ValueError as e:
        raise ConfigError(p, "server", "addr", str(e)) from None
    for section, obj in (("server", cfg.server), ("agents", cfg.agents)):
        for key in ("crt_file", "key_file", "ca_file"):
            if getattr(obj, key) is None:
                raise ConfigError(p, section, key, "required (the scheduler only speaks mTLS)")
    if not cfg.auth.workers:
        raise ConfigError(p, "auth", "workers", "no worker identity allowed: list at least one")
    for key in ("workers", "users"):
        for entry in getattr(cfg.auth, key):
            problem = pattern_problem(entry)
            if problem:
                raise ConfigError(p, "auth", key, problem)
    if cfg.registry.expire_seconds <= cfg.registry.heartbeat_seconds:
        raise ConfigError(p, "registry", "expire_seconds", "must be longer than heartbeat_seconds")
    if cfg.legacy.addr:
        try:
            host, _ = split_host_port(cfg.legacy.addr)
        except ValueError as e:
            raise ConfigError(p, "legacy", "addr", str(e)) from None
        # Whoever reaches a plaintext listener can register a worker (and so
        # receive users' jobs): never off the machine.
        if not is_loopback_host(host):
            raise ConfigError(
                p, "legacy", "addr", f"{host!r} is not loopback: plaintext is only possible there"
            )
        if cfg.legacy.addr == cfg.server.addr:
            raise ConfigError(p, "legacy", "addr", "must differ from [server] addr")
    return cfg


# ---------------------------------------------------------------- registry (pure)


@dataclass
class Worker:
    """One registered worker."""

    worker_id: str
    identity: str
    address: str
    registered_at: float
    last_seen: float
    legacy: bool = False  # registered on the plaintext listener: never expires


class UnknownWorker(Exception):
    """No such worker; ``forgotten`` tells whether it was known recently."""

    def __init__(self, worker_id: str, forgotten: Worker | None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.forgotten = forgotten


class Registry:
    """Workers by id, with expiry. Pure: time comes from the ``clock``."""

    def __init__(self, expire_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.expire_seconds = expire_seconds
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self.forgotten: dict[str, Worker] = {}  # expired, kept for messages and stable ids

    def register(self, identity: str, address: str, *, legacy: bool = False) -> Worker:
        """Add or refresh the worker for (identity, address); ids are stable."""
        now = self.clock()
        for w in list(self.workers.values()) + list(self.forgotten.values()):
            if w.identity == identity and w.address == address and w.legacy == legacy:
                self.forgotten.pop(w.worker_id, None)
                w.last_seen = now
                if w.worker_id not in self.workers:
                    w.registered_at = now
                self.workers[w.worker_id] = w
                return w
        w = Worker(str(uuid.uuid4()), identity, address, now, now, legacy)
        self.workers[w.worker_id] = w
        return w

    def heartbeat(self, worker_id: str, identity: str) -> bool:
        """Refresh; False if the scheduler does not know this worker (re-register)."""
        w = self.workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        w.last_seen = self.clock()
        return True

    def deregister(self, worker_id: str, identity: str) -> bool:
        """Remove a worker; only its own identity may."""
        w = self.workers.get(worker_id)
        if w is None or w.identity != identity:
            return False
        del self.workers[worker_id]
        return True

    def expire(self) -> list[Worker]:
        """Forget workers not heard from within expire_seconds."""
        cutoff = self.clock() - self.expire_seconds
        # Original workers send no heartbeats (the original never expired them).
        gone = [w for w in self.workers.values() if w.last_seen < cutoff and not w.legacy]
        for w in gone:
            del self.workers[w.worker_id]
            self.forgotten[w.worker_id] = w
        if len(self.forgotten) > 10000:
            for k in sorted(self.forgotten, key=lambda i: self.forgotten[i].last_seen)[:1000]:
                del self.forgotten[k]
        return gone

    def get(self, worker_id: str) -> Worker:
        """A live worker or UnknownWorker."""
        w = self.workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id, self.forgotten.get(worker_id))
        return w


# ---------------------------------------------------------------- service

T = TypeVar("T")


class SchedulerService:
    """Implements ``jobscheduler.Scheduler``."""

    def __init__(self, cfg: SchedulerConfig, registry: Registry, *, legacy: bool = False) -> None:
        """Serve ``cfg`` with ``registry``; reads the agents' TLS files now.

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

    # ---------------------------------------------------------- plumbing

    def _identity(self, context: Any) -> PeerCert:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "no verified client certificate")
        peer = identity_from_cert(pems[0])
        if peer.problem:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, peer.problem)
        return peer

    def _require(self, context: Any, role: str) -> str:
        """The caller's identity if the ``role`` list matches it, else PERMISSION_DENIED."""
        if self.legacy:
            # The plaintext listener knows no identities: workers only.
            if role != "worker":
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "the legacy (plaintext) listener serves workers only: use the mTLS one",
                )
            return LEGACY_IDENTITY
        peer = self._identity(context)
        ident = peer.identity
        try:
            # Patterns (*.agents.example.com, spiffe://td/worker/) match the SANs.
            self.rules[role].caller(ident, peer.sans).may_act_as(role)
        except AccessDenied as e:
            log.warning("refused %s %r from %s", role, ident, context.peer())
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, e.message) from None
        return ident

    async def _guard(self, context: Any, body: Callable[[], Awaitable[T]]) -> T:
        try:
            return await body()
        except _Abort as e:
            await context.abort(e.code, e.details)
            raise AssertionError("unreachable") from None

    def _worker(self, worker_id: str) -> Worker:
        try:
            return self.registry.get(worker_id)
        except UnknownWorker as e:
            if e.forgotten is not None:
                ago = time.time() - e.forgotten.last_seen
                raise _Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"worker {worker_id} ({e.forgotten.address}) is not registered: "
                    f"last heard from {ago:.0f} s ago",
                ) from None
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no worker with id {worker_id}") from None

    def _client(self, w: Worker) -> AsyncAgentClient:
        c = self._clients.get((w.address, w.legacy))
        if c is None:
            # Fast reconnects: a worker back from a network cut is usable at once.
            # An original worker (legacy, loopback) only speaks plaintext.
            c = AsyncAgentClient(
                w.address,
                None if w.legacy else self._tls,
                insecure=w.legacy,
                timeout=self.cfg.agents.call_timeout_seconds,
                options=reconnecting_channel_options(),
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
            raise _Abort(e.code, f"worker {worker_id} ({w.address}): {e.details}") from None

    # ---------------------------------------------------------- RPCs

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        """A worker (on the ``workers`` list) registers; its id is stable."""

        async def body() -> Any:
            ident = self._require(context, "worker")
            try:
                host, _ = split_host_port(request.address)
            except ValueError as e:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"address {request.address[:200]!r}: {e}"
                ) from None
            if self.legacy and not is_loopback_host(host):
                # Jobs for it would travel in plaintext: never off the machine.
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"address {request.address[:200]!r}: a legacy worker must be on loopback",
                )
            w = self.registry.register(ident, request.address, legacy=self.legacy)
            log.info("worker %s registered: identity %s, address %s", w.worker_id, ident, w.address)
            return pb.RegisterRes(
                success=True,
                workerID=w.worker_id,
                heartbeatSeconds=self.cfg.registry.heartbeat_seconds,
            )

        return await self._guard(context, body)

    async def DeregisterWorker(self, request: Any, context: Any) -> Any:
        """A worker leaves; only its own identity may remove it."""

        async def body() -> Any:
            ident = self._require(context, "worker")
            ok = self.registry.deregister(request.workerID, ident)
            if ok:
                log.info("worker %s deregistered", request.workerID)
            return pb.DeregisterRes(success=ok)

        return await self._guard(context, body)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        """A worker renews its registration; ``known`` False tells it to register again."""

        async def body() -> Any:
            ident = self._require(context, "worker")
            return pb.HeartbeatRes(known=self.registry.heartbeat(request.workerID, ident))

        return await self._guard(context, body)

    async def ListWorkers(self, request: Any, context: Any) -> Any:
        """Registered workers, oldest first (users only)."""

        async def body() -> Any:
            self._require(context, "user")
            out = pb.ListWorkersRes()
            for w in sorted(self.registry.workers.values(), key=lambda w: w.registered_at):
                info = out.workers.add(workerID=w.worker_id, address=w.address, identity=w.identity)
                info.registeredAt.FromNanoseconds(int(w.registered_at * 1e9))
                info.lastSeen.FromNanoseconds(int(w.last_seen * 1e9))
            return out

        return await self._guard(context, body)

    async def DispatchStartJob(self, request: Any, context: Any) -> Any:
        """Start a job on a worker (users only); never retried."""
        job = request.job

        async def call(c: AsyncAgentClient) -> Any:
            # start_pb is never retried by the client library: never twice.
            return pb.StartJobRes(jobID=await c.start_pb(job))

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    async def DispatchQueryJob(self, request: Any, context: Any) -> Any:
        """A job's status on a worker (users only)."""

        async def call(c: AsyncAgentClient) -> Any:
            return await c.query_pb(request.jobID)

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    async def DispatchStopJob(self, request: Any, context: Any) -> Any:
        """Stop a job on a worker (users only)."""

        async def call(c: AsyncAgentClient) -> Any:
            await c.stop(request.jobID)
            return pb.StopJobRes()

        return await self._guard(context, lambda: self._dispatch(context, request.workerID, call))

    async def close(self) -> None:
        """Close the channels to agents."""
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()


class _Abort(Exception):
    """End the RPC with this status and message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# ---------------------------------------------------------------- serving

SCHEDULER_SERVICE = "jobscheduler.Scheduler"


async def serve(cfg: SchedulerConfig, *, ready: Callable[[int], None] | None = None) -> None:
    """Run the scheduler until SIGTERM/SIGINT."""
    s = cfg.server
    assert s.crt_file and s.key_file and s.ca_file
    registry = Registry(cfg.registry.expire_seconds)
    service = SchedulerService(cfg, registry)
    # Agents and users keep idle connections alive with pings: agent.channel
    # keeps what this server allows and what they do in one place.
    server_options = [("grpc.so_reuseport", 0), *server_keepalive_options()]
    server = grpc.aio.server(options=server_options)
    pb_grpc.add_SchedulerServicer_to_server(service, server)
    # Standard health (NOT_SERVING once stopping) and reflection, for
    # grpc-health-probe and grpcurl; mTLS still applies to them.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SCHEDULER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await health_servicer.set(SCHEDULER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    reloader = CertificateReloader(s.crt_file, s.key_file, s.ca_file)
    creds = reloading_server_credentials(reloader, require_client_auth=True)
    try:
        port = server.add_secure_port(s.addr, creds)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {s.addr}: {e}") from None
    await server.start()
    log.info(
        "scheduler listening on %s (mTLS); workers %s; users %s",
        s.addr,
        ", ".join(cfg.auth.workers),
        ", ".join(cfg.auth.users) or "none",
    )
    legacy_server = await _serve_legacy(cfg, registry, server_options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready(port)
    period = min(1.0, cfg.registry.expire_seconds / 4)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)
        for w in registry.expire():
            log.warning(
                "worker %s (%s, %s) stopped renewing: forgotten", w.worker_id, w.identity, w.address
            )
    log.info("scheduler stopping")
    await health_servicer.enter_graceful_shutdown()
    if legacy_server is not None:
        await legacy_server.stop(grace=1.0)
    await server.stop(grace=1.0)
    await service.close()


async def _serve_legacy(
    cfg: SchedulerConfig, registry: Registry, options: list[tuple[str, Any]]
) -> grpc.aio.Server | None:
    """The plaintext listener of legacy mode (``[legacy] addr``), or None when off."""
    if not cfg.legacy.addr:
        return None
    server = grpc.aio.server(options=options)
    pb_grpc.add_SchedulerServicer_to_server(SchedulerService(cfg, registry, legacy=True), server)
    try:
        server.add_insecure_port(cfg.legacy.addr)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {cfg.legacy.addr}: {e}") from None
    await server.start()
    log.warning(
        "legacy listener on %s: PLAINTEXT, original workers register there without "
        "identities and are driven without TLS; never use this outside development",
        cfg.legacy.addr,
    )
    return server
