"""Standard gRPC health and reflection, and the Prometheus metrics endpoint."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.client import PermissionDenied
from agent.configfile import ConfigError
from agent.keeper.config import parse

from helpers import AgentFactory, Certs, SchedulerProcess, free_port, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
BASE = (
    '[grpc_server]\naddr = "127.0.0.1:1"\nuse_tls = false\nallow_plaintext_loopback = true\n'
    '[auth]\nallow_anonymous = true\n[jobs]\npolicy_file = "p.yaml"\n'
)


def _health(addr: str, certs: Certs, identity: str, service: str) -> int:
    with grpc.secure_channel(addr, certs.creds(identity)) as ch:
        res = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(res.status)


def _services(addr: str, certs: Certs, identity: str) -> set[str]:
    with grpc.secure_channel(addr, certs.creds(identity)) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        out: set[str] = set()
        for res in stub.ServerReflectionInfo(iter([req]), timeout=5):
            out |= {s.name for s in res.list_services_response.service}
        return out


def _symbol_file(addr: str, certs: Certs, identity: str, symbol: str) -> int:
    with grpc.secure_channel(addr, certs.creds(identity)) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        n = 0
        for res in stub.ServerReflectionInfo(iter([req]), timeout=5):
            n += len(res.file_descriptor_response.file_descriptor_proto)
        return n


def test_agent_health_and_reflection(make_agent: AgentFactory) -> None:
    """grpc.health.v1 says SERVING and reflection lists and describes the Worker service."""
    a = make_agent()
    assert _health(a.addr, a.certs, "client", "") == SERVING
    assert _health(a.addr, a.certs, "client", "jobscheduler.Worker") == SERVING
    services = _services(a.addr, a.certs, "client")
    assert {
        "jobscheduler.Worker",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert _symbol_file(a.addr, a.certs, "client", "jobscheduler.Worker") >= 1


def test_health_denies_identities_auth_does_not_list(make_agent: AgentFactory) -> None:
    """An identity missing from [auth] gets PERMISSION_DENIED from health and reflection too."""
    a = make_agent()
    with pytest.raises(grpc.RpcError) as e:
        _health(a.addr, a.certs, "agent", "")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e2:
        _services(a.addr, a.certs, "agent")
    assert e2.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_scheduler_health_and_reflection(tmp_path: Path, certs: Certs) -> None:
    """The reference scheduler answers health and reflection too."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    s.start()
    try:
        assert _health(s.addr, certs, "admin", "jobscheduler.Scheduler") == SERVING
        assert "jobscheduler.Scheduler" in _services(s.addr, certs, "admin")
    finally:
        s.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the scrape:\n{text}")


def test_metrics_endpoint_after_jobs(make_agent: AgentFactory, script_dir: Path) -> None:
    """A real scrape shows jobs by entry and state, RPCs by code, refusals by rule, certs."""
    port = free_port()
    a = make_agent(metrics={"enabled": True, "addr": f"127.0.0.1:{port}"})
    c = a.client()
    for _ in range(2):
        job = c.start("bash", str(script_dir / "hello.sh"))
        assert c.wait(job, timeout=20).state == "SUCCEEDED"
    with pytest.raises(PermissionDenied):
        c.start("/bin/sh", "-c")
    denied = 'agent_rpcs_total{code="PERMISSION_DENIED",method="/jobscheduler.Worker/StartJob"}'

    # The status reaches the client as the handler ends: the count follows a moment later.
    def scraped() -> str | None:
        t = _scrape(port)
        return t if denied + " " in t else None

    text = wait_for(scraped)
    started = [ln for ln in text.splitlines() if ln.startswith("agent_jobs_started_total{")]
    assert started and sum(float(ln.split()[-1]) for ln in started) == 2
    assert any(
        ln.startswith("agent_jobs_finished_total{") and 'state="SUCCEEDED"' in ln
        for ln in text.splitlines()
    )
    assert _value(text, "agent_jobs_running") == 0
    assert _value(text, "agent_ready") == 1
    assert _value(text, "agent_spawn_latency_seconds_count") == 2
    assert _value(text, denied) == 1
    assert _value(text, 'agent_refusals_total{rule="command-not-allowed"}') == 1
    assert "agent_job_duration_seconds_bucket" in text
    assert "agent_rpc_duration_seconds_bucket" in text
    assert "agent_stream_followers" in text
    assert 'agent_policy_reloads_total{result="ok"}' in text
    assert 'agent_certificate_reloads_total{result="error"}' in text
    server = [
        ln
        for ln in text.splitlines()
        if ln.startswith('agent_certificate_expiry_seconds{cert="server"')
    ]
    assert server and float(server[0].split()[-1]) > 0
    assert 'agent_certificate_expiry_seconds{cert="ca"' in text
    assert "agent_history_jobs" in text


def test_metrics_listener_off_loopback_needs_tls(tmp_path: Path) -> None:
    """[metrics] on a non-loopback address without a certificate is a config error."""
    text = BASE + '[metrics]\nenabled = true\naddr = "0.0.0.0:9464"\n'
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path / "config.toml")
    assert "[metrics] addr" in str(e.value) and "TLS" in str(e.value)


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    """Without [metrics] enabled = true no listener is configured."""
    cfg = parse(BASE, tmp_path / "config.toml")
    assert cfg.metrics.enabled is False and cfg.metrics.addr == "127.0.0.1:9464"


def test_dashboard_and_alerts_use_only_real_metrics() -> None:
    """Every agent_* name in the shipped Grafana dashboard and alert rules exists."""
    import re

    from agent.daemon.metrics import AgentMetrics

    repo = Path(__file__).resolve().parent.parent
    if not (repo / "examples").is_dir():
        pytest.skip("not a source checkout")
    names: set[str] = set()
    for fam in AgentMetrics().registry.collect():
        names |= {s.name for s in fam.samples} | {fam.name}
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names |= {fam.name + x for x in ("_bucket", "_count", "_sum")}
    for f in ("grafana-dashboard.json", "prometheus-alerts.yaml"):
        used = set(re.findall(r"\bagent_[a-z_]+", (repo / "examples" / f).read_text()))
        assert used and used <= names, (f, used - names)


def test_metrics_over_tls_with_client_certificates(make_agent: AgentFactory, certs: Certs) -> None:
    """[metrics] with crt_file/key_file/ca_file serves HTTPS and requires a client certificate."""
    import ssl

    port = free_port()
    make_agent(
        metrics={
            "enabled": True,
            "addr": f"127.0.0.1:{port}",
            "crt_file": str(certs.crt("server")),
            "key_file": str(certs.key("server")),
            "ca_file": str(certs.ca),
        }
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(certs.crt("client")), str(certs.key("client")))
    url = f"https://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
        assert b"agent_ready 1.0" in r.read()
    bare = ssl.create_default_context(cafile=str(certs.ca))
    bare.check_hostname = False
    with pytest.raises((ssl.SSLError, OSError)):
        urllib.request.urlopen(url, context=bare, timeout=5).read()
