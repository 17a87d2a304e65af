"""The agent server: runs a started agent until told to stop.

The flow follows uvicorn: :func:`serve` = start-up (:mod:`agent.daemon.assembly`,
phase by phase: the state, the jobs, the listener), main loop (signals only set
flags; the loop acts on them), shutdown (an explicit sequence with deadlines, then
each phase's parts closed in reverse). Nothing here runs before a daemon fork: the
CLI calls :func:`run` after ``DaemonContext.open()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.daemon import retention
from agent.daemon.assembly import (
    JobParts,
    Listener,
    StartupError,
    StateParts,
    attach_jobs,
    listen,
    open_state,
    refresh_metrics,
)
from agent.daemon.reloading import Reloader
from agent.daemon.sdnotify import Notifier, watchdog_interval
from agent.daemon.startup import Prepared
from agent.keeper.config import Config

if TYPE_CHECKING:
    from agent.daemon.registration import Registrar

__all__ = ["AgentServer", "Control", "StartupError", "run", "serve"]

log = logging.getLogger(__name__)


class Control:
    """What signals and the keeper's failure ask of the agent: flags only, acted on by
    the main loop (and the shutdown), from before start-up to the end."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.reload_requested = asyncio.Event()
        self.exit_status = 0
        self.status_dirty = True
        self.started = False  # start-up went through (the jobs are this agent's)
        self.running_jobs: Callable[[], int] = lambda: 0  # for SIGINT's message
        self._sigint_count = 0

    def install(self) -> None:
        """Signals only set flags; the main loop acts on them."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.should_exit.set)
        loop.add_signal_handler(signal.SIGINT, self.on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    def on_sigint(self) -> None:
        self._sigint_count += 1
        running = self.running_jobs()
        if self._sigint_count > 1:
            # The operator insists: stop waiting for jobs, kill and go.
            self.force_exit = True
        elif self.config.daemon.on_shutdown == "wait" and running:
            log.info(
                "SIGINT: waiting up to %g s for %d running job(s) (on_shutdown = wait); "
                "press Ctrl-C again to stop them now",
                self.config.daemon.shutdown_deadline_seconds,
                running,
            )
        self.should_exit.set()

    def keeper_failed(self, why: str) -> None:
        # Without a keeper no job can run: stop, and say so in the exit status.
        log.error("shutting down: %s", why)
        self.exit_status = 1
        self.should_exit.set()

    def mark_status(self) -> None:
        self.status_dirty = True

    def keep_jobs(self) -> bool:
        """Whether the jobs stay with the keeper when this agent goes."""
        cfg = self.config
        return (
            cfg.daemon.on_shutdown == "keep" and not self.force_exit
        ) or cfg.keeper.mode == "service"


class AgentServer:
    """One started agent, built in one step from the phases' parts: its main loop,
    its reloads and its shutdown."""

    def __init__(
        self,
        config: Config,
        control: Control,
        notifier: Notifier,
        state: StateParts,
        job_parts: JobParts,
        listener: Listener,
        registrar: Registrar | None,
    ) -> None:
        self.config = config
        self.control = control
        self.notifier = notifier
        self.state = state
        self.jobs = job_parts.jobs
        self.sweeper = job_parts.sweeper
        self.listener = listener
        self.registrar = registrar
        self.reloader = Reloader(
            config, job_parts.prepared, state.audit, job_parts.keeper, listener
        )

    def status_text(self) -> str:
        n = len(self.jobs.running)
        state = "accepting jobs" if self.jobs.accepting else "not accepting jobs"
        text = f"{n} job{'s' if n != 1 else ''} running; {state}"
        if self.reloader.rejected:
            text += f"; last reload rejected: {', '.join(self.reloader.rejected)} (see the log)"
        return text

    async def main_loop(self) -> None:
        """Act on signals; run periodic work; return when asked to exit."""
        control = self.control
        sweep_every = self.config.retention.sweep_seconds
        wd = watchdog_interval() if self.notifier.enabled else None
        next_sweep = time.monotonic() + sweep_every
        next_wd = time.monotonic()
        next_status = 0.0
        next_metrics = time.monotonic() + 5.0
        while not control.should_exit.is_set():
            now = time.monotonic()
            if now >= next_metrics:
                refresh_metrics(self.state.metrics, self.jobs.history)
                next_metrics = now + 5.0
            if control.reload_requested.is_set():
                control.reload_requested.clear()
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
            if control.status_dirty and now >= next_status:
                control.status_dirty = False
                self.notifier.status(self.status_text())
                next_status = now + 1.0
            waits = [next_sweep - now, 1.0]
            if wd is not None:
                waits.append(next_wd - now)
            reload_wait = asyncio.ensure_future(control.reload_requested.wait())
            exit_wait = asyncio.ensure_future(control.should_exit.wait())
            await asyncio.wait(
                {reload_wait, exit_wait},
                timeout=max(0.01, min(waits)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            reload_wait.cancel()
            exit_wait.cancel()

    async def reload(self) -> None:
        """SIGHUP (see agent.daemon.reloading); READY=1 again with the outcome."""
        self.notifier.reloading()
        await self.reloader.reload()
        self.notifier.ready(self.status_text())
        self.control.status_dirty = True

    async def drain(self) -> None:
        """Stop taking jobs, deregister, and end the jobs as ``on_shutdown`` says (the
        listener still answers queries meanwhile); the parts are closed after."""
        cfg, control = self.config, self.control
        self.jobs.stop_accepting()
        with contextlib.suppress(Exception):
            await self.listener.health.enter_graceful_shutdown()
        self.notifier.status(self.status_text())
        if self.registrar is not None:
            with contextlib.suppress(Exception):
                await self.registrar.stop(deregister=True)
        mode = "stop" if control.force_exit else cfg.daemon.on_shutdown
        if cfg.keeper.mode == "service":
            mode = "keep"  # a keeper service's jobs are stopped only by stopping it
        task = asyncio.ensure_future(
            self.jobs.shutdown(mode=mode, deadline=cfg.daemon.shutdown_deadline_seconds)
        )
        # A second SIGINT during the wait turns it into a stop.
        while not task.done():
            control.should_exit.clear()
            waiter = asyncio.ensure_future(control.should_exit.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if control.force_exit and not task.done():
                self.jobs.stop_all(force=True)
        await task
        self.sweeper.sweep(set(self.jobs.running))


async def serve(
    prepared: Prepared,
    control: Control,
    *,
    notifier: Notifier | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Start, run until SIGTERM/SIGINT, shut down; raise StartupError if start-up fails
    (after closing what it had made)."""
    cfg = prepared.config
    notifier = notifier or Notifier()
    control.install()
    try:
        async with contextlib.AsyncExitStack() as parts:
            try:
                agent = await _start(prepared, control, notifier, parts, on_ready)
            except BaseException as e:
                if isinstance(e, StartupError):
                    # Said first, before the clean-up's "shutting down ... stopped".
                    log.error("%s", e)
                notifier.stopping()
                log.info(
                    "shutting down (0 running job(s), on_shutdown = %s)",
                    cfg.daemon.on_shutdown,
                )
                raise
            await agent.main_loop()
            notifier.stopping()
            log.info(
                "shutting down (%s running job(s), on_shutdown = %s)",
                len(agent.jobs.running),
                cfg.daemon.on_shutdown,
            )
            await agent.drain()
    finally:
        log.info("stopped")


async def _start(
    prepared: Prepared,
    control: Control,
    notifier: Notifier,
    parts: contextlib.AsyncExitStack,
    on_ready: Callable[[], None] | None,
) -> AgentServer:
    cfg = prepared.config
    state = open_state(cfg)
    parts.callback(state.close)
    job_parts = await attach_jobs(
        cfg, prepared, state, on_fatal=control.keeper_failed, on_change=control.mark_status
    )
    jobs = job_parts.jobs
    control.running_jobs = lambda: len(jobs.running)

    def close_jobs() -> None:
        # A start-up that failed half-way leaves the jobs a surviving keeper kept where
        # they are; a keeper it started itself holds nothing and goes.
        keep = control.keep_jobs() or (not control.started and not job_parts.fresh)
        job_parts.close(keep=keep)

    parts.callback(close_jobs)
    listener = await listen(cfg, state, job_parts, ready=lambda: control.started and jobs.accepting)
    parts.push_async_callback(listener.close)
    for w in prepared.warnings:
        log.warning("%s", w)
    gs = cfg.grpc_server
    log.info(
        "agent %s listening on %s (%s), policy %s with %d entr%s, jobs run as %s",
        _version(),
        gs.addr,
        "mTLS" if cfg.mtls else "TLS" if gs.use_tls else "PLAINTEXT",
        cfg.jobs.policy_file,
        len(prepared.policy.entries),
        "y" if len(prepared.policy.entries) == 1 else "ies",
        prepared.job_user.name,
    )
    state.audit.record(
        "agent_start", decision="ok", reason=f"listening on {gs.addr}", pid=os.getpid()
    )
    registrar = await _register(cfg, prepared, state, listener)
    agent = AgentServer(cfg, control, notifier, state, job_parts, listener, registrar)
    # The listener is bound and serving TLS: only now is the agent ready.
    control.started = True
    notifier.ready(agent.status_text())
    if on_ready is not None:
        on_ready()
    return agent


async def _register(
    cfg: Config, prepared: Prepared, state: StateParts, listener: Listener
) -> Registrar | None:
    sch = cfg.scheduler
    if not sch.register:
        return None
    from agent.daemon.registration import Registrar

    advertise = sch.advertise_addr
    if not advertise:
        advertise = cfg.grpc_server.addr
        if advertise.endswith(":0"):
            advertise = advertise[:-1] + str(listener.port)
    audit = state.audit
    registrar = Registrar(
        scheduler_addr=sch.addr,
        fallback_addrs=sch.addrs,
        advertise_addr=advertise,
        # Both None: plaintext registration (use_tls = false, loopback only).
        pair=prepared.scheduler_pair,
        ca_pem=prepared.scheduler_ca,
        server_name=sch.server_name,
        heartbeat=sch.heartbeat_seconds,
        retry_initial=sch.retry_initial_seconds,
        retry_max=sch.retry_max_seconds,
        call_timeout=sch.call_timeout_seconds,
        labels=sch.labels,
        on_event=lambda **kw: audit.record("registration", **kw),
        # The scheduler's calls over the link run through the listener's own service.
        link=sch.link,
        service=listener.service,
        calls_as=sch.calls_as,
    )
    registrar.start()
    return registrar


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

    async def main() -> int:
        control = Control(prepared.config)
        await serve(prepared, control, on_ready=on_ready)
        return control.exit_status

    try:
        return asyncio.run(main())
    except StartupError as e:
        if on_startup_error:
            on_startup_error(str(e))
        return 1
