"""A keeper killed with kill -9: the next keeper adopts its jobs from their cgroups.

Real keeper processes (tests/test_keeper_protocol.py's ``Keeper``) with job cgroups in a
subtree of this machine's cgroup2 made for the test: a job runs, the keeper is killed
(SIGKILL: nothing of its own runs), the job keeps running in its leaf, a new keeper is
started on the same socket, output folder and subtree. Its hello lists the job; a stop
works through the cgroup; the end is reported LOST with "exit status unknown: the
keeper restarted" (or STOPPED / TIMED_OUT with "exit status unknown"), never as a
success or an exit code nobody saw; nothing else is killed, nothing runs twice, no
process or leaf is left. The service's descriptor store (the pipe kept across the
death) is the systemd tier's (tests/systemd_tier/test_agent_systemd.py).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_keeper_protocol import POLICY, Conn, Keeper

from agent.keeper.keeperadopt import ADOPTED_TEXT, NO_FILE_NOTE, NO_PIPE_NOTE
from agent.keeper.keeperfiles import JOB_FILE, JOURNAL, JOURNAL_COMPACT, index_journal

from helpers import IS_ROOT, cgroup2_mount, job_subtree, wait_for

MOUNT = cgroup2_mount()
pytestmark = pytest.mark.skipif(
    not IS_ROOT or MOUNT is None, reason="needs root and a cgroup2 mount (job cgroups)"
)


@pytest.fixture
def subtree() -> Iterator[Path]:
    """A job subtree of its own for the test (whatever is left in it is killed after)."""
    with job_subtree("agent-test-adopt") as top:
        yield top


@pytest.fixture
def keeper(tmp_path: Path, subtree: Path) -> Iterator[Keeper]:
    k = Keeper(tmp_path, policy=POLICY, cgroup_jobs=subtree)
    try:
        yield k
    finally:
        k.stop()


# Says "before", then waits until SIGUSR1 (exit 7): never writes after the keeper's death.
WAITS = "trap 'exit 7' USR1; echo before; while :; do sleep 0.05; done"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] != b"Z"


def _kill9(k: Keeper, c: Conn) -> None:
    c.close()
    k.proc.kill()
    k.proc.wait()


def _record(k: Keeper, job: str) -> dict[str, Any] | None:
    """The job's record in the keeper's journal (its last line), or None."""
    path = k.out / JOURNAL
    line = index_journal(path.read_bytes())[0].get(job) if path.exists() else None
    return None if line is None else dict(json.loads(line))


def _recorded(k: Keeper, job: str) -> dict[str, Any]:
    """The job's record, once the keeper has written it (right after the start's answer:
    the start waits for the answer, not for it)."""
    got: dict[str, Any] = wait_for(lambda: _record(k, job))
    return got


def _append(k: Keeper, data: bytes) -> None:
    """Append to the journal as a keeper would (one write)."""
    with open(k.out / JOURNAL, "ab") as f:
        f.write(data)


def _drop(k: Keeper, job: str) -> None:
    """Rewrite the journal without the job's lines (as if it never had a record)."""
    path = k.out / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(x for x in lines if f'"job":"{job}"'.encode() not in x))
    assert _record(k, job) is None


def _started(c: Conn, argv: list[str], **kw: object) -> tuple[str, int]:
    job = c.start(argv, **kw)  # type: ignore[arg-type]
    got = c.started(job)
    assert "pid" in got, got
    return job, int(got["pid"])


def test_a_killed_keepers_job_is_adopted_and_its_end_reported_honestly(
    keeper: Keeper, subtree: Path
) -> None:
    """kill -9 of the keeper: the job runs on in its leaf; the next keeper's hello lists
    it, its output file keeps what was written, and its end (the leaf empties) is LOST
    "exit status unknown: the keeper restarted", its output's loss said; leaf and
    processes gone; the job ran once. Its record is in the journal, no file of its own."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sh", "-c", WAITS], record={"id": "r1"})
    c.output(job, 7)
    assert _recorded(keeper, job)["record"]["id"] == "r1"
    assert not (keeper.out / f"{job}{JOB_FILE}").exists()
    _kill9(keeper, c)
    assert _alive(pid) and (subtree / job).is_dir()
    keeper.launch()
    c2, hello = keeper.attach()
    [kept] = hello["jobs"]
    assert (kept["job"], kept["pid"], kept["size"], kept["ending"]) == (job, pid, 7, False)
    assert kept["record"]["id"] == "r1"
    assert "adopted job" in keeper.log()
    os.kill(pid, signal.SIGUSR1)
    fin = c2.finished(job)
    assert fin["state"] == "LOST" and fin["exit"]["code"] is None
    assert fin["text"] == f"{ADOPTED_TEXT}; {NO_PIPE_NOTE}"
    assert fin["size"] == 7 and (keeper.out / f"{job}.out").read_bytes() == b"before\n"
    # Ran once: the new keeper started nothing (no "started" for it).
    assert not [m for m in c2.seen if m["op"] == "started"]
    # Both go right after the end is told.
    assert not _alive(pid)
    wait_for(lambda: not (subtree / job).exists())
    # Acknowledged, it is gone; the new keeper runs new jobs as before.
    c2.send({"op": "ack", "jobs": [job]})
    assert c2.run(["echo", "hi"])["state"] == "SUCCEEDED"


def test_an_adopted_job_is_stopped_through_its_cgroup(keeper: Keeper, subtree: Path) -> None:
    """A stop of an adopted job: SIGTERM to its leaf (escaped processes too), SIGKILL
    after the grace; STOPPED "stopped by request (exit status unknown)"; nothing left."""
    c, _ = keeper.attach()
    script = "trap '' TERM; ( setsid sleep 1000 & ); echo up; sleep 1000"
    job, _ = _started(c, ["sh", "-c", script])
    c.output(job, 3)

    def in_leaf() -> list[str] | None:  # sh, its sleep, the escaped sleep
        got = (subtree / job / "cgroup.procs").read_text().split()
        return got if len(got) >= 3 else None

    procs: list[str] = wait_for(in_leaf)
    _kill9(keeper, c)
    keeper.launch()
    c2, hello = keeper.attach()
    assert [j["job"] for j in hello["jobs"]] == [job]
    c2.send({"op": "stop", "job": job, "how": "stop"})
    fin = c2.finished(job)
    assert fin["state"] == "STOPPED"
    assert fin["text"].startswith("stopped by request (exit status unknown)")
    assert not any(_alive(int(p)) for p in procs)
    wait_for(lambda: not (subtree / job).exists())  # removed right after the end is told


def test_an_adopted_job_keeps_its_deadline(keeper: Keeper, subtree: Path) -> None:
    """The deadline the dead keeper wrote in the job's record is enforced by the next
    one: TIMED_OUT at the original time, not restarted from the adoption."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sleep", "1000"], timeout=2)
    meta = _recorded(keeper, job)
    _kill9(keeper, c)
    keeper.launch()
    c2, _ = keeper.attach()
    fin = c2.finished(job)
    assert fin["state"] == "TIMED_OUT" and fin["text"].startswith("timed out after 2 s")
    assert fin["exit"]["ended"] >= meta["deadline"] - 0.1
    assert not _alive(pid)
    wait_for(lambda: not (subtree / job).exists())


def test_a_job_that_ended_while_no_keeper_ran_is_reported_lost(
    keeper: Keeper, subtree: Path
) -> None:
    """A job whose processes all ended between the death and the next keeper: its empty
    leaf is found, reported LOST (exit status unknown) in the next hello's ends."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sh", "-c", WAITS])
    c.output(job, 7)
    _kill9(keeper, c)
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: not _alive(pid))
    keeper.launch()
    _, hello = keeper.attach()
    assert hello["jobs"] == []
    [fin] = hello["ended"]
    assert (fin["job"], fin["state"]) == (job, "LOST")
    assert fin["text"].startswith(ADOPTED_TEXT)
    wait_for(lambda: not (subtree / job).exists())


def test_an_adopted_job_survives_the_keepers_reexec(keeper: Keeper, subtree: Path) -> None:
    """An adopted job is carried across the next keeper's re-exec in place (SIGUSR2, the
    package's upgrade): its leaf is watched again, and its end still comes, honestly."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sh", "-c", WAITS])
    c.output(job, 7)
    _kill9(keeper, c)
    keeper.launch()
    c2, hello = keeper.attach()
    assert [j["job"] for j in hello["jobs"]] == [job]
    keeper.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: "re-executed in place" in keeper.log(), timeout=30)
    assert keeper.alive()
    os.kill(pid, signal.SIGUSR1)
    fin = c2.finished(job)
    assert (fin["state"], fin["text"]) == ("LOST", f"{ADOPTED_TEXT}; {NO_PIPE_NOTE}")
    wait_for(lambda: not (subtree / job).exists())


def test_a_malformed_record_is_said_and_the_job_still_adopted(
    keeper: Keeper, subtree: Path
) -> None:
    """A job's record that is not one (here: its last line in the journal, garbage) is
    ignored and said: the job is still adopted (never killed for it) without a deadline,
    and its end says what was lost."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sh", "-c", WAITS], timeout=1)
    c.output(job, 7)
    _recorded(keeper, job)
    _kill9(keeper, c)
    _append(keeper, json.dumps({"job": job, "run": 3}).encode() + b"\n")
    keeper.launch()
    c2, hello = keeper.attach()
    assert [j["job"] for j in hello["jobs"]] == [job]
    assert "is not one" in keeper.log()
    time.sleep(1.5)  # past the lost deadline: nothing times it out
    assert _alive(pid)
    os.kill(pid, signal.SIGUSR1)
    fin = c2.finished(job)
    assert fin["state"] == "LOST"
    assert fin["text"] == f"{ADOPTED_TEXT}; {NO_FILE_NOTE}; {NO_PIPE_NOTE}"


def test_garbage_in_the_journal_is_skipped_and_every_record_still_read(
    keeper: Keeper, subtree: Path
) -> None:
    """Lines of the journal that are no record (not JSON, not UTF-8, no valid job id, a
    line torn at its end) are skipped and said once: every job's record is still read,
    each job adopted with its deadline, and the journal rewritten without them."""
    c, _ = keeper.attach()
    a, _ = _started(c, ["sleep", "1000"], timeout=3)
    b, _ = _started(c, ["sleep", "1000"], timeout=3)
    deadlines = {j: _recorded(keeper, j)["deadline"] for j in (a, b)}
    _kill9(keeper, c)
    path = keeper.out / JOURNAL
    first, second = path.read_bytes().splitlines(keepends=True)
    junk = b'not json\n{"job": "nope", "run": 3}\n[1, 2]\n\xff\xfe\n\n'
    path.write_bytes(junk + first + junk + second + f'{{"job":"{a}","pid":'.encode())
    keeper.launch()
    c2, hello = keeper.attach()
    assert sorted(j["job"] for j in hello["jobs"]) == sorted([a, b])
    assert "9 line(s) that are no job's record skipped" in keeper.log()
    assert keeper.log().count("deadline kept") == 2
    assert index_journal(path.read_bytes()) == ({a: first, b: second}, 0)
    for job in (a, b):
        fin = c2.finished(job)
        assert fin["state"] == "TIMED_OUT" and fin["exit"]["ended"] >= deadlines[job] - 0.1


def test_a_previous_releases_keeper_file_is_read_when_the_journal_lacks_the_job(
    keeper: Keeper, subtree: Path
) -> None:
    """A job the journal does not name but a <job id>.keeper file does (a keeper of the
    previous release died, this release adopts): the file is read as before (its deadline
    kept), kept across the next keeper's re-exec and removed at the job's end; a file of
    a job that no longer runs is removed at the adoption."""
    c, _ = keeper.attach()
    job, pid = _started(c, ["sleep", "1000"], timeout=8)
    meta = _recorded(keeper, job)
    _kill9(keeper, c)
    _drop(keeper, job)
    del meta["job"]  # as the previous release wrote it
    legacy, stale = keeper.out / f"{job}{JOB_FILE}", keeper.out / f"{uuid.uuid4()}{JOB_FILE}"
    for path in (legacy, stale):
        path.write_text(json.dumps(meta, separators=(",", ":")))
    keeper.launch()
    c2, hello = keeper.attach()
    assert [j["job"] for j in hello["jobs"]] == [job]
    assert "deadline kept" in keeper.log() and legacy.exists() and not stale.exists()
    keeper.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: "re-executed in place" in keeper.log(), timeout=30)
    assert "1 job(s) kept" in keeper.log()  # (not ended before: the re-exec is tested)
    fin = c2.finished(job)
    assert fin["state"] == "TIMED_OUT" and fin["exit"]["ended"] >= meta["deadline"] - 0.1
    assert not _alive(pid)
    wait_for(lambda: not legacy.exists())


def test_a_kill9_among_many_starts_leaves_every_running_jobs_record(
    keeper: Keeper, subtree: Path
) -> None:
    """Jobs start and end, their records big enough that the journal is rewritten
    (past JOURNAL_COMPACT) while some run; the keeper is killed -9 with starts still
    coming: the next keeper adopts every job whose start was answered and that still
    runs, with its record and its deadline, and the journal keeps no ended job."""
    pad = "x" * (JOURNAL_COMPACT // 6)  # a record under RECORD_MAX: 6 fill the threshold
    c, _ = keeper.attach()
    running: dict[str, dict[str, Any]] = {}
    ended: list[str] = []
    for i in range(14):
        record = {"id": f"r{i}", "pad": pad}
        if i % 2:
            ended.append(c.start(["true"], record=record))
        else:
            job, _ = _started(c, ["sleep", "1000"], timeout=60 + i, record=record)
            running[job] = _recorded(keeper, job)
    for job in ended:
        assert c.finished(job)["state"] == "SUCCEEDED"
    path = keeper.out / JOURNAL
    lines = [x for x in path.read_bytes().split(b"\n") if x]
    assert len(lines) < 14  # rewritten at least once
    for _ in range(4):  # more starts, the keeper killed in their midst
        c.start(["sleep", "1000"], record={"id": "late", "pad": pad}, timeout=60)
    _kill9(keeper, c)
    keeper.launch()
    _, hello = keeper.attach()
    adopted = {j["job"]: j for j in hello["jobs"]}
    assert set(running) <= set(adopted)
    log = keeper.log()
    for job, meta in running.items():
        assert adopted[job]["record"] == meta["record"]
        assert f"adopted job {job} " in log
        line = next(x for x in log.splitlines() if f"adopted job {job} " in x)
        assert "deadline kept" in line
    assert not set(ended) & set(index_journal(path.read_bytes())[0])


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_an_adopted_jobs_dynamic_uid_stays_held_until_it_ends(
    tmp_path: Path, subtree: Path
) -> None:
    """With dynamic users, the next keeper holds an adopted job's uid (from its record)
    until the job ends: a new job never gets the uid of one still running (it could see
    and signal it); with the range's other uid taken too, a start is refused. A job
    whose uid cannot be known (no record) is killed, never shared."""
    jobs = {"dynamic_users": True, "dynamic_uid_min": 60710, "dynamic_uid_max": 60711}
    k = Keeper(tmp_path, policy=POLICY, cgroup_jobs=subtree, jobs=jobs)
    try:
        c, _ = k.attach()
        job, pid = _started(c, ["sh", "-c", WAITS])
        uid = _uid(pid)
        assert 60710 <= uid <= 60711
        # Its record (with its uid) is written once it runs: killed after that.
        c.output(job, 7)
        assert _recorded(k, job)["uid"] == uid
        _kill9(k, c)
        k.launch()
        c2, hello = k.attach()
        assert [j["job"] for j in hello["jobs"]] == [job]
        other, opid = _started(c2, ["sleep", "30"])
        assert _uid(opid) != uid and 60710 <= _uid(opid) <= 60711
        third = c2.start(["sleep", "30"])
        assert "pid" not in c2.started(third)  # the range is spent: both uids are held
        c2.send({"op": "stop", "job": other, "how": "stop"})
        assert c2.finished(other)["state"] == "STOPPED"
        os.kill(pid, signal.SIGUSR1)
        assert c2.finished(job)["state"] == "LOST"
        # Both uids free again: two jobs start, of the two uids.
        a, apid = _started(c2, ["sleep", "30"])
        b, bpid = _started(c2, ["sleep", "30"])
        assert {_uid(apid), _uid(bpid)} == {60710, 60711}
        for j in (a, b):
            _recorded(k, j)
        # A job with no record, the keeper killed: its uid is unknown, it is killed.
        _kill9(k, c2)
        _drop(k, a)
        k.launch()
        c3, hello = k.attach()
        assert [j["job"] for j in hello["jobs"]] == [b]
        assert "its dynamic uid is unknown" in k.log()
        wait_for(lambda: not _alive(apid))
        c3.send({"op": "stop", "job": b, "how": "stop"})
        assert c3.finished(b)["state"] == "STOPPED"
    finally:
        k.stop()


def _datagrams(store: socket.socket) -> list[tuple[str, int]]:
    """The descriptor store's datagrams so far: (text, how many descriptors came)."""
    got: list[tuple[str, int]] = []
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(store, 4096, 4)
        except BlockingIOError:
            return got
        for fd in fds:
            os.close(fd)
        got.append((data.decode(), len(fds)))


def test_an_agent_that_is_the_store_gets_each_pipe_with_the_start(
    tmp_path: Path, subtree: Path
) -> None:
    """A keeper whose descriptor store is its agent (the agent's child: $NOTIFY_SOCKET is
    the agent's agent.daemon.pipestore) pushes each job's pipe in a datagram and takes it
    out at the job's end; an agent that asks for "pipe-with-start" gets the pipe with the
    start's answer instead, and no datagram comes for the job, neither then nor at its
    end. The pipe is the job's: what the job writes after the keeper's death is in it."""
    path = str(tmp_path / "store")
    store = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    store.bind(path)
    (tmp_path / "k1").mkdir()
    k = Keeper(
        tmp_path / "k1", policy=POLICY, cgroup_jobs=subtree,
        env={"NOTIFY_SOCKET": path, "FDSTORE": "16"},
    )  # fmt: skip
    kept = -1
    try:
        c, hello = k.attach()
        assert "pipe-with-start" in hello["features"]
        first = c.start(["echo", "hi"])
        assert c.finished(first)["state"] == "SUCCEEDED"
        said: list[tuple[str, int]] = []  # (each look takes what has come so far)

        def both_said() -> bool:
            said.extend(_datagrams(store))
            return len(said) >= 2

        wait_for(both_said)
        assert said == [
            (f"FDSTORE=1\nFDNAME={first}\nFDPOLL=0", 1),
            (f"FDSTOREREMOVE=1\nFDNAME={first}", 0),
        ]
        assert first not in c.pipes

        c.send({"op": "features", "use": ["admitted+started", "pipe-with-start"]})
        short = c.start(["echo", "hi"])
        assert c.finished(short)["state"] == "SUCCEEDED" and short in c.pipes
        script = "trap 'echo after; exit 7' USR1; echo before; while :; do sleep 0.05; done"
        job = c.start(["sh", "-c", script])
        pid = int(c.answer(job)["pid"])  # "admitted" with the pid (admitted+started)
        assert job in c.pipes
        kept = os.dup(c.pipes[job])
        c.output(job, 7)
        c.ping()  # everything the keeper did for these jobs is done
        assert _datagrams(store) == []
        _kill9(k, c)
        os.kill(pid, signal.SIGUSR1)
        assert select.select([kept], [], [], 10)[0], "the job's write never came"
        assert os.read(kept, 100) == b"after\n"
    finally:
        if kept >= 0:
            os.close(kept)
        store.close()
        k.stop()
