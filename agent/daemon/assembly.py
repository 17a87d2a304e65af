"""The agent's start-up, phase by phase, each phase building its parts whole.

1. :func:`open_state`: the state directory's lock, the history, the audit log and the
   metrics (a port already in use is said first, before anything is started);
2. :func:`attach_jobs`: the job keeper (attached to, or started), the supervisor, the
   jobs the keeper kept taken over and the lost ones recovered, the retention sweeper;
3. :func:`listen`: the Worker service, the gRPC server with TLS, health and
   reflection, the metrics listener; serving once this returns.

A phase that fails raises :class:`StartupError` and leaves nothing of its own behind;
what the phases before it made is closed by the caller (the server's exit stack calls
each phase's close in reverse). So no part of a running agent is ever half-made, and
the server is built in one step from the three (:class:`agent.daemon.server.AgentServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.access import AccessRules
from agent.channel import server_keepalive_options
from agent.configfile import ConfigError, split_host_port
from agent.credentials import reloading_server_credentials
from agent.daemon import adoption, retention
from agent.daemon.access_gate import AccessGate
from agent.daemon.audit import AuditLog
from agent.daemon.history import History, JobRecord, Store
from agent.daemon.keeperclient import KeeperClient
from agent.daemon.lockfile import LockFile
from agent.daemon.retention import Sweeper
from agent.daemon.service import StreamSlots, WorkerService, worker_handler
from agent.daemon.startup import Prepared, check_cgroup_limits
from agent.daemon.supervisor import BOOT_ID, INSTANCE_ENV, Supervisor
from agent.keeper.cgroups import Subtree
from agent.keeper.config import Config
from agent.keeper.decision import runner_is_root, settings_of
from agent.keeper.errors import AgentError
from agent.keeper.launch import KEEPER_SOCKET
from agent.rpc import abort
from agent.tls import CertificateReloader, ServerTLSState

if TYPE_CHECKING:
    # Imported at start-up only when [metrics] enabled = true: prometheus_client
    # brings http.server, email, urllib, wsgiref and gzip (about 4.5 MB resident)
    # that an agent without metrics never uses.
    from agent.daemon.metrics import AgentMetrics

log = logging.getLogger(__name__)

# The services the health service reports on ("" is the server as a whole).
WORKER_SERVICE = "jobscheduler.Worker"
HEALTH_SERVICES = ("", WORKER_SERVICE)
# grpc_reflection.v1alpha.reflection.SERVICE_NAME, known without importing it.
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_METHOD = f"/{REFLECTION_SERVICE}/ServerReflectionInfo"
KEEPER_PID = "keeper.pid"


class StartupError(Exception):
    """The server could not start (port in use, database unusable, ...)."""


def access_rules(cfg: Config) -> AccessRules:
    """The ``[auth]`` lists as access rules."""
    return AccessRules(
        mtls=cfg.mtls,
        clients=frozenset(cfg.auth.clients),
        admins=frozenset(cfg.auth.admins),
        allow_anonymous=cfg.auth.allow_anonymous,
    )


def server_options(cfg: Config) -> list[tuple[str, Any]]:
    """Channel arguments of the listener."""
    gs = cfg.grpc_server
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", gs.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default, which would let a second agent
        # (or anything else) bind the same port and receive a share of the
        # connections. One listener per port.
        ("grpc.so_reuseport", 0),
        # Clients may keep idle connections alive with pings (the client
        # library does, to notice a dead agent quickly): agent.channel keeps
        # what the server allows and what the clients do in one place.
        *server_keepalive_options(),
    ]
    if gs.max_connection_idle_seconds:
        opts.append(("grpc.max_connection_idle_ms", gs.max_connection_idle_seconds * 1000))
    # What connections can make the agent hold: their number, and the calls each may
    # have in flight (every call has buffers; StreamJobOutput is also bounded per
    # identity and in total by the service).
    if gs.max_connections:
        opts.append(("grpc.max_allowed_incoming_connections", gs.max_connections))
    opts.append(("grpc.max_concurrent_streams", gs.max_concurrent_streams))
    return opts


def audit_job_end(audit: AuditLog) -> Callable[[JobRecord], None]:
    """The supervisor's ``on_finish``: each job's end, in the audit log."""

    def record(rec: JobRecord) -> None:
        audit.record(
            "job_end",
            decision="ok",
            identity=rec.owner,
            job_id=rec.id,
            command=rec.command,
            path=rec.path,
            state=rec.state.name,
            exit_code=rec.exit_code,
            signal=rec.signal,
            reason=rec.error_text,
        )

    return record


# ---------------------------------------------------------------- 1. state


@dataclasses.dataclass
class StateParts:
    """The state directory's lock, the history, the audit log and the metrics."""

    lock: LockFile
    history: History
    audit: AuditLog
    metrics: AgentMetrics | None  # None unless [metrics] enabled = true

    def close(self) -> None:
        """Last of all: the audit log's last record, then the lock."""
        if self.metrics is not None:
            self.metrics.close()
        self.audit.record("agent_stop", decision="ok", pid=os.getpid())
        self.audit.close()
        self.lock.release()


def open_state(cfg: Config) -> StateParts:
    """Phase 1 (see the module's docstring)."""
    _raise_nofile_limit()
    lock = LockFile.state_dir(cfg.jobs.state_dir)
    try:
        lock.acquire()
    except RuntimeError as e:
        raise StartupError(str(e)) from None
    try:
        # A port already in use is said first, before anything is started (the job
        # keeper, which another agent of this state directory could not be using).
        busy = _port_in_use(cfg.grpc_server.addr)
        if busy:
            raise StartupError(
                f"cannot listen on {cfg.grpc_server.addr}: {busy} (is another process "
                "using the port?)"
            )
        try:
            store = Store(cfg.db_path)
        except Exception as e:
            raise StartupError(f"job history {cfg.db_path}: {e}") from None
        metrics = None
        if cfg.metrics.enabled:
            # Metrics off: nothing is counted (nobody could read it) and
            # prometheus_client is never imported (see the TYPE_CHECKING import).
            from agent.daemon.metrics import AgentMetrics

            metrics = AgentMetrics()
        audit = AuditLog(cfg.audit_file, on_record=None if metrics is None else metrics.audit_event)
    except BaseException:
        lock.release()
        raise
    return StateParts(lock, History(store), audit, metrics)


# ---------------------------------------------------------------- 2. jobs


@dataclasses.dataclass
class JobParts:
    """The job keeper's client, the supervisor and the retention sweeper."""

    keeper: KeeperClient
    jobs: Supervisor
    sweeper: Sweeper
    prepared: Prepared  # as start-up prepared it, with a keeper service's job cgroups
    # The keeper was started by this agent (it kept nothing): when this agent fails to
    # start, it goes with it; a keeper that was running already keeps its jobs.
    fresh: bool

    def close(self, *, keep: bool) -> None:
        """Detach from the keeper (``keep``: its jobs go on) or end it with its jobs,
        and then remove the job cgroup subtree the agent made."""
        self.jobs.close(keep_jobs=keep)
        if not keep:
            _remove_cgroup_subtree(self.prepared)


async def attach_jobs(
    cfg: Config,
    prepared: Prepared,
    state: StateParts,
    *,
    on_fatal: Callable[[str], None],
    on_change: Callable[[], None],
) -> JobParts:
    """Phase 2 (see the module's docstring)."""
    own_service = cfg.keeper.mode == "service"
    ops = KeeperClient(
        str(cfg.jobs.state_dir / KEEPER_SOCKET),
        output_dir=str(cfg.output_dir),
        config_path=str(cfg.path),
        # A keeper service owns its job cgroups (its unit's, delegated): the agent, in a
        # unit of its own, may not and need not touch them.
        cgroups=None if own_service else prepared.cgroups,
        on_fatal=on_fatal,
        service_wait=cfg.keeper.wait_seconds if own_service else None,
    )
    try:
        hello = ops.attach()
    except (OSError, ValueError, KeyError, TypeError) as e:
        ops.abandon()
        raise StartupError(f"cannot attach to the job keeper: {e}") from None
    fresh = hello.fresh and not own_service
    try:
        if own_service:
            prepared = _keeper_cgroups(cfg, prepared, hello.cgroups)
            if (hello.uid == 0 or hello.gives) != runner_is_root(cfg):
                # Who the jobs run as was resolved for the keeper the config describes; a
                # root keeper taken for an unprivileged one would run them as root.
                gives = "" if hello.uid == 0 or not hello.gives else ", switching users"
                raise StartupError(
                    f"the job keeper runs as uid {hello.uid}{gives}, but [keeper] agent_user "
                    f"{'is set (a root keeper)' if cfg.keeper.agent_user else 'is not set'}: "
                    "set agent_user exactly when the keeper runs as root (or as the "
                    "privileged unit's user with its capabilities) and the agent not"
                )
    except BaseException:
        ops.close(keep_jobs=True)  # a keeper service's jobs are its own
        raise
    settings = settings_of(cfg, prepared.job_user, prepared.cgroups)
    # Who holds the jobs, for the operator (`kill -USR2` re-executes it in place).
    with contextlib.suppress(OSError):
        (cfg.jobs.state_dir / KEEPER_PID).write_text(f"{hello.pid}\n")
    history = state.history
    jobs = Supervisor(
        settings,
        history,
        ops,
        on_change=on_change,
        on_finish=audit_job_end(state.audit),
        hooks=state.metrics,
    )
    parts = JobParts(ops, jobs, Sweeper(history, cfg.output_dir, _retention(cfg)), prepared, fresh)
    try:
        await _take_over(cfg, parts, hello, own_service)
    except BaseException:
        # Jobs a keeper kept stay kept when this agent fails to start; one this agent
        # started holds nothing and goes (unless the config keeps jobs at any stop).
        parts.close(keep=not fresh or own_service or cfg.daemon.on_shutdown == "keep")
        raise
    return parts


async def _take_over(cfg: Config, parts: JobParts, hello: Any, own_service: bool) -> None:
    """What the keeper kept while no agent was attached is taken over first; only the
    records it does not know of are LOST; then the history commits in groups."""
    ops, jobs, history = parts.keeper, parts.jobs, parts.jobs.history
    ops.on_unknown_finished = functools.partial(adoption.record_ended, jobs)
    kept = adoption.adopt(jobs, hello)
    if not hello.fresh:
        # A keeper that was running already (a service, or one the last agent left)
        # decides with the policy it loaded then: it reads its own file again now, so
        # the policy in force is the one this start-up checked.
        try:
            answer = await ops.reload()
        except OSError as e:
            raise StartupError(f"the job keeper could not reload the policy: {e}") from None
        if answer.get("error"):
            raise StartupError(f"the job keeper rejected the policy: {answer['error']}")
    retention.recover(
        history,
        instance=jobs.settings.instance,
        boot_id=BOOT_ID,
        instance_env=INSTANCE_ENV,
        # Job cgroups: leftovers are found by them (a keeper service's are its own).
        subtree=None if own_service else parts.prepared.cgroups,
        kept=kept,
        # A keeper that survived the last agent holds its jobs: no process is a
        # leftover by its marker alone, and no cgroup of a kept job is one.
        sweep_leftovers=parts.fresh,
    )
    # Recovered and durable: from now on the history commits in groups on the loop.
    history.attach(asyncio.get_running_loop())
    parts.sweeper.sweep()


def _retention(cfg: Config) -> retention.Policy:
    r = cfg.retention
    return retention.Policy(max_age_seconds=r.max_age_seconds, max_jobs=r.max_jobs)


def _keeper_cgroups(cfg: Config, prepared: Prepared, where: Subtree | None) -> Prepared:
    """A keeper service's job cgroups, as its hello says: what the agent's limits are
    checked against (the agent never writes there)."""
    try:
        warnings = check_cgroup_limits(cfg, where)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    for w in warnings:
        log.warning("%s", w)
    return dataclasses.replace(prepared, cgroups=where, cgroups_owned=False)


# ---------------------------------------------------------------- 3. listener


@dataclasses.dataclass
class Listener:
    """The Worker service behind its gRPC server, serving."""

    service: WorkerService
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    reloader: CertificateReloader | None  # None: plaintext
    port: int  # the bound port (the config's may be 0)
    metrics_port: int  # 0: no metrics listener

    async def close(self) -> None:
        await self.server.stop(grace=1.0)


async def listen(
    cfg: Config, state: StateParts, job_parts: JobParts, *, ready: Callable[[], bool]
) -> Listener:
    """Phase 3 (see the module's docstring). ``ready``: the metrics' readiness."""
    prepared = job_parts.prepared
    metrics = state.metrics
    gauge = metrics.stream_followers if metrics is not None else None
    service = WorkerService(
        job_parts.jobs,
        state.audit,
        access_rules(cfg),
        log_reads=cfg.audit.log_reads,
        revocation=prepared.revocation,
        streams=StreamSlots(
            cfg.jobs.max_streams,
            cfg.jobs.max_streams_per_identity,
            on_change=gauge.set if gauge is not None else None,
        ),
    )
    # One gate in front of the health and reflection services, the same whatever the
    # metrics setting (access_gate.gated: fails closed); with metrics, the counting
    # wraps it, so refusals are counted too.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        AccessGate(_gate(service), exempt=f"/{WORKER_SERVICE}/")
    ]
    if metrics is not None:
        from agent.daemon.metrics import RpcMetricsInterceptor

        interceptors.insert(0, RpcMetricsInterceptor(metrics))
    server = grpc.aio.server(options=server_options(cfg), interceptors=interceptors)
    server.add_generic_rpc_handlers([worker_handler(service)])
    # grpc.health.v1 (NOT_SERVING until started and once draining) and server
    # reflection, so grpc-health-probe and grpcurl work.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers(
        [LazyReflection((WORKER_SERVICE, health.SERVICE_NAME, REFLECTION_SERVICE))]
    )
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reloader, port = _bind(cfg, server, prepared, state.audit)
    metrics_port = 0
    if metrics is not None:
        jobs = job_parts.jobs
        metrics.running = lambda: len(jobs.running)
        metrics.ready = ready
        metrics_port = _serve_metrics(cfg, metrics, prepared, reloader, jobs.history)
    await server.start()
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Listener(service, server, health_servicer, reloader, port, metrics_port)


def _gate(service: WorkerService) -> Callable[[str, Any], Any]:
    async def gate(method: str, context: Any) -> None:
        """Health and reflection calls: only identities [auth] allows (deny by default)."""
        if method.startswith(f"/{WORKER_SERVICE}/"):
            return  # the Worker service checks its callers itself
        try:
            peer = service.identify(context)
            service.access.caller(peer.identity, peer.sans).may_call()
        except AgentError as e:  # AccessDenied included: one refusal type, one table
            await abort(context, e)

    return gate


def _bind(
    cfg: Config, server: grpc.aio.Server, prepared: Prepared, audit: AuditLog
) -> tuple[CertificateReloader | None, int]:
    """The listener's port, with TLS unless the config says plaintext."""
    gs = cfg.grpc_server
    reloader = None

    def rotated(state: ServerTLSState) -> None:
        audit.record(
            "certificate_rotation",
            decision="ok",
            reason=f"now serving {state.pair.subject}",
            fingerprint=state.pair.fingerprint,
        )

    try:
        if gs.use_tls:
            assert gs.crt_file and gs.key_file
            pair = prepared.server_pair
            reloader = CertificateReloader(
                gs.crt_file,
                gs.key_file,
                gs.ca_file,
                key_type_locked=pair.key_type if (gs.tls13_only and pair) else None,
                on_change=rotated,
                expiry_warning_days=gs.cert_expiry_warning_days,
            )
            creds = reloading_server_credentials(reloader, require_client_auth=cfg.mtls)
            port = server.add_secure_port(gs.addr, creds)
        else:
            port = server.add_insecure_port(gs.addr)
    except RuntimeError as e:
        raise StartupError(
            f"cannot listen on {gs.addr}: {e} (is another process using the port?)"
        ) from None
    if not port:
        raise StartupError(f"cannot listen on {gs.addr} (is another process using the port?)")
    return reloader, port


def _serve_metrics(
    cfg: Config,
    m: AgentMetrics,
    prepared: Prepared,
    reloader: CertificateReloader | None,
    history: History,
) -> int:
    if reloader is not None:
        m.certificates.add("server", lambda: reloader.state.pair.cert_pem)
        m.certificates.add("ca", lambda: reloader.state.ca_pem)
    if prepared.scheduler_pair is not None:
        pair = prepared.scheduler_pair
        m.certificates.add("scheduler_client", lambda: pair.cert_pem)
    refresh_metrics(m, history)
    try:
        port = m.serve(cfg.metrics)
    except OSError as e:
        raise StartupError(
            f"cannot serve metrics on {cfg.metrics.addr}: {e.strerror or e} "
            "(is another process using the port?)"
        ) from None
    log.info(
        "metrics on %s://%s/metrics",
        "https" if cfg.metrics.crt_file else "http",
        cfg.metrics.addr.rsplit(":", 1)[0] + f":{port}",
    )
    return port


def refresh_metrics(m: AgentMetrics | None, history: History) -> None:
    """What the metrics read from the database (refreshed by the main loop)."""
    if m is not None:
        with contextlib.suppress(Exception):
            m.history_jobs.set(history.count())


class LazyReflection(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Server reflection (grpcurl), imported on its first call.

    grpc_reflection builds protobuf's descriptor.proto classes when imported,
    about 2.5 MB resident for a service that only a person with grpcurl uses.
    """

    def __init__(self, service_names: tuple[str, ...]) -> None:
        self._names = service_names
        self._handler: Any = None

    def service(self, handler_call_details: Any) -> Any:
        """The reflection method's handler; None for every other method."""
        if handler_call_details.method != REFLECTION_METHOD:
            return None
        if self._handler is None:
            from grpc_reflection.v1alpha import reflection, reflection_pb2

            servicer = reflection.aio.ReflectionServicer(self._names)
            self._handler = grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        return self._handler


# ---------------------------------------------------------------- helpers


def _remove_cgroup_subtree(prepared: Prepared) -> None:
    """rmdir the agent's own job cgroup subtree at shutdown; only an empty one goes."""
    sub = prepared.cgroups
    if sub is None or not prepared.cgroups_owned:
        return
    try:
        os.rmdir(sub.jobs)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("job cgroup subtree %s not removed: %s", sub.jobs, e.strerror)


def _port_in_use(addr: str) -> str | None:
    """Why ``addr`` cannot be bound because something holds it, or None.

    Asked before gRPC binds, so that a busy port gets the agent's one line
    and not first gRPC's own ``E... add_port.cc`` line on stderr (gRPC logs
    through its C core; only the process-wide GRPC_VERBOSITY would silence it).
    A bind that fails for another reason is left to gRPC to report.
    """
    try:
        host, port = split_host_port(addr)
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (ValueError, OSError):
        return None
    if port == 0:
        return None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                # As gRPC binds: SO_REUSEADDR, so a port in TIME_WAIT is not "busy".
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return str(e.strerror)
    return None


def _raise_nofile_limit() -> None:
    """Each running job holds three descriptors (pidfd, pipe, output file):
    raise the soft RLIMIT_NOFILE to the hard limit so max_running is not
    capped by the usual soft 1024. Jobs inherit it unless [limits] open_files
    is set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
