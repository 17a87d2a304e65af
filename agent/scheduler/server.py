"""Serving the reference scheduler: its listeners, health, and the expiry loop.

``serve`` opens the store (:mod:`agent.scheduler.store`), builds the gRPC
server (mTLS, reloading certificates, keepalive from :mod:`agent.channel`)
around one :class:`~agent.scheduler.service.SchedulerService` and one
registry kept in that store, adds the standard health and reflection
services, opens the plaintext legacy listener when ``[legacy] addr`` asks for it, and runs
until SIGTERM/SIGINT, forgetting workers that stop renewing. Only the CLI
(:mod:`agent.scheduler.cli`) calls it and turns its errors into an exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import server_keepalive_options
from agent.credentials import reloading_server_credentials
from agent.scheduler.config import SchedulerConfig
from agent.scheduler.registry import Registry, Worker, WorkerRegistry
from agent.scheduler.runs import prune_finished
from agent.scheduler.service import SchedulerService
from agent.scheduler.store import SQLiteStore, Store, StoreError
from agent.tls import CertificateReloader

__all__ = ["SCHEDULER_SERVICE", "serve"]

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = "jobscheduler.Scheduler"
PRUNE_EVERY_S = 3600.0  # retention of finished runs ([runs]): at start, then this often


async def serve(cfg: SchedulerConfig, *, ready: Callable[[int], None] | None = None) -> None:
    """Run the scheduler until SIGTERM/SIGINT (StoreError if its store cannot be opened)."""
    store = open_store(cfg)
    try:
        await _serve(cfg, store, ready)
    finally:
        store.close()


async def _serve(cfg: SchedulerConfig, store: Store, ready: Callable[[int], None] | None) -> None:
    s = cfg.server
    assert s.crt_file and s.key_file and s.ca_file
    # Starts from the workers the store remembers: they stay while they renew.
    registry = Registry(cfg.registry.expire_seconds, store=store)
    store.keep_alive()  # opens the session that owns this scheduler's runs
    _prune(cfg, store)
    service = SchedulerService(cfg, registry, store)
    if not store.shared:
        # Its own runs, as the previous process left them: driven on (see RunManager.adopt).
        for rec in store.unfinished_runs():
            service.runs.adopt(rec, resumed=True)
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
    legacy_server = await _serve_legacy(cfg, registry, store, server_options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready(port)
    period = min(1.0, cfg.registry.expire_seconds / 4)
    next_prune = time.monotonic() + PRUNE_EVERY_S
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + PRUNE_EVERY_S
            _prune(cfg, store)
        try:
            gone = _shared_tick(store, registry, service) if store.shared else registry.expire()
        except StoreError as e:
            log.error("store: %s", e)
            continue
        for w in gone:
            log.warning(
                "worker %s (%s, %s) stopped renewing: forgotten", w.worker_id, w.identity, w.address
            )
    log.info("scheduler stopping")
    await health_servicer.enter_graceful_shutdown()
    # Runs first, left as recorded: the links end with the server, and a call
    # that fails on an ended link must not be recorded as the host's end.
    await service.runs.close()
    if legacy_server is not None:
        await legacy_server.stop(grace=1.0)
    await server.stop(grace=1.0)
    await service.close()


def _prune(cfg: SchedulerConfig, store: Store) -> None:
    """Retention: the finished runs past ``[runs]`` go (a failure is logged, retried later)."""
    try:
        n = prune_finished(store, cfg.runs.keep_days, cfg.runs.keep_count, time.time())
    except StoreError as e:
        log.error("store: pruning runs: %s", e)
        return
    if n:
        log.info(
            "%d finished run(s) pruned ([runs] keep_days %g, keep_count %d)",
            n,
            cfg.runs.keep_days,
            cfg.runs.keep_count,
        )


def open_store(cfg: SchedulerConfig) -> Store:
    """The store ``[store]`` names (StoreError if it cannot be opened)."""
    st = cfg.store
    if st.backend == "sqlite":
        return SQLiteStore(st.sqlite_file)
    from agent.scheduler.etcdstore import EtcdStore

    assert st.etcd_ca_file and st.etcd_crt_file and st.etcd_key_file
    return EtcdStore(
        st.etcd_endpoints,
        ca_file=st.etcd_ca_file,
        crt_file=st.etcd_crt_file,
        key_file=st.etcd_key_file,
        prefix=st.etcd_prefix,
        server_name=st.etcd_server_name,
        worker_ttl=cfg.registry.expire_seconds,
        session_ttl=st.session_seconds,
    )


def _shared_tick(store: Store, registry: Registry, service: SchedulerService) -> list[Worker]:
    """One beat of a scheduler sharing its store: session, workers, orphaned runs."""
    if not store.keep_alive():
        service.runs.abandon()
    gone = registry.sync([w for w, _ in store.workers()])
    for rec in store.orphaned_runs():
        if rec.run_id in service.runs.active:
            continue  # driven here
        if store.claim_run(rec.run_id):
            fresh = store.run(rec.run_id)  # as the dead owner left it
            if fresh is not None:
                service.runs.adopt(fresh)
    # Cancels asked at another scheduler of the runs driven here: read only while some run
    # is (each read is a blocking round trip to etcd, a long one without a quorum).
    if service.runs.active:
        for run_id in store.cancel_requests():
            active = service.runs.active.get(run_id)
            if active is not None:
                service.runs.cancel(active)
    return gone


async def _serve_legacy(
    cfg: SchedulerConfig, registry: WorkerRegistry, store: Store, options: list[tuple[str, Any]]
) -> grpc.aio.Server | None:
    """The plaintext listener of legacy mode (``[legacy] addr``), or None when off."""
    if not cfg.legacy.addr:
        return None
    server = grpc.aio.server(options=options)
    pb_grpc.add_SchedulerServicer_to_server(
        SchedulerService(cfg, registry, store, legacy=True), server
    )
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
