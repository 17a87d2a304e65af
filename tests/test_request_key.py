"""StartJob's requestKey: a start sent twice starts one job (agent.daemon.startkeys).

Real agent processes, real mTLS: the same key again answers the first job (existing),
repeats sent at the same moment start one job, keys are per identity, a restarted agent
still knows them (the history database), a malformed key is refused and starts nothing.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.daemon.history import Store
from agent.keeper import validation
from agent.keeper.errors import InvalidArgument

from helpers import AgentProcess, Certs, pb, policy_for


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, script_dir: Path
) -> Iterator[AgentProcess]:
    """One agent for the module (each test uses keys of its own; the restart test last)."""
    a = AgentProcess(tmp_path_factory.mktemp("keys"), certs, policy_for(script_dir)).start()
    try:
        yield a
    finally:
        a.stop()
        a.cleanup()


def _start(agent: AgentProcess, key: str, identity: str = "client") -> pb.StartJobRes:
    with agent.stub(identity) as stub:
        res: pb.StartJobRes = stub.StartJob(
            pb.StartJobReq(command="sleep", path="30", requestKey=key), timeout=30
        )
        return res


def _jobs(agent: AgentProcess, identity: str = "client") -> list[str]:
    with agent.stub(identity) as stub:
        return [j.jobID for j in stub.ListJobs(pb.ListJobsReq(), timeout=30).jobs]


def test_the_same_key_again_answers_the_first_job_and_starts_nothing(
    agent: AgentProcess,
) -> None:
    first = _start(agent, "run-1/host-a")
    assert (first.requestKey, first.existing) == ("run-1/host-a", False)
    again = _start(agent, "run-1/host-a")
    assert (again.jobID, again.requestKey, again.existing) == (first.jobID, "run-1/host-a", True)
    other = _start(agent, "run-1/host-b")
    assert other.jobID != first.jobID and not other.existing
    assert {first.jobID, other.jobID} <= set(_jobs(agent))
    repeats = [
        e
        for e in agent.audit_lines()
        if e["event"] == "job_start_repeat" and e["request_key"] == "run-1/host-a"
    ]
    assert [e["job_id"] for e in repeats] == [first.jobID]


def test_repeats_sent_at_once_start_one_job(agent: AgentProcess) -> None:
    """Eight StartJobs with one key on eight connections at the same moment: one job."""
    before = set(_jobs(agent))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _start(agent, "burst"), range(8)))
    assert len({a.jobID for a in answers}) == 1
    assert sum(not a.existing for a in answers) == 1
    assert set(_jobs(agent)) - before == {answers[0].jobID}


def test_keys_are_per_identity(agent: AgentProcess) -> None:
    """Another identity's start with the same key is a start of its own: a key never
    reaches another caller's job."""
    mine = _start(agent, "shared-key", "client")
    theirs = _start(agent, "shared-key", "scheduler")
    assert mine.jobID != theirs.jobID and not theirs.existing


def test_a_malformed_key_is_refused_and_starts_nothing(agent: AgentProcess) -> None:
    before = set(_jobs(agent))
    for key in ("a b", "x" * 129, "é", "key\n", "a;b"):
        with pytest.raises(grpc.RpcError) as e:
            _start(agent, key)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requestKey" in str(e.value.details())
    assert set(_jobs(agent)) == before


def test_request_key_validation() -> None:
    assert validation.request_key("") == ""
    assert validation.request_key("r-1/w_2:x.y") == "r-1/w_2:x.y"
    assert validation.request_key("k" * 128) == "k" * 128
    for bad in ("k" * 129, "a b", "ü", "a\x00"):
        with pytest.raises(InvalidArgument):
            validation.request_key(bad)


def test_an_older_history_file_gets_the_key_column(tmp_path: Path) -> None:
    """A database written before requestKey (no request_key column) is opened, gains the
    column, and its old rows have no key."""
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL, command TEXT NOT NULL, path TEXT NOT NULL, args TEXT NOT NULL,
        state INTEGER NOT NULL, pid INTEGER NOT NULL DEFAULT 0,
        leader_start INTEGER NOT NULL DEFAULT 0, boot_id TEXT NOT NULL DEFAULT '',
        start_time REAL NOT NULL, end_time REAL, exit_code INTEGER, signal INTEGER,
        error_text TEXT NOT NULL DEFAULT '', user_cpu REAL NOT NULL DEFAULT 0,
        system_cpu REAL NOT NULL DEFAULT 0, max_rss INTEGER NOT NULL DEFAULT 0,
        output_path TEXT NOT NULL, output_bytes INTEGER NOT NULL DEFAULT 0,
        output_truncated INTEGER NOT NULL DEFAULT 0, timeout_seconds INTEGER NOT NULL DEFAULT 0,
        limits TEXT NOT NULL DEFAULT '{}');
        INSERT INTO jobs (id, owner, command, path, args, state, start_time, output_path)
        VALUES ('00000000-0000-4000-8000-000000000001', 'client', '/bin/true', '', '[]', 2,
                1.0, '/x');
        PRAGMA user_version=1;"""
    )
    db.close()
    store = Store(path)
    try:
        rec = store.get("00000000-0000-4000-8000-000000000001")
        assert rec is not None and rec.request_key == ""
        assert store.job_of_key("client", "k") is None
    finally:
        store.close()


def test_a_restarted_agent_still_knows_the_keys(agent: AgentProcess) -> None:
    """Killed (the job goes on in its keeper), started again: the key is in the history."""
    first = _start(agent, "before-restart")
    agent.kill9()
    agent.restart()
    again = _start(agent, "before-restart")
    assert (again.jobID, again.existing) == (first.jobID, True)


def test_start_job_stream_gives_the_job_id_its_output_and_its_status(
    agent: AgentProcess, script_dir: Path
) -> None:
    """StartJobStream: one call, the new job's id first (alone), then its output, then its
    status; with a key used before, the job of that start (nothing new started)."""
    req = pb.StartJobReq(
        command="bash", path=str(script_dir / "count.sh"), args=["3", "0.01"], requestKey="ss-1"
    )
    with agent.stub("client") as stub:
        msgs = list(stub.StartJobStream(req, timeout=30))
        again = list(stub.StartJobStream(req, timeout=30))
    first, *rest = msgs
    assert first.jobID and not first.data and not first.HasField("status")
    assert b"".join(m.data for m in rest) == b"line 1\nline 2\nline 3\n"
    assert rest[-1].HasField("status") and rest[-1].status.state == pb.SUCCEEDED
    assert again[0].jobID == first.jobID
    assert b"".join(m.data for m in again[1:]) == b"line 1\nline 2\nline 3\n"
