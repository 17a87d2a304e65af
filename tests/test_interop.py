"""Interoperability with the original system, both ways.

The original scheduler and worker are stood in for by programs built from
nothing but the original .proto (the field list of shared/DESIGN.md, in
``test_proto.ORIGINAL_PROTO``) and what the original code does: its
scheduler answers RegisterWorker with a workerID and no ``success``, has no
Heartbeat, never forgets a worker and dials workers without TLS; its worker
dials the scheduler without TLS, runs ``command path`` and exits if it
cannot register. They run as separate processes, as the originals do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_proto import ORIGINAL_PROTO

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.configfile import ConfigError
from agent.keeper import config as agent_config
from agent.scheduler.config import load_config
from agent.scheduler.registry import LEGACY_IDENTITY, Registry

from helpers import (
    AgentProcess,
    Certs,
    SchedulerProcess,
    free_port,
    registration_section,
    to_toml,
    wait_for,
)

AgentFactory = Callable[..., AgentProcess]

STANDIN = textwrap.dedent('''
    """Stand-ins of the original scheduler and worker (original proto only)."""
    import json, os, signal, subprocess, sys, threading, time, uuid
    from concurrent import futures
    import grpc
    sys.path.insert(0, os.environ["STUBS"])
    import jobscheduler_pb2 as pb, jobscheduler_pb2_grpc as pbg

    def out(**kw):
        print(json.dumps(kw), flush=True)

    class Unknown(grpc.GenericRpcHandler):
        """Counts calls of methods the original does not have (UNIMPLEMENTED)."""
        def service(self, details):
            out(event="unknown", method=details.method)
            return None

    def scheduler(addr, crt=None, key=None):
        workers = {}
        class S(pbg.SchedulerServicer):
            def RegisterWorker(self, r, ctx):
                wid = str(uuid.uuid4())
                workers[wid] = r.address
                out(event="register", id=wid, address=r.address, workers=workers)
                return pb.RegisterRes(workerID=wid)  # success never set
            def DeregisterWorker(self, r, ctx):
                workers.pop(r.workerID, None)
                out(event="deregister", id=r.workerID, workers=workers)
                return pb.DeregisterRes(success=True)
        # gRPC's default ping policy, strict: a client pinging without calls
        # more often than every 5 minutes loses its connection, as with Go.
        srv = grpc.server(futures.ThreadPoolExecutor(8), handlers=[Unknown()],
                          options=[("grpc.http2.max_ping_strikes", 1)])
        pbg.add_SchedulerServicer_to_server(S(), srv)
        if crt:
            rd = lambda p: open(p, "rb").read()
            srv.add_secure_port(addr, grpc.ssl_server_credentials([(rd(key), rd(crt))]))
        else:
            srv.add_insecure_port(addr)
        srv.start()
        out(event="listening")
        return srv

    def drive(worker_addr):
        """What the original scheduler's HTTP API does: plaintext calls, results out."""
        stub = pbg.WorkerStub(grpc.insecure_channel(worker_addr))
        def call(step, fn, req):
            try:
                r = fn(req, timeout=5)
            except grpc.RpcError as e:
                out(step=step, code=e.code().name, details=e.details())
                return None
            out(step=step, code="OK", **{f.name: v for f, v in r.ListFields()})
            return r
        def wait(step, jid):
            for _ in range(1000):
                r = stub.QueryJob(pb.QueryJobReq(jobID=jid), timeout=5)
                if r.done:
                    break
                time.sleep(0.01)
            out(step=step, code="OK", done=r.done, error=r.error, errorText=r.errorText)
        ok = call("start true", stub.StartJob, pb.StartJobReq(command="true", path=""))
        wait("wait true", ok.jobID)
        call("stop finished", stub.StopJob, pb.StopJobReq(jobID=ok.jobID))
        long = call("start sleep", stub.StartJob, pb.StartJobReq(command="sleep", path="30"))
        call("query running", stub.QueryJob, pb.QueryJobReq(jobID=long.jobID))
        call("stop running", stub.StopJob, pb.StopJobReq(jobID=long.jobID))
        wait("wait stopped", long.jobID)
        unknown = str(uuid.uuid4())
        call("query unknown", stub.QueryJob, pb.QueryJobReq(jobID=unknown))
        call("stop unknown", stub.StopJob, pb.StopJobReq(jobID=unknown))
        call("start refused", stub.StartJob, pb.StartJobReq(command="/bin/sh", path="-c"))

    def worker(addr, sched_addr):
        jobs = {}
        class W(pbg.WorkerServicer):
            def StartJob(self, r, ctx):
                jid = str(uuid.uuid4())
                jobs[jid] = subprocess.Popen([r.command, r.path])
                return pb.StartJobRes(jobID=jid)
            def StopJob(self, r, ctx):
                p = jobs.get(r.jobID)
                if p is None:
                    ctx.abort(grpc.StatusCode.NOT_FOUND, "job not found")
                if p.poll() is None:
                    p.kill()
                return pb.StopJobRes()
            def QueryJob(self, r, ctx):
                p = jobs.get(r.jobID)
                if p is None:
                    ctx.abort(grpc.StatusCode.NOT_FOUND, "job not found")
                rc = p.poll()
                return pb.QueryJobRes(done=rc is not None, error=bool(rc),
                                      errorText=f"exit {rc}" if rc else "")
        srv = grpc.server(futures.ThreadPoolExecutor(8))
        pbg.add_WorkerServicer_to_server(W(), srv)
        srv.add_insecure_port(addr)
        srv.start()
        sched = pbg.SchedulerStub(grpc.insecure_channel(sched_addr))
        try:
            wid = sched.RegisterWorker(pb.RegisterReq(address=addr), timeout=2).workerID
        except grpc.RpcError as e:
            out(event="cannot register", code=e.code().name, details=e.details())
            sys.exit(1)  # the original worker exits if it cannot register
        out(event="registered", id=wid)
        def leave(*_):
            sched.DeregisterWorker(pb.DeregisterReq(workerID=wid), timeout=2)
            os._exit(0)
        signal.signal(signal.SIGTERM, leave)
        return srv

    if __name__ == "__main__":
        mode, *args = sys.argv[1:]
        if mode == "drive":
            drive(*args)
            sys.exit(0)
        srv = (scheduler if mode == "scheduler" else worker)(*args)
        srv.wait_for_termination()
''')


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in program, with stubs generated from the original proto alone."""
    from grpc_tools import protoc

    d = tmp_path_factory.mktemp("original")
    (d / "jobscheduler.proto").write_text(ORIGINAL_PROTO)
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{d}",
                f"--python_out={d}",
                f"--grpc_python_out={d}",
                "jobscheduler.proto",
            ]
        )
        == 0
    )
    (d / "standin.py").write_text(STANDIN)
    return d


class Original:
    """A running stand-in (scheduler or worker); its events are JSON lines."""

    def __init__(self, standin: Path, workdir: Path, mode: str, *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = workdir / f"{mode}-{free_port()}.jsonl"
        env = dict(os.environ, STUBS=str(standin))
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(standin / "standin.py"), mode, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events so far (lines that are not JSON are gRPC's own logs)."""
        evs = []
        for line in self.out_path.read_text().splitlines():
            if line.startswith("{"):
                e = json.loads(line)
                if kind is None or e.get("event") == kind:
                    evs.append(e)
        return evs

    def workers(self) -> dict[str, str]:
        """The stand-in scheduler's registry after its last change."""
        evs = [e for e in self.events() if "workers" in e]
        return evs[-1]["workers"] if evs else {}

    def heartbeats(self) -> int:
        return sum(1 for e in self.events("unknown") if e["method"].endswith("/Heartbeat"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def originals(standin: Path, tmp_path: Path) -> Iterator[Callable[..., Original]]:
    """Start stand-ins (stopped at the end of the test)."""
    started: list[Original] = []

    def start(mode: str, *args: str) -> Original:
        o = Original(standin, tmp_path / "originals", mode, *args)
        started.append(o)
        if mode == "scheduler":
            wait_for(lambda: o.events("listening") or o.proc.poll() is not None, timeout=20)
            assert o.proc.poll() is None, o.out_path.read_text()
        return o

    yield start
    for o in started:
        o.stop()


def _plaintext(addr: str) -> dict[str, Any]:
    """A [scheduler] table registering over plaintext (loopback, explicit switch)."""
    return {
        "addr": addr,
        "register": True,
        "use_tls": False,
        "allow_plaintext_loopback": True,
        "heartbeat_seconds": 0.3,
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "call_timeout_seconds": 2.0,
    }


def _registered_once(sched: Original, agent: AgentProcess, probes: int = 4) -> None:
    """The agent registered with ``sched`` exactly once, over ``probes`` probe intervals."""
    wait_for(lambda: len(sched.workers()) == 1, timeout=15)
    start = sched.heartbeats()
    wait_for(lambda: sched.heartbeats() >= start + probes, timeout=20)
    assert list(sched.workers().values()) == [agent.addr]
    assert len(sched.events("register")) == 1


# ---------------------------------------------------------------- agent -> original scheduler


def test_agent_registers_once_with_an_original_scheduler_over_plaintext(
    make_agent: AgentFactory, originals: Callable[..., Original]
) -> None:
    """Plaintext loopback: one registration, success unset accepted, no heartbeat spam."""
    addr = f"127.0.0.1:{free_port()}"
    sched = originals("scheduler", addr)
    a = make_agent(scheduler=_plaintext(addr))
    _registered_once(sched, a)
    log = a.log()
    assert "PLAINTEXT registration with scheduler" in log
    assert log.count("speaks the original protocol") == 1
    assert log.count("registered with scheduler") == 1
    assert "heartbeat failed" not in log and "UNIMPLEMENTED" not in log
    assert a.stop() == 0
    assert sched.workers() == {}  # deregistered at shutdown


def test_agent_registers_once_with_an_original_scheduler_over_tls(
    make_agent: AgentFactory, originals: Callable[..., Original], certs: Certs
) -> None:
    """The original's TLS mode (server certificate only): exactly one registration."""
    addr = f"127.0.0.1:{free_port()}"
    sched = originals("scheduler", addr, str(certs.crt("scheduler")), str(certs.key("scheduler")))
    a = make_agent(scheduler=registration_section(addr, certs, heartbeat_seconds=0.3))
    _registered_once(sched, a)
    assert "PLAINTEXT" not in a.log()


@pytest.mark.slow
def test_restarted_original_scheduler_gets_one_new_registration(
    make_agent: AgentFactory, originals: Callable[..., Original]
) -> None:
    """A new scheduler lifetime (same address) is told once more; the agent keeps serving."""
    addr = f"127.0.0.1:{free_port()}"
    first = originals("scheduler", addr)
    a = make_agent(scheduler=_plaintext(addr))
    _registered_once(first, a)
    first.proc.kill()
    first.proc.wait()
    second = originals("scheduler", addr)
    _registered_once(second, a)
    assert a.proc is not None and a.proc.poll() is None
    assert a.log().count("speaks the original protocol") == 1


def test_original_scheduler_drives_the_agent(make_agent: AgentFactory, standin: Path) -> None:
    """Start, query, stop, stop of a finished job, unknown ids and refusals behave."""
    a = make_agent(
        grpc_server={"use_tls": False, "ca_file": "", "allow_plaintext_loopback": True},
        auth={"allow_anonymous": True, "clients": [], "admins": []},
    )
    r = subprocess.run(
        [sys.executable, str(standin / "standin.py"), "drive", a.addr],
        env=dict(os.environ, STUBS=str(standin)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {e["step"]: e for e in map(json.loads, r.stdout.splitlines()) if "step" in e}
    assert steps["start true"]["code"] == "OK" and steps["start true"]["jobID"]
    assert steps["wait true"]["done"] and not steps["wait true"]["error"]
    assert steps["stop finished"]["code"] == "OK"
    assert steps["query running"]["code"] == "OK" and not steps["query running"].get("done")
    assert steps["stop running"]["code"] == "OK"
    assert steps["wait stopped"]["done"] and steps["wait stopped"]["error"]
    assert steps["wait stopped"]["errorText"]
    assert steps["query unknown"]["code"] == "NOT_FOUND"
    assert steps["stop unknown"]["code"] == "NOT_FOUND"
    assert steps["start refused"]["code"] == "PERMISSION_DENIED"
    # nothing ran for the refusal: the agent knows of the two other jobs only
    ch = grpc.insecure_channel(a.addr)
    try:
        jobs = pb_grpc.WorkerStub(ch).ListJobs(pb.ListJobsReq(), timeout=5).jobs
    finally:
        ch.close()
    assert {j.jobID for j in jobs} == {steps["start true"]["jobID"], steps["start sleep"]["jobID"]}


# ---------------------------------------------------------------- agent config


def _agent_cfg(tmp_path: Path, certs: Certs, scheduler: dict[str, Any]) -> Path:
    p = tmp_path / "config.toml"
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nentries: []\n")
    p.write_text(
        to_toml(
            {
                "grpc_server": {
                    "addr": "127.0.0.1:50000",
                    "crt_file": str(certs.crt("server")),
                    "key_file": str(certs.key("server")),
                    "ca_file": str(certs.ca),
                },
                "auth": {"clients": ["client"]},
                "jobs": {"policy_file": str(policy), "state_dir": str(tmp_path / "state")},
                "scheduler": scheduler,
            }
        )
    )
    return p


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (
            {"addr": "10.0.0.1:50000", "register": True, "use_tls": False},
            "[scheduler] use_tls: false is refused on non-loopback address",
        ),
        (
            {
                "addr": "10.0.0.1:50000",
                "register": True,
                "use_tls": False,
                "allow_plaintext_loopback": True,
            },
            "[scheduler] use_tls: false is refused on non-loopback address",
        ),
        (
            {"addr": "127.0.0.1:50000", "register": True, "use_tls": False},
            "[scheduler] use_tls: false needs allow_plaintext_loopback = true",
        ),
        (
            {"addr": "127.0.0.1:50000", "register": True},
            "[scheduler] crt_file: required when register = true",
        ),
    ],
)
def test_plaintext_registration_only_on_loopback_with_the_switch(
    tmp_path: Path, certs: Certs, scheduler: dict[str, Any], message: str
) -> None:
    """use_tls = false: loopback and allow_plaintext_loopback, else one clear line."""
    with pytest.raises(ConfigError) as e:
        agent_config.load(_agent_cfg(tmp_path, certs, scheduler))
    assert message in str(e.value)


# ------------------------------------------ original worker -> reference scheduler


def _legacy_scheduler(tmp_path: Path, certs: Certs) -> tuple[SchedulerProcess, str]:
    s = SchedulerProcess(tmp_path / "sched", certs)
    legacy_addr = f"127.0.0.1:{free_port()}"
    with open(s.config_path, "a") as f:
        f.write(f'\n[legacy]\naddr = "{legacy_addr}"\n')
    return s.start(), legacy_addr


def test_reference_scheduler_legacy_mode_drives_an_original_worker(
    tmp_path: Path, certs: Certs, originals: Callable[..., Original]
) -> None:
    """An original worker registers on the plaintext listener, is listed, driven, leaves."""
    s, legacy_addr = _legacy_scheduler(tmp_path, certs)
    try:
        # Logged just after the mTLS listener's line that start() waits for.
        wait_for(lambda: "legacy listener on" in s.log(), timeout=10)
        assert "PLAINTEXT" in s.log()
        w_addr = f"127.0.0.1:{free_port()}"
        w = originals("worker", w_addr, legacy_addr)
        wait_for(lambda: w.events("registered") or w.proc.poll() is not None, timeout=20)
        assert w.events("registered"), w.out_path.read_text()
        r = s.cli("workers", "--json")
        [info] = json.loads(r.stdout)
        assert info["address"] == w_addr and info["identity"] == LEGACY_IDENTITY
        wid = info["worker_id"]
        run = s.cli("run", "--worker", wid, "sleep", "30")
        assert run.returncode == 0, run.stderr
        job = run.stdout.strip()
        st = s.cli("status", "--worker", wid, "--json", job)
        assert st.returncode == 0, st.stderr
        assert s.cli("stop", "--worker", wid, job).returncode == 0
        unknown = s.cli("status", "--worker", wid, "--json", "no-such-job")
        assert unknown.returncode == 1 and "job not found" in unknown.stderr
        # A fan-out over it: no output stream nor WaitJob there, QueryJob tells the end.
        fan = s.cli("run", "--select", f"list:{wid}", "--", "true")
        assert fan.returncode == 0, fan.stderr
        assert "ok 1 failed 0" in fan.stderr
        w.stop()  # the original deregisters on SIGTERM
        assert json.loads(s.cli("workers", "--json").stdout) == []
    finally:
        s.stop()


def test_legacy_listener_serves_workers_only_on_loopback(
    tmp_path: Path, certs: Certs, standin: Path
) -> None:
    """Users are refused on the plaintext listener; workers must advertise loopback."""
    s, legacy_addr = _legacy_scheduler(tmp_path, certs)
    try:
        code = textwrap.dedent(f"""
            import os, sys, grpc
            sys.path.insert(0, os.environ["STUBS"])
            import jobscheduler_pb2 as pb, jobscheduler_pb2_grpc as pbg
            stub = pbg.SchedulerStub(grpc.insecure_channel("{legacy_addr}"))
            try:
                stub.RegisterWorker(pb.RegisterReq(address="10.1.2.3:30000"), timeout=5)
            except grpc.RpcError as e:
                print(e.code().name, e.details())
        """)
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, STUBS=str(standin)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "INVALID_ARGUMENT" in r.stdout and "must be on loopback" in r.stdout, r
        listed = s.cli("--addr", legacy_addr, "workers")
        assert listed.returncode == 1
        assert json.loads(s.cli("workers", "--json").stdout) == []
    finally:
        s.stop()


def test_legacy_addr_must_be_loopback(tmp_path: Path, certs: Certs) -> None:
    """[legacy] addr off loopback is refused, naming the key."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    with open(s.config_path, "a") as f:
        f.write('\n[legacy]\naddr = "0.0.0.0:50009"\n')
    with pytest.raises(ConfigError) as e:
        load_config(s.config_path)
    assert "[legacy] addr" in str(e.value) and "not loopback" in str(e.value)


def test_registry_never_expires_legacy_workers() -> None:
    """Original workers send no heartbeats: only they outlive expire_seconds."""
    clock = [1000.0]
    r = Registry(expire_seconds=10, clock=lambda: clock[0])
    old = r.register(LEGACY_IDENTITY, "127.0.0.1:30000", legacy=True)
    new = r.register("agent", "127.0.0.1:30001")
    clock[0] += 60
    assert [w.worker_id for w in r.expire()] == [new.worker_id]
    assert r.get(old.worker_id).address == "127.0.0.1:30000"
