"""Registration over mTLS, the reference scheduler, and the client library."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import agent
from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.access import AccessDenied, AccessRules
from agent.client import (
    AgentClient,
    AsyncAgentClient,
    DeadlineExceeded,
    JobStatus,
    NotFound,
    SchedulerClient,
    TLSFiles,
    Unavailable,
)
from agent.client.text import format_status
from agent.scheduler.cli import main as scheduler_main

from helpers import (
    AgentProcess,
    Certs,
    SchedulerProcess,
    free_port,
    registration_section,
    wait_for,
)

AgentFactory = Callable[..., AgentProcess]

# ---------------------------------------------------------------- registration


@pytest.fixture
def scheduler(tmp_path: Path, certs: Certs):  # type: ignore[no-untyped-def]
    s = SchedulerProcess(tmp_path / "sched", certs)
    yield s
    s.stop()


def _workers(s: SchedulerProcess) -> list[dict[str, str]]:
    r = s.cli("workers", "--json")
    assert r.returncode == 0 and r.stdout, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_agent_starts_without_scheduler_and_registers_when_it_comes(
    make_agent: AgentFactory, scheduler: SchedulerProcess, certs: Certs
) -> None:
    """Scheduler down at start-up: the agent serves, retries, registers once it is up."""
    a = make_agent(scheduler=registration_section(scheduler.addr, certs))
    c = a.client()
    assert c.wait(c.start("true", ""), timeout=10).state == "SUCCEEDED"
    wait_for(lambda: "cannot register" in a.log(), timeout=10)
    assert a.log().count("cannot register") == 1  # logged once, not at every retry
    scheduler.start()
    wait_for(lambda: len(_workers(scheduler)) == 1, timeout=15)
    w = _workers(scheduler)[0]
    assert w["address"] == a.addr and w["identity"] == "agent"
    assert "registered with scheduler" in a.log()
    # jobs through the scheduler, with the CLI
    r = scheduler.cli("run", "--worker", w["worker_id"], "--wait", "echo", "via", "sched")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert "SUCCEEDED" in r.stderr
    st = scheduler.cli("status", "--worker", w["worker_id"], "--json", job)
    assert json.loads(st.stdout)["owner"] == "scheduler"  # the agent sees the scheduler
    # deregistration at shutdown
    a.stop()
    assert _workers(scheduler) == []
    assert "worker" in scheduler.log() and "deregistered" in scheduler.log()


def test_worker_identity_not_allowed_is_refused(
    make_agent: AgentFactory, tmp_path: Path, certs: Certs
) -> None:
    """A worker certificate the scheduler does not list cannot register; it keeps serving."""
    s = SchedulerProcess(tmp_path / "s2", certs, workers=["someone-else"]).start()
    try:
        a = make_agent(scheduler=registration_section(s.addr, certs))
        wait_for(lambda: "registration refused" in a.log(), timeout=10)
        assert "not allowed as a worker" in a.log()
        assert _workers(s) == []
        c = a.client()
        assert c.wait(c.start("true", ""), timeout=10).state == "SUCCEEDED"
        assert "refused worker 'agent'" in s.log()
    finally:
        s.stop()


def test_restarted_scheduler_learns_of_the_agent_again(
    make_agent: AgentFactory, scheduler: SchedulerProcess, certs: Certs
) -> None:
    """Heartbeats: a scheduler restarted with an empty registry is told again."""
    scheduler.start()
    a = make_agent(scheduler=registration_section(scheduler.addr, certs))
    wait_for(lambda: len(_workers(scheduler)) == 1, timeout=15)
    scheduler.stop()
    scheduler.start()
    assert len(_workers(scheduler)) in (0, 1)
    wait_for(lambda: len(_workers(scheduler)) == 1, timeout=15)
    assert a.proc is not None and a.proc.poll() is None


def test_user_not_allowed_and_unknown_worker(scheduler: SchedulerProcess) -> None:
    """Only [auth] users may use the scheduler; unknown workers are NOT_FOUND."""
    scheduler.start()
    r = scheduler.cli("workers", identity="client")
    assert r.returncode == 1 and "permission denied" in r.stderr
    r = scheduler.cli("status", "--worker", "nope", "00000000-0000-4000-8000-000000000000")
    assert r.returncode == 1 and "not found" in r.stderr


# ---------------------------------------------------------------- client library


def test_client_deadlines_fail_fast_against_a_silent_peer(certs: Certs) -> None:
    """A peer that accepts TCP and never answers: DEADLINE_EXCEEDED within the deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    addr = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        with AgentClient(addr, certs.tls("client"), timeout=1.0) as c:
            t0 = time.monotonic()
            with pytest.raises((DeadlineExceeded, Unavailable)):
                c.query("00000000-0000-4000-8000-000000000000")
            assert time.monotonic() - t0 < 5
            t0 = time.monotonic()
            with pytest.raises((DeadlineExceeded, Unavailable)):
                c.start("true", "")
            assert time.monotonic() - t0 < 3
    finally:
        stop.set()
        t.join()
        srv.close()
        for s in conns:
            s.close()


def test_start_is_never_retried_queries_are(make_agent: AgentFactory, script_dir: Path) -> None:
    """During shutdown StartJob is UNAVAILABLE: the client tries it exactly once."""
    a = make_agent(daemon={"on_shutdown": "wait", "shutdown_deadline_seconds": 30})
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["2"])
    import signal as _signal

    a.signal(_signal.SIGTERM)
    wait_for(lambda: "shutting down" in a.log())
    with pytest.raises(Unavailable):
        c.start("true", "")
    attempts = [e for e in a.audit_lines() if e.get("rule") == "shutting-down"]
    assert len(attempts) == 1
    assert c.query(job).state == "RUNNING"


def test_async_client_full_cycle(agent: AgentProcess, script_dir: Path) -> None:
    """AsyncAgentClient: start, stream, wait, list, stop, errors."""

    async def run() -> None:
        async with AsyncAgentClient(agent.addr, agent.certs.tls("client")) as c:
            job = await c.start("bash", str(script_dir / "count.sh"), args=["3", "0.05"])
            data = b"".join([chunk async for chunk in c.stream(job, follow=True)])
            assert data == b"line 1\nline 2\nline 3\n"
            st = await c.wait(job, timeout=10)
            assert st.state == "SUCCEEDED"
            jobs, _ = await c.list()
            assert job in [j.job_id for j in jobs]
            long = await c.start("sleep", "30")
            await c.stop(long)
            assert (await c.wait(long, timeout=10)).state == "STOPPED"
            with pytest.raises(NotFound):
                await c.query("00000000-0000-4000-8000-000000000000")

    asyncio.run(run())


def test_scheduler_client_library(
    make_agent: AgentFactory, scheduler: SchedulerProcess, certs: Certs
) -> None:
    """SchedulerClient: list workers, run and stop a job on one."""
    scheduler.start()
    make_agent(scheduler=registration_section(scheduler.addr, certs))
    with SchedulerClient(
        scheduler.addr, TLSFiles(certs.ca, certs.crt("admin"), certs.key("admin"))
    ) as s:
        wait_for(lambda: len(s.workers()) == 1, timeout=15)
        w = s.workers()[0]
        job = s.start(w.worker_id, "sleep", "30")
        assert s.query(w.worker_id, job).state == "RUNNING"
        s.stop(w.worker_id, job)
        assert s.wait(w.worker_id, job, timeout=10).state == "STOPPED"
        with pytest.raises(NotFound):
            s.query("00000000-0000-4000-8000-000000000000", job)


# ---------------------------------------------------------------- scheduler roles and CLI


def test_scheduler_roles_use_the_shared_access_rules() -> None:
    """A caller not on a role's list is refused with a message naming the role."""
    rules = AccessRules(clients=frozenset({"agent-1"}))
    rules.caller("agent-1").may_act_as("worker")
    with pytest.raises(AccessDenied, match="'intruder' is not allowed as a worker") as e:
        rules.caller("intruder").may_act_as("worker")
    assert e.value.rule == "not-a-worker"


def test_scheduler_version(capsys: pytest.CaptureFixture[str]) -> None:
    """agent-scheduler --version prints 'agent-scheduler <version>' and exits 0."""
    with pytest.raises(SystemExit) as e:
        scheduler_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"agent-scheduler {agent.__version__}"


# ---------------------------------------------------------------- original workers


def test_status_of_an_original_worker_is_read_from_done_and_error() -> None:
    """No state on the wire: done without error is success, with error a failure."""
    ok = JobStatus.from_pb(pb.QueryJobRes(done=True), "j")
    failed = JobStatus.from_pb(pb.QueryJobRes(done=True, error=True, errorText="exit 3"), "j")
    running = JobStatus.from_pb(pb.QueryJobRes(), "j")
    assert ok.state == failed.state == running.state == "UNSPECIFIED"
    assert (ok.succeeded, failed.succeeded, running.succeeded) == (True, False, False)
    assert "succeeded (the worker reports done/error only" in format_status(ok)
    assert "failed (" in format_status(failed) and "not done (" in format_status(running)
    # A worker that sends a state is judged by it alone.
    stopped = pb.QueryJobRes(done=True, state=pb.STOPPED)
    assert not JobStatus.from_pb(stopped).succeeded


class _OriginalWorker(pb_grpc.WorkerServicer):
    """A worker of the original protocol: its QueryJobRes has done, error, errorText only.

    ``true`` exits 0, anything else exits 1; jobs are done at once.
    """

    def __init__(self) -> None:
        self.exits: dict[str, int] = {}

    def StartJob(self, request: Any, context: Any) -> pb.StartJobRes:
        job = str(uuid.uuid4())
        self.exits[job] = 0 if request.command == "true" else 1
        return pb.StartJobRes(jobID=job)

    def QueryJob(self, request: Any, context: Any) -> pb.QueryJobRes:
        rc = self.exits[request.jobID]
        return pb.QueryJobRes(done=True, error=rc != 0, errorText=f"exit status {rc}" if rc else "")


@pytest.fixture
def original_worker() -> Iterator[str]:
    """An original-protocol worker serving plaintext on loopback; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_WorkerServicer_to_server(_OriginalWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_run_wait_on_an_original_worker_exits_by_done_and_error(
    tmp_path: Path, certs: Certs, original_worker: str
) -> None:
    """agent-scheduler run --wait: 0 for a job an original worker ran to success, else 1."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    legacy = f"127.0.0.1:{free_port()}"
    with open(s.config_path, "a") as f:
        f.write(f'\n[legacy]\naddr = "{legacy}"\n')
    s.start()
    try:
        # Logged just after the mTLS listener's line that start() waits for.
        wait_for(lambda: "legacy listener on" in s.log(), timeout=10)
        with grpc.insecure_channel(legacy) as ch:
            reg = pb_grpc.SchedulerStub(ch).RegisterWorker(
                pb.RegisterReq(address=original_worker), timeout=10
            )
        ok = s.cli("run", "--worker", reg.workerID, "--wait", "true")
        assert ok.returncode == 0, ok.stderr
        assert "succeeded (the worker reports done/error only" in ok.stderr
        failed = s.cli("run", "--worker", reg.workerID, "--wait", "false")
        assert failed.returncode == 1, failed.stderr
        assert "exit status 1" in failed.stderr
    finally:
        s.stop()
