"""Fan-out runs over real parts: one scheduler process, four agents on loopback ports, mTLS.

The agents advertise labels (three role=web, one role=db); runs go through the
client library and the ``agent-scheduler`` command. The scheduler keeps its
registry and its runs in its SQLite store, so the last test restarts it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.client import RunInfo, SchedulerClient
from agent.client.runs import RunHostInfo

from helpers import (
    AgentFactory,
    AgentProcess,
    Certs,
    SchedulerProcess,
    registration_section,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.slow

ROLES = ["web", "web", "web", "db"]


class Fleet:
    """The module's scheduler and agents."""

    def __init__(self, scheduler: SchedulerProcess, agents: list[AgentProcess]) -> None:
        self.scheduler = scheduler
        self.agents = agents

    def client(self) -> SchedulerClient:
        return SchedulerClient(self.scheduler.addr, self.scheduler.certs.tls("admin"), timeout=10)

    def workers(self) -> list[dict[str, object]]:
        r = self.scheduler.cli("workers", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def follow(self, run_id: str) -> RunInfo:
        """Follow the run to its end; its final RunInfo."""
        with self.client() as c:
            events = list(c.follow_run(run_id, timeout=120))
        assert isinstance(events[-1], RunInfo)
        return events[-1]


@contextlib.contextmanager
def started_fleet(
    base: Path, certs: Certs, policy: str, registrations: list[dict[str, Any]]
) -> Iterator[Fleet]:
    """A scheduler and one agent a ``registrations`` item (its [scheduler] keys beyond
    the address and certificates), all registered; stopped after."""
    # Expiry long enough that an agent killed in a test stays registered (unreachable).
    sched = SchedulerProcess(base / "sched", certs, heartbeat=1, expire=30.0).start()
    agents: list[AgentProcess] = []
    try:
        for i, extra in enumerate(registrations):
            reg = registration_section(sched.addr, certs, **extra)
            agents.append(AgentProcess(base / f"a{i}", certs, policy, scheduler=reg).start())
        f = Fleet(sched, agents)
        wait_for(lambda: len(f.workers()) == len(registrations), timeout=20)
        yield f
    finally:
        for a in agents:
            a.stop()
            a.cleanup()
        sched.stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, standard_policy: str
) -> Iterator[Fleet]:
    regs = [{"labels": {"role": role, "n": str(i)}} for i, role in enumerate(ROLES)]
    with started_fleet(tmp_path_factory.mktemp("fanout"), certs, standard_policy, regs) as f:
        yield f


def _peak(hosts: tuple[RunHostInfo, ...]) -> int:
    """The most jobs running at once, from each host's start and end as the scheduler saw them."""
    edges: list[tuple[float, int]] = []
    for h in hosts:
        assert h.start_time is not None and h.end_time is not None
        # An end sorts before a start at the same instant: the slot was free again.
        edges += [(h.start_time.timestamp(), 1), (h.end_time.timestamp(), -1)]
    running = peak = 0
    for _, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return peak


def test_workers_show_their_labels(fleet: Fleet) -> None:
    """ListWorkers carries the labels each agent's [scheduler] labels advertised."""
    roles = sorted(str(w["labels"]["role"]) for w in fleet.workers())  # type: ignore[index]
    assert roles == sorted(ROLES)


def test_bad_labels_are_refused_at_registration(fleet: Fleet) -> None:
    """A worker advertising a malformed label is refused with INVALID_ARGUMENT."""
    creds = fleet.scheduler.certs.creds("agent")
    with grpc.secure_channel(fleet.scheduler.addr, creds) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterWorker(
                pb.RegisterReq(address="127.0.0.1:1", labels={"role": "w eb"}), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "value 'w eb'" in str(e.value.details())
        ok = stub.RegisterWorker(
            pb.RegisterReq(address="127.0.0.1:1", labels={"role": "web"}), timeout=10
        )
        assert stub.DeregisterWorker(pb.DeregisterReq(workerID=ok.workerID), timeout=10).success


def test_a_fan_out_by_label_prints_labelled_lines_and_a_summary(
    fleet: Fleet, script_dir: Path
) -> None:
    """run --select label:role=web runs on the three web hosts only; each output line names
    its host; the summary counts them; exit 0 as every host succeeded."""
    r = fleet.scheduler.cli(
        "run", "--select", "label:role=web", "--", "bash", f"{script_dir}/hello.sh", "fleet"
    )
    assert r.returncode == 0, r.stderr
    web = {a.addr for a, role in zip(fleet.agents, ROLES, strict=True) if role == "web"}
    assert sorted(r.stdout.splitlines()) == sorted(f"[{addr}] hello fleet" for addr in web)
    assert "ok 3 failed 0 not-started 0 unreachable 0" in r.stderr
    assert fleet.agents[3].addr not in r.stdout + r.stderr


def test_max_concurrency_is_respected(fleet: Fleet, script_dir: Path) -> None:
    """50% of four hosts: never more than two jobs at once (measured from the hosts' start
    and end times), and two did run together."""
    with fleet.client() as c:
        run = c.start_run(
            "id:agent", "bash", f"{script_dir}/sleep.sh", args=["1"], max_concurrency="50%"
        )
    assert run.max_concurrency == 2 and len(run.hosts) == 4
    final = fleet.follow(run.run_id)
    assert final.state == "DONE" and final.all_succeeded, final
    assert _peak(final.hosts) == 2


def test_the_error_budget_stops_new_starts(fleet: Fleet, script_dir: Path) -> None:
    """One at a time, one error tolerated: the second failure stops the run; the two hosts
    left are reported as not started; exit status 3; exit codes by host in the summary."""
    r = fleet.scheduler.cli(
        "run",
        "--select",
        "id:agent",
        "--max-concurrency",
        "1",
        "--max-errors",
        "1",
        "--",
        "bash",
        f"{script_dir}/fail.sh",
        "7",
    )
    assert r.returncode == 3, r.stderr
    assert "ok 0 failed 2 not-started 2 unreachable 0" in r.stderr
    assert r.stderr.count("exit 7") >= 2
    runs = json.loads(fleet.scheduler.cli("runs", "--json").stdout)
    shown = json.loads(fleet.scheduler.cli("run-show", "--json", runs[0]["run_id"]).stdout)
    states = [h["state"] for h in shown["hosts"]]
    assert states == ["FAILED", "FAILED", "NOT_STARTED", "NOT_STARTED"]
    assert [h["exit_code"] for h in shown["hosts"][:2]] == [7, 7]
    assert all(h["job_id"] == "" for h in shown["hosts"][2:])


def test_cancel_stops_what_runs_and_starts_nothing_more(fleet: Fleet, script_dir: Path) -> None:
    """A detached run, followed from "another terminal", cancelled from a third: the running
    jobs are stopped, the rest never start, the follower sees the end and exits 3."""
    r = fleet.scheduler.cli(
        "run",
        "--select",
        "id:agent",
        "--max-concurrency",
        "2",
        "--detach",
        "--",
        "bash",
        f"{script_dir}/sleep.sh",
        "60",
    )
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    follower = subprocess.Popen(
        [*_cli_argv(fleet.scheduler), "run-follow", run_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with fleet.client() as c:
        wait_for(
            lambda: [h.state for h in c.run_info(run_id).hosts].count("RUNNING") == 2, timeout=20
        )
        assert fleet.scheduler.cli("run-cancel", run_id).returncode == 0
        final = fleet.follow(run_id)
    assert final.state == "CANCELLED"
    assert [h.state for h in final.hosts] == ["FAILED", "FAILED", "NOT_STARTED", "NOT_STARTED"]
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 3, err
    assert "started" in out and "cancelled" in err
    # Cancelling again: the run is over.
    again = fleet.scheduler.cli("run-cancel", run_id)
    assert again.returncode == 1 and "is over" in again.stderr


def _cli_argv(s: SchedulerProcess) -> list[str]:
    c = s.certs
    return [
        sys.executable,
        "-m",
        "agent.scheduler.cli",
        "--addr",
        s.addr,
        "--ca",
        str(c.ca),
        "--cert",
        str(c.crt("admin")),
        "--key",
        str(c.key("admin")),
    ]


def test_an_unreachable_worker_is_reported_and_counts_against_the_budget(
    fleet: Fleet, make_agent: AgentFactory, certs: Certs, script_dir: Path
) -> None:
    """A registered agent that died: its host is UNREACHABLE; with no error tolerated,
    nothing starts after it."""
    doomed = make_agent(
        scheduler=registration_section(fleet.scheduler.addr, certs, labels={"role": "doomed"})
    )
    wait_for(lambda: len(fleet.workers()) == len(ROLES) + 1, timeout=20)
    doomed.kill9()
    target = f"list:{doomed.addr},{fleet.agents[0].addr}"
    r = fleet.scheduler.cli(
        "run", "--select", target, "--max-concurrency", "1", "--", "bash", f"{script_dir}/hello.sh"
    )
    assert r.returncode == 3, r.stderr
    assert "ok 0 failed 0 not-started 1 unreachable 1" in r.stderr
    assert f"[{doomed.addr}] UNREACHABLE" in r.stderr


def test_bad_requests_get_clear_errors(fleet: Fleet) -> None:
    """A bad selector or quantity is a usage error (2); the scheduler refuses what matches
    nothing or names no worker, and an unknown run is not found (1)."""
    r = fleet.scheduler.cli("run", "--select", "role=web", "--", "true")
    assert r.returncode == 2 and "selector 'role=web'" in r.stderr
    r = fleet.scheduler.cli("run", "--select", "id:agent", "--max-errors", "150%", "--", "true")
    assert r.returncode == 2 and "1-100" in r.stderr
    r = fleet.scheduler.cli("run", "--select", "label:role=cache", "--", "true")
    assert r.returncode == 1 and "failed precondition" in r.stderr and "role=cache" in r.stderr
    r = fleet.scheduler.cli("run", "--select", "list:nope", "--", "true")
    assert r.returncode == 1 and "invalid argument" in r.stderr
    r = fleet.scheduler.cli("run", "--worker", "w", "--max-errors", "1", "--", "true")
    assert r.returncode == 2 and "--max-errors is for a fan-out run" in r.stderr
    r = fleet.scheduler.cli("run-show", "no-such-run")
    assert r.returncode == 1 and "not found" in r.stderr
    r = fleet.scheduler.cli("runs", identity="client")
    assert r.returncode == 1 and "permission denied" in r.stderr


def _ran(agent: AgentProcess, token: str) -> int:
    """How many jobs wrote this token on this agent (each job has its own output file;
    the keeper's journal of its jobs' records, beside them, holds their arguments too)."""
    d = agent.state / "output"
    return sum(1 for p in d.glob("*.out") if token.encode() in p.read_bytes())


def _one_running(c: SchedulerClient, run_id: str) -> bool:
    """The first host's job runs and the others wait (no start on its way)."""
    states = [h.state for h in c.run_info(run_id).hosts]
    return states[0] == "RUNNING" and states[1:] == ["PENDING"] * (len(states) - 1)


def test_a_restarted_scheduler_still_has_its_workers_and_runs(
    fleet: Fleet, script_dir: Path
) -> None:
    """Restart (SIGTERM) with the SQLite store: the same workers (with last seen) without
    registering again, the finished runs with per-host job ids and results, and a run cut
    by the restart resumed: its running job followed to its end (same job id), the hosts
    not started yet started, each web host's job run exactly once."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    addrs = {a.addr for a in fleet.agents}
    before = {str(w["worker_id"]) for w in fleet.workers() if w["address"] in addrs}
    with fleet.client() as c:
        done = c.start_run("label:role=db", "bash", f"{script_dir}/hello.sh")
        assert fleet.follow(done.run_id).all_succeeded
        cut = c.start_run("label:role=web", "bash", str(once), args=[token, "2"], max_concurrency=1)
        wait_for(lambda: _one_running(c, cut.run_id), timeout=20, interval=0.05)
        first_job = c.run_info(cut.run_id).hosts[0].job_id
    registrations = [a.log().count("registered with scheduler") for a in fleet.agents]
    fleet.scheduler.stop()
    fleet.scheduler.start()
    listed = fleet.workers()  # at once: from the store, not from new registrations
    assert before <= {str(w["worker_id"]) for w in listed}
    assert all(w["last_seen"] for w in listed)
    with fleet.client() as c:
        old = c.run_info(done.run_id)
        assert old.state == "DONE" and old.all_succeeded
        assert old.hosts[0].job_id and old.hosts[0].exit_code == 0
        assert {r.run_id for r in c.runs()} >= {done.run_id, cut.run_id}
    final = fleet.follow(cut.run_id)
    assert final.state == "DONE" and final.all_succeeded, final
    assert final.hosts[0].job_id == first_job
    assert "resumed after a restart" in fleet.scheduler.log()
    web = [a for a, role in zip(fleet.agents, ROLES, strict=True) if role == "web"]
    assert [_ran(a, token) for a in web] == [1, 1, 1]
    # Heartbeats went on to a scheduler that still knew them: nobody registered again.
    assert [a.log().count("registered with scheduler") for a in fleet.agents] == registrations


def test_a_scheduler_killed_mid_run_resumes_it_when_restarted(
    fleet: Fleet, script_dir: Path
) -> None:
    """SIGKILL (no clean stop) mid-run, then the same scheduler again on the same store:
    the run goes on from its records; every host ran the job exactly once."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    with fleet.client() as c:
        run = c.start_run("label:role=web", "bash", str(once), args=[token, "2"], max_concurrency=1)
        wait_for(lambda: _one_running(c, run.run_id), timeout=20, interval=0.05)
    fleet.scheduler.proc.kill()  # type: ignore[union-attr]
    fleet.scheduler.proc.wait()  # type: ignore[union-attr]
    fleet.scheduler.start()
    final = fleet.follow(run.run_id)
    assert final.state == "DONE" and final.all_succeeded, final
    web = [a for a, role in zip(fleet.agents, ROLES, strict=True) if role == "web"]
    assert [_ran(a, token) for a in web] == [1, 1, 1]


def test_an_agent_ends_a_followed_stream_with_the_status_when_asked(
    fleet: Fleet, script_dir: Path
) -> None:
    """StreamJobOutput with endStatus: the same output, then one last message (no data, at
    the output's end) with the job's status, which the scheduler takes instead of a
    WaitJob; without it the stream is as it always was, with no status."""
    a = fleet.agents[0]
    with grpc.secure_channel(a.addr, a.certs.creds("scheduler")) as ch:
        stub = pb_grpc.WorkerStub(ch)
        req = pb.StartJobReq(command="bash", path=f"{script_dir}/hello.sh", args=["status"])
        job = stub.StartJob(req, timeout=10).jobID
        asked = list(
            stub.StreamJobOutput(
                pb.StreamJobOutputReq(jobID=job, follow=True, endStatus=True), timeout=30
            )
        )
        plain = list(
            stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job, follow=True), timeout=30)
        )
    output = b"".join(m.data for m in plain)
    assert output.startswith(b"hello status") and b"".join(m.data for m in asked) == output
    assert not any(m.HasField("status") for m in plain + asked[:-1])
    last = asked[-1]
    assert last.HasField("status") and not last.data and last.offset == len(output)
    assert last.status.done and last.status.state == pb.SUCCEEDED and last.status.exitCode == 0
    assert last.status.jobID == job


def test_a_follower_gets_the_same_events_in_batches_or_one_by_one(
    fleet: Fleet, script_dir: Path
) -> None:
    """FollowRun with batch (what the client library asks) and without (an original
    client): the same events in the same order; without, one event per message."""
    with fleet.client() as c:
        run = c.start_run("label:role=web", "bash", f"{script_dir}/hello.sh", args=["x"])
    fleet.follow(run.run_id)
    creds = fleet.scheduler.certs.creds("admin")
    with grpc.secure_channel(fleet.scheduler.addr, creds) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        one = list(stub.FollowRun(pb.RunReq(runID=run.run_id), timeout=30))
        batched = list(stub.FollowRun(pb.RunReq(runID=run.run_id, batch=True), timeout=30))
    assert all(m.WhichOneof("event") != "batch" for m in one)
    assert all(m.WhichOneof("event") == "batch" for m in batched)
    unpacked = [e for m in batched for e in m.batch.events]
    assert len(batched) < len(unpacked)
    # The same events (times aside: the run's end is stamped once, the same in both).
    assert unpacked == one
    kinds = [m.WhichOneof("event") for m in one]
    assert kinds.count("output") == 3 and kinds.count("host") >= 9 and kinds[-1] == "done"
