"""The agent server: builds the gRPC server and runs it until told to stop.

The flow follows uvicorn: ``AgentServer(prepared).serve()`` = start-up
(open the history, recover lost jobs, bind the TLS listener), main loop
(signals only set flags; the loop acts on them), shutdown (an explicit
sequence with deadlines). Nothing here runs before a daemon fork: the CLI
calls :func:`run` after ``DaemonContext.open()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.access import AccessRules
from agent.channel import server_keepalive_options
from agent.configfile import ConfigError, split_host_port
from agent.credentials import reloading_server_credentials
from agent.daemon import config as config_mod
from agent.daemon import reloadstatus, retention
from agent.daemon.access_gate import AccessGate
from agent.daemon.audit import AuditLog
from agent.daemon.cgroups import Subtree
from agent.daemon.config import Config
from agent.daemon.decision import Settings, runner_is_root, settings_of
from agent.daemon.errors import AgentError
from agent.daemon.history import History, Store
from agent.daemon.keeperclient import KEEPER_SOCKET, KeeperClient
from agent.daemon.lockfile import LockFile
from agent.daemon.retention import Sweeper
from agent.daemon.sdnotify import Notifier, watchdog_interval
from agent.daemon.service import StreamSlots, WorkerService
from agent.daemon.startup import Prepared, check_cgroup_limits, expiry_warnings
from agent.daemon.supervisor import BOOT_ID, INSTANCE_ENV, Supervisor
from agent.rpc import abort
from agent.tls import CertificateReloader, ServerTLSState

if TYPE_CHECKING:
    # Imported at start-up only when [metrics] enabled = true: prometheus_client
    # brings http.server, email, urllib, wsgiref and gzip (about 4.5 MB resident)
    # that an agent without metrics never uses.
    from agent.daemon.metrics import AgentMetrics

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server could not start (port in use, database unusable, ...)."""


# The services the health service reports on ("" is the server as a whole).
WORKER_SERVICE = "jobscheduler.Worker"
HEALTH_SERVICES = ("", WORKER_SERVICE)
# grpc_reflection.v1alpha.reflection.SERVICE_NAME, known without importing it.
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_METHOD = f"/{REFLECTION_SERVICE}/ServerReflectionInfo"
# What a SIGHUP applies; every other changed key is logged and needs a restart.
RELOADABLE_SECTIONS = frozenset({"auth"})


def access_rules(cfg: Config) -> AccessRules:
    """The ``[auth]`` lists as access rules."""
    return AccessRules(
        mtls=cfg.mtls,
        clients=frozenset(cfg.auth.clients),
        admins=frozenset(cfg.auth.admins),
        allow_anonymous=cfg.auth.allow_anonymous,
    )


def config_changes(old: Any, new: Any, section: str = "") -> list[tuple[str, str, Any, Any]]:
    """(section, key, old, new) for every key that differs between two configs."""
    out: list[tuple[str, str, Any, Any]] = []
    for f in dataclasses.fields(old):
        if f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            out.extend(config_changes(a, b, f"{section}.{f.name}" if section else f.name))
        elif a != b:
            out.append((section, f.name, a, b))
    return out


KEEPER_PID = "keeper.pid"


def settings_from(cfg: Config, prepared: Prepared) -> Settings:
    """Supervisor settings from the configuration."""
    return settings_of(cfg, prepared.job_user, prepared.cgroups)


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
    # What connections can make the agent hold (issue 23): their number, and the calls
    # each may have in flight (every call has buffers; StreamJobOutput is also bounded
    # per identity and in total by the service).
    if gs.max_connections:
        opts.append(("grpc.max_allowed_incoming_connections", gs.max_connections))
    opts.append(("grpc.max_concurrent_streams", gs.max_concurrent_streams))
    return opts


class AgentServer:
    """One agent: listener, job manager, signals, notifications."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        notifier: Notifier | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.prepared = prepared
        self._on_ready = on_ready
        self.config = prepared.config
        self.notifier = notifier or Notifier()
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.reload_requested = asyncio.Event()
        self._sigint_count = 0
        self.server: grpc.aio.Server | None = None
        self.jobs: Supervisor | None = None
        self.sweeper: Sweeper | None = None
        self.audit: AuditLog | None = None
        self.reloader: CertificateReloader | None = None
        self.registrar: Any = None
        self.service: WorkerService | None = None
        # None unless [metrics] enabled = true (see the TYPE_CHECKING import).
        self.metrics: AgentMetrics | None = None
        self.metrics_port = 0
        self.health: Any = None
        self.bound_port = 0
        self._lock = LockFile.state_dir(self.config.jobs.state_dir)
        self._status_dirty = True
        self.exit_status = 0
        self.reloads = 0
        # What the last reload rejected ("policy", "config", ...); shown in STATUS=.
        self.reload_rejected: tuple[str, ...] = ()
        self._started = False  # start-up went through (the jobs are this agent's)
        self._keeper_fresh = True  # the keeper was started by this agent (nothing kept)
        self.keeper: KeeperClient | None = None

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """Signals only set flags; the main loop acts on them."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_int)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    def _on_term(self) -> None:
        self.should_exit.set()

    def _spawner_fatal(self, why: str) -> None:
        # Without a spawner no job can run: stop, and say so in the exit status.
        log.error("shutting down: %s", why)
        self.exit_status = 1
        self.should_exit.set()

    def _on_int(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            # The operator insists: stop waiting for jobs, kill and go.
            self.force_exit = True
        elif self.config.daemon.on_shutdown == "wait" and self.jobs and self.jobs.running:
            log.info(
                "SIGINT: waiting up to %g s for %d running job(s) (on_shutdown = wait); "
                "press Ctrl-C again to stop them now",
                self.config.daemon.shutdown_deadline_seconds,
                len(self.jobs.running),
            )
        self.should_exit.set()

    # ------------------------------------------------------------ start-up

    async def startup(self) -> None:
        """Open state, recover, bind and start serving; then READY=1."""
        cfg = self.config
        _raise_nofile_limit()
        try:
            self._lock.acquire()
        except RuntimeError as e:
            raise StartupError(str(e)) from None
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
        # Metrics off: nothing is counted (nobody could read it) and
        # prometheus_client is never imported (see the TYPE_CHECKING import).
        # Either way an interceptor runs the [auth] gate in front of the
        # health and reflection services.
        # One gate, the same whatever the metrics setting (access_gate.gated: fails
        # closed); with metrics, the counting wraps it, so refusals are counted too.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            AccessGate(self._gate, exempt=f"/{WORKER_SERVICE}/")
        ]
        supervisor: type[Supervisor] = Supervisor
        if cfg.metrics.enabled:
            from agent.daemon import metrics as metrics_mod

            self.metrics = metrics_mod.AgentMetrics()
            self.audit = metrics_mod.MeteredAuditLog(cfg.audit_file, self.metrics)
            supervisor = metrics_mod.MeteredSupervisor
            interceptors.insert(0, metrics_mod.RpcMetricsInterceptor(self.metrics))
        else:
            self.audit = AuditLog(cfg.audit_file)
        history = History(store)
        own_service = cfg.keeper.mode == "service"
        ops = KeeperClient(
            str(cfg.jobs.state_dir / KEEPER_SOCKET),
            output_dir=str(cfg.output_dir),
            config_path=str(cfg.path),
            # A keeper service owns its job cgroups (its unit's, delegated): the agent,
            # in a unit of its own, may not and need not touch them.
            cgroups=None if own_service else self.prepared.cgroups,
            on_fatal=self._spawner_fatal,
            service_wait=cfg.keeper.wait_seconds if own_service else None,
        )
        try:
            hello = ops.attach()
        except (OSError, ValueError, KeyError, TypeError) as e:
            ops.abandon()
            raise StartupError(f"cannot attach to the job keeper: {e}") from None
        self._keeper_fresh = hello.fresh and not own_service
        if own_service:
            self._keeper_cgroups(hello.cgroups)
            if (hello.uid == 0) != runner_is_root(cfg):
                # Who the jobs run as was resolved for the keeper the config describes; a
                # root keeper taken for an unprivileged one would run them as root.
                raise StartupError(
                    f"the job keeper runs as uid {hello.uid}, but [keeper] agent_user "
                    f"{'is set (a root keeper)' if cfg.keeper.agent_user else 'is not set'}: "
                    "set agent_user exactly when the keeper runs as root and the agent not"
                )
        settings = settings_from(cfg, self.prepared)
        # Who holds the jobs, for the operator (`kill -USR2` re-executes it in place).
        with contextlib.suppress(OSError):
            (cfg.jobs.state_dir / KEEPER_PID).write_text(f"{hello.pid}\n")
        self.keeper = ops
        self.jobs = supervisor(
            settings,
            history,
            ops,
            on_change=self._mark_status,
            on_finish=self._audit_finish,
        )
        if self.metrics is not None:
            self.jobs.metrics = self.metrics  # type: ignore[attr-defined]
        jobs = self.jobs
        ops.on_unknown_finished = jobs.record_ended
        # What the keeper kept while no agent was attached is taken over first; only
        # records it does not know of are LOST.
        kept = jobs.adopt(hello)
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
            instance=settings.instance,
            boot_id=BOOT_ID,
            instance_env=INSTANCE_ENV,
            # Job cgroups: leftovers are found by them (a keeper service's are its own).
            subtree=None if own_service else self.prepared.cgroups,
            kept=kept,
            # A keeper that survived the last agent holds its jobs: no process is a
            # leftover by its marker alone, and no cgroup of a kept job is one.
            sweep_leftovers=self._keeper_fresh,
        )
        self.sweeper = Sweeper(
            history,
            cfg.output_dir,
            retention.Policy(
                max_age_seconds=cfg.retention.max_age_seconds, max_jobs=cfg.retention.max_jobs
            ),
        )
        self.sweeper.sweep()
        gauge = self.metrics.stream_followers if self.metrics is not None else None
        service = WorkerService(
            self.jobs,
            self.audit,
            access_rules(cfg),
            log_reads=cfg.audit.log_reads,
            revocation=self.prepared.revocation,
            streams=StreamSlots(
                cfg.jobs.max_streams,
                cfg.jobs.max_streams_per_identity,
                on_change=gauge.set if gauge is not None else None,
            ),
        )
        self.service = service
        server = grpc.aio.server(
            options=server_options(cfg),
            interceptors=interceptors,
        )
        server.add_generic_rpc_handlers([service.handler()])
        self._add_health_and_reflection(server)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        gs = cfg.grpc_server
        try:
            if gs.use_tls:
                assert gs.crt_file and gs.key_file
                pair = self.prepared.server_pair
                self.reloader = CertificateReloader(
                    gs.crt_file,
                    gs.key_file,
                    gs.ca_file,
                    key_type_locked=pair.key_type if (gs.tls13_only and pair) else None,
                    on_change=self._audit_rotation,
                    expiry_warning_days=gs.cert_expiry_warning_days,
                )
                creds = reloading_server_credentials(self.reloader, require_client_auth=cfg.mtls)
                port = server.add_secure_port(gs.addr, creds)
            else:
                port = server.add_insecure_port(gs.addr)
        except RuntimeError as e:
            raise StartupError(
                f"cannot listen on {gs.addr}: {e} (is another process using the port?)"
            ) from None
        if not port:
            raise StartupError(f"cannot listen on {gs.addr} (is another process using the port?)")
        self.bound_port = port
        self._start_metrics()
        await server.start()
        self.server = server
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for w in self.prepared.warnings:
            log.warning("%s", w)
        log.info(
            "agent %s listening on %s (%s), policy %s with %d entr%s, jobs run as %s",
            _version(),
            gs.addr,
            "mTLS" if cfg.mtls else "TLS" if gs.use_tls else "PLAINTEXT",
            cfg.jobs.policy_file,
            len(self.prepared.policy.entries),
            "y" if len(self.prepared.policy.entries) == 1 else "ies",
            self.prepared.job_user.name,
        )
        self.audit.record(
            "agent_start", decision="ok", reason=f"listening on {gs.addr}", pid=os.getpid()
        )
        await self._start_registration()
        # The listener is bound and serving TLS: only now is the agent ready.
        self._started = True
        self.notifier.ready(self._status_text())
        if self._on_ready:
            self._on_ready()

    def _add_health_and_reflection(self, server: grpc.aio.Server) -> None:
        # grpc.health.v1 (NOT_SERVING until started and once draining) and
        # server reflection, so grpc-health-probe and grpcurl work.
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers(
            [LazyReflection((WORKER_SERVICE, health.SERVICE_NAME, REFLECTION_SERVICE))]
        )

    async def _gate(self, method: str, context: Any) -> None:
        """Health and reflection calls: only identities [auth] allows (deny by default)."""
        if method.startswith(f"/{WORKER_SERVICE}/") or self.service is None:
            return  # the Worker service checks its callers itself
        try:
            peer = self.service.identify(context)
            self.service.access.caller(peer.identity, peer.sans).may_call()
        except AgentError as e:  # AccessDenied included: one refusal type, one table
            await abort(context, e)

    def _start_metrics(self) -> None:
        m, cfg = self.metrics, self.config
        if m is None:
            return  # [metrics] enabled = false
        jobs = self.jobs
        m.running = lambda: len(jobs.running) if jobs else 0
        m.ready = lambda: bool(self.server is not None and jobs is not None and jobs.accepting)
        reloader = self.reloader
        if reloader is not None:
            m.certificates.add("server", lambda: reloader.state.pair.cert_pem)
            m.certificates.add("ca", lambda: reloader.state.ca_pem)
        if self.prepared.scheduler_pair is not None:
            pair = self.prepared.scheduler_pair
            m.certificates.add("scheduler_client", lambda: pair.cert_pem)
        self._refresh_metrics()
        try:
            self.metrics_port = m.serve(cfg.metrics)
        except OSError as e:
            raise StartupError(
                f"cannot serve metrics on {cfg.metrics.addr}: {e.strerror or e} "
                "(is another process using the port?)"
            ) from None
        log.info(
            "metrics on %s://%s/metrics",
            "https" if cfg.metrics.crt_file else "http",
            cfg.metrics.addr.rsplit(":", 1)[0] + f":{self.metrics_port}",
        )

    def _refresh_metrics(self) -> None:
        if self.jobs is not None and self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.history_jobs.set(self.jobs.history.store.count())

    async def _start_registration(self) -> None:
        sch = self.config.scheduler
        if not sch.register:
            return
        from agent.daemon.registration import Registrar

        # Both None: plaintext registration (use_tls = false, loopback only).
        advertise = sch.advertise_addr or self._advertise_default()
        self.registrar = Registrar(
            scheduler_addr=sch.addr,
            advertise_addr=advertise,
            pair=self.prepared.scheduler_pair,
            ca_pem=self.prepared.scheduler_ca,
            server_name=sch.server_name,
            heartbeat=sch.heartbeat_seconds,
            retry_initial=sch.retry_initial_seconds,
            retry_max=sch.retry_max_seconds,
            call_timeout=sch.call_timeout_seconds,
            labels=sch.labels,
            on_event=lambda **kw: self.audit.record("registration", **kw) if self.audit else None,
        )
        self.registrar.start()

    def _advertise_default(self) -> str:
        addr = self.config.grpc_server.addr
        if addr.endswith(":0"):
            addr = addr[:-1] + str(self.bound_port)
        return addr

    # ------------------------------------------------------------ running

    def _mark_status(self) -> None:
        self._status_dirty = True

    def _status_text(self) -> str:
        n = len(self.jobs.running) if self.jobs else 0
        state = "accepting jobs" if (self.jobs and self.jobs.accepting) else "not accepting jobs"
        text = f"{n} job{'s' if n != 1 else ''} running; {state}"
        if self.reload_rejected:
            text += f"; last reload rejected: {', '.join(self.reload_rejected)} (see the log)"
        return text

    def _audit_finish(self, rec: Any) -> None:
        if self.jobs is not None and self.metrics is not None:
            self.metrics.job_finished(rec)
        if self.audit:
            self.audit.record(
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

    def _audit_rotation(self, state: ServerTLSState) -> None:
        if self.audit:
            self.audit.record(
                "certificate_rotation",
                decision="ok",
                reason=f"now serving {state.pair.subject}",
                fingerprint=state.pair.fingerprint,
            )

    async def main_loop(self) -> None:
        """Act on signals; run periodic work; return when asked to exit."""
        assert self.jobs is not None and self.sweeper is not None
        sweep_every = self.config.retention.sweep_seconds
        wd = watchdog_interval() if self.notifier.enabled else None
        next_sweep = time.monotonic() + sweep_every
        next_wd = time.monotonic()
        next_status = 0.0
        next_metrics = time.monotonic() + 5.0
        while not self.should_exit.is_set():
            now = time.monotonic()
            if now >= next_metrics:
                self._refresh_metrics()
                next_metrics = now + 5.0
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                await self.reload()
            if now >= next_sweep:
                try:
                    self.sweeper.sweep(set(self.jobs.running), budget=retention.STEP_BUDGET)
                except Exception:
                    log.exception("retention sweep failed")
                # A backlog is worked off in small steps between requests.
                next_sweep = now + (0.02 if self.sweeper.more else sweep_every)
            if wd is not None and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd
            if self._status_dirty and now >= next_status:
                self._status_dirty = False
                self.notifier.status(self._status_text())
                next_status = now + 1.0
            waits = [next_sweep - now, 1.0]
            if wd is not None:
                waits.append(next_wd - now)
            reload_wait = asyncio.ensure_future(self.reload_requested.wait())
            exit_wait = asyncio.ensure_future(self.should_exit.wait())
            await asyncio.wait(
                {reload_wait, exit_wait},
                timeout=max(0.01, min(waits)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            reload_wait.cancel()
            exit_wait.cancel()

    async def reload(self) -> None:
        """SIGHUP: certificates, policy, ``[auth]`` and the audit log file; jobs keep running.

        Whatever is rejected keeps its previous version and is named in the
        status line and in the reload record ``agent reload`` waits for
        (agent/daemon/reloadstatus.py). A rejected config file also keeps the
        policy: the reload applies the files together or not at all.
        """
        assert self.jobs is not None and self.audit is not None
        started = time.monotonic()
        self.notifier.reloading()
        log.info("reloading (SIGHUP)")
        rejected: list[tuple[str, str]] = []
        if self.reloader is not None:
            self.reloader.check()
            if self.reloader.error:
                rejected.append(("certificates", self.reloader.error))
        if self.prepared.revocation is not None:
            self.prepared.revocation.check(force=True)
            rejected += [("CRL", e) for e in self.prepared.revocation.errors]
        for w in expiry_warnings(self.config):
            log.warning("%s", w)
        config_error = self._reload_config()
        if config_error is not None:
            rejected.append(("config", config_error))
        else:
            policy_error = await self._reload_policy()
            if policy_error is not None:
                rejected.append(("policy", policy_error))
        try:
            self.audit.reopen()
        except OSError as e:
            log.error("cannot reopen the audit log: %s", e)
            rejected.append(("audit log", str(e)))
        self.reload_rejected = tuple(dict.fromkeys(what for what, _ in rejected))
        if self.reload_rejected:
            log.error(
                "reload rejected (%s): the agent carries on with the previous version",
                ", ".join(self.reload_rejected),
            )
        self.notifier.ready(self._status_text())
        self._status_dirty = True
        self.reloads += 1
        outcome = reloadstatus.Outcome(os.getpid(), self.reloads, started, tuple(rejected))
        try:
            reloadstatus.write(self.config.jobs.state_dir, outcome)
        except OSError as e:
            log.error("cannot record the reload's outcome for `agent reload`: %s", e)

    async def _reload_policy(self) -> str | None:
        """Make the job keeper read the policy again from its own config file (the agent
        decides no start and hands the keeper no policy); why it was rejected, or None."""
        assert self.jobs is not None and self.audit is not None and self.keeper is not None
        try:
            answer = await self.keeper.reload()
            error = str(answer.get("error", ""))
            entries = int(answer.get("entries", 0))
            warnings = [str(w) for w in answer.get("warnings", [])]
        except (OSError, ValueError, TypeError) as e:
            error = f"the job keeper could not reload the policy: {e}"
            entries, warnings = 0, []
        if error:
            log.error("policy reload rejected, keeping the current policy: %s", error)
            self.audit.record("policy_reload", decision="error", reason=error)
            return error
        for w in warnings:
            log.warning("%s", w)
        log.info("policy reloaded: %d entr%s", entries, "y" if entries == 1 else "ies")
        self.audit.record("policy_reload", decision="ok", reason=f"{entries} entries")
        return None

    def _reload_config(self) -> str | None:
        """Apply ``[auth]`` from the config file; log every other change as ignored.

        Returns why the file was rejected, or None.
        """
        assert self.audit is not None
        old = self.config
        try:
            new = config_mod.load(old.path)
        except ConfigError as e:
            log.error(
                "configuration reload rejected, keeping the current settings and policy: %s", e
            )
            self.audit.record("config_reload", decision="error", reason=str(e))
            return str(e)
        changes = config_changes(old, new)
        for section, key, was, now in changes:
            if section in RELOADABLE_SECTIONS:
                continue
            log.warning(
                "%s: [%s] %s changed to %r: takes effect only after a restart; keeping %r",
                old.path,
                section,
                key,
                _shown(now),
                _shown(was),
            )
        if new.auth == old.auth:
            return None
        self.config = dataclasses.replace(old, auth=new.auth)
        if self.service is not None:
            # Every call from now on, on every connection, is decided with
            # the new lists: removing an identity revokes it without a restart.
            self.service.set_access(access_rules(self.config))
        a = new.auth
        log.info("[auth] reloaded: %d client(s), %d admin(s)", len(a.clients), len(a.admins))
        self.audit.record(
            "config_reload",
            decision="ok",
            reason=f"[auth] clients={sorted(a.clients)} admins={sorted(a.admins)}",
        )
        return None

    def _keeper_cgroups(self, where: Subtree | None) -> None:
        """A keeper service's job cgroups, as its hello says: what the agent's limits are
        checked against (the agent never writes there)."""
        try:
            warnings = check_cgroup_limits(self.config, where)
        except ConfigError as e:
            raise StartupError(str(e)) from None
        for w in warnings:
            log.warning("%s", w)
        self.prepared = dataclasses.replace(self.prepared, cgroups=where, cgroups_owned=False)

    # ------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop taking jobs, deregister, end jobs, persist, close."""
        cfg = self.config
        self.notifier.stopping()
        log.info(
            "shutting down (%s running job(s), on_shutdown = %s)",
            len(self.jobs.running) if self.jobs else 0,
            cfg.daemon.on_shutdown,
        )
        if self.jobs is not None:
            self.jobs.stop_accepting()
        if self.health is not None:
            with contextlib.suppress(Exception):
                await self.health.enter_graceful_shutdown()
        self.notifier.status(self._status_text())
        if self.registrar is not None:
            with contextlib.suppress(Exception):
                await self.registrar.stop(deregister=True)
        if self.jobs is not None:
            mode = "stop" if self.force_exit else cfg.daemon.on_shutdown
            if not self._started or cfg.keeper.mode == "service":
                # Jobs a keeper kept stay kept when this agent fails to start; a keeper
                # service's jobs are stopped only by stopping that service.
                mode = "keep"
            task = asyncio.ensure_future(
                self.jobs.shutdown(mode=mode, deadline=cfg.daemon.shutdown_deadline_seconds)
            )
            # A second SIGINT during the wait turns it into a stop.
            while not task.done():
                self.should_exit.clear()
                waiter = asyncio.ensure_future(self.should_exit.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if self.force_exit and not task.done():
                    self.jobs.stop_all(force=True)
            await task
            if self.sweeper is not None:
                self.sweeper.sweep(set(self.jobs.running))
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.metrics is not None:
            self.metrics.close()
        # A start-up that failed half-way leaves jobs a surviving keeper kept where they
        # are, as "keep" does; a keeper it started itself holds nothing and goes.
        keep = (
            (not self._started and not self._keeper_fresh)
            or (cfg.daemon.on_shutdown == "keep" and not self.force_exit)
            or cfg.keeper.mode == "service"
        )
        if self.jobs is not None:
            self.jobs.close(keep_jobs=keep)
        if not keep:
            # --- job cgroups: remove the subtree the agent made (a delegated one stays).
            _remove_cgroup_subtree(self.prepared)
        # ---
        if self.audit is not None:
            self.audit.record("agent_stop", decision="ok", pid=os.getpid())
            self.audit.close()
        self._lock.release()
        log.info("stopped")

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; raise StartupError if start-up fails."""
        self.install_signal_handlers()
        try:
            try:
                await self.startup()
            except StartupError as e:
                # Said first, before the clean-up's "shutting down ... stopped".
                log.error("%s", e)
                raise
            await self.main_loop()
        finally:
            await self.shutdown()


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


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value


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


def _version() -> str:
    from agent import __version__

    return __version__


def run(
    prepared: Prepared,
    *,
    on_ready: Callable[[], None] | None = None,
    on_startup_error: Callable[[str], None] | None = None,
) -> int:
    """Run an agent in this process (after any daemon fork). Returns the exit status."""
    server = AgentServer(prepared, on_ready=on_ready)
    try:
        asyncio.run(server.serve())
    except StartupError as e:
        if on_startup_error:
            on_startup_error(str(e))
        return 1
    return server.exit_status
