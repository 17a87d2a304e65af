"""Output streams are bounded: per identity and in total, counted in the metrics, and a
client that goes away is a normal end, not a logged traceback. A follower that never
reads holds its buffers, so without the bounds any allowed client could make the agent
hold what it likes."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.daemon.service import StreamSlots
from agent.keeper.errors import ResourceExhausted

from helpers import AgentFactory, AgentProcess, free_port, make_safe_dir, wait_for, write_script


def test_slots_count_per_identity_and_in_total() -> None:
    """Each identity gets at most its share, everyone together at most the total; a
    released slot is free again and the hook sees every change."""
    seen: list[int] = []
    slots = StreamSlots(3, 2, on_change=seen.append)
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(ResourceExhausted) as e:
        slots.acquire("a")
    assert e.value.rule == "stream-limit-identity"
    slots.acquire("b")
    with pytest.raises(ResourceExhausted) as e:
        slots.acquire("c")
    assert e.value.rule == "stream-limit"
    slots.release("a")
    slots.acquire("c")
    assert seen == [1, 2, 3, 2, 3] and slots.open == 3


@pytest.fixture(scope="module")
def chatty() -> Iterator[Path]:
    """A script that writes a lot, then waits: its followers always have more to get."""
    d = make_safe_dir()
    write_script(d, "chatty.sh", "#!/bin/bash\nhead -c 20000000 /dev/zero | tr '\\0' x\nsleep 60\n")
    yield d


def _policy(d: Path) -> str:
    return (
        "version: 1\nentries:\n  - name: chatty\n    command: /bin/bash\n"
        f"    aliases: [bash]\n    scripts: ['{d}/*.sh']\n"
    )


@contextmanager
def _channel(a: AgentProcess, identity: str) -> Iterator[pb_grpc.WorkerStub]:
    with grpc.secure_channel(a.addr, a.certs.creds(identity)) as ch:
        yield pb_grpc.WorkerStub(ch)


def _follow(stub: pb_grpc.WorkerStub, job: str) -> Any:
    """A follow that never reads; the first message proves the agent accepted it."""
    call = stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job, follow=True), timeout=60)
    next(call)
    return call


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
        return text


def test_streams_are_bounded_counted_and_end_quietly(
    make_agent: AgentFactory, chatty: Path
) -> None:
    """Follows that never read: one identity gets max_streams_per_identity, everyone
    max_streams, then RESOURCE_EXHAUSTED naming the limit; the metrics count them; a
    cancelled stream frees its slot and leaves no traceback in the log."""
    port = free_port()
    a = make_agent(
        _policy(chatty),
        jobs={"max_streams": 5, "max_streams_per_identity": 3},
        metrics={"enabled": True, "addr": f"127.0.0.1:{port}"},
    )
    with a.stub() as stub:
        job = stub.StartJob(pb.StartJobReq(command="bash", path=str(chatty / "chatty.sh"))).jobID
    with _channel(a, "client") as c1, _channel(a, "admin") as c2:
        mine = [_follow(c1, job) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as e:
            _follow(c1, job)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 3" in (e.value.details() or "")
        theirs = [_follow(c2, job) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as e:
            _follow(c2, job)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the agent's limit is 5" in (e.value.details() or "")
        wait_for(lambda: "agent_stream_followers 5.0" in _metrics(port), timeout=10)
        text = _metrics(port)
        assert 'rule="stream-limit-identity"' in text and 'rule="stream-limit"' in text
        for call in mine:
            call.cancel()
        wait_for(lambda: "agent_stream_followers 2.0" in _metrics(port), timeout=10)
        again = _follow(c1, job)  # the slots came back
        again.cancel()
        for call in theirs:
            call.cancel()
        wait_for(lambda: "agent_stream_followers 0.0" in _metrics(port), timeout=10)
    time.sleep(0.5)
    log = a.log()
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]


def test_a_stream_still_delivers_everything(make_agent: AgentFactory, chatty: Path) -> None:
    """The control: a reading follow gets every byte, in order, through 64 KiB chunks."""
    a = make_agent(_policy(chatty))
    c = a.client()
    job = c.start("bash", str(chatty / "chatty.sh"))
    got = 0
    with _channel(a, "client") as stub:
        call = stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job, follow=True), timeout=60)
        for msg in call:
            assert msg.offset == got
            got += len(msg.data)
            if got >= 20_000_000:
                call.cancel()
                break
    assert got == 20_000_000
    c.stop(job)


def test_connections_beyond_the_limit_are_refused_and_come_back(make_agent: AgentFactory) -> None:
    """[grpc_server] max_connections: one connection more is refused at accept
    (UNAVAILABLE for its calls); when one closes, a new one is accepted."""
    a = make_agent(grpc_server={"max_connections": 2})

    def served(stub: pb_grpc.WorkerStub, **kw: Any) -> grpc.StatusCode:
        # wait_for_ready: the readiness probe's connection may still be counted a moment.
        try:
            stub.QueryJob(pb.QueryJobReq(jobID=str(uuid.uuid4())), **kw)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
        raise AssertionError("an unknown job was found")

    with _channel(a, "client") as s1, _channel(a, "client") as s2:
        for s in (s1, s2):
            assert served(s, timeout=20, wait_for_ready=True) == grpc.StatusCode.NOT_FOUND
        with _channel(a, "client") as s3:
            assert served(s3, timeout=3) in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    with _channel(a, "client") as s4:
        assert served(s4, timeout=20, wait_for_ready=True) == grpc.StatusCode.NOT_FOUND
