"""Registration with the scheduler: register, keep alive, deregister.

The original worker dialled the scheduler without TLS and exited when it was
down. Here the agent calls ``RegisterWorker`` over mTLS (its own client
certificate, the scheduler's certificate verified against the configured
CA), retries with exponential backoff and full jitter for as long as it
takes, never exits because of the scheduler, sends ``Heartbeat`` to keep the
registration alive and registers again when the scheduler has forgotten it
(a restart, or a network cut longer than the scheduler's expiry), and calls
``DeregisterWorker`` on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.channel import backoff, reconnecting_channel_options
from agent.tls import KeyPair

__all__ = ["Registrar", "backoff", "reconnecting_channel_options"]

log = logging.getLogger(__name__)


class Registrar:
    """Keeps this agent registered with the scheduler."""

    def __init__(
        self,
        *,
        scheduler_addr: str,
        advertise_addr: str,
        pair: KeyPair,
        ca_pem: bytes,
        server_name: str = "",
        heartbeat: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        call_timeout: float = 5.0,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.scheduler_addr = scheduler_addr
        self.advertise_addr = advertise_addr
        self.heartbeat = heartbeat
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.call_timeout = call_timeout
        self.worker_id = ""
        self.registered = asyncio.Event()
        self._on_event = on_event or (lambda **kw: None)
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=pair.key_pem, certificate_chain=pair.cert_pem
        )
        self._channel = grpc.aio.secure_channel(
            scheduler_addr, creds, options=reconnecting_channel_options(server_name)
        )
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._last_problem = ""

    def start(self) -> None:
        """Run the registration loop in the background."""
        self._task = asyncio.ensure_future(self._loop())

    def _problem(self, text: str) -> None:
        # Log a failure once per kind, not at every retry.
        if text != self._last_problem:
            self._last_problem = text
            log.warning("scheduler %s: %s (retrying with backoff)", self.scheduler_addr, text)
            self._on_event(decision="error", reason=text, rpc="RegisterWorker")

    async def _register(self) -> float:
        """Register until it works; returns the heartbeat interval to use."""
        delay = backoff(self.retry_initial, self.retry_max)
        while True:
            try:
                res = await self._stub.RegisterWorker(
                    pb.RegisterReq(address=self.advertise_addr), timeout=self.call_timeout
                )
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    self._problem(f"registration refused: {e.details()}")
                else:
                    self._problem(f"cannot register: {code.name}: {e.details()}")
            else:
                if res.success and res.workerID:
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
                    return float(res.heartbeatSeconds or self.heartbeat)
                self._problem("registration refused (success = false)")
            await asyncio.sleep(delay())

    async def _loop(self) -> None:
        while True:
            interval = await self._register()
            await self._keep_alive(interval)
            self.registered.clear()

    async def _keep_alive(self, interval: float) -> None:
        """Heartbeat until the scheduler no longer knows us."""
        delay = backoff(self.retry_initial, self.retry_max)
        while True:
            await asyncio.sleep(interval)
            try:
                res = await self._stub.Heartbeat(
                    pb.HeartbeatReq(workerID=self.worker_id), timeout=self.call_timeout
                )
            except grpc.aio.AioRpcError as e:
                self._problem(f"heartbeat failed: {e.code().name}: {e.details()}")
                # Unreachable: keep trying; the scheduler may forget us
                # meanwhile, which the next successful heartbeat tells.
                await asyncio.sleep(max(0.0, delay() - interval))
                continue
            if not res.known:
                log.info(
                    "scheduler %s no longer knows worker %s: registering again",
                    self.scheduler_addr,
                    self.worker_id,
                )
                return
            if self._last_problem:
                log.info("scheduler %s reachable again", self.scheduler_addr)
                self._last_problem = ""
            delay = backoff(self.retry_initial, self.retry_max)

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
