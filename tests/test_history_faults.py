"""The history under faults and at scale: ListJobs agrees with QueryJob while the disk
is full, unsaved records are written again on their own schedule, retention works in
small steps and gives the space back. A full disk is the agent's condition, so it must
never make the two views of a job disagree nor lose a record for good."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import retention
from agent.daemon.history import History, JobRecord, Store
from agent.vocabulary import JobState

from helpers import IS_ROOT, AgentFactory, wait_for


def _rec(i: int, state: JobState = JobState.SUCCEEDED, age: float = 100_000.0) -> JobRecord:
    t = time.time() - age + i
    return JobRecord(
        id=str(uuid.uuid4()),
        owner="client",
        command="/bin/true",
        path="",
        args=[],
        state=state,
        start_time=t,
        end_time=None if state is JobState.RUNNING else t,
        output_path=f"/nonexistent/{i}.out",  # outside any output dir: never removed
    )


def _count(store: Store) -> int:
    (n,) = store._db.execute(
        "SELECT COUNT(*) FROM jobs WHERE state <> ?", (JobState.RUNNING.value,)
    ).fetchone()
    return int(n)


def test_the_kept_count_of_finished_jobs_matches_the_table(tmp_path: Path) -> None:
    """Inserts, state changes and deletes keep the finished count the retention uses
    equal to a real COUNT(*), and a reopened file keeps it."""
    store = Store(tmp_path / "h.sqlite3")
    recs = [_rec(i, JobState.RUNNING if i % 3 == 0 else JobState.FAILED) for i in range(60)]
    for r in recs:
        store.insert(r)
    store.commit()
    for r in recs[::3]:
        r.state = JobState.SUCCEEDED
        store.update(r)
    recs[1].state = JobState.FAILED  # finished to finished: no change of the count
    store.update(recs[1])
    store.commit()
    store.delete([r.id for r in recs[:10]])
    finished = store._db.execute("SELECT n FROM finished_count").fetchone()[0]
    assert finished == _count(store) == 50
    assert store.count() == 50
    store.close()
    again = Store(tmp_path / "h.sqlite3")
    assert again._db.execute("SELECT n FROM finished_count").fetchone()[0] == 50
    again.close()


def test_a_file_of_an_older_agent_gets_the_count_and_incremental_vacuum(tmp_path: Path) -> None:
    """A history written before (no count table, no auto_vacuum) is upgraded at open."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    from agent.daemon import history

    db.executescript(history._SCHEMA)
    db.execute("PRAGMA user_version=1")
    db.execute(
        "INSERT INTO jobs (id, owner, command, path, args, state, start_time, output_path) "
        "VALUES ('a', 'o', '/bin/true', '', '[]', 2, 0, '/x')"
    )
    db.commit()
    db.close()
    store = Store(path)
    assert store._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert store._db.execute("SELECT n FROM finished_count").fetchone()[0] == 1
    store.close()


def _filled(path: Path, jobs: int) -> tuple[Store, History]:
    store = Store(path)
    for i in range(jobs):
        store.insert(_rec(i))
    store.commit()
    return store, History(store)


def test_retention_steps_are_small_and_the_file_shrinks(tmp_path: Path) -> None:
    """A sweep with a budget removes a bounded batch per step and says more is left;
    once the backlog is gone the free pages go back and the file is smaller."""
    path = tmp_path / "h.sqlite3"
    store, history = _filled(path, 4000)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    big = path.stat().st_size
    sweeper = retention.Sweeper(
        history, tmp_path, retention.Policy(max_age_seconds=0, max_jobs=100)
    )
    steps = 0
    while True:
        removed = sweeper.sweep(budget=1e-9)  # the smallest budget: one batch a step
        assert removed <= retention.SWEEP_BATCH
        steps += 1
        if not sweeper.more:
            break
        assert steps < 1000
    assert _count(store) == 100
    assert steps >= (4000 - 100) // retention.SWEEP_BATCH
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size < big / 4, (big, path.stat().st_size)
    store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own (root only), unmounted at the end."""
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir(mode=0o700)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_list_agrees_with_query_while_the_history_cannot_be_written(
    make_agent: AgentFactory, small_disk: Path, tmp_path: Path, script_dir: Path
) -> None:
    """With the history's disk full, a job that ends is SUCCEEDED in ListJobs as in
    QueryJob (state filters included); once space is back its record is written on its
    own schedule, without a retention sweep: after kill -9 and a restart it is still
    SUCCEEDED, not LOST."""
    out = tmp_path / "output"
    out.mkdir(mode=0o700)
    a = make_agent(
        jobs={"state_dir": str(small_disk), "output_dir": str(out)},
        retention={"sweep_seconds": 3600.0},
    )
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["1"])
    filler = _fill(small_disk)
    try:
        assert c.wait(job, timeout=20).state == "SUCCEEDED"
        wait_for(lambda: "cannot" in a.log() and "history" in a.log(), timeout=10)
        listed = {j.job_id: j.state for j in c.list()[0]}
        assert listed[job] == "SUCCEEDED" == c.query(job).state
        assert job not in {j.job_id for j in c.list(states=["RUNNING"])[0]}
        assert job in {j.job_id for j in c.list(states=["SUCCEEDED"])[0]}
    finally:
        os.unlink(filler)
    # Written again on the history's own retry schedule (no retention sweep runs: 1 h).
    wait_for(lambda: "unsaved record(s) written" in a.log(), timeout=30)
    a.kill9()
    a.start()
    c = a.client()
    st = c.query(job)
    assert st.state == "SUCCEEDED", st
