"""The job keeper's parts on their own: the pure checks of a start, of a job's record
(a journal line, or a previous release's ``.keeper`` file) and of an ended file, the
journal written, rewritten and read back in a real folder, and the kept jobs' timers
and lifecycle driven without a keeper process (a real pipe and output file; the agent,
the signals and the job files replaced by lists that record what the part asked for).

The whole keeper with real jobs is tests/test_keeper_protocol.py and its neighbours."""

from __future__ import annotations

import json
import os
import selectors
import signal
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.keeper import capabilities, keeperfiles, policyfile
from agent.keeper import lifecycle as lc
from agent.keeper.admission import Rules, StartRequest
from agent.keeper.decision import Decider
from agent.keeper.errors import FailedPrecondition
from agent.keeper.jobsettings import JobUser, Settings
from agent.keeper.keeperfiles import (
    JOB_FILE,
    JOURNAL,
    JobFiles,
    index_journal,
    parse_ends,
    parse_job_file,
)
from agent.keeper.keeperstart import RECORD_MAX, start_problem
from agent.keeper.keptjobs import Kept, KeptJob
from agent.keeper.outputfile import OutputFile

JOB = "0f0f0f0f-1111-2222-3333-444444444444"
CAP = 100
RUN: dict[str, Any] = {
    "timeout": 30,
    "cpu_seconds": 0,
    "memory_max": 0,
    "note": "",
    "cap": CAP,
    "kill_on_cap": True,
    "grace": 2.5,
}


def _start(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "start", "id": 1, "job": JOB, "record": {}, "request": {}}
    msg.update(over)
    return msg


@pytest.mark.parametrize(
    ("msg", "fds", "exists", "why"),
    [
        (_start(), {}, False, ""),
        (_start(id=True), {}, False, "malformed start: id"),
        (_start(job="../etc"), {}, False, "malformed start: job"),
        (_start(), {}, True, f"job {JOB} exists already"),
        (_start(plan={}), {}, False, "malformed start: unknown keys"),
        (_start(), {"stdout": 5}, False, "malformed start: descriptors"),
        (_start(record=[]), {}, False, "malformed start: record"),
        (_start(record={"x": "y" * RECORD_MAX}), {}, False, "malformed start: record"),
        # The first problem is the one said: a duplicate before a plan smuggled in.
        (_start(plan={}), {}, True, f"job {JOB} exists already"),
    ],
)
def test_a_malformed_start_is_named(
    msg: dict[str, Any], fds: dict[str, int], exists: bool, why: str
) -> None:
    """Each malformed part of a start is named; a well-formed one has no problem."""
    got = start_problem(msg, fds, lambda _: exists)
    assert got.startswith(why) and (got == "") == (why == "")


CAPS_POLICY = """
version: 1
entries:
  - name: "true"
    command: /bin/true
    aliases: ["true"]
  - name: raw
    command: /bin/true
    aliases: [raw]
    user: daemon
    capabilities: [CAP_NET_RAW, CAP_NET_BIND_SERVICE]
"""


def test_an_entry_whose_capabilities_the_keeper_does_not_hold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keeper that gives capabilities (root here, or the privileged unit's) checks its
    policy against what it holds: an entry giving one it lacks is named with it, and its
    starts are refused (FAILED_PRECONDITION) rather than failing at the job's capset;
    holding them all, nothing is said and the entry runs."""
    rules = Rules(
        max_running=8,
        default_timeout=0,
        max_timeout=0,
        default_limits={},
        max_limits={"output_bytes": 0},
    )
    user = JobUser(None, None, "me", "/")
    settings = Settings(tmp_path, "test", user, 0o077, 0.05, "kill", "/usr/bin:/bin", rules)
    decider = Decider(settings, policyfile.parse(CAPS_POLICY, source="policy.yaml"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    held = 1 << capabilities.NAMES["CAP_NET_BIND_SERVICE"]
    monkeypatch.setattr(capabilities, "_own_set", lambda field: held)
    (warning,) = decider.check_held()
    assert warning.startswith("policy.yaml: entry 'raw': capabilities CAP_NET_RAW are not held")
    assert "restarted" in warning
    with pytest.raises(FailedPrecondition, match="'raw' gives CAP_NET_RAW") as e:
        decider.decide(JOB, StartRequest(identity="alice", command="raw", path=""))
    assert e.value.rule == "capabilities-not-held"
    assert decider.decide(JOB, StartRequest(identity="alice", command="true", path="")).entry
    monkeypatch.setattr(capabilities, "_own_set", lambda field: (1 << 41) - 1)
    assert decider.check_held() == []
    assert decider.decide(JOB, StartRequest(identity="alice", command="raw", path="")).entry


def test_a_keeper_file_is_read_back_and_a_forged_one_is_refused() -> None:
    """What a keeper wrote is read back (a journal line, or a .keeper file of the
    previous release: the same record, without its job id); a record whose deadline,
    cap, grace, record or pid is not of the right kind is none."""
    good = {"pid": 42, "uid": None, "deadline": 1.5, "run": RUN, "record": {"id": JOB}}
    assert parse_job_file(json.dumps(good).encode()) == good
    line = json.dumps({"job": JOB, **good}, separators=(",", ":")).encode() + b"\n"
    assert parse_job_file(line) == {"job": JOB, **good}
    bads: list[dict[str, Any]] = [
        {**good, "deadline": "soon"},
        {**good, "run": {**RUN, "cap": "big"}},
        {**good, "run": {**RUN, "grace": None}},
        {**good, "record": []},
        {**good, "pid": "42"},
        {k: v for k, v in good.items() if k != "run"},
    ]
    for bad in bads:
        with pytest.raises((ValueError, KeyError, TypeError)):
            parse_job_file(json.dumps(bad).encode())
    with pytest.raises(ValueError):
        parse_job_file(b"not json")


def test_the_journal_index_is_each_jobs_last_line_and_garbage_is_skipped() -> None:
    """A journal's index: each job's last line (a later record replaces an earlier one);
    a line that is not JSON (a torn one, bytes that are not UTF-8), not an object, or
    without a valid job id is skipped and counted, and loses no other job's record."""
    other = str(uuid.uuid4())
    first, last = (json.dumps({"job": JOB, "pid": n}).encode() + b"\n" for n in (1, 2))
    theirs = json.dumps({"job": other, "pid": 3}).encode() + b"\n"
    junk = [b"not json\n", b"[1, 2]\n", b'{"job": "../etc", "pid": 4}\n', b'{"pid": 5}\n',
            b"\xff\xfe\n", b'{"job": 7}\n']  # fmt: skip
    data = first + junk[0] + theirs + b"".join(junk[1:]) + b"\n" + last + last[:20]
    assert index_journal(data) == ({JOB: last, other: theirs}, len(junk) + 1)
    assert index_journal(b"") == ({}, 0)


def _kept_job(tmp_path: Path, timeout: int = 30, pad: int = 0) -> KeptJob:
    """A running job as the keeper holds it (its record padded by ``pad`` bytes)."""
    job_id = str(uuid.uuid4())
    job = KeptJob(job_id, 1, 1, {**RUN, "timeout": timeout}, OutputFile(str(tmp_path / job_id), 0))
    job.pid = 4242
    job.record = {"id": job_id, "pad": "x" * pad}
    return job


def test_the_journal_is_rewritten_with_the_running_jobs_records_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs start and end: once the journal passes its threshold (JOURNAL_COMPACT, or
    twice its size after the last rewrite) it is rewritten with the last line of each
    running job and none of an ended job, and stays bounded; a job's end writes nothing."""
    monkeypatch.setattr(keeperfiles, "JOURNAL_COMPACT", 4096)
    running: dict[str, KeptJob] = {}
    files = JobFiles(str(tmp_path), running)
    path = tmp_path / JOURNAL
    ended_since: set[str] = set()  # ended since the last rewrite: their lines stay till then
    ino, rewrites, after = -1, 0, 0
    for i in range(300):
        job = _kept_job(tmp_path, pad=100)
        running[job.id] = job
        files.write(job, None, None)
        st = path.stat()
        if st.st_ino != ino and ino != -1:  # renamed over: a rewrite
            rewrites, ended_since, after = rewrites + 1, set(), st.st_size
        ino = st.st_ino
        assert st.st_size <= max(4096, 2 * after) + 400
        if i % 3:  # two jobs of three end at once, the third runs on
            del running[job.id]
            files.forget(job)
            ended_since.add(job.id)
            assert path.stat().st_size == st.st_size
        index, skipped = index_journal(path.read_bytes())
        assert set(index) == set(running) | ended_since and skipped == 0
    assert rewrites >= 5
    # What the next keeper reads: every running job's record, as it was written.
    reader = JobFiles(str(tmp_path), {})
    for job in running.values():
        got = reader.read(job.id)
        assert got is not None and got["record"] == job.record and got["pid"] == 4242
    assert not list(tmp_path.glob("*.tmp"))


def test_an_ended_jobs_record_is_out_of_the_journal_within_journal_keep(
    tmp_path: Path,
) -> None:
    """A job's end makes a rewrite due JOURNAL_KEEP later (once, for all the ends till
    then): the keeper's loop sleeps no longer than that and rewrites, and the ended
    job's record (its command and arguments) is gone from the journal, however little
    the keeper does meanwhile; a running job's stays."""
    running: dict[str, KeptJob] = {}
    files = JobFiles(str(tmp_path), running)
    ended, stays = _kept_job(tmp_path), _kept_job(tmp_path)
    for job in (ended, stays):
        running[job.id] = job
        files.write(job, None, None)
    assert not files.rewrite_due
    del running[ended.id]
    before = time.monotonic()
    files.forget(ended)
    due = files.rewrite_due
    assert before + keeperfiles.JOURNAL_KEEP <= due <= time.monotonic() + keeperfiles.JOURNAL_KEEP
    files.forget(_kept_job(tmp_path))  # (no line of its own: nothing changes)
    assert files.rewrite_due == due
    index, _ = index_journal((tmp_path / JOURNAL).read_bytes())
    assert set(index) == {ended.id, stays.id}  # an end writes nothing
    files.compact()  # what the loop does once it is due
    index, _ = index_journal((tmp_path / JOURNAL).read_bytes())
    assert set(index) == {stays.id} and not files.rewrite_due


def test_a_rewrite_after_a_reexec_keeps_the_records_only_the_journal_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a re-exec the keeper's jobs' lines are in the journal only (the new code has
    none in memory): its first rewrite reads them back, so none is lost."""
    monkeypatch.setattr(keeperfiles, "JOURNAL_COMPACT", 4096)
    running: dict[str, KeptJob] = {}
    before = JobFiles(str(tmp_path), running)
    kept = [_kept_job(tmp_path, pad=100) for _ in range(3)]
    for job in kept:
        running[job.id] = job
        before.write(job, None, None)
    after = JobFiles(str(tmp_path), running)  # the same jobs, the new code
    ino = (tmp_path / JOURNAL).stat().st_ino
    for _ in range(100):  # jobs that end at once, until the journal is rewritten
        after.write(_kept_job(tmp_path, pad=100), None, None)
        if (tmp_path / JOURNAL).stat().st_ino != ino:
            break
    else:
        raise AssertionError("never rewritten")
    index, _ = index_journal((tmp_path / JOURNAL).read_bytes())
    assert set(index) == {j.id for j in kept}


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """A journal whose last line was cut short (its writer killed in the write, a full
    disk): the next keeper's first record starts on a line of its own, and is read."""
    (tmp_path / JOURNAL).write_bytes(b'{"job":"' + JOB.encode() + b'","pid":1,"ru')
    job = _kept_job(tmp_path, timeout=0)
    JobFiles(str(tmp_path), {}).write(job, 60712, None)
    got = JobFiles(str(tmp_path), {}).read(job.id)
    assert got is not None and (got["uid"], got["deadline"]) == (60712, None)


@pytest.mark.parametrize("kind", ["link", "fifo", "device", "directory"])
def test_a_journal_that_is_not_a_regular_file_is_never_written_through(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal that is a link, a FIFO (never waited on), a device or a directory is
    neither followed nor written: each record goes in a <job id>.keeper file of its own
    instead (the previous release's, read at an adoption as before), said once, and that
    file goes at the job's end."""
    path, target = tmp_path / JOURNAL, tmp_path / "target"
    target.write_bytes(b"")
    if kind == "link":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        try:  # /dev/null's: open for writing succeeds, only the fstat check refuses it
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD")
    jobs = [_kept_job(tmp_path) for _ in range(2)]
    files = JobFiles(str(tmp_path), {job.id: job for job in jobs})
    for job in jobs:
        files.write(job, None, None)
        got = JobFiles(str(tmp_path), {}).read(job.id)
        assert got is not None and got["record"] == job.record and got["deadline"] is not None
        files.forget(job)
        assert not (tmp_path / f"{job.id}{JOB_FILE}").exists()
    assert target.read_bytes() == b"" and files.fd == -1
    assert capsys.readouterr().err.count(f"cannot use {path}") == 1


def test_an_ended_file_gives_its_ends_by_job_and_refuses_anything_else() -> None:
    end = {"op": "finished", "job": JOB, "state": "SUCCEEDED"}
    assert parse_ends(json.dumps([end])) == {JOB: end}
    for bad in ({"x": 1}, [{"op": "output", "job": JOB}], [{"op": "finished", "job": "x"}]):
        with pytest.raises(ValueError):
            parse_ends(json.dumps(bad))


class _Kept:
    """A Kept with its agent, signals and job files as lists, and one job on a pipe."""

    def __init__(self, tmp_path: Path) -> None:
        self.told: list[dict[str, Any]] = []
        self.signals: list[int] = []
        self.forgotten: list[str] = []
        self.sel = selectors.DefaultSelector()
        self.kept = Kept(
            self.sel,
            tell=self.told.append,
            signal=lambda job, sig: self.signals.append(sig),
            forget=lambda job: self.forgotten.append(job.id),
        )
        out = OutputFile(str(tmp_path / f"{JOB}.out"), CAP)
        out.reserve()
        self.job = KeptJob(JOB, 7, 1, dict(RUN), out)
        self.job.rfd, self.w = os.pipe2(os.O_NONBLOCK)
        self.job.pid = 4242
        self.sel.register(self.job.rfd, selectors.EVENT_READ, self.job)
        self.kept.jobs[JOB] = self.job
        self.kept.by_pid[4242] = self.job

    def ops(self) -> list[str]:
        return [m["op"] for m in self.told]


def test_a_kept_job_times_out_is_killed_after_its_grace_and_ends(tmp_path: Path) -> None:
    """The timeout's timer sends SIGTERM, the grace's SIGKILL; its exit and the end of
    its output finish it TIMED_OUT: told once, kept until acknowledged, its files
    forgotten, its timers gone."""
    t = _Kept(tmp_path)
    t.kept.arm(t.job, 0, lc.TimedOut())
    t.kept.run_timers()
    assert t.signals == [signal.SIGTERM]
    # The grace timer is armed for job.grace seconds: fired here by hand.
    assert [type(x.event) for x in t.job.timers] == [lc.TimedOut, lc.KillGraceExpired]
    t.kept.handle(t.job, lc.KillGraceExpired())
    assert t.signals == [signal.SIGTERM, signal.SIGKILL]
    os.write(t.w, b"last words\n")
    os.close(t.w)
    ex = lc.Exit(exit_code=None, signal=signal.SIGKILL, end_time=1.0)
    t.kept.exited(t.job, ex)
    t.kept.flush_output()
    assert t.ops() == ["finished"]  # no "ending" or "output" ahead of it: it says all
    fin = t.told[0]
    assert (fin["state"], fin["size"], fin["exit"]["signal"]) == ("TIMED_OUT", 11, 9)
    assert t.kept.ended == {JOB: fin} and not t.kept.jobs and not t.kept.by_pid
    assert t.forgotten == [JOB] and not t.job.timers
    assert all(x.cancelled for _, _, x in t.kept.heap)
    t.kept.ack({"op": "ack", "jobs": [JOB]})
    assert t.kept.ended == {}


def test_output_progress_and_the_cap_are_told(tmp_path: Path) -> None:
    """Output is recorded and its progress told at the end of the turn; past the cap
    the file is truncated and a kill_on_cap job is stopped."""
    t = _Kept(tmp_path)
    os.write(t.w, b"x" * 40)
    t.kept.on_output(t.job)
    t.kept.flush_output()
    assert t.told == [{"op": "output", "jobs": [[JOB, 40, False]]}]
    os.write(t.w, b"y" * 100)
    t.kept.on_output(t.job)
    t.kept.flush_output()
    assert t.told[-1] == {"op": "output", "jobs": [[JOB, 100, True]]}
    assert t.signals == [signal.SIGTERM]
    os.close(t.w)
