"""What a running agent keeps loaded at idle: nothing it needs only on a rare path.

Each module named here cost resident memory for the agent's whole life while
serving no request of an idle agent with the default configuration (metrics
off, logging to stderr); see docs/benchmarks.md for the figures. The agent is
real (``python -m agent run`` through runpy, as ``-m`` does) and is asked for
its ``sys.modules`` with SIGUSR2, which a small wrapper handles; no RSS number
is asserted (the bench reports it). Also here: the retention sweep reads an
index, so a long history does not fill SQLite's page cache at every start.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent._proto import jobscheduler_pb2 as pb
from agent.daemon.cli import limit_malloc_arenas
from agent.daemon.history import JobRecord, Store
from agent.vocabulary import JobState

from helpers import AgentFactory, AgentProcess, free_port

# Loaded but unneeded at idle (established with /proc/PID/smaps, -X importtime
# and tracemalloc); the reason each one came in is in brackets.
NOT_AT_IDLE = (
    "prometheus_client",  # [metrics] is off (brought http.server, email, urllib, wsgiref)
    "agent.daemon.metrics",
    "http.server",
    "http.client",
    "email",
    "urllib.request",
    "wsgiref",
    "gzip",
    "grpc_reflection.v1alpha",  # reflection is imported on its first call
    "google.protobuf.descriptor_pb2",  # (by grpc_reflection)
    "logging.handlers",  # logging to stderr needs neither syslog nor a watched file
    "shutil",  # (by argparse, to size help text nobody asked for; with zlib, bz2, lzma)
    "bz2",
    "lzma",
    "cryptography",  # only [auth] crl_files and `agent pki` use it
    "agent.keeper.spawner",  # runs in the spawner process, never in the agent
    "agent.daemon.registration",  # [scheduler] register = false
    "daemon",  # python-daemon: only `agent run --daemon`
    "agent.client",
    "agent.scheduler",
)

WRAPPER = textwrap.dedent(
    """
    import os, runpy, signal, sys

    def dump(*_):
        path = os.environ["AGENT_TEST_MODULES_OUT"]
        with open(path + ".tmp", "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["agent", "run", "--config", sys.argv[1]]
    runpy.run_module("agent", run_name="__main__", alter_sys=True)
    """
)


def _start_wrapped(a: AgentProcess, out: Path) -> None:
    """Start the agent under the wrapper; wait until it serves."""
    a.env["AGENT_TEST_MODULES_OUT"] = str(out)
    a.start(command=[sys.executable, "-c", WRAPPER, str(a.config_path)])


def _modules(a: AgentProcess, out: Path) -> set[str]:
    """The agent's sys.modules now."""
    out.unlink(missing_ok=True)
    a.signal(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists():
        assert time.monotonic() < deadline, a.log()
        time.sleep(0.02)
    return set(out.read_text().split())


def _loaded(mods: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in mods)


def _idle_calls(a: AgentProcess) -> None:
    """What an idle agent sees: a health check and a listing."""
    with grpc.secure_channel(a.addr, a.certs.creds("client")) as ch:
        res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert res.status == health_pb2.HealthCheckResponse.SERVING
    with a.stub("admin") as stub:
        stub.ListJobs(pb.ListJobsReq(pageSize=10), timeout=10)


def _list_services(a: AgentProcess) -> set[str]:
    with grpc.secure_channel(a.addr, a.certs.creds("client")) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        res = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
        return {s.name for s in res.list_services_response.service}


def test_idle_agent_has_no_rare_path_module_loaded(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """An idle agent (default config) has none of the modules only rare paths need."""
    a = make_agent(start=False)
    out = tmp_path / "modules.txt"
    _start_wrapped(a, out)
    _idle_calls(a)
    mods = _modules(a, out)
    assert {"grpc", "agent.daemon.server", "agent.daemon.service"} <= mods  # the dump works
    assert [m for m in NOT_AT_IDLE if _loaded(mods, m)] == []


def test_reflection_is_loaded_by_its_first_call(make_agent: AgentFactory, tmp_path: Path) -> None:
    """Reflection, imported on demand, answers its first call in full."""
    a = make_agent(start=False)
    out = tmp_path / "modules.txt"
    _start_wrapped(a, out)
    assert not _loaded(_modules(a, out), "grpc_reflection.v1alpha")
    assert {"jobscheduler.Worker", "grpc.health.v1.Health"} <= _list_services(a)
    assert _loaded(_modules(a, out), "grpc_reflection.v1alpha")


def test_metrics_on_loads_prometheus(make_agent: AgentFactory, tmp_path: Path) -> None:
    """With [metrics] enabled the metrics module is there (the list above is about off)."""
    a = make_agent(start=False, metrics={"enabled": True, "addr": f"127.0.0.1:{free_port()}"})
    out = tmp_path / "modules.txt"
    _start_wrapped(a, out)
    assert {"prometheus_client", "agent.daemon.metrics"} <= _modules(a, out)


def _check(a: AgentProcess, identity: str) -> health_pb2.HealthCheckResponse:
    with grpc.secure_channel(a.addr, a.certs.creds(identity)) as ch:
        res: health_pb2.HealthCheckResponse = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return res


def _watch(a: AgentProcess, identity: str) -> health_pb2.HealthCheckResponse:
    with grpc.secure_channel(a.addr, a.certs.creds(identity)) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        try:
            return next(iter(call))
        finally:
            call.cancel()


@pytest.mark.parametrize("metrics", [False, True], ids=["metrics-off", "metrics-on"])
def test_auth_gate_covers_every_health_and_reflection_method(
    make_agent: AgentFactory, metrics: bool
) -> None:
    """Check, Watch and reflection refuse an identity [auth] lacks, with metrics off or on."""
    kw = {"metrics": {"enabled": True, "addr": f"127.0.0.1:{free_port()}"}} if metrics else {}
    a = make_agent(**kw)
    assert _watch(a, "client").status == health_pb2.HealthCheckResponse.SERVING
    for call in (_watch, _check):
        with pytest.raises(grpc.RpcError) as e:
            call(a, "agent")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(a.addr, a.certs.creds("agent")) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e2:
            next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
        assert e2.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_age_sweep_reads_the_end_time_index_not_the_history(tmp_path: Path) -> None:
    """The retention age query reads the jobs_end index, not every row (a full page cache)."""
    store = Store(tmp_path / "jobs.sqlite3")
    now = time.time()
    for i in range(50):
        store.insert(
            JobRecord(
                id=f"job-{i}",
                owner="client",
                command="/bin/true",
                path="",
                args=[],
                state=JobState.SUCCEEDED,
                start_time=now - 10,
                end_time=now - 5,
                output_path=str(tmp_path / f"job-{i}.log"),
            )
        )
    store.commit()
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    assert store.expired(max_age_seconds=3600, max_jobs=0) == []  # nothing is a week old
    store._db.set_trace_callback(None)
    selects = [q for q in seen if q.lstrip().upper().startswith("SELECT")]
    assert selects
    for q in selects:
        plan = " ".join(str(row[-1]) for row in store._db.execute("EXPLAIN QUERY PLAN " + q))
        assert "INDEX" in plan, (q, plan)
    store.close()


def test_malloc_arenas_are_limited_unless_the_operator_chose() -> None:
    """`agent run` caps glibc's malloc arenas; an operator's MALLOC_ARENA_MAX is left alone."""
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("not glibc")
    assert limit_malloc_arenas({}) is True
    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "4"}) is False
