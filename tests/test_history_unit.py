"""The job history (agent.daemon.history) on a real SQLite file, with no agent.

The store: every field round-trips, updates touch only what may change, ListJobs pages
never lose or repeat a row whatever the filters, retention picks exactly the finished
jobs past its limits; the keeper's wire form of a record; and the history as the
supervisor uses it: group commit on an asyncio loop, and records kept and retried when
a write fails (a Store whose writes fail on demand stands in for a full disk). The
history under real faults and at scale is tests/test_history_faults.py; the cache of
recent records is tests/test_rpc_caches.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.daemon import history
from agent.daemon.history import (
    History,
    JobRecord,
    Store,
    StoreError,
    record_from_wire,
    record_to_wire,
)
from agent.keeper.errors import Unavailable
from agent.vocabulary import JobState

T0 = 1_700_000_000.0


def _rec(
    i: int = 0,
    state: JobState = JobState.SUCCEEDED,
    owner: str = "alice",
    end: float | None = None,
) -> JobRecord:
    done = state is not JobState.RUNNING
    return JobRecord(
        id=str(uuid.UUID(int=i + 1)),
        owner=owner,
        command="/bin/true",
        path="",
        args=[],
        state=state,
        start_time=T0 + i,
        output_path=f"/out/{i}.out",
        end_time=(T0 + i if end is None else end) if done else None,
        exit_code=0 if done else None,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "h.sqlite3")
    yield s
    s.close()


def _other(store: Store) -> Store:
    """A second connection to the same file: what is committed, not what is cached."""
    return Store(store.path)


# ---------------------------------------------------------------- the store


def test_every_field_round_trips_through_the_file(store: Store) -> None:
    """A record with every field set comes back equal from another connection: lists,
    dicts, None, booleans and floats included."""
    rec = JobRecord(
        id="11111111-2222-3333-4444-555555555555",
        owner="alice",
        command="/bin/bash",
        path="/s/x.sh",
        args=["a", "<secret>", "é\u00a0"],
        state=JobState.FAILED,
        start_time=T0 + 0.25,
        output_path="/out/x.out",
        pid=4242,
        leader_start=987654321,
        boot_id="b00t",
        end_time=T0 + 3.5,
        exit_code=3,
        signal=None,
        error_text="exit status 3",
        user_cpu=0.125,
        system_cpu=0.0625,
        max_rss=2048,
        output_bytes=77,
        output_truncated=True,
        timeout_seconds=60,
        limits={"cpu_seconds": 5, "memory_bytes": 1 << 40},
    )
    store.insert(rec)
    store.commit()
    other = _other(store)
    got = other.get(rec.id)
    other.close()
    assert got == rec and got is not rec
    assert got.seq == rec.seq > 0


def test_seq_grows_with_each_insert(store: Store) -> None:
    """Each insert gets a larger sequence number (ListJobs orders and pages by it)."""
    recs = [_rec(i) for i in range(5)]
    for r in recs:
        store.insert(r)
    assert [r.seq for r in recs] == sorted({r.seq for r in recs})


def test_an_unknown_id_is_none(store: Store) -> None:
    """get() of an id the history does not hold answers None."""
    assert store.get("nope") is None


def test_update_writes_only_what_may_change(store: Store) -> None:
    """An update writes the job's state and outcome, never its owner, command, path,
    arguments, start time or output path (who asked for what stays as recorded)."""
    rec = _rec(0, JobState.RUNNING)
    store.insert(rec)
    store.commit()
    rec.owner, rec.command, rec.path, rec.args = "mallory", "/bin/sh", "/x", ["-c"]
    rec.start_time, rec.output_path = 0.0, "/etc/passwd"
    rec.state, rec.exit_code, rec.end_time, rec.pid = JobState.SUCCEEDED, 0, T0 + 9, 77
    store.update(rec)
    store.commit()
    other = _other(store)
    got = other.get(rec.id)
    other.close()
    assert got is not None
    assert (got.owner, got.command, got.path, got.args) == ("alice", "/bin/true", "", [])
    assert (got.start_time, got.output_path) == (T0, "/out/0.out")
    assert (got.state, got.exit_code, got.end_time, got.pid) == (JobState.SUCCEEDED, 0, T0 + 9, 77)


def test_nothing_is_visible_to_others_before_commit_and_rollback_drops_it(store: Store) -> None:
    """Writes wait in the open transaction: another connection sees them only after
    commit(); rollback() drops them, from this connection's answers too."""
    other = _other(store)
    a = _rec(0)
    store.insert(a)
    assert other.get(a.id) is None
    store.commit()
    assert other.get(a.id) is not None
    b = _rec(1)
    store.insert(b)
    store.rollback()
    assert store.get(b.id) is None and other.get(b.id) is None
    other.close()


def test_running_and_count(store: Store) -> None:
    """running() is the jobs recorded as running; count() all jobs, running or not."""
    states = [JobState.RUNNING, JobState.SUCCEEDED, JobState.RUNNING, JobState.LOST]
    recs = [_rec(i, s) for i, s in enumerate(states)]
    for r in recs:
        store.insert(r)
    store.commit()
    assert {r.id for r in store.running()} == {recs[0].id, recs[2].id}
    assert store.count() == 4
    recs[0].state = JobState.STOPPED
    store.update(recs[0])
    assert store.count() == 4 and len(store.running()) == 1


def _ids(recs: list[JobRecord]) -> list[str]:
    return [r.id for r in recs]


def test_list_is_newest_first_and_filtered(store: Store) -> None:
    """Newest first; by states (any of them), by owner, both, with a limit."""
    specs = [
        (JobState.RUNNING, "alice"),
        (JobState.SUCCEEDED, "bob"),
        (JobState.FAILED, "alice"),
        (JobState.SUCCEEDED, "alice"),
        (JobState.LOST, "bob"),
    ]
    recs = [_rec(i, s, o) for i, (s, o) in enumerate(specs)]
    for r in recs:
        store.insert(r)
    store.commit()
    newest = list(reversed(recs))
    assert _ids(store.list_jobs()) == _ids(newest)
    assert _ids(store.list_jobs(limit=2)) == _ids(newest[:2])
    assert _ids(store.list_jobs(owner="bob")) == [recs[4].id, recs[1].id]
    assert _ids(store.list_jobs(states=[JobState.SUCCEEDED, JobState.FAILED])) == [
        recs[3].id,
        recs[2].id,
        recs[1].id,
    ]
    both = store.list_jobs(states=[JobState.SUCCEEDED], owner="alice")
    assert _ids(both) == [recs[3].id]
    assert store.list_jobs(owner="carol") == []
    assert _ids(store.list_jobs(before_seq=recs[2].seq)) == [recs[1].id, recs[0].id]


JOBS = st.lists(
    st.tuples(st.sampled_from(list(JobState)), st.sampled_from(["alice", "bob", "carol"])),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    jobs=JOBS,
    page=st.integers(min_value=1, max_value=7),
    states=st.sets(st.sampled_from(list(JobState)), max_size=3),
    owner=st.one_of(st.none(), st.sampled_from(["alice", "bob", "dave"])),
)
def test_paging_never_loses_or_repeats_a_row(
    jobs: list[tuple[JobState, str]],
    page: int,
    states: set[JobState],
    owner: str | None,
) -> None:
    """Property: paging with before_seq = the last row's seq yields every matching job
    exactly once, newest first, whatever the page size and filters."""
    s = Store(Path(":memory:"))  # the same SQL on SQLite, without a file per example
    recs = [_rec(i, st_, o) for i, (st_, o) in enumerate(jobs)]
    for r in recs:
        s.insert(r)
    s.commit()
    want = [
        r.id
        for r in reversed(recs)
        if (not states or r.state in states) and (owner is None or r.owner == owner)
    ]
    got: list[str] = []
    before: int | None = None
    for _ in range(len(jobs) + 2):
        rows = s.list_jobs(states=states, owner=owner, before_seq=before, limit=page)
        assert len(rows) <= page
        got += _ids(rows)
        if len(rows) < page:
            break
        before = rows[-1].seq
    s.close()
    assert got == want


def test_expired_by_age_takes_finished_jobs_ended_before_the_cutoff(store: Store) -> None:
    """max_age: finished jobs that ended more than that long ago, oldest end first;
    never a running job, however old."""
    old = _rec(0, end=T0 - 1000)
    older = _rec(1, end=T0 - 2000)
    young = _rec(2, end=T0 - 10)
    running = _rec(3, JobState.RUNNING)
    running.start_time = T0 - 10_000
    for r in (old, older, young, running):
        store.insert(r)
    store.commit()
    got = store.expired(max_age_seconds=100, max_jobs=0, now=T0)
    assert got == [(older.id, older.output_path), (old.id, old.output_path)]
    assert store.expired(max_age_seconds=0, max_jobs=0, now=T0) == []


def test_expired_by_count_takes_the_oldest_finished_beyond_max_jobs(store: Store) -> None:
    """max_jobs: the oldest finished jobs (by insertion) beyond the count; running jobs
    are neither counted nor taken; the batch bounds one step."""
    recs = [_rec(i, JobState.RUNNING if i == 0 else JobState.SUCCEEDED) for i in range(6)]
    for r in recs:
        store.insert(r)
    store.commit()
    assert [i for i, _ in store.expired(max_age_seconds=0, max_jobs=3, now=T0)] == _ids(recs[1:3])
    assert store.expired(max_age_seconds=0, max_jobs=5, now=T0) == []
    assert [i for i, _ in store.expired(max_age_seconds=0, max_jobs=1, batch=2)] == _ids(recs[1:3])


def test_expired_by_both_limits_names_each_job_once(store: Store) -> None:
    """A job past both limits appears once."""
    recs = [_rec(i, end=T0 - 5000) for i in range(3)]
    for r in recs:
        store.insert(r)
    store.commit()
    got = store.expired(max_age_seconds=100, max_jobs=1, now=T0)
    assert sorted(i for i, _ in got) == sorted(_ids(recs))


def test_delete_removes_finished_jobs_only(store: Store) -> None:
    """delete() removes finished jobs (committed at once) and never a running one."""
    done, running = _rec(0), _rec(1, JobState.RUNNING)
    store.insert(done)
    store.insert(running)
    store.commit()
    assert store.get(done.id) is not None  # and now in the recent cache
    store.delete([done.id, running.id])
    store.delete([])
    assert store.get(done.id) is None and store.get(running.id) is not None
    other = _other(store)
    assert other.get(done.id) is None and other.count() == 1
    other.close()


def test_vacuum_step_waits_for_the_open_transaction(store: Store) -> None:
    """Inside a group commit the vacuum does nothing (0); outside it gives pages back
    until none are free."""
    for i in range(200):
        r = _rec(i)
        r.error_text = "x" * 2000
        store.insert(r)
    store.commit()
    store.delete([str(uuid.UUID(int=i + 1)) for i in range(200)])
    store.insert(_rec(500))
    assert store.vacuum_step() == 0
    store.commit()
    for _ in range(100):
        if store.vacuum_step(pages=8) == 0:
            break
    assert store.vacuum_step() == 0


def test_a_file_of_a_newer_agent_is_refused(tmp_path: Path) -> None:
    """A schema version above ours: StoreError naming the file, not a guess at its tables."""
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={history.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="written by a newer agent"):
        Store(path)


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    """Garbage where the history should be: StoreError naming the file."""
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as e:
        Store(path)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------- the keeper's wire form


def test_wire_form_round_trips_through_json() -> None:
    """record_to_wire -> JSON -> record_from_wire gives the same record (the sequence
    number is the agent's own and does not travel); the state travels by name."""
    rec = _rec(3, JobState.TIMED_OUT)
    rec.args, rec.limits, rec.signal, rec.output_truncated = ["a"], {"open_files": 9}, 9, True
    rec.seq = 99
    wire = json.loads(json.dumps(record_to_wire(rec)))
    assert wire["state"] == "TIMED_OUT" and "seq" not in wire
    back = record_from_wire(wire)
    rec.seq = 0
    assert back == rec


def test_wire_form_fills_defaults_and_ignores_unknown_keys() -> None:
    """Only the required fields: the rest take their defaults; unknown keys are ignored."""
    wire = {k: v for k, v in record_to_wire(_rec(0)).items() if k not in ("pid", "limits")}
    wire["from_the_future"] = 1
    back = record_from_wire(wire)
    assert back.pid == 0 and back.limits == {}


@pytest.mark.parametrize(
    "change",
    [
        {"state": "SLEEPING"},
        {"state": 2},
        {"args": "a b"},
        {"id": 5},
        {"owner": None, "id": None},
    ],
)
def test_a_bad_wire_record_is_value_error(change: dict[str, object]) -> None:
    """An unknown state, arguments that are no list, an id that is no string: ValueError."""
    wire = {**record_to_wire(_rec(0)), **change}
    with pytest.raises(ValueError, match="not a job record"):
        record_from_wire(wire)


@pytest.mark.parametrize("missing", ["id", "state", "owner", "start_time"])
def test_a_wire_record_without_a_required_field_is_value_error(missing: str) -> None:
    """A missing required field is ValueError, not KeyError or TypeError."""
    wire = record_to_wire(_rec(0))
    del wire[missing]
    with pytest.raises(ValueError, match="not a job record"):
        record_from_wire(wire)


# ---------------------------------------------------------------- History


class FlakyStore(Store):
    """A Store whose writes and commits fail while ``broken`` (a full disk, say)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.broken_update = False
        self.broken_commit = False
        self.broken_insert = False
        self.commits = 0

    def insert(self, rec: JobRecord) -> None:
        if self.broken_insert:
            raise sqlite3.OperationalError("database or disk is full")
        super().insert(rec)

    def update(self, rec: JobRecord) -> None:
        if self.broken_update:
            raise sqlite3.OperationalError("database or disk is full")
        super().update(rec)

    def commit(self) -> None:
        if self.broken_commit and self._db.in_transaction:
            raise sqlite3.OperationalError("disk I/O error")
        if self._db.in_transaction:
            self.commits += 1
        super().commit()


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[FlakyStore]:
    s = FlakyStore(tmp_path / "h.sqlite3")
    yield s
    s.broken_update = s.broken_commit = s.broken_insert = False
    s.close()


def _committed_state(store: Store, job_id: str) -> JobState | None:
    """The job's state as committed to the file (a plain reader: no write lock needed)."""
    db = sqlite3.connect(store.path)
    row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
    db.close()
    return None if row is None else JobState(row[0])


def test_starts_in_one_iteration_share_one_commit(flaky: FlakyStore) -> None:
    """Group commit: inserts made in one loop iteration are committed by one COMMIT and
    share its future; once awaited, they are in the file."""
    h = History(flaky)
    recs = [_rec(i, JobState.RUNNING) for i in range(5)]

    async def main() -> None:
        futures = [h.insert_new(r) for r in recs]
        assert all(f is futures[0] for f in futures)
        assert _committed_state(flaky, recs[0].id) is None  # not before the commit
        for f in futures:
            await h.committed(f)

    asyncio.run(main())
    assert flaky.commits == 1
    assert all(_committed_state(flaky, r.id) is JobState.RUNNING for r in recs)


def test_a_failed_commit_fails_the_starts_and_keeps_nothing(flaky: FlakyStore) -> None:
    """A start whose commit fails is told UNAVAILABLE (history-write-failed), and the
    insert is rolled back: no job the caller was told did not start."""
    h = History(flaky)
    rec = _rec(0, JobState.RUNNING)

    async def main() -> None:
        fut = h.insert_new(rec)
        flaky.broken_commit = True
        with pytest.raises(Unavailable) as e:
            await h.committed(fut)
        assert e.value.rule == "history-write-failed"
        assert "the job was not started" in e.value.message

    asyncio.run(main())
    flaky.broken_commit = False
    assert _committed_state(flaky, rec.id) is None
    assert flaky.get(rec.id) is None


def test_a_failed_insert_is_unavailable_at_once(flaky: FlakyStore) -> None:
    """An insert that cannot be written is refused before any commit is awaited."""
    h = History(flaky)
    flaky.broken_insert = True

    async def main() -> None:
        with pytest.raises(Unavailable):
            h.insert_new(_rec(0, JobState.RUNNING))

    asyncio.run(main())
    with pytest.raises(Unavailable):
        h.insert_now(_rec(1))


def test_insert_now_commits_at_once(flaky: FlakyStore) -> None:
    """insert_now (a job the keeper kept and the history lost) is in the file on return;
    a failed commit rolls it back and is UNAVAILABLE."""
    h = History(flaky)
    rec = _rec(0)
    h.insert_now(rec)
    assert _committed_state(flaky, rec.id) is JobState.SUCCEEDED
    flaky.broken_commit = True
    lost = _rec(1)
    with pytest.raises(Unavailable):
        h.insert_now(lost)
    flaky.broken_commit = False
    assert flaky.get(lost.id) is None and _committed_state(flaky, lost.id) is None


def test_save_outside_the_loop_commits_at_once(flaky: FlakyStore) -> None:
    """Before a loop is attached (recovery at start-up) a save is committed on return."""
    h = History(flaky)
    rec = _rec(0, JobState.RUNNING)
    h.insert_now(rec)
    rec.state = JobState.LOST
    assert h.save(rec) is None
    assert _committed_state(flaky, rec.id) is JobState.LOST


def test_record_change_waits_for_its_commit_and_tells_on_commit(flaky: FlakyStore) -> None:
    """On the loop, a change is in the file once record_change returns, and on_commit
    hears the records of each commit."""
    h = History(flaky)
    heard: list[list[str]] = []
    h.on_commit = lambda recs: heard.append([r.id for r in recs])
    rec = _rec(0, JobState.RUNNING)
    h.insert_now(rec)

    async def main() -> None:
        h.attach(asyncio.get_running_loop())
        rec.state = JobState.SUCCEEDED
        a = _rec(1, JobState.RUNNING)
        h.insert_now(a)
        a.state = JobState.FAILED
        fut = h.save(a)
        assert fut is not None
        await h.record_change(rec)
        assert _committed_state(flaky, rec.id) is JobState.SUCCEEDED

    asyncio.run(main())
    assert heard == [[str(uuid.UUID(int=2))]]  # record_change's write is no save batch
    assert _committed_state(flaky, str(uuid.UUID(int=2))) is JobState.FAILED


def test_a_failed_record_change_is_unavailable(flaky: FlakyStore) -> None:
    """record_change whose write fails raises UNAVAILABLE (history-write-failed)."""
    h = History(flaky)
    rec = _rec(0, JobState.RUNNING)
    h.insert_now(rec)
    flaky.broken_update = True

    async def main() -> None:
        with pytest.raises(Unavailable) as e:
            await h.record_change(rec)
        assert e.value.rule == "history-write-failed"

    asyncio.run(main())


def test_an_unsaved_record_is_served_and_written_again_on_its_own(
    flaky: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fails keeps the record in ``unsaved`` (get() answers it, not the stale
    row) and writes it again on a schedule of its own once the disk is back; the retry
    delay doubles up to its maximum while it keeps failing, and starts over after."""
    monkeypatch.setattr(history, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(history, "RETRY_MAX", 0.04)
    h = History(flaky)
    heard: list[str] = []
    h.on_commit = lambda recs: heard.extend(r.id for r in recs)
    rec = _rec(0, JobState.RUNNING)
    h.insert_now(rec)

    async def main() -> None:
        h.attach(asyncio.get_running_loop())
        flaky.broken_update = True
        rec.state = JobState.SUCCEEDED
        assert h.save(rec) is None
        assert h.unsaved == {rec.id: rec}
        got = h.get(rec.id)
        assert got is not None and got.state is JobState.SUCCEEDED
        assert _committed_state(flaky, rec.id) is JobState.RUNNING
        await asyncio.sleep(0.2)  # several retries, all failing
        assert h.unsaved and h._retry_delay == 0.04
        flaky.broken_update = False
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not h.unsaved:
                break
        await asyncio.sleep(0)

    asyncio.run(main())
    assert h.unsaved == {}
    assert _committed_state(flaky, rec.id) is JobState.SUCCEEDED
    assert heard == [rec.id]
    assert h._retry_delay == 0.01
    h.close()


def test_a_failed_group_commit_keeps_its_records_for_the_retry(
    flaky: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saves whose shared commit fails go to ``unsaved`` (the future's error is retrieved:
    no 'never retrieved' warning) and are written by the retry."""
    monkeypatch.setattr(history, "RETRY_FIRST", 0.01)
    h = History(flaky)
    recs = [_rec(i, JobState.RUNNING) for i in range(3)]
    for r in recs:
        h.insert_now(r)

    async def main() -> None:
        h.attach(asyncio.get_running_loop())
        flaky.broken_commit = True
        for r in recs:
            r.state = JobState.STOPPED
            assert h.save(r) is not None
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert set(h.unsaved) == {r.id for r in recs}
        flaky.broken_commit = False
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not h.unsaved:
                break

    asyncio.run(main())
    assert h.unsaved == {}
    assert all(_committed_state(flaky, r.id) is JobState.STOPPED for r in recs)


def test_retry_unsaved_by_hand_writes_them(flaky: FlakyStore) -> None:
    """retry_unsaved() (the retention sweep calls it) writes every kept record."""
    h = History(flaky)
    rec = _rec(0, JobState.RUNNING)
    h.insert_now(rec)
    flaky.broken_update = True
    rec.state = JobState.FAILED
    h.save(rec)
    assert rec.id in h.unsaved
    flaky.broken_update = False
    h.retry_unsaved()
    assert h.unsaved == {}
    assert _committed_state(flaky, rec.id) is JobState.FAILED


def test_count_and_list_answer_from_the_store(flaky: FlakyStore) -> None:
    """History.count and list_jobs are the store's, filters and paging passed through."""
    h = History(flaky)
    recs = [_rec(i, owner="bob" if i % 2 else "alice") for i in range(4)]
    for r in recs:
        h.insert_now(r)
    assert h.count() == 4
    page = h.list_jobs(owner="alice", limit=1)
    assert _ids(page) == [recs[2].id]
    assert _ids(h.list_jobs(owner="alice", before_seq=page[0].seq)) == [recs[0].id]
    assert h.list_jobs(states=[JobState.RUNNING]) == []
