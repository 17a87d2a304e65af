"""Prometheus metrics of the agent, on a listener of their own.

Every name starts with ``agent_`` and follows the Prometheus conventions
(counters end in ``_total``, durations are ``_seconds``). The numbers come
from hooks the parts that already report events call, never from inside
them: a gRPC server interceptor (RPCs, stream followers), the audit log's
``on_record`` (refusals by rule, policy and certificate reload results: every
one of them is an audit event already), the supervisor's
:class:`~agent.daemon.supervisor.JobHooks` (jobs started and finished, spawn
latency, durations) and values read at scrape time (running jobs, certificate
expiry, readiness) or refreshed by the main loop (history size, which needs
the database).

The listener is plain HTTP on loopback only unless ``[metrics]`` gives a
certificate (the config refuses anything else): metrics name policy
entries and show what runs when.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import x509
from agent.configfile import split_host_port
from agent.daemon.access_gate import gated
from agent.daemon.history import JobRecord
from agent.keeper.config import Metrics as MetricsConfig
from agent.vocabulary import JobState

log = logging.getLogger(__name__)

PREFIX = "agent"
SPAWN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
JOB_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400)
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# An entry name that no longer matches (the policy was reloaded meanwhile).
UNKNOWN_ENTRY = ""
# Label children kept for the per-job series before the cache starts over.
LABEL_CACHE = 1024


class LabelChildren:
    """One metric's label children, looked up once per label values (bounded).

    prometheus_client's ``labels()`` costs more than the increment itself. The
    values are given in the metric's label order; past ``bound`` distinct ones
    (entry names come from the policy, and reloads can add some) the cache
    starts over.
    """

    def __init__(self, metric: Any, bound: int = LABEL_CACHE) -> None:
        self._metric, self._bound = metric, bound
        self._children: dict[tuple[str, ...], Any] = {}

    def get(self, *values: str) -> Any:
        """``metric.labels(*values)``, from the cache after the first time."""
        child = self._children.get(values)
        if child is None:
            if len(self._children) >= self._bound:
                self._children.clear()
            child = self._children[values] = self._metric.labels(*values)
        return child


class CertificateSource:
    """What the expiry gauge reads at scrape time: name -> current PEM."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], bytes | None]] = {}

    def add(self, name: str, pem: Callable[[], bytes | None]) -> None:
        """Report ``pem()``'s certificates under ``cert=name``."""
        self._sources[name] = pem

    def expiries(self) -> Iterable[tuple[str, str, float]]:
        """(name, subject, not_after as a Unix time) of every loaded certificate."""
        for name, get in self._sources.items():
            try:
                pem = get()
                if not pem:
                    continue
                ders = x509.pem_certificates(pem)
                # A chain file: only the leaf matters; a CA bundle: every CA.
                for der in ders if name == "ca" else ders[:1]:
                    c = x509.parse_certificate(der)
                    yield (
                        name,
                        c.subject,
                        c.not_after.replace(tzinfo=datetime.timezone.utc).timestamp(),
                    )
            except (x509.DERError, OSError):
                continue


class _ScrapeCollector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            f"{PREFIX}_certificate_expiry_seconds",
            "Seconds until the certificate expires (negative: expired)",
            labels=["cert", "subject"],
        )
        now = time.time()
        for name, subject, not_after in self._m.certificates.expiries():
            g.add_metric([name, subject], not_after - now)
        yield g
        yield GaugeMetricFamily(
            f"{PREFIX}_jobs_running", "Jobs running now", value=self._m.running()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_ready",
            "1 while the agent serves and accepts jobs, 0 while starting, draining or stopping",
            value=1.0 if self._m.ready() else 0.0,
        )


class AgentMetrics:
    """The agent's metrics in a registry of their own (one per agent)."""

    def __init__(self) -> None:
        # No "_created" series: a process-wide switch, and this process has
        # no other metrics.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self.jobs_started = Counter(
            f"{p}_jobs_started_total", "Jobs started, by policy entry", ["entry"], registry=r
        )
        self.jobs_finished = Counter(
            f"{p}_jobs_finished_total",
            "Jobs that ended, by final state and policy entry",
            ["state", "entry"],
            registry=r,
        )
        self.job_duration = Histogram(
            f"{p}_job_duration_seconds",
            "Run time of finished jobs, by policy entry",
            ["entry"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.spawn_latency = Histogram(
            f"{p}_spawn_latency_seconds",
            "From an admitted StartJob to the job running and recorded",
            buckets=SPAWN_BUCKETS,
            registry=r,
        )
        self.rpcs = Counter(
            f"{p}_rpcs_total",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            f"{p}_rpc_duration_seconds",
            "RPC handling time, by method",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            f"{p}_refusals_total", "Refused requests, by rule", ["rule"], registry=r
        )
        self.stream_followers = Gauge(
            f"{p}_stream_followers", "Output streams being served now", registry=r
        )
        self.policy_reloads = Counter(
            f"{p}_policy_reloads_total",
            "Policy reloads, by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.certificate_reloads = Counter(
            f"{p}_certificate_reloads_total",
            "Certificate reloads, by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.history_jobs = Gauge(
            f"{p}_history_jobs", "Jobs recorded in the history (running included)", registry=r
        )
        for c in (self.policy_reloads, self.certificate_reloads):
            for result in ("ok", "error"):
                c.labels(result=result)
        self.certificates = CertificateSource()
        self.running: Callable[[], int] = lambda: 0
        self.ready: Callable[[], bool] = lambda: False
        r.register(_ScrapeCollector(self))
        self._entries: dict[str, str] = {}
        self._server: Any = None
        # Label children of the per-job series, looked up once per label values.
        self._started = LabelChildren(self.jobs_started)
        self._ended = LabelChildren(self.jobs_finished)
        self._durations = LabelChildren(self.job_duration)

    # ------------------------------------------------------------ hooks

    def job_started(self, rec: JobRecord, entry: str, seconds: float) -> None:
        """A start returned ``rec`` (admitted under policy ``entry``) after ``seconds``."""
        self._started.get(entry).inc()
        if rec.pid:  # a process was spawned (pid 0: the start failed)
            self.spawn_latency.observe(seconds)
        if rec.state is JobState.RUNNING:
            self._entries[rec.id] = entry
        else:
            # Could not start, or already over: on_finish ran before this
            # (it found no entry and left the counting to here).
            self._finished(rec, entry)

    def job_finished(self, rec: JobRecord) -> None:
        """``rec`` reached its final state (the supervisor's JobHooks)."""
        entry = self._entries.pop(rec.id, None)
        if entry is not None:
            self._finished(rec, entry)

    def _finished(self, rec: JobRecord, entry: str) -> None:
        self._ended.get(rec.state.name, entry).inc()
        if rec.end_time is not None:
            self._durations.get(entry).observe(max(0.0, rec.end_time - rec.start_time))

    def audit_event(self, event: str, decision: str, rule: str) -> None:
        """Every audit record passes here (the audit log's ``on_record``)."""
        if decision == "deny":
            self.refusals.labels(rule=rule or "unknown").inc()
        elif event == "policy_reload":
            self.policy_reloads.labels(result=decision).inc()
        elif event == "certificate_rotation":
            self.certificate_reloads.labels(result=decision).inc()

    # ------------------------------------------------------------ listener

    def serve(self, cfg: MetricsConfig) -> int:
        """Start the HTTP(S) listener; return its port. Raises OSError when it cannot bind."""
        host, port = split_host_port(cfg.addr)
        tls: dict[str, Any] = {}
        if cfg.crt_file is not None and cfg.key_file is not None:
            tls = {"certfile": str(cfg.crt_file), "keyfile": str(cfg.key_file)}
            if cfg.ca_file is not None:
                tls.update(client_cafile=str(cfg.ca_file), client_auth_required=True)
        server, _thread = start_http_server(port, addr=host, registry=self.registry, **tls)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ---------------------------------------------------------------- RPCs


def _code_name(context: Any, failed: BaseException | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return str(c.name)
    if failed is None:
        return "OK"
    if isinstance(failed, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    return "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every RPC by method and status code."""

    def __init__(
        self,
        metrics: AgentMetrics,
        gate: Callable[[str, Any], Awaitable[None]] | None = None,
    ) -> None:
        self._m = metrics
        # gate(method, context): may abort the call (access to the health and
        # reflection services); runs before their handler.
        self._gate = gate
        # method -> (the handler grpc found, our wrapper of it): built once per
        # method instead of once per call. Keyed on the handler object too, so
        # a different handler for the same method gets its own wrapper. Bounded
        # by the registered methods (an unknown method has no handler).
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        # Label children, looked up once per (method, code) and per method.
        self._counts = LabelChildren(metrics.rpcs)
        self._durations = LabelChildren(metrics.rpc_duration)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        """Wrap the handler's behaviour (unary-unary or unary-stream)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        gate = self._gate
        if gate is not None:
            # The one access gate (fails closed: None for a handler it cannot
            # gate); the counting below wraps it, so refusals are counted too.
            handler = gated(handler, method, gate)
            if handler is None:
                return None
        counts, durations = self._counts, self._durations

        def observe(context: Any, failed: BaseException | None, t0: float) -> None:
            counts.get(method, _code_name(context, failed)).inc()
            durations.get(method).observe(time.monotonic() - t0)

        def call(inner: Any) -> Any:
            """A unary handler, or one that writes with context.write() (health's Watch)."""

            async def wrapped(request: Any, context: Any) -> Any:
                t0 = time.monotonic()
                failed: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    failed = e
                    raise
                finally:
                    observe(context, failed, t0)

            return wrapped

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=call(handler.unary_unary))
        for kind in ("unary_stream", "stream_stream"):
            inner_s = getattr(handler, kind)
            if inner_s is None:
                continue
            if inspect.isasyncgenfunction(inner_s):

                async def gen(
                    request: Any, context: Any, inner: Any = inner_s
                ) -> AsyncIterator[Any]:
                    t0 = time.monotonic()
                    failed: BaseException | None = None
                    try:
                        async for item in inner(request, context):
                            yield item
                    except BaseException as e:
                        failed = e
                        raise
                    finally:
                        observe(context, failed, t0)

                return handler._replace(**{kind: gen})

            return handler._replace(**{kind: call(inner_s)})
        return handler
