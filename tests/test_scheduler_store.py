"""The scheduler's SQLite store: workers and runs survive a reopen (an unfinished run is
resumed: tests/test_scheduler_runs.py, tests/test_fanout.py); finished runs are pruned
past [runs]."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent.configfile import ConfigError
from agent.scheduler.config import load_config
from agent.scheduler.registry import Registry
from agent.scheduler.runs import prune_finished
from agent.scheduler.store import HostRecord, RunRecord, SQLiteStore, StoreError
from agent.vocabulary import HostState, RunState

from helpers import Certs, FakeClock, SchedulerProcess


def test_the_store_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    """Its folder is created 0700, the file 0600, the journal WAL."""
    path = tmp_path / "state" / "scheduler.db"
    s = SQLiteStore(path)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


def test_a_registry_starts_from_the_workers_the_store_remembers(tmp_path: Path) -> None:
    """Ids, labels and last seen survive; a forgotten worker stays forgotten but keeps its id."""
    clock = FakeClock()
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    r = Registry(10, clock, store=s)
    web = r.register("agent", "10.0.0.1:1", labels={"role": "web"})
    old = r.register("agent", "10.0.0.2:1")
    clock.t += 8
    assert r.heartbeat(web.worker_id, "agent")
    clock.t += 5
    assert [w.worker_id for w in r.expire()] == [old.worker_id]
    s.close()

    s = SQLiteStore(path)
    r2 = Registry(10, clock, store=s)
    [w] = r2.live()
    assert (w.worker_id, w.labels, w.last_seen) == (web.worker_id, {"role": "web"}, 1008.0)
    assert r2.register("agent", "10.0.0.2:1").worker_id == old.worker_id
    assert r2.deregister(web.worker_id, "agent")
    s.close()
    assert [w.address for w, live in SQLiteStore(path).workers()] == ["10.0.0.2:1"]


def _run(run_id: str, created: float, *states: HostState) -> RunRecord:
    hosts = [
        HostRecord(f"w{i}", f"10.0.0.{i}:1", "agent", i, st, job_id="j" if st.value > 2 else "")
        for i, st in enumerate(states)
    ]
    return RunRecord(run_id, "admin", b"job", b"targets", 2, 0, created, hosts=hosts)


def test_runs_and_hosts_survive_a_reopen(tmp_path: Path) -> None:
    """A run, its hosts' states, job ids and exit codes read back as written, newest first."""
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s.save_run(_run("r1", 1.0, HostState.PENDING))
    run = _run("r2", 2.0, HostState.PENDING, HostState.PENDING)
    s.save_run(run)
    h = run.hosts[1]
    h.state, h.job_id, h.exit_code, h.end_time = HostState.FAILED, "job-9", 3, 5.0
    s.save_host("r2", h)
    s.close()
    s = SQLiteStore(path)
    assert [r.run_id for r in s.runs(10)] == ["r2", "r1"]
    got = s.run("r2")
    assert got is not None and got.hosts[1] == h and got.job == b"job"
    assert s.run("nope") is None
    s.close()


def test_hosts_written_in_one_turn_of_the_event_loop_are_committed_together(
    tmp_path: Path,
) -> None:
    """Inside the event loop a host's row is committed at the loop's next turn, with the
    others of that turn; flushed() waits for that commit; a read commits first."""
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    run = _run("r", 1.0, HostState.PENDING, HostState.PENDING)
    s.save_run(run)
    other = SQLiteStore(path)  # another connection sees only what is committed

    def stored() -> list[HostState]:
        got = other.run("r")
        assert got is not None
        return [h.state for h in got.hosts]

    async def main() -> None:
        for h in run.hosts:
            h.state = HostState.STARTING
            s.save_host("r", h)
        assert stored() == [HostState.PENDING] * 2
        await s.flushed()
        assert stored() == [HostState.STARTING] * 2
        run.hosts[0].state = HostState.RUNNING
        s.save_host("r", run.hosts[0])
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the turn after: committed without being waited for
        assert stored() == [HostState.RUNNING, HostState.STARTING]
        run.hosts[1].state = HostState.SUCCEEDED
        s.save_host("r", run.hosts[1])
        got = s.run("r")  # its own read
        assert got is not None and got.hosts[1].state is HostState.SUCCEEDED
        assert stored() == [HostState.RUNNING, HostState.SUCCEEDED]

    asyncio.run(main())
    s.close()
    other.close()


DAY = 86400.0


def _ended(run_id: str, created: float, ended: float | None, state: RunState) -> RunRecord:
    """A run of two hosts in ``state``, ended at ``ended`` (None: still RUNNING)."""
    host = HostState.SUCCEEDED if ended is not None else HostState.RUNNING
    run = _run(run_id, created, host, host)
    run.state, run.end_time = state, ended
    return run


def _rows(path: Path) -> tuple[set[str], set[str]]:
    """The run ids of the runs table and of the run_hosts table, read by another connection."""
    db = sqlite3.connect(path)
    try:
        runs = {r for (r,) in db.execute("SELECT run_id FROM runs")}
        hosts = {r for (r,) in db.execute("SELECT run_id FROM run_hosts")}
    finally:
        db.close()
    return runs, hosts


def test_finished_runs_past_keep_days_are_pruned_with_their_hosts(tmp_path: Path) -> None:
    """[runs] keep_days: finished runs that ended longer ago go with their hosts; newer ones
    and a RUNNING run (however old) stay; 0 keeps everything."""
    path = tmp_path / "s.db"
    now = time.time()
    s = SQLiteStore(path)
    s.save_run(_ended("old-done", now - 40 * DAY, now - 40 * DAY, RunState.DONE))
    s.save_run(_ended("old-cancelled", now - 50 * DAY, now - 31 * DAY, RunState.CANCELLED))
    s.save_run(_ended("old-interrupted", now - 90 * DAY, now - 89 * DAY, RunState.INTERRUPTED))
    s.save_run(_ended("old-running", now - 60 * DAY, None, RunState.RUNNING))
    s.save_run(_ended("ended-lately", now - 40 * DAY, now - 29 * DAY, RunState.DONE))
    s.save_run(_ended("new", now - 1, now, RunState.CANCELLED))
    assert prune_finished(s, 0, 0, now) == 0
    assert len(_rows(path)[0]) == 6
    assert prune_finished(s, 30, 0, now) == 3
    s.close()
    kept = {"old-running", "ended-lately", "new"}
    assert _rows(path) == (kept, kept)
    s = SQLiteStore(path)
    assert {r.run_id for r in s.runs(10)} == kept
    got = s.run("old-running")
    assert got is not None and len(got.hosts) == 2 and got.state is RunState.RUNNING
    assert prune_finished(s, 30, 0, now) == 0
    s.close()


def test_a_cancel_request_is_kept_across_a_reopen_and_pruned_with_its_run(
    tmp_path: Path,
) -> None:
    """request_cancel is durable and idempotent; a pruned run's request goes with it."""
    path = tmp_path / "s.db"
    now = time.time()
    s = SQLiteStore(path)
    s.save_run(_ended("old", now - 40 * DAY, now - 40 * DAY, RunState.CANCELLED))
    s.save_run(_ended("running", now - 1, None, RunState.RUNNING))
    for run_id in ("old", "running", "running"):
        s.request_cancel(run_id)
    s.close()
    s = SQLiteStore(path)
    assert s.cancel_requests() == {"old", "running"}
    assert prune_finished(s, 30, 0, now) == 1
    assert s.cancel_requests() == {"running"}
    s.close()


def test_keep_count_keeps_the_newest_finished_runs_and_every_running_one(tmp_path: Path) -> None:
    """[runs] keep_count: only the newest that many finished runs stay (by creation); the
    running ones are not counted and never pruned; with keep_days, either limit prunes."""
    path = tmp_path / "s.db"
    now = time.time()
    s = SQLiteStore(path)
    for i in range(5):
        s.save_run(_ended(f"done{i}", now - 10 + i, now - 5 + i, RunState.DONE))
    s.save_run(_ended("running-old", now - 100, None, RunState.RUNNING))
    s.save_run(_ended("running-new", now, None, RunState.RUNNING))
    assert prune_finished(s, 0, 2, now) == 3
    kept = {"done3", "done4", "running-old", "running-new"}
    assert _rows(path) == (kept, kept)
    # done3 ended 2 s before "now": a limit of a day from a day later prunes it by age.
    assert prune_finished(s, 1, 5, now + DAY - 1.5) == 1
    assert _rows(path)[0] == {"done4", "running-old", "running-new"}
    s.close()


def test_a_scheduler_prunes_its_store_at_start(tmp_path: Path, certs: Certs) -> None:
    """A scheduler started over a store holding a run that ended 31 days ago prunes it (the
    default keep_days, 30) before it listens, and keeps a recent one."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    path = s.workdir / "scheduler-state" / "scheduler.db"
    now = time.time()
    st = SQLiteStore(path)
    st.save_run(_ended("old", now - 32 * DAY, now - 31 * DAY, RunState.DONE))
    st.save_run(_ended("recent", now - 2 * DAY, now - DAY, RunState.DONE))
    st.close()
    s.start()
    try:
        assert _rows(path) == ({"recent"}, {"recent"})
        assert "1 finished run(s) pruned ([runs] keep_days 30, keep_count 0)" in s.log()
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("runs", "key", "problem"),
    [
        ("keep_days = -1", "keep_days", "must be at least 0, got -1"),
        ("keep_days = nan", "keep_days", "must be a number of days, 0 to keep all"),
        ('keep_days = "30d"', "keep_days", "expected a number, got '30d'"),
        ("keep_count = -5", "keep_count", "must be at least 0, got -5"),
        ("keep_count = 2.5", "keep_count", "expected an integer, got 2.5"),
        ("keep = 3", "keep", "unknown"),
    ],
)
def test_runs_retention_config_errors_name_the_key(
    tmp_path: Path, certs: Certs, runs: str, key: str, problem: str
) -> None:
    """[runs] keep_days and keep_count are checked like every option: a line naming [runs],
    the key and the problem."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    assert load_config(s.config_path).runs.keep_days == 30.0
    with open(s.config_path, "a") as f:
        f.write(f"\n[runs]\n{runs}\n")
    with pytest.raises(ConfigError, match=rf"\[runs\] {key}: .*{re.escape(problem)}"):
        load_config(s.config_path)


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer scheduler is not silently used."""
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s._db.execute("PRAGMA user_version = 99")
    s.close()
    with pytest.raises(StoreError, match="newer scheduler"):
        SQLiteStore(path)


def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    """A path that cannot be a database names the file."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match=r"dir\.db"):
        SQLiteStore(tmp_path / "dir.db")


def test_the_store_defaults_to_the_config_folder(tmp_path: Path, certs: Certs) -> None:
    """Without [store], the SQLite file is scheduler-state/scheduler.db beside the config;
    a relative sqlite_file resolves against the config folder too."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    cfg = load_config(s.config_path)
    assert cfg.store.sqlite_file == s.workdir / "scheduler-state" / "scheduler.db"
    with open(s.config_path, "a") as f:
        f.write('\n[store]\nsqlite_file = "db/x.db"\n')
    assert load_config(s.config_path).store.sqlite_file == s.workdir / "db" / "x.db"
    with open(s.config_path, "a") as f:
        f.write('backend = "redis"\n')
    with pytest.raises(ConfigError, match=r"\[store\] backend: must be one of sqlite, etcd"):
        load_config(s.config_path)


@pytest.mark.parametrize(
    ("store", "key", "problem"),
    [
        ('backend = "etcd"', "etcd_endpoints", "required when backend = etcd"),
        (
            'backend = "etcd"\netcd_endpoints = ["127.0.0.1:2379", "etcd.example:2379"]',
            "etcd_endpoints",
            "several members must be IPv4 addresses",
        ),
        (
            'backend = "etcd"\netcd_endpoints = ["127.0.0.1"]',
            "etcd_endpoints",
            "127.0.0.1",
        ),
        (
            'backend = "etcd"\netcd_endpoints = ["127.0.0.1:2379"]',
            "etcd_ca_file",
            "required when backend = etcd (etcd over mTLS)",
        ),
    ],
)
def test_etcd_store_config_errors_name_the_key(
    tmp_path: Path, certs: Certs, store: str, key: str, problem: str
) -> None:
    """[store] backend = "etcd" needs endpoints and its own certificates: each missing or
    malformed key is refused with a line naming [store] and that key."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    with open(s.config_path, "a") as f:
        f.write(f"\n[store]\n{store}\n")
    with pytest.raises(ConfigError, match=rf"\[store\] {key}: .*{re.escape(problem)}"):
        load_config(s.config_path)


def test_an_etcd_store_config_with_its_certificates_loads(tmp_path: Path, certs: Certs) -> None:
    """A complete etcd [store] loads, its certificate paths resolved like every path."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    with open(s.config_path, "a") as f:
        f.write(
            '\n[store]\nbackend = "etcd"\n'
            'etcd_endpoints = ["127.0.0.1:2379", "127.0.0.2:2379"]\n'
            f'etcd_ca_file = "{certs.crt("etcd-ca")}"\n'
            f'etcd_crt_file = "{certs.crt("etcd-client")}"\n'
            f'etcd_key_file = "{certs.key("etcd-client")}"\n'
        )
    st = load_config(s.config_path).store
    assert st.backend == "etcd" and st.etcd_prefix == "/agent-scheduler/"
    assert st.etcd_ca_file == certs.crt("etcd-ca") and st.session_seconds == 10


def test_a_scheduler_whose_store_cannot_open_exits_1_naming_it(
    tmp_path: Path, certs: Certs
) -> None:
    """serve with an unusable store: one line naming the file, exit status 1, no listener."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    (s.workdir / "bad.db").mkdir()
    with open(s.config_path, "a") as f:
        f.write('\n[store]\nsqlite_file = "bad.db"\n')
    r = subprocess.run(s.argv(), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "bad.db: cannot open the store" in r.stderr
    assert "listening" not in r.stderr
