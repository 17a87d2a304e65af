"""Two schedulers on one etcd store: takeover, a lost etcd member, failover, all real.

A three-member etcd cluster on loopback ports (mTLS for clients and peers, the
certificates of scripts/gen_certs.sh), two ``agent-scheduler`` processes with
``[store] backend = "etcd"``, and agents that know both schedulers
(``[scheduler] addr`` and ``addrs``, half of them the other way round).
Whether each host ran a job exactly once is counted from the hosts
themselves: every job of a run writes its own output file on its agent, with
the run's token in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
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
from agent.scheduler import etcdstore
from agent.scheduler.etcdstore import EtcdStore
from agent.scheduler.registry import Worker
from agent.scheduler.runs import prune_finished
from agent.scheduler.store import HostRecord, RunRecord, StoreError
from agent.vocabulary import HostState, RunState

from etcdcluster import ETCD, EtcdCluster
from helpers import (
    AgentFactory,
    AgentProcess,
    Certs,
    SchedulerProcess,
    free_port,
    registration_section,
    wait_for,
    write_script,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("etcd") is None and not Path(ETCD).exists(),
        reason="etcd is not installed (Debian etcd-server; scripts/test.sh installs it as root)",
    ),
]
pytest.importorskip("aetcd", reason="aetcd (the etcd extra) is not installed")

AGENTS = 20
SESSION_S = 3  # a dead scheduler's runs are taken over after about this long
# A worker nobody renews is gone after this long. Above what losing the etcd leader can
# cost a scheduler (an election, then etcd's own ~7 s timeout of a write the dead leader
# took, during which the store's call holds the scheduler's loop): at 6 s, under load,
# workers whose heartbeats waited that long were forgotten (UNREACHABLE "no longer
# registered" in a run) when a member was killed. The shipped default is 30 s.
EXPIRE_S = 20.0


class Fleet:
    """The module's etcd cluster, two schedulers and agents."""

    def __init__(
        self, etcd: EtcdCluster, scheds: list[SchedulerProcess], agents: list[AgentProcess]
    ) -> None:
        self.etcd = etcd
        self.scheds = scheds
        self.agents = agents

    def client(self, i: int) -> SchedulerClient:
        s = self.scheds[i]
        return SchedulerClient(s.addr, s.certs.tls("admin"), timeout=10)

    def workers(self, i: int) -> set[str]:
        r = self.scheds[i].cli("workers", "--json")
        assert r.returncode == 0, r.stderr
        return {str(w["address"]) for w in json.loads(r.stdout)}

    def follow(self, i: int, run_id: str) -> RunInfo:
        with self.client(i) as c:
            events = list(c.follow_run(run_id, timeout=120))
        assert isinstance(events[-1], RunInfo)
        return events[-1]


def _store(etcd: EtcdCluster, certs: Certs) -> dict[str, Any]:
    return {
        "backend": "etcd",
        "etcd_endpoints": etcd.endpoints,
        "etcd_ca_file": str(certs.crt("etcd-ca")),
        "etcd_crt_file": str(certs.crt("etcd-client")),
        "etcd_key_file": str(certs.key("etcd-client")),
        "session_seconds": SESSION_S,
    }


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, standard_policy: str
) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet-etcd")
    etcd = EtcdCluster(base / "etcd", certs)
    scheds: list[SchedulerProcess] = []
    agents: list[AgentProcess] = []
    try:
        etcd.start()
        for i in range(2):
            scheds.append(
                SchedulerProcess(
                    base / f"sched{i}",
                    certs,
                    heartbeat=1,
                    expire=EXPIRE_S,
                    store=_store(etcd, certs),
                ).start()
            )
        for i in range(AGENTS):
            first, second = scheds[i % 2], scheds[1 - i % 2]
            reg = registration_section(first.addr, certs, addrs=[second.addr])
            agents.append(
                AgentProcess(base / f"a{i}", certs, standard_policy, scheduler=reg).start()
            )
        f = Fleet(etcd, scheds, agents)
        everyone = {a.addr for a in agents}
        wait_for(lambda: f.workers(0) >= everyone and f.workers(1) >= everyone, timeout=30)
        yield f
    finally:
        for a in agents:
            a.stop()
            a.cleanup()
        for s in scheds:
            s.stop()
        etcd.stop()


def _ran(agent: AgentProcess, token: str) -> int:
    """How many jobs wrote this token on this agent (each job has its own output file;
    the keeper's journal of its jobs' records, beside them, holds their arguments too)."""
    d = agent.state / "output"
    return sum(1 for p in d.glob("*.out") if token.encode() in p.read_bytes())


def test_both_schedulers_list_every_worker(fleet: Fleet) -> None:
    """Workers registered with either scheduler are listed by both (one registry, in etcd)."""
    everyone = {a.addr for a in fleet.agents}
    assert fleet.workers(0) >= everyone and fleet.workers(1) >= everyone


def test_the_other_scheduler_takes_over_a_run_whose_owner_died(
    fleet: Fleet, script_dir: Path
) -> None:
    """SIGKILL the scheduler driving a run (some hosts done, five running, the rest pending):
    the other one takes the run over and finishes it; every host ran the job exactly once."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    owner, other = 0, 1
    with fleet.client(owner) as c:
        run = c.start_run("id:agent", "bash", str(once), args=[token, "2"], max_concurrency=5)

        # Killed between two starts (five just started, none being sent): a start cut
        # mid-call is cancelled by the agent and ends FAILED (see takeover.py), which
        # is right but would not show the run finished.
        def progressed() -> bool:
            states = [h.state for h in c.run_info(run.run_id).hosts]
            return "SUCCEEDED" in states and states.count("RUNNING") == 5

        wait_for(progressed, timeout=30, interval=0.05)
    fleet.scheds[owner].proc.kill()  # type: ignore[union-attr]
    fleet.scheds[owner].proc.wait()  # type: ignore[union-attr]
    killed_at = time.monotonic()
    with fleet.client(other) as c:
        wait_for(lambda: c.run_info(run.run_id).state != "RUNNING", timeout=60, interval=0.2)
        final = c.run_info(run.run_id)
    took = time.monotonic() - killed_at
    assert final.state == "DONE", final
    states = [(h.state, h.error_text) for h in final.hosts]
    ran = {a.addr: _ran(a, token) for a in fleet.agents}
    assert [h.state for h in final.hosts] == ["SUCCEEDED"] * AGENTS, (
        states,
        ran,
        [h.address for h in final.hosts],
    )
    assert "taken over" in fleet.scheds[other].log()
    ran = {a.addr: _ran(a, token) for a in fleet.agents}
    assert ran == {a.addr: 1 for a in fleet.agents}, json.dumps([ran, states])
    print(f"takeover: run finished {took:.1f} s after its owner was killed")
    # The killed scheduler comes back (same config, same store) for the next tests.
    fleet.scheds[owner].start()


def test_a_scheduler_stopped_cleanly_hands_its_run_over_at_once(
    fleet: Fleet, script_dir: Path
) -> None:
    """SIGTERM the owner mid-run: it releases the run (no lease to wait for), the other
    scheduler finishes it, each host ran once."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    with fleet.client(1) as c:
        run = c.start_run("id:agent", "bash", str(once), args=[token, "1"], max_concurrency=4)
        wait_for(lambda: "RUNNING" in [h.state for h in c.run_info(run.run_id).hosts], timeout=30)
    t0 = time.monotonic()
    fleet.scheds[1].stop()
    with fleet.client(0) as c:
        wait_for(lambda: c.run_info(run.run_id).state != "RUNNING", timeout=60, interval=0.2)
        final = c.run_info(run.run_id)
    took = time.monotonic() - t0
    assert final.all_succeeded, [(h.state, h.error_text) for h in final.hosts]
    ran = {a.addr: _ran(a, token) for a in fleet.agents}
    assert ran == {a.addr: 1 for a in fleet.agents}, ran
    print(f"clean handover: run finished {took:.1f} s after SIGTERM to its owner")
    fleet.scheds[1].start()


def test_a_run_is_cancelled_at_either_scheduler(fleet: Fleet, script_dir: Path) -> None:
    """run-cancel at the scheduler that does not drive the run: the cancel is recorded in
    etcd and the driving scheduler cancels the run at its next beat: its running jobs
    stopped, nothing more started, the run CANCELLED; a follower at the other scheduler
    sees the hosts change and the end."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    ours = "list:" + ",".join(a.addr for a in fleet.agents)
    with fleet.client(1) as c:
        run = c.start_run(ours, "bash", str(once), args=[token, "60"], max_concurrency=2)
        wait_for(lambda: "RUNNING" in [h.state for h in c.run_info(run.run_id).hosts], timeout=30)
    r = fleet.scheds[0].cli("run-cancel", run.run_id)
    assert r.returncode == 0, r.stderr
    # Followed at the scheduler that does not drive it: the hosts' changes as the store
    # has them, to the run's end.
    with fleet.client(0) as c:
        events = list(c.follow_run(run.run_id, timeout=120))
    final = events[-1]
    assert isinstance(final, RunInfo) and final.state == "CANCELLED", final
    seen = [e.state for e in events[:-1] if isinstance(e, RunHostInfo)]
    assert "RUNNING" in seen and "NOT_STARTED" in seen, seen
    states = [h.state for h in final.hosts]
    assert "SUCCEEDED" not in states and states.count("NOT_STARTED") >= len(states) - 2, states


def test_a_takeover_sends_a_maybe_sent_start_only_when_it_never_arrived(
    fleet: Fleet, certs: Certs, script_dir: Path
) -> None:
    """A run left by a dead owner, written straight into etcd: a host STARTING whose job is
    on its worker is followed, not sent again; a STARTING host with no job there (its
    deadline long past) is started; a RUNNING host is followed; a PENDING one starts.
    Each host ran the job exactly once."""
    once = write_script(script_dir, "once.sh", '#!/bin/bash\necho "ran $1"\nsleep "$2"\n')
    token = f"tok-{uuid.uuid4().hex}"
    args = [token, "1"]
    by_addr = {
        str(w["address"]): w for w in json.loads(fleet.scheds[0].cli("workers", "--json").stdout)
    }
    agents = fleet.agents[:4]
    # Jobs "the dead owner" started: on agents 0 (recorded STARTING) and 1 (RUNNING).
    started = [a.client("scheduler").start("bash", str(once), args=args) for a in agents[:2]]
    now = time.time()
    states = [
        (HostState.STARTING, "", now - 1.0),  # its job arrived: to be found
        (HostState.RUNNING, started[1], now - 1.0),
        (HostState.STARTING, "", now - 60.0),  # never arrived, deadline long past
        (HostState.PENDING, "", None),
    ]
    hosts = [
        HostRecord(
            str(by_addr[a.addr]["worker_id"]),
            a.addr,
            str(by_addr[a.addr]["identity"]),
            i,
            state,
            job_id,
            start_time=sent,
        )
        for i, (a, (state, job_id, sent)) in enumerate(zip(agents, states, strict=True))
    ]
    job = pb.StartJobReq(command="bash", path=str(once), args=args)
    rec = RunRecord(
        str(uuid.uuid4()), "admin", job.SerializeToString(), b"", 4, 0, now, hosts=hosts
    )
    store = EtcdStore(
        fleet.etcd.endpoints,
        ca_file=certs.crt("etcd-ca"),
        crt_file=certs.crt("etcd-client"),
        key_file=certs.key("etcd-client"),
    )
    try:
        store.keep_alive()
        assert store.claim_run(rec.run_id)
        store.save_run(rec)
        store.release_run(rec.run_id)  # the owner is gone: up for takeover
    finally:
        store.close()
    with fleet.client(0) as c:
        wait_for(lambda: c.run_info(rec.run_id).state != "RUNNING", timeout=60, interval=0.2)
        final = c.run_info(rec.run_id)
    assert [h.state for h in final.hosts] == ["SUCCEEDED"] * 4, final
    assert final.hosts[0].job_id == started[0] and final.hosts[1].job_id == started[1]
    ran = {a.addr: _ran(a, token) for a in agents}
    assert ran == {a.addr: 1 for a in agents}, ran
    # Had the owner only been frozen, its start of the host it never reached would arrive
    # now, late: the host's key (run id / worker id) answers the takeover's job, and
    # nothing runs twice.
    late = pb.StartJobReq(
        command="bash", path=str(once), args=args, requestKey=f"{rec.run_id}/{hosts[2].worker_id}"
    )
    with agents[2].stub("scheduler") as stub:
        res = stub.StartJob(late, timeout=30)
    assert (res.jobID, res.existing) == (final.hosts[2].job_id, True)


def _unsucceeded(run: RunInfo) -> str:
    """The run's summary and each host that did not succeed, with why."""
    bad = [f"{h.address} {h.state} {h.error_text!r}" for h in run.hosts if h.state != "SUCCEEDED"]
    return f"{run.summary}: " + "; ".join(bad)


def test_losing_one_etcd_member_goes_unnoticed(fleet: Fleet, script_dir: Path) -> None:
    """Kill an etcd member during a run: the run ends with every host succeeded, both
    schedulers still list every worker, and a new run works."""
    with fleet.client(1) as c:
        run = c.start_run("id:agent", "bash", f"{script_dir}/sleep.sh", args=["1"])
        fleet.etcd.kill(fleet.etcd.names[0])
        t0 = time.monotonic()
        final = fleet.follow(1, run.run_id)
        assert final.state == "DONE" and final.all_succeeded, _unsucceeded(final)
        again = c.start_run("id:agent", "bash", f"{script_dir}/hello.sh")
    assert fleet.follow(1, again.run_id).all_succeeded
    everyone = {a.addr for a in fleet.agents}
    assert fleet.workers(0) >= everyone and fleet.workers(1) >= everyone
    print(f"one etcd member down: run finished {time.monotonic() - t0:.1f} s after the kill")


def test_registration_fails_over_to_the_next_scheduler(
    fleet: Fleet, make_agent: AgentFactory, certs: Certs
) -> None:
    """An agent whose first scheduler is down registers with the next in [scheduler] addrs,
    and both schedulers list it."""
    dead = f"127.0.0.1:{free_port()}"
    a = make_agent(scheduler=registration_section(dead, certs, addrs=[fleet.scheds[1].addr]))
    wait_for(lambda: a.addr in fleet.workers(0) and a.addr in fleet.workers(1), timeout=30)
    assert f"registered with scheduler {fleet.scheds[1].addr}" in a.log()


def test_an_agent_cut_off_is_unreachable_and_counts_against_the_budget(
    fleet: Fleet, make_agent: AgentFactory, certs: Certs, script_dir: Path
) -> None:
    """A registered agent that died before its turn: UNREACHABLE, and with no error
    tolerated nothing starts after it."""
    s = fleet.scheds[1]
    doomed = make_agent(scheduler=registration_section(s.addr, certs))
    wait_for(lambda: doomed.addr in fleet.workers(1), timeout=30)
    doomed.kill9()
    target = f"list:{doomed.addr},{fleet.agents[0].addr}"
    r = s.cli(
        "run", "--select", target, "--max-concurrency", "1", "--", "bash", f"{script_dir}/hello.sh"
    )
    assert r.returncode == 3, r.stderr
    assert "ok 0 failed 0 not-started 1 unreachable 1" in r.stderr


def test_without_an_etcd_quorum_nothing_is_started_and_all_comes_back(
    fleet: Fleet, certs: Certs, script_dir: Path
) -> None:
    """Two of three members down: a registration is refused UNAVAILABLE naming the store,
    a run cannot start, the schedulers stay up; with the quorum back, both list every
    worker again and a run over all of them succeeds."""
    for m in fleet.etcd.names:
        if fleet.etcd.procs[m].poll() is None:
            fleet.etcd.kill(m)
            break
    alive = [m for m in fleet.etcd.names if fleet.etcd.procs[m].poll() is None]
    assert len(alive) == 1
    s = fleet.scheds[0]
    with (
        grpc.secure_channel(s.addr, certs.creds("agent")) as ch,
        pytest.raises(grpc.RpcError) as e,
    ):
        pb_grpc.SchedulerStub(ch).RegisterWorker(pb.RegisterReq(address="127.0.0.1:1"), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert "store" in str(e.value.details())
    r = s.cli("run", "--select", "id:agent", "--", "bash", f"{script_dir}/hello.sh")
    assert r.returncode == 1, r.stderr
    t0 = time.monotonic()
    for m in fleet.etcd.names:
        if m not in alive:
            fleet.etcd.start_member(m)
    wait_for(fleet.etcd.healthy, timeout=30, interval=0.2)
    everyone = {a.addr for a in fleet.agents}
    wait_for(lambda: fleet.workers(0) >= everyone and fleet.workers(1) >= everyone, timeout=60)
    print(f"quorum back: every worker listed {time.monotonic() - t0:.1f} s after the restart")
    ours = "list:" + ",".join(a.addr for a in fleet.agents)  # not the earlier tests' agents
    for i in range(2):
        assert all(p.proc and p.proc.poll() is None for p in fleet.scheds)
        with fleet.client(i) as c:
            run = c.start_run(ours, "bash", f"{script_dir}/hello.sh")
        assert fleet.follow(i, run.run_id).all_succeeded


@contextlib.contextmanager
def _two_stores(
    tmp_path: Path, certs: Certs, prefix: str
) -> Iterator[tuple[EtcdCluster, list[EtcdStore]]]:
    """Two stores (as two schedulers) on a one-member etcd cluster of the test's own."""
    etcd = EtcdCluster(tmp_path / "etcd", certs, n=1)
    stores: list[EtcdStore] = []
    try:
        etcd.start()
        for _ in range(2):
            stores.append(
                EtcdStore(
                    etcd.endpoints,
                    ca_file=certs.crt("etcd-ca"),
                    crt_file=certs.crt("etcd-client"),
                    key_file=certs.key("etcd-client"),
                    prefix=prefix,
                )
            )
        yield etcd, stores
    finally:
        for s in stores:
            s.close()
        etcd.stop()


def test_an_etcd_that_does_not_answer_fails_calls_at_once_until_it_does(
    tmp_path: Path, certs: Certs
) -> None:
    """Each store call blocks the scheduler's event loop: with the cluster not answering
    (here its one member frozen), one call waits its whole time, then calls fail at once
    naming the cluster (no RPC: a quorum-less etcd would otherwise hold the loop a call's
    time for every heartbeat in turn) until a probe finds it answering again."""
    with _two_stores(tmp_path, certs, "/down-test/") as (etcd, stores):
        store = stores[0]
        store.timeout = 1.5
        store.keep_alive()
        [member] = store.endpoints
        [proc] = etcd.procs.values()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="DEADLINE_EXCEEDED") as first:
                store.workers()
            assert time.monotonic() - t0 >= 1.0
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="fail at once until it answers") as then:
                store.save_worker(Worker("w", "agent", "10.0.0.1:1", 1.0, 1.0), live=True)
            assert time.monotonic() - t0 < etcdstore.ATTEMPT_S  # no RPC was made
            assert member in str(first.value) and member in str(then.value)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: _answers(store), timeout=20, interval=0.1)
        store.save_worker(Worker("w", "agent", "10.0.0.1:1", 1.0, 1.0), live=True)
        assert [w.worker_id for w, _ in store.workers()] == ["w"]


def _answers(store: EtcdStore) -> bool:
    try:
        store.workers()
    except StoreError:
        return False
    return True


def test_a_run_taken_over_is_written_only_by_its_new_owner(tmp_path: Path, certs: Certs) -> None:
    """Fencing: the owner that lost a run (its key released, claimed by another; as for an
    owner frozen past its lease) can write neither the run nor its hosts; the new owner
    can, and what it wrote stays."""
    with _two_stores(tmp_path, certs, "/fence-test/") as (_, stores):
        old, new = stores
        old.keep_alive()
        new.keep_alive()
        hosts = [HostRecord("w0", "10.0.0.1:1", "agent", 0, HostState.STARTING)]
        rec = RunRecord("r", "admin", b"job", b"", 1, 0, time.time(), hosts=hosts)
        assert old.claim_run("r")
        old.save_run(rec)
        old.release_run("r")  # its lease gone, as for a frozen owner
        assert new.claim_run("r")
        taken = new.run("r")
        assert taken is not None
        taken.hosts[0].state = HostState.RUNNING
        new.save_run(taken)
        stale = RunRecord(
            "r", "admin", b"job", b"", 1, 0, rec.created_at, RunState.DONE, time.time(), hosts
        )
        with pytest.raises(StoreError, match="no longer owned"):
            old.save_run(stale)
        with pytest.raises(StoreError, match="no longer owned"):
            old.save_host("r", HostRecord("w0", "10.0.0.1:1", "agent", 0, HostState.FAILED))
        now = new.run("r")
        assert now is not None
        assert (now.state, now.hosts[0].state) == (RunState.RUNNING, HostState.RUNNING)


def test_finished_runs_past_retention_are_pruned_from_etcd(tmp_path: Path, certs: Certs) -> None:
    """[runs] retention with etcd (a cluster of its own): a finished run that ended 31 days
    ago goes with its hosts' keys; a recent one, a RUNNING one (owned, or orphaned and
    waiting to be taken over) and a finished one still owned stay; once released, it goes."""
    with _two_stores(tmp_path, certs, "/prune-test/") as (_, stores):
        owner, other = stores
        owner.keep_alive()
        now = time.time()
        day = 86400.0

        def put(run_id: str, ended_days_ago: float | None, *, release: bool = True) -> None:
            ended = None if ended_days_ago is None else now - ended_days_ago * day
            state = RunState.RUNNING if ended is None else RunState.DONE
            host = HostState.RUNNING if ended is None else HostState.SUCCEEDED
            hosts = [HostRecord(f"w{i}", f"10.0.0.{i}:1", "agent", i, host) for i in range(2)]
            rec = RunRecord(run_id, "admin", b"job", b"", 2, 0, now - 40 * day, state, ended, hosts)
            assert owner.claim_run(run_id)
            owner.save_run(rec)
            if release:
                owner.release_run(run_id)

        put("old", 31)
        put("old-owned", 35, release=False)  # its owner has not released it yet
        put("running", None, release=False)
        put("orphaned", None)  # RUNNING, its owner gone: to be taken over, never pruned
        put("recent", 1)
        assert prune_finished(other, 30, 0, now) == 1
        assert {r.run_id for r in other.runs(10)} == {"old-owned", "running", "orphaned", "recent"}
        assert other._range(b"/prune-test/hosts/old/") == []
        assert len(other._range(b"/prune-test/hosts/old-owned/")) == 2
        owner.release_run("old-owned")
        assert prune_finished(other, 30, 0, now) == 1
        assert prune_finished(other, 0, 1, now) == 0  # "recent" is the newest finished one
        assert {r.run_id for r in other.runs(10)} == {"running", "orphaned", "recent"}
        assert len(other._range(b"/prune-test/hosts/")) == 6
