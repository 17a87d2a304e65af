"""The keeper's state across ``execve`` (agent.keeper.keeperstate), in-process.

The whole upgrade with real jobs is tests/test_keeper_survival.py (SIGUSR2); here the
pieces: a snapshot restores to the same keeper, descriptors included, and code that
does not import is never executed into.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.keeper import keeperstate
from agent.keeper import lifecycle as lc
from agent.keeper import spawnproto as proto
from agent.keeper.keeper import Keeper
from agent.keeper.keptjobs import KeptJob
from agent.keeper.outputfile import OutputFile

RUN = {
    "timeout": 30,
    "cpu_seconds": 0,
    "memory_max": 0,
    "note": "a note",
    "cap": 100,
    "kill_on_cap": True,
    "grace": 2.5,
}
JOB = "0f0f0f0f-1111-2222-3333-444444444444"


def _keeper(tmp_path: Path) -> Keeper:
    listener = proto.listen_at(str(tmp_path / "k.sock"))
    return Keeper(listener, agent_uid=os.geteuid(), output_dir=str(tmp_path))


def test_a_snapshot_restores_the_same_keeper(tmp_path: Path) -> None:
    """Every kept job (its lifecycle, output file, pipe, timers, record) and every end
    not yet acknowledged come back as they were, through JSON, descriptors by number."""
    k = _keeper(tmp_path)
    out = OutputFile(str(tmp_path / f"{JOB}.out"), 100)
    out.reserve()
    assert out.write(b"hello\n").written == 6
    job = KeptJob(JOB, 7, 1, RUN, out)
    r, w = os.pipe()
    job.pid, job.rfd, job.record = 4242, r, {"id": JOB, "args": ["a"]}
    job.life.handle(lc.StopRequested())  # terminating: SIGTERM sent, kill timer armed
    k.kept.jobs[JOB] = job
    k.kept.arm(job, 30, lc.TimedOut())
    k.kept.arm(job, 2.5, lc.KillGraceExpired())
    k.kept.ended["x"] = {"op": "finished", "job": "x", "state": "SUCCEEDED"}
    state = json.loads(json.dumps(keeperstate.snapshot(k)))
    file_fd = out._fd  # the descriptor the snapshot must name
    assert file_fd is not None
    assert sorted(keeperstate.descriptors(state)) == sorted([k.link.listener.fileno(), r, file_fd])

    k2 = Keeper(
        socket.socket(fileno=os.dup(k.link.listener.fileno())),
        agent_uid=state["agent_uid"],
        output_dir=state["output_dir"],
    )
    keeperstate.restore(k2, state)
    j2 = k2.kept.jobs[JOB]
    assert (j2.pid, j2.rfd, j2.record, j2.grace, j2.kill_on_cap) == (
        4242,
        r,
        job.record,
        2.5,
        True,
    )
    assert j2.life == job.life and j2.life.phase is lc.Phase.TERMINATING
    assert j2.life.cause == lc.Cause(lc.Why.STOP)
    assert (j2.out.size, j2.out.cap, j2.out.path) == (6, 100, out.path)
    assert sorted(type(t.event).__name__ for t in j2.timers) == ["KillGraceExpired", "TimedOut"]
    assert k2.kept.by_pid[4242] is j2 and k2.kept.ended == k.kept.ended
    # The restored output file goes on where it was.
    assert j2.out.write(b"more\n").written == 5
    assert (tmp_path / f"{JOB}.out").read_bytes() == b"hello\nmore\n"
    os.close(w)


def test_the_attached_agents_features_survive_the_re_exec(tmp_path: Path) -> None:
    """What the attached agent asked for (its features) is part of the attachment handed
    across the exec; a state saved before features (no key) restores none."""
    k = _keeper(tmp_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    k.link.attach(ours, -1)
    k.link.use({"op": "features", "use": ["admitted+started", "unknown"]})
    assert k.link.features == {"admitted+started"}
    agent = json.loads(json.dumps(k.link.state()))
    (tmp_path / "2").mkdir()
    (tmp_path / "3").mkdir()
    k2, k3 = _keeper(tmp_path / "2"), _keeper(tmp_path / "3")
    k2.link.restore(agent, gen=3)
    assert k2.link.features == {"admitted+started"} and k2.link.gen == 3
    old = {key: v for key, v in agent.items() if key != "features"}
    old["fd"] = os.dup(agent["fd"])
    k3.link.restore(old, gen=1)
    assert k3.link.features == frozenset()
    theirs.close()


def test_new_code_that_does_not_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken upgrade (the new keeper does not even import) is said, never executed
    into: the keeper goes on with the code it runs."""
    assert keeperstate.new_code_problem() == ""
    broken = tmp_path / "agent" / "keeper"
    broken.mkdir(parents=True)
    (tmp_path / "agent" / "__init__.py").write_text("")
    (broken / "__init__.py").write_text("")
    (broken / "keeperstate.py").write_text("def broken(:\n")
    monkeypatch.setattr(keeperstate, "PACKAGE_ROOT", str(tmp_path))
    assert "SyntaxError" in keeperstate.new_code_problem()


def test_a_state_of_another_version_is_refused(tmp_path: Path) -> None:
    fd = os.memfd_create("state")
    os.write(fd, json.dumps({"version": 99}).encode())
    with pytest.raises(ValueError, match="version"):
        keeperstate.load(fd)


def test_the_loop_wakes_for_a_due_rewrite_of_the_journal(tmp_path: Path) -> None:
    """An idle keeper (no job, no timer) would sleep until something comes; a rewrite of
    the journal due (an ended job's record to take out) bounds its sleep, and the loop
    does the rewrite once it is due."""
    k = _keeper(tmp_path)
    assert k.sleep_time() is None
    k.files.rewrite_due = time.monotonic() + 0.5
    got = k.sleep_time()
    assert got is not None and 0 < got <= 0.5
    k.files.rewrite_due = time.monotonic() - 1  # due: the next turn rewrites
    k.link.sock = None
    k.running = True
    real_compact = k.files.compact

    def compact() -> None:
        real_compact()
        k.running = False  # one turn is enough

    k.files.compact = compact  # type: ignore[method-assign]
    # A loop that never rewrites must not hang the test: stopped after 5 s (a turn
    # returns at once, the rewrite being due, when sleep_time counts it).
    stop = threading.Timer(5, lambda: setattr(k, "running", False))
    stop.start()
    try:
        k.serve()
    finally:
        stop.cancel()
    assert not k.files.rewrite_due
