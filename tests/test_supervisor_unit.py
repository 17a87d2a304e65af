"""The supervisor driven in-process by a fake ProcessOps, the way Supervisor tests its process.

No child process exists: the fake "process" writes into the output pipe the
supervisor gave it and exits when the test says so. The history is a real
SQLite file, the policy a real parsed policy (its file checks run on
/bin/true).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.access import AccessRules
from agent.daemon import lifecycle as lc
from agent.daemon import policy, supervisor
from agent.daemon.admission import Rules, StartRequest
from agent.daemon.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from agent.daemon.history import History, Store
from agent.daemon.spawn import SpawnSpec
from agent.daemon.supervisor import JobUser, Settings, Supervisor
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


class FakeProcess:
    def __init__(self, pid: int, spec: SpawnSpec, on_exit: Callable[[lc.Exit], None]) -> None:
        self.pid = pid
        self.spec = spec
        self.on_exit = on_exit
        self.out = os.dup(spec.stdout_fd)  # the supervisor closes its copy
        self.signals: list[int] = []

    def write(self, data: bytes) -> None:
        os.write(self.out, data)

    def exit(self, ex: lc.Exit, *, close_output: bool = True) -> None:
        if close_output:
            self.close_output()
        self.on_exit(ex)

    def close_output(self) -> None:
        if self.out >= 0:
            os.close(self.out)
            self.out = -1


class FakeOps:
    """A ProcessOps whose processes the test drives."""

    def __init__(self, *, fail: OSError | None = None, exit_on_term: bool = False) -> None:
        self.procs: list[FakeProcess] = []
        self.fail = fail
        self.exit_on_term = exit_on_term
        self.closed = False

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[lc.Exit], None]) -> int:
        if self.fail is not None:
            raise self.fail
        p = FakeProcess(1000 + len(self.procs), spec, on_exit)
        self.procs.append(p)
        return p.pid

    def signal(self, pid: int, sig: int) -> bool:
        p = next(p for p in self.procs if p.pid == pid)
        p.signals.append(sig)
        if self.exit_on_term and sig == signal.SIGTERM:
            asyncio.get_running_loop().call_soon(p.exit, lc.Exit(None, signal.SIGTERM))
        return True

    def close(self) -> None:
        self.closed = True


def make(tmp_path: Path, ops: FakeOps, **rules: int) -> Supervisor:
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
    return Supervisor(
        settings, History(Store(tmp_path / "jobs.sqlite3")), policy.parse(POLICY), ops
    )


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def req(identity: str = "alice", **kw: Any) -> StartRequest:
    return StartRequest(identity=identity, command="true", path="", **kw)


def test_start_output_exit_is_recorded(tmp_path: Path) -> None:
    """Start, output into the pipe, exit 0: SUCCEEDED with the output in its file."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        assert rec.state is JobState.RUNNING and rec.pid == 1000
        assert ops.procs[0].spec.argv == (os.path.realpath("/bin/true"),)
        ops.procs[0].write(b"hello\n")
        ops.procs[0].exit(lc.Exit(0, None))
        done = await sup.wait(rec.id, ALICE, 2)
        assert done.state is JobState.SUCCEEDED
        assert Path(done.output_path).read_bytes() == b"hello\n"
        assert sup.history.store.get(rec.id).state is JobState.SUCCEEDED  # type: ignore[union-attr]
        assert rec.id not in sup.running

    run(body)


def test_exit_before_end_of_output_waits_for_the_output(tmp_path: Path) -> None:
    """The exit arrives while a holder keeps the pipe open: done only once it closes."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        p = ops.procs[0]
        p.exit(lc.Exit(0, None), close_output=False)
        await settle()
        assert sup.running[rec.id].life.exit is not None
        assert not sup.running[rec.id].done.done()
        p.write(b"late\n")
        p.close_output()
        done = await sup.wait(rec.id, ALICE, 2)
        assert done.state is JobState.SUCCEEDED and done.output_bytes == 5

    run(body)


async def _output_end_seen(sup: Supervisor, job_id: str) -> None:
    for _ in range(200):
        if sup.running[job_id].live.closed:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the end of the output was never seen")


def test_a_query_of_an_ending_job_waits_for_its_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output closed, exit report not yet in: the query answers done once it comes, not RUNNING."""
    ops = FakeOps()
    sup = make(tmp_path, ops)
    # Far longer than the test needs: the answer must come from the exit, not the clock.
    monkeypatch.setattr(supervisor, "ENDING_WAIT", 30.0)
    monkeypatch.setattr(supervisor, "ENDING_WINDOW", 30.0)

    async def body() -> None:
        rec = await sup.start(req())
        p = ops.procs[0]
        p.close_output()
        await _output_end_seen(sup, rec.id)
        asked = asyncio.ensure_future(sup.query(rec.id, ALICE))
        await asyncio.sleep(0.01)
        assert not asked.done()  # waiting for the exit that is on its way
        p.exit(lc.Exit(0, None), close_output=False)
        done = await asyncio.wait_for(asked, 5)
        assert done.state is JobState.SUCCEEDED

    run(body)


def test_a_query_waits_only_briefly_and_only_right_after_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running job with its output open, or closed long ago, is answered at once;
    one that closed its output and goes on is answered RUNNING after the short wait."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        p = ops.procs[0]
        monkeypatch.setattr(supervisor, "ENDING_WAIT", 30.0)
        # Output open: no wait at all (a 30 s wait would trip wait_for).
        assert (await asyncio.wait_for(sup.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        p.close_output()
        await _output_end_seen(sup, rec.id)
        # Closed, but longer ago than the window: no wait either.
        monkeypatch.setattr(supervisor, "ENDING_WINDOW", 0.0)
        assert (await asyncio.wait_for(sup.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        # Inside the window, still no exit: RUNNING once the short wait is over.
        monkeypatch.setattr(supervisor, "ENDING_WAIT", 0.01)
        monkeypatch.setattr(supervisor, "ENDING_WINDOW", 30.0)
        assert (await asyncio.wait_for(sup.query(rec.id, ALICE), 5)).state is JobState.RUNNING
        p.exit(lc.Exit(0, None), close_output=False)
        assert (await sup.wait(rec.id, ALICE, 2)).state is JobState.SUCCEEDED
        # And the usual rules: unknown ids and other owners' jobs are refused.
        with pytest.raises(PermissionDenied):
            await sup.query(rec.id, BOB)
        with pytest.raises(NotFound):
            await sup.query("00000000-0000-4000-8000-000000000000", ALICE)

    run(body)


def test_stop_signals_the_job_and_ends_stopped(tmp_path: Path) -> None:
    """StopJob: SIGTERM to the job, then STOPPED when it exits."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        sup.stop(rec.id, ALICE)
        done = await sup.wait(rec.id, ALICE, 2)
        assert ops.procs[0].signals == [signal.SIGTERM]
        assert done.state is JobState.STOPPED

    run(body)


def test_stop_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    """A job that ignores SIGTERM gets SIGKILL when the grace is over."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        sup.stop(rec.id, ALICE)
        await asyncio.sleep(0.15)
        assert ops.procs[0].signals == [signal.SIGTERM, signal.SIGKILL]
        ops.procs[0].exit(lc.Exit(None, signal.SIGKILL))
        assert (await sup.wait(rec.id, ALICE, 2)).state is JobState.STOPPED

    run(body)


def test_timeout_ends_timed_out(tmp_path: Path) -> None:
    """A job past its timeout is terminated and TIMED_OUT."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req(timeout_seconds=1))
        done = await sup.wait(rec.id, ALICE, 3)
        assert done.state is JobState.TIMED_OUT

    run(body)


def test_output_cap_kills_and_truncates(tmp_path: Path) -> None:
    """Output over outputBytes is cut at the cap and the job is FAILED naming the cap."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req(limits={"output_bytes": 4}))
        ops.procs[0].write(b"0123456789")
        done = await sup.wait(rec.id, ALICE, 2)
        assert done.state is JobState.FAILED and "cap of 4 bytes" in done.error_text
        assert Path(done.output_path).read_bytes() == b"0123" and done.output_truncated

    run(body)


def _on_disk(tmp_path: Path, job_id: str) -> tuple[int, int] | None:
    """(state, pid) of a job as committed to the history file (another connection)."""
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        row = db.execute("SELECT state, pid FROM jobs WHERE id=?", (job_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else (int(row[0]), int(row[1]))


def test_spawn_failure_is_a_failed_job_with_the_reason(tmp_path: Path) -> None:
    """ProcessOps raising OSError gives a recorded FAILED job "start failed: ..."."""
    ops = FakeOps(fail=OSError(8, "Exec format error"))
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        assert rec.state is JobState.FAILED
        assert rec.error_text == "start failed: Exec format error (ENOEXEC)"
        # Committed as FAILED before the start is answered, never left RUNNING.
        assert _on_disk(tmp_path, rec.id) == (JobState.FAILED.value, 0)

    run(body)


class RecordingOps(FakeOps):
    """Notes, at the moment of each spawn, what the history file holds for that job."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.tmp_path = tmp_path
        self.at_spawn: list[tuple[int, int] | None] = []

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[lc.Exit], None]) -> int:
        await asyncio.sleep(0.05)  # the spawner's round trip: the commit runs meanwhile
        self.at_spawn.append(_on_disk(self.tmp_path, spec.env["AGENT_JOB_ID"]))
        return await super().spawn(spec, on_exit)


def test_a_job_is_in_the_history_before_it_starts(tmp_path: Path) -> None:
    """The row is committed while the spawner works (RUNNING, pid 0), and gets its pid later."""
    ops = RecordingOps(tmp_path)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        assert ops.at_spawn == [(JobState.RUNNING.value, 0)]
        assert rec.pid == 1000
        ops.procs[0].exit(lc.Exit(0, None))
        await sup.wait(rec.id, ALICE, 2)
        await settle()
        assert _on_disk(tmp_path, rec.id) == (JobState.SUCCEEDED.value, 1000)

    run(body)


def test_a_crash_between_the_insert_and_the_pid_is_recovered_as_lost(tmp_path: Path) -> None:
    """A RUNNING row with pid 0 (the agent died during the spawner's round trip): the next
    start marks it LOST and kills the job's process by its AGENT_JOB_ID marker."""
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
    # What the spawner may already have started for it: a process with the job's marker.
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


class StuckOps(FakeOps):
    """A spawner that never answers."""

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[lc.Exit], None]) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


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
        rows = sup.history.store.running()
        assert rows == []
        (only,) = sup.list_jobs(ALICE)[0]
        assert only.state is JobState.FAILED and "cancelled" in only.error_text
        assert _on_disk(tmp_path, only.id) == (JobState.FAILED.value, 0)

    run(body)


class BrokenOps(FakeOps):
    """A spawner whose spawn fails with something that is not an OSError (a bug)."""

    async def spawn(self, spec: SpawnSpec, on_exit: Callable[[lc.Exit], None]) -> int:
        raise RuntimeError("a bug in the spawner's channel")


def test_a_start_that_fails_unexpectedly_leaves_no_running_record(tmp_path: Path) -> None:
    """An error other than OSError mid-start is raised, and the row ends FAILED."""
    sup = make(tmp_path, BrokenOps())

    async def body() -> None:
        with pytest.raises(RuntimeError):
            await sup.start(req())
        await settle()
        assert sup.history.store.running() == []
        (only,) = sup.list_jobs(ALICE)[0]
        assert only.state is JobState.FAILED and only.error_text == "start failed: internal error"

    run(body)


def test_a_history_that_cannot_commit_refuses_the_start_and_kills_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No job runs that the history does not hold: Unavailable, and the started job is killed."""
    ops = FakeOps()
    sup = make(tmp_path, ops)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body() -> None:
        monkeypatch.setattr(sup.history.store, "commit", broken)
        with pytest.raises(Unavailable, match="cannot be written"):
            await sup.start(req())
        assert ops.procs[0].signals == [signal.SIGKILL]

    run(body)


def test_owners_and_admins(tmp_path: Path) -> None:
    """Only the owner (or an admin) may see and stop a job; others get PERMISSION_DENIED."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        with pytest.raises(PermissionDenied):
            sup.get(rec.id, BOB)
        with pytest.raises(PermissionDenied):
            sup.stop(rec.id, BOB)
        assert sup.get(rec.id, ADMIN).id == rec.id
        with pytest.raises(PermissionDenied):
            sup.list_jobs(BOB, owner="alice")
        assert [r.id for r in sup.list_jobs(ADMIN, owner="alice")[0]] == [rec.id]
        assert sup.list_jobs(BOB)[0] == []
        sup.stop(rec.id, ADMIN)
        await sup.wait(rec.id, ALICE, 2)

    run(body)


def test_capacity_and_shutdown_refuse_new_jobs(tmp_path: Path) -> None:
    """Over max_running is RESOURCE_EXHAUSTED; after stop_accepting it is UNAVAILABLE."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops, max_running=1)

    async def body() -> None:
        await sup.start(req())
        with pytest.raises(ResourceExhausted):
            await sup.start(req())
        sup.stop_accepting()
        with pytest.raises(Unavailable):
            await sup.start(req())
        await sup.shutdown(mode="stop", deadline=0)
        assert not sup.running

    run(body)


def test_shutdown_with_a_follower_attached_ends_the_stream(tmp_path: Path) -> None:
    """A live follower gets the output and its stream ends when shutdown stops the job."""
    ops = FakeOps(exit_on_term=True)
    sup = make(tmp_path, ops)

    async def body() -> None:
        rec = await sup.start(req())
        ops.procs[0].write(b"abc")
        got: list[bytes] = []

        async def follow() -> None:
            async for _, data in sup.stream(rec.id, ALICE, 0, True):
                got.append(data)

        task = asyncio.ensure_future(follow())
        await settle()
        await sup.shutdown(mode="stop", deadline=0)
        await asyncio.wait_for(task, 2)
        assert b"".join(got) == b"abc"
        done = sup.get(rec.id, ALICE)
        assert done.state is JobState.STOPPED and "agent shutdown" in done.error_text

    run(body)


def test_bad_secret_index_and_limit_are_refused_before_spawning(tmp_path: Path) -> None:
    """Admission errors are INVALID_ARGUMENT and nothing is spawned."""
    ops = FakeOps()
    sup = make(tmp_path, ops, max_timeout=10)

    async def body() -> None:
        with pytest.raises(InvalidArgument):
            await sup.start(req(secret_args=(3,)))
        with pytest.raises(InvalidArgument):
            await sup.start(req(timeout_seconds=11))
        assert ops.procs == []

    run(body)
