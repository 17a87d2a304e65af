"""The supervisor driven in-process by a fake job keeper at the JobOps seam.

No keeper and no child process exist: the fake records every start (spec, run, record,
sink) and answers it with a made-up pid; the test then reports what the keeper would
(``sink.on_output``, ``on_ending``, ``on_finished`` with the state and text the keeper's
lifecycle decides) and looks at what the supervisor did with it: the history, the
waiters, the stops and the acknowledgements it sent. What the keeper itself decides
(stop escalation, timeouts, the output cap) is tested against a real keeper in
tests/test_keeper_protocol.py. The history is a real SQLite file, the policy a real
parsed policy (its file checks run on /bin/true).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.access import AccessRules
from agent.daemon import adoption, jobview, supervisor
from agent.daemon.history import History, JobRecord, Store, record_to_wire
from agent.daemon.keeperclient import RunSpec
from agent.daemon.keeperwire import Admission, Finished, Hello, Kept
from agent.daemon.supervisor import Job, Supervisor
from agent.keeper import policyfile
from agent.keeper.admission import Rules, StartRequest
from agent.keeper.decision import Decider
from agent.keeper.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SpawnFailure,
    Unavailable,
)
from agent.keeper.jobsettings import JobUser, Settings
from agent.keeper.lifecycle import Exit
from agent.keeper.spawn import SpawnSpec
from agent.vocabulary import JobState

POLICY = """
version: 1
entries:
  - name: "true"
    command: /bin/true
    aliases: ["true"]
    args: {max_count: 4}
"""
ACCESS = AccessRules(clients=frozenset({"alice", "bob"}), admins=frozenset({"root-admin"}))
ALICE, BOB, ADMIN = (ACCESS.caller(n) for n in ("alice", "bob", "root-admin"))


@dataclass
class Started:
    """One start the fake keeper took."""

    spec: SpawnSpec
    run: RunSpec
    record: dict[str, Any]
    sink: Job
    pid: int

    @property
    def id(self) -> str:
        return str(self.record["id"])


def fin(
    job_id: str,
    state: JobState,
    text: str = "",
    *,
    code: int | None = 0,
    sig: int | None = None,
    size: int = 0,
    truncated: bool = False,
    persist: bool = True,
    record: dict[str, Any] | None = None,
) -> Finished:
    """A finished report as the keeper sends it."""
    ex = Exit(code, sig, user_cpu=0.01, end_time=1_700_000_000.0)
    return Finished(job_id, state, text, ex, size, truncated, persist, record or {})


class FakeOps:
    """A JobOps whose keeper the test plays.

    It decides every start as the keeper does (the same :class:`Decider`, with the
    test's policy), answers at once with the admission, and then "spawns" in
    :meth:`spawn` (a subclass may make it wait, fail or break).

    ``stop_ends``: a "stop" or "shutdown" request finishes the job STOPPED at once (with
    the text the keeper's lifecycle gives a job that dies of the SIGTERM).
    """

    decider: Decider  # set by make()

    def __init__(self, *, fail: OSError | None = None, stop_ends: bool = False) -> None:
        self.starts: list[Started] = []
        self.watched: dict[str, Job] = {}
        self.stops: list[tuple[str, str]] = []
        self.acks: list[str] = []
        self.fail = fail
        self.stop_ends = stop_ends
        self.closed: bool | None = None  # its keep_jobs, once closed
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, job_id: str, req: StartRequest, record: dict, sink: Job) -> Admission:  # type: ignore[type-arg]
        decided = self.decider.decide(job_id, req)
        for fd in (decided.spec.exec_fd, decided.spec.script_fd):
            if fd is not None:
                os.close(fd)
        loop = asyncio.get_running_loop()
        started: asyncio.Future[int] = loop.create_future()
        s = Started(decided.spec, decided.run, record, sink, 0)
        self.tasks.add(task := loop.create_task(self._spawn(s, started)))
        task.add_done_callback(self.tasks.discard)
        answer = {
            "command": decided.executable,
            "timeout": decided.timeout,
            "limits": decided.limits,
            "entry": decided.entry,
        }
        return Admission(self, job_id, started, answer)

    async def _spawn(self, s: Started, started: asyncio.Future[int]) -> None:
        try:
            s.pid = await self.spawn(s)
        except BaseException as e:
            if not started.done():
                started.set_exception(e)
            return
        self.starts.append(s)
        if started.done():  # cancelled: as the keeper client does, it must not run
            self.stop(s.id, "not_recorded")
            return
        started.set_result(s.pid)

    async def spawn(self, s: Started) -> int:
        """The keeper's spawn of an admitted job: its pid, or an OSError."""
        if self.fail is not None:
            raise self.fail
        return 1000 + len(self.starts)

    def watch(self, job_id: str, sink: Job) -> None:
        self.watched[job_id] = sink

    def stop(self, job_id: str, how: str) -> None:
        self.stops.append((job_id, how))
        sink = self.sink(job_id)
        if self.stop_ends and how in ("stop", "shutdown") and sink is not None:
            text = "stopped by agent shutdown" if how == "shutdown" else "stopped by request"
            report = fin(job_id, JobState.STOPPED, f"{text} (killed by SIGTERM)", code=None)
            asyncio.get_running_loop().call_soon(sink.on_finished, report)

    def ack(self, job_id: str) -> None:
        self.acks.append(job_id)

    def close(self, *, keep_jobs: bool = False) -> None:
        self.closed = keep_jobs

    def sink(self, job_id: str) -> Job | None:
        for s in self.starts:
            if s.id == job_id:
                return s.sink
        return self.watched.get(job_id)


def make(
    tmp_path: Path, ops: FakeOps, *, hooks: supervisor.JobHooks | None = None, **rules: int
) -> Supervisor:
    out = tmp_path / "output"
    out.mkdir(exist_ok=True)
    r = Rules(
        max_running=rules.get("max_running", 8),
        default_timeout=0,
        max_timeout=rules.get("max_timeout", 0),
        default_limits={},
        max_limits={"output_bytes": 0},
    )
    settings = Settings(
        output_dir=out,
        instance="test",
        user=JobUser(None, None, "me", "/"),
        umask=0o077,
        stop_grace=0.05,
        on_output_cap="kill",
        path_env="/usr/bin:/bin",
        rules=r,
    )
    ops.decider = Decider(settings, policyfile.parse(POLICY))
    return Supervisor(settings, History(Store(tmp_path / "jobs.sqlite3")), ops, hooks=hooks)


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def req(identity: str = "alice", **kw: Any) -> StartRequest:
    return StartRequest(identity=identity, command="true", path="", **kw)


def _on_disk(tmp_path: Path, job_id: str) -> tuple[int, int] | None:
    """(state, pid) of a job as committed to the history file (another connection)."""
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        row = db.execute("SELECT state, pid FROM jobs WHERE id=?", (job_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else (int(row[0]), int(row[1]))


# ---------------------------------------------------------------- start and reports


def test_start_output_and_finish_are_recorded(tmp_path: Path) -> None:
    """The keeper gets the spec, run and record; its output and finished reports reach
    the record, the history and the waiters; the job is acknowledged."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req(timeout_seconds=7, limits={"output_bytes": 100}))
        assert rec.state is JobState.RUNNING and rec.pid == 1000
        (s,) = ops.starts
        assert s.spec.argv == (os.path.realpath("/bin/true"),)
        assert s.spec.env["AGENT_JOB_ID"] == rec.id and s.spec.stdout_fd == -1
        assert s.run == RunSpec(7, 0, 0, supervisor.NO_CGROUP_NOTE, 100, True, 0.05)
        assert s.record["id"] == rec.id and s.record["state"] == "RUNNING"
        assert s.sink is sup.running[rec.id]
        s.sink.on_output(6, False)
        assert sup.view.get(rec.id, ALICE).output_bytes == 6
        s.sink.on_ending()
        s.sink.on_finished(fin(rec.id, JobState.SUCCEEDED, size=6))
        done = await sup.view.wait(rec.id, ALICE, 2)
        assert done.state is JobState.SUCCEEDED and done.output_bytes == 6
        assert done.end_time == 1_700_000_000.0  # the keeper's time of the reap
        assert rec.id not in sup.running
        await settle()
        assert _on_disk(tmp_path, rec.id) == (JobState.SUCCEEDED.value, 1000)
        assert ops.acks == [rec.id]

    run(body)


class Hooks:
    """Records what the supervisor's JobHooks are told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def job_started(self, rec: JobRecord, entry: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append(("started", rec.state.name, entry))

    def job_finished(self, rec: JobRecord) -> None:
        self.calls.append(("finished", rec.state.name, ""))


def test_hooks_see_each_start_with_its_entry_and_each_end(tmp_path: Path) -> None:
    """The hooks (the metrics) hear a start with the policy entry the keeper admitted it
    under, and its end; a start that failed is a start and an end; a refusal neither."""
    ops = FakeOps()
    hooks = Hooks()
    sup = make(tmp_path, ops, hooks=hooks)

    async def body() -> None:
        rec = await sup.start(req())
        ops.sink(rec.id).on_finished(fin(rec.id, JobState.SUCCEEDED))  # type: ignore[union-attr]
        await sup.view.wait(rec.id, ALICE, 2)
        ops.fail = OSError(errno.ENOENT, "gone")
        await sup.start(req())
        with pytest.raises(PermissionDenied):
            await sup.start(StartRequest(identity="alice", command="rm", path=""))
        assert hooks.calls == [
            ("started", "RUNNING", "true"),
            ("finished", "SUCCEEDED", ""),
            ("finished", "FAILED", ""),
            ("started", "FAILED", "true"),
        ]

    run(body)


async def _ending_seen(sup: Supervisor, job_id: str) -> None:
    for _ in range(200):
        if sup.running[job_id].ending is not None:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the ending was never seen")


def test_a_query_of_an_ending_job_waits_for_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending reported, finished not yet in: the query answers done once it comes."""
    ops = FakeOps()
    sup = make(tmp_path, ops)
    # Far longer than the test needs: the answer must come from the report, not the clock.
    monkeypatch.setattr(jobview, "ENDING_WAIT", 30.0)
    monkeypatch.setattr(jobview, "ENDING_WINDOW", 30.0)

    async def body() -> None:
        rec = await sup.start(req())
        sink = ops.starts[0].sink
        sink.on_ending()
        await _ending_seen(sup, rec.id)
        asked = asyncio.ensure_future(sup.view.query(rec.id, ALICE))
        await asyncio.sleep(0.01)
        assert not asked.done()  # waiting for the end that is on its way
        sink.on_finished(fin(rec.id, JobState.SUCCEEDED))
        done = await asyncio.wait_for(asked, 5)
        assert done.state is JobState.SUCCEEDED

    run(body)


def test_a_query_waits_only_briefly_and_only_right_after_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running job not ending, or ending long ago, is answered at once; one that is
    ending and goes on is answered RUNNING after the short wait."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        sink = ops.starts[0].sink
        monkeypatch.setattr(jobview, "ENDING_WAIT", 30.0)
        # Not ending: no wait at all (a 30 s wait would trip wait_for).
        assert (await asyncio.wait_for(sup.view.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        sink.on_ending()
        await _ending_seen(sup, rec.id)
        # Ending, but longer ago than the window: no wait either.
        monkeypatch.setattr(jobview, "ENDING_WINDOW", 0.0)
        assert (await asyncio.wait_for(sup.view.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        # Inside the window, still not finished: RUNNING once the short wait is over.
        monkeypatch.setattr(jobview, "ENDING_WAIT", 0.01)
        monkeypatch.setattr(jobview, "ENDING_WINDOW", 30.0)
        assert (await asyncio.wait_for(sup.view.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        sink.on_finished(fin(rec.id, JobState.SUCCEEDED))
        assert (await sup.view.wait(rec.id, ALICE, 2)).state is JobState.SUCCEEDED
        # And the usual rules: unknown ids and other owners' jobs are refused.
        with pytest.raises(PermissionDenied):
            await sup.view.query(rec.id, BOB)
        with pytest.raises(NotFound):
            await sup.view.query("00000000-0000-4000-8000-000000000000", ALICE)

    run(body)


def test_stop_asks_the_keeper_and_records_its_end(tmp_path: Path) -> None:
    """StopJob is the keeper's "stop"; the job ends as the keeper reports it."""
    ops = FakeOps(stop_ends=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        assert sup.stop(rec.id, ALICE).id == rec.id
        assert ops.stops == [(rec.id, "stop")]
        done = await sup.view.wait(rec.id, ALICE, 2)
        assert (done.state, done.error_text) == (
            JobState.STOPPED,
            "stopped by request (killed by SIGTERM)",
        )
        # A finished job is fine to stop again, and nothing more is asked of the keeper.
        assert sup.stop(rec.id, ALICE).state is JobState.STOPPED
        assert ops.stops == [(rec.id, "stop")]

    run(body)


def test_start_failure_is_a_failed_job_with_the_reason(tmp_path: Path) -> None:
    """The keeper's start error gives a recorded FAILED job "start failed: ..."; its
    running out of descriptors is the agent's condition, still recorded FAILED."""

    async def body() -> None:
        enoexec = SpawnFailure(errno.ENOEXEC, "execve: Exec format error (ENOEXEC)")
        first = FakeOps(fail=enoexec)
        sup = make(tmp_path, first)
        rec = await sup.start(req())
        assert rec.state is JobState.FAILED
        assert rec.error_text == "start failed: execve: Exec format error (ENOEXEC)"
        # Committed as FAILED before the start is answered, never left RUNNING.
        assert _on_disk(tmp_path, rec.id) == (JobState.FAILED.value, 0)
        emfile = FakeOps(fail=SpawnFailure(errno.EMFILE, "output: Too many open files"))
        emfile.decider = first.decider
        sup.ops = emfile
        with pytest.raises(ResourceExhausted):
            await sup.start(req())
        assert sup.history.store.running() == []
        assert not sup.running

    run(body)


class RecordingOps(FakeOps):
    """Notes what the history file holds for a job at its start and at its ack."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.tmp_path = tmp_path
        self.at_start: list[tuple[int, int] | None] = []
        self.at_ack: list[tuple[int, int] | None] = []

    async def spawn(self, s: Started) -> int:
        await asyncio.sleep(0.05)  # the keeper's spawn: the commit runs meanwhile
        self.at_start.append(_on_disk(self.tmp_path, s.spec.env["AGENT_JOB_ID"]))
        return await super().spawn(s)

    def ack(self, job_id: str) -> None:
        self.at_ack.append(_on_disk(self.tmp_path, job_id))
        super().ack(job_id)


def test_a_job_is_in_the_history_before_it_starts(tmp_path: Path) -> None:
    """The row is committed while the keeper works (RUNNING, pid 0), and gets its pid later."""
    ops = RecordingOps(tmp_path)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        assert ops.at_start == [(JobState.RUNNING.value, 0)]
        assert rec.pid == 1000
        ops.starts[0].sink.on_finished(fin(rec.id, JobState.SUCCEEDED))
        await sup.view.wait(rec.id, ALICE, 2)
        await settle()
        assert _on_disk(tmp_path, rec.id) == (JobState.SUCCEEDED.value, 1000)

    run(body)


def test_acks_are_sent_only_after_the_history_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job is acknowledged once its end is committed, never before; a commit
    that fails sends no ack until the retry writes it."""
    ops = RecordingOps(tmp_path)
    sup = make(tmp_path, ops)

    async def body() -> None:
        a = await sup.start(req())
        ops.starts[0].sink.on_finished(fin(a.id, JobState.FAILED, "exit status 3", code=3))
        assert ops.acks == []  # not in the same breath as the report
        await settle()
        assert ops.acks == [a.id] and ops.at_ack == [(JobState.FAILED.value, 1000)]

        b = await sup.start(req())
        real_commit = sup.history.store.commit

        def broken() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(sup.history.store, "commit", broken)
        ops.starts[1].sink.on_finished(fin(b.id, JobState.SUCCEEDED))
        await settle()
        assert ops.acks == [a.id]  # the keeper keeps it: the history does not have it
        assert b.id in sup.history.unsaved
        monkeypatch.setattr(sup.history.store, "commit", real_commit)
        sup.history.retry_unsaved()
        await settle()
        assert _on_disk(tmp_path, b.id) == (JobState.SUCCEEDED.value, 1001)
        # Acknowledged, if at all, only with its row committed (see the next test).
        assert all(at == (JobState.SUCCEEDED.value, 1001) for at in ops.at_ack[1:])

    run(body)


def test_a_record_written_by_the_retry_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the retry commits a finished job the first commit lost, the keeper is told
    it may forget it (else it keeps the end until the next agent attaches)."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body() -> None:
        rec = await sup.start(req())
        real_commit = sup.history.store.commit
        monkeypatch.setattr(sup.history.store, "commit", broken)
        ops.starts[0].sink.on_finished(fin(rec.id, JobState.SUCCEEDED))
        await settle()
        monkeypatch.setattr(sup.history.store, "commit", real_commit)
        sup.history.retry_unsaved()
        await settle()
        assert _on_disk(tmp_path, rec.id) == (JobState.SUCCEEDED.value, 1000)
        assert ops.acks == [rec.id]

    run(body)


class StuckOps(FakeOps):
    """A keeper that never answers."""

    async def spawn(self, s: Started) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_crash_between_the_insert_and_the_pid_is_recovered_as_lost(tmp_path: Path) -> None:
    """A RUNNING row with pid 0 (the agent died during the keeper's round trip, and no
    keeper kept the job): the next start marks it LOST and kills the job's process by
    its AGENT_JOB_ID marker."""
    from agent.daemon import procfs, retention

    async def body() -> str:
        sup = make(tmp_path, StuckOps())
        start = asyncio.ensure_future(sup.start(req()))
        await settle()
        (row,) = sup.history.store.running()
        assert row.pid == 0
        # The crash: the agent is gone with the row on disk as it is now. (The
        # cancellation that ends this test's start marks the row FAILED; the
        # file is put back as the crash would have left it.)
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        sup.history.store._db.execute(
            "UPDATE jobs SET state=?, end_time=NULL WHERE id=?", (JobState.RUNNING.value, row.id)
        )
        sup.history.store.close()
        return row.id

    job_id = asyncio.run(body())
    # What the keeper may already have started for it: a process with the job's marker.
    orphan = subprocess.Popen(
        ["/bin/sleep", "30"], env={procfs.JOB_ID_ENV: job_id, "PATH": "/usr/bin:/bin"}
    )
    try:
        history = History(Store(tmp_path / "jobs.sqlite3"))
        lost = retention.recover(
            history,
            instance="another-instance",
            boot_id=supervisor.BOOT_ID,
            instance_env=supervisor.INSTANCE_ENV,
        )
        assert [r.id for r in lost] == [job_id]
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert _on_disk(tmp_path, job_id) == (JobState.LOST.value, 0)
        history.close()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_cancelled_start_leaves_no_running_record(tmp_path: Path) -> None:
    """The caller goes away mid-start: the row recorded before the start ends FAILED."""
    sup = make(tmp_path, StuckOps())

    async def body() -> None:
        start = asyncio.ensure_future(sup.start(req()))
        await settle()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await settle()
        assert sup.history.store.running() == []
        (only,) = sup.view.list_jobs(ALICE)[0]
        assert only.state is JobState.FAILED and "cancelled" in only.error_text
        assert _on_disk(tmp_path, only.id) == (JobState.FAILED.value, 0)

    run(body)


class BrokenOps(FakeOps):
    """A keeper client whose start fails with something that is not an OSError (a bug)."""

    async def spawn(self, s: Started) -> int:
        raise RuntimeError("a bug in the keeper's channel")


def test_a_start_that_fails_unexpectedly_leaves_no_running_record(tmp_path: Path) -> None:
    """An error other than OSError mid-start is raised, and the row ends FAILED."""
    sup = make(tmp_path, BrokenOps())

    async def body() -> None:
        with pytest.raises(RuntimeError):
            await sup.start(req())
        await settle()
        assert sup.history.store.running() == []
        (only,) = sup.view.list_jobs(ALICE)[0]
        assert only.state is JobState.FAILED and only.error_text == "start failed: internal error"

    run(body)


def test_a_history_that_cannot_commit_refuses_the_start_and_kills_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No job runs that the history does not hold: Unavailable, and the keeper is told
    "not_recorded"; its end (not to be persisted) is neither written nor acknowledged."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body() -> None:
        monkeypatch.setattr(sup.history.store, "commit", broken)
        with pytest.raises(Unavailable, match="cannot be written"):
            await sup.start(req())
        (s,) = ops.starts
        assert ops.stops == [(s.id, "not_recorded")]
        s.sink.on_finished(fin(s.id, JobState.FAILED, "not recorded", code=None, persist=False))
        await settle()
        assert s.id not in sup.running and ops.acks == []

    run(body)


# ---------------------------------------------------------------- access and admission


def test_owners_and_admins(tmp_path: Path) -> None:
    """Only the owner (or an admin) may see and stop a job; others get PERMISSION_DENIED."""
    ops = FakeOps(stop_ends=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        with pytest.raises(PermissionDenied):
            sup.view.get(rec.id, BOB)
        with pytest.raises(PermissionDenied):
            sup.stop(rec.id, BOB)
        assert ops.stops == []
        assert sup.view.get(rec.id, ADMIN).id == rec.id
        with pytest.raises(PermissionDenied):
            sup.view.list_jobs(BOB, owner="alice")
        assert [r.id for r in sup.view.list_jobs(ADMIN, owner="alice")[0]] == [rec.id]
        assert sup.view.list_jobs(BOB)[0] == []
        sup.stop(rec.id, ADMIN)
        assert (await sup.view.wait(rec.id, ALICE, 2)).state is JobState.STOPPED

    run(body)


def test_capacity_and_shutdown_refuse_new_jobs(tmp_path: Path) -> None:
    """Over max_running is RESOURCE_EXHAUSTED; after stop_accepting it is UNAVAILABLE."""
    ops = FakeOps(stop_ends=True)
    sup = make(tmp_path, ops, max_running=1)

    async def body() -> None:
        await sup.start(req())
        with pytest.raises(ResourceExhausted):
            await sup.start(req())
        sup.stop_accepting()
        with pytest.raises(Unavailable):
            await sup.start(req())
        assert len(ops.starts) == 1
        await sup.shutdown(mode="stop", deadline=0)
        assert not sup.running

    run(body)


def test_bad_secret_index_and_limit_are_refused_before_starting(tmp_path: Path) -> None:
    """Admission errors are INVALID_ARGUMENT and nothing reaches the keeper."""
    ops = FakeOps()
    sup = make(tmp_path, ops, max_timeout=10)

    async def body() -> None:
        with pytest.raises(InvalidArgument):
            await sup.start(req(secret_args=(3,)))
        with pytest.raises(InvalidArgument):
            await sup.start(req(timeout_seconds=11))
        assert ops.starts == []
        assert sup.history.store.count() == 0

    run(body)


# ---------------------------------------------------------------- shutdown


def test_shutdown_with_a_follower_attached_ends_the_stream(tmp_path: Path) -> None:
    """A live follower gets the output and its stream ends when shutdown stops the job."""
    ops = FakeOps(stop_ends=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        Path(rec.output_path).write_bytes(b"abc")  # what the keeper recorded
        ops.starts[0].sink.on_output(3, False)
        got: list[bytes] = []

        async def follow() -> None:
            async for _, data in sup.view.stream(rec.id, ALICE, 0, True):
                got.append(data)

        task = asyncio.ensure_future(follow())
        await settle()
        assert not task.done()  # following
        await sup.shutdown(mode="stop", deadline=0)
        assert ops.stops == [(rec.id, "shutdown")]
        await asyncio.wait_for(task, 2)
        assert b"".join(got) == b"abc"
        done = sup.view.get(rec.id, ALICE)
        assert done.state is JobState.STOPPED and "agent shutdown" in done.error_text

    run(body)


def test_shutdown_keep_stops_nothing(tmp_path: Path) -> None:
    """mode="keep": the running jobs are left to the keeper, untouched and still RUNNING."""
    ops = FakeOps(stop_ends=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        await asyncio.wait_for(sup.shutdown(mode="keep", deadline=0), 2)
        assert ops.stops == []
        assert sup.view.get(rec.id, ALICE).state is JobState.RUNNING
        with pytest.raises(Unavailable):
            await sup.start(req())
        sup.close(keep_jobs=True)
        assert ops.closed is True

    run(body)


class GatedOps(FakeOps):
    """A keeper whose answer to each start waits for the test's word."""

    def __init__(self) -> None:
        super().__init__(stop_ends=True)
        self.gates: list[asyncio.Future[None]] = []

    async def spawn(self, s: Started) -> int:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        return await super().spawn(s)


def test_shutdown_waits_for_starts_in_flight_and_stops_them_too(tmp_path: Path) -> None:
    """A start handed to the keeper but not yet answered is a running job: shutdown
    waits for its answer, then stops it with the others."""
    ops = GatedOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        start = asyncio.ensure_future(sup.start(req()))
        await settle()
        assert len(ops.gates) == 1
        down = asyncio.ensure_future(sup.shutdown(mode="stop", deadline=0))
        await settle()
        assert not down.done() and ops.stops == []
        ops.gates[0].set_result(None)
        rec = await asyncio.wait_for(start, 2)
        await asyncio.wait_for(down, 2)
        assert ops.stops == [(rec.id, "shutdown")]
        assert sup.view.get(rec.id, ALICE).state is JobState.STOPPED

    run(body)


# ---------------------------------------------------------------- adopting a keeper's jobs


def a_record(tmp_path: Path, job_id: str, state: JobState = JobState.RUNNING) -> JobRecord:
    return JobRecord(
        id=job_id,
        owner="alice",
        command="/bin/true",
        path="",
        args=[],
        state=state,
        start_time=1_699_999_000.0,
        output_path=str(tmp_path / "output" / f"{job_id}.out"),
        pid=0,
        end_time=None if state is JobState.RUNNING else 1_699_999_500.0,
    )


ID1, ID2, ID3, ID4 = (f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5))


def hello(jobs: list[Kept] = (), ended: list[Finished] = ()) -> Hello:  # type: ignore[assignment]
    return Hello(
        pid=4242, spawn="fork", why="test", jobs=list(jobs), ended=list(ended), fresh=False
    )


def test_adopt_mirrors_a_running_kept_job_and_watches_it(tmp_path: Path) -> None:
    """A job the keeper kept running is mirrored (pid, output so far, ending) and its
    reports are watched: they finish it like any other."""
    ops = FakeOps()
    sup = make(tmp_path, ops)
    sup.history.insert_now(a_record(tmp_path, ID1))
    sup.history.insert_now(a_record(tmp_path, ID2))

    async def body() -> None:
        kept = [Kept(ID1, 777, 12, False, False, {}), Kept(ID2, 778, 0, False, True, {})]
        assert adoption.adopt(sup, hello(kept)) == {ID1, ID2}
        assert set(ops.watched) == {ID1, ID2} and ops.stops == []
        rec = sup.view.get(ID1, ALICE)
        assert (rec.state, rec.pid, rec.output_bytes) == (JobState.RUNNING, 777, 12)
        assert sup.running[ID1].live.size == 12 and sup.running[ID1].ending is None
        assert sup.running[ID2].ending is not None  # queries wait for its end
        ops.watched[ID1].on_output(20, True)
        ops.watched[ID1].on_finished(
            fin(ID1, JobState.FAILED, "exit status 1", code=1, size=20, truncated=True)
        )
        done = await sup.view.wait(ID1, ALICE, 2)
        assert (done.state, done.output_bytes, done.output_truncated) == (
            JobState.FAILED,
            20,
            True,
        )
        await settle()
        assert ops.acks == [ID1] and _on_disk(tmp_path, ID1) == (JobState.FAILED.value, 777)

    run(body)


def test_adopt_records_the_jobs_that_ended_and_acks_after_the_commit(tmp_path: Path) -> None:
    """A job that ended while no agent was attached is recorded with the keeper's end,
    then acknowledged; one the history already has as finished is just acknowledged."""
    ops = RecordingOps(tmp_path)
    sup = make(tmp_path, ops)
    sup.history.insert_now(a_record(tmp_path, ID1))
    sup.history.insert_now(a_record(tmp_path, ID2, JobState.SUCCEEDED))

    async def body() -> None:
        ended = [
            fin(ID1, JobState.TIMED_OUT, "timed out after 5 s (killed by SIGTERM)", code=None),
            fin(ID2, JobState.SUCCEEDED),
        ]
        assert adoption.adopt(sup, hello(ended=ended)) == {ID1, ID2}
        assert ID1 not in sup.running
        await settle()
        rec = sup.history.get(ID1)
        assert rec is not None and rec.state is JobState.TIMED_OUT
        assert rec.error_text.startswith("timed out") and rec.end_time == 1_700_000_000.0
        assert sorted(ops.acks) == [ID1, ID2]
        assert ops.at_ack[ops.acks.index(ID1)] == (JobState.TIMED_OUT.value, 0)

    run(body)


def test_adopt_inserts_a_kept_job_the_history_never_had(tmp_path: Path) -> None:
    """The agent died between the insert and its commit: the keeper's copy of the record
    is inserted, RUNNING, and the job mirrored; an ended one is recorded from its copy."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        kept = Kept(ID3, 555, 4, False, False, record_to_wire(a_record(tmp_path, ID3)))
        gone = fin(ID4, JobState.SUCCEEDED, record=record_to_wire(a_record(tmp_path, ID4)))
        assert adoption.adopt(sup, hello([kept], [gone])) == {ID3, ID4}
        assert _on_disk(tmp_path, ID3) == (JobState.RUNNING.value, 0)
        assert sup.view.get(ID3, ALICE).pid == 555 and ID3 in ops.watched
        await settle()
        assert _on_disk(tmp_path, ID4) == (JobState.SUCCEEDED.value, 0)
        assert ops.acks == [ID4]
        # Not one of alice's to see for bob, even when it came from the keeper.
        with pytest.raises(PermissionDenied):
            sup.view.get(ID3, BOB)

    run(body)


def test_adopt_stops_a_kept_job_the_history_has_as_finished(tmp_path: Path) -> None:
    """A kept job the history says has ended (or knows nothing of, with no record copy)
    must not run unseen: the keeper is told to kill it, and it is not mirrored."""
    ops = FakeOps()
    sup = make(tmp_path, ops)
    sup.history.insert_now(a_record(tmp_path, ID1, JobState.FAILED))

    async def body() -> None:
        kept = [Kept(ID1, 777, 0, False, False, {}), Kept(ID2, 778, 0, False, False, {})]
        assert adoption.adopt(sup, hello(kept)) == set()
        assert ops.stops == [(ID1, "kill"), (ID2, "kill")]
        assert not sup.running and ops.watched == {}
        assert sup.history.get(ID1).state is JobState.FAILED  # type: ignore[union-attr]

    run(body)
