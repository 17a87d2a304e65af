"""The job keeper's parts on their own: the pure checks of a start, of a ``.keeper``
file and of an ended file, and the kept jobs' timers and lifecycle driven without a
keeper process (a real pipe and output file; the agent, the signals and the job files
replaced by lists that record what the part asked for).

The whole keeper with real jobs is tests/test_keeper_protocol.py and its neighbours."""

from __future__ import annotations

import json
import os
import selectors
import signal
from pathlib import Path
from typing import Any

import pytest

from agent.keeper import capabilities, policyfile
from agent.keeper import lifecycle as lc
from agent.keeper.admission import Rules, StartRequest
from agent.keeper.decision import Decider
from agent.keeper.errors import FailedPrecondition
from agent.keeper.jobsettings import JobUser, Settings
from agent.keeper.keeperfiles import parse_ends, parse_job_file
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
    """What a keeper wrote is read back; a file whose deadline, cap, grace, record or
    pid is not of the right kind is no .keeper file."""
    good = {"pid": 42, "uid": None, "deadline": 1.5, "run": RUN, "record": {"id": JOB}}
    assert parse_job_file(json.dumps(good).encode()) == good
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
