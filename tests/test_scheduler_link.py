"""The scheduler's side of a worker's link (Scheduler.Link) against a real scheduler process.

The worker is played by the test: a grpc.aio client with the agent's
certificate, registering as an agent does and speaking Link (hello,
heartbeats, replies to the calls that come down it). The address it
registers is a port nothing listens on, so a call that reached the worker
can only have come down its link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.client import AgentClientError, RunInfo, RunOutputLine, SchedulerClient

from helpers import Certs, SchedulerProcess, free_port, wait_for

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK.value[0]


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[SchedulerProcess]:
    # Two worker identities, to link with another's id; expiry 3 s (heartbeats 1 s).
    s = SchedulerProcess(
        tmp_path_factory.mktemp("link") / "sched", certs, workers=["agent", "client"]
    ).start()
    yield s
    s.stop()


class Worker:
    """A worker played by the test: its registration connection and its link."""

    def __init__(self, sched: SchedulerProcess, identity: str = "agent") -> None:
        self.channel = grpc.aio.secure_channel(sched.addr, sched.certs.creds(identity))
        self.stub = pb_grpc.SchedulerStub(self.channel)
        self.address = f"127.0.0.1:{free_port()}"  # nothing listens there
        self.worker_id = ""
        self.up: asyncio.Queue[pb.LinkUp | None] = asyncio.Queue()
        self.call: grpc.aio.StreamStreamCall | None = None

    async def register(self) -> str:
        res = await self.stub.RegisterWorker(pb.RegisterReq(address=self.address), timeout=10)
        self.worker_id = str(res.workerID)
        return self.worker_id

    async def _ups(self) -> AsyncIterator[pb.LinkUp]:
        while (msg := await self.up.get()) is not None:
            yield msg

    def open(self, first: pb.LinkUp | None = None, *, accepts_calls: bool = True) -> None:
        if first is None:
            first = pb.LinkUp(
                hello=pb.LinkHello(workerID=self.worker_id, acceptsCalls=accepts_calls)
            )
        self.up.put_nowait(first)
        self.call = self.stub.Link(self._ups())

    async def link(self, *, accepts_calls: bool = True) -> None:
        """Open the link and wait until the scheduler has it (a heartbeat answered)."""
        self.open(accepts_calls=accepts_calls)
        self.send(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=self.worker_id)))
        assert (await self.recv()).heartbeat.known

    def send(self, msg: pb.LinkUp) -> None:
        self.up.put_nowait(msg)

    def reply(self, call_id: int, response: bytes = b"", *, last: bool = True) -> None:
        self.send(pb.LinkUp(reply=pb.LinkReply(callID=call_id, response=response, last=last)))

    async def recv(self) -> pb.LinkDown:
        assert self.call is not None
        msg = await asyncio.wait_for(self.call.read(), 30)
        assert msg is not grpc.aio.EOF, "the link ended"
        return msg  # type: ignore[no-any-return]

    async def refusal(self) -> grpc.aio.AioRpcError:
        """The error that ends a link refused at its hello."""
        assert self.call is not None
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(self.call.read(), 30)
        return e.value

    async def close(self) -> None:
        self.up.put_nowait(None)
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


def run_everywhere(sched: SchedulerProcess, worker_id: str) -> tuple[RunInfo, list[bytes]]:
    """A fan-out run of ``true`` on one worker, followed to its end: its end and output."""
    with SchedulerClient(sched.addr, sched.certs.tls("admin"), timeout=30) as c:
        run = c.start_run(f"list:{worker_id}", "true", max_errors="100%")
        events = list(c.follow_run(run.run_id, timeout=120))
    final = events[-1]
    assert isinstance(final, RunInfo)
    return final, [e.line for e in events if isinstance(e, RunOutputLine)]


def listed(sched: SchedulerProcess) -> set[str]:
    with SchedulerClient(sched.addr, sched.certs.tls("admin"), timeout=30) as c:
        return {w.worker_id for w in c.workers()}


def test_hello_for_an_unregistered_id_is_not_found(sched: SchedulerProcess) -> None:
    async def main() -> None:
        w = Worker(sched)
        w.worker_id = "no-such-worker"
        w.open()
        e = await w.refusal()
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert "register again" in str(e.details())
        await w.close()

    asyncio.run(main())


def test_hello_naming_another_identitys_worker_is_permission_denied(
    sched: SchedulerProcess,
) -> None:
    async def main() -> None:
        other = Worker(sched, "client")
        wid = await other.register()
        w = Worker(sched, "agent")
        w.worker_id = wid
        w.open()
        e = await w.refusal()
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        # Its own identity may open it.
        other.open()
        other.send(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=wid)))
        assert (await other.recv()).heartbeat.known
        await w.close()
        await other.close()

    asyncio.run(main())


def test_a_link_must_start_with_a_hello(sched: SchedulerProcess) -> None:
    async def main() -> None:
        w = Worker(sched)
        await w.register()
        w.open(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=w.worker_id)))
        e = await w.refusal()
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        await w.close()

    asyncio.run(main())


def test_heartbeats_on_the_link_are_answered_and_keep_the_worker_listed(
    sched: SchedulerProcess,
) -> None:
    """Heartbeats only on the link, for twice the expiry: still listed; each answered in
    order (known, then unknown for an id not registered); a worker that stops beating is
    forgotten although its link stays open."""

    async def main() -> None:
        w = Worker(sched)
        silent = Worker(sched)
        await w.register()
        await silent.register()
        w.open()
        silent.open()
        for _ in range(12):  # 6 s; the expiry is 3 s
            w.send(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=w.worker_id)))
            w.send(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID="no-such-worker")))
            assert (await w.recv()).heartbeat.known
            second = await w.recv()
            assert second.HasField("heartbeat") and not second.heartbeat.known
            await asyncio.sleep(0.5)
        ids = await asyncio.to_thread(listed, sched)
        assert w.worker_id in ids
        assert silent.worker_id not in ids
        await w.close()
        await silent.close()

    asyncio.run(main())


async def answer_like_an_agent(
    w: Worker, seen: list[str], job_id: str = "job-1", one_call: bool = True
) -> None:
    """Answer StartJobStream (unless not ``one_call``: UNIMPLEMENTED, as an older agent),
    StartJob and StreamJobOutput down the link as an agent whose job succeeded."""
    status = pb.QueryJobRes(jobID=job_id, done=True, state=pb.SUCCEEDED, exitCode=0)
    while True:
        down = await w.recv()
        if not down.HasField("call"):
            continue
        call = down.call
        seen.append(call.method)
        if call.method == "StartJobStream" and one_call:
            assert pb.StartJobReq.FromString(call.request).command == "true"
            for m in (
                pb.StreamJobOutputRes(jobID=job_id),
                pb.StreamJobOutputRes(data=b"ok\n", offset=0),
                pb.StreamJobOutputRes(offset=3, status=status),
            ):
                w.reply(call.callID, m.SerializeToString(), last=False)
            w.reply(call.callID)
        elif call.method == "StartJob":
            assert pb.StartJobReq.FromString(call.request).command == "true"
            w.reply(call.callID, pb.StartJobRes(jobID=job_id).SerializeToString())
        elif call.method == "StreamJobOutput":
            out = pb.StreamJobOutputReq.FromString(call.request)
            assert out.jobID == job_id and out.follow and out.endStatus
            data = pb.StreamJobOutputRes(data=b"ok\n", offset=0)
            w.reply(call.callID, data.SerializeToString(), last=False)
            end = pb.StreamJobOutputRes(offset=3, status=status)
            w.reply(call.callID, end.SerializeToString(), last=False)
            w.reply(call.callID)
        else:
            code = grpc.StatusCode.UNIMPLEMENTED.value[0]
            w.send(pb.LinkUp(reply=pb.LinkReply(callID=call.callID, last=True, code=code)))


@pytest.mark.parametrize("one_call", [True, False], ids=["StartJobStream", "older-agent"])
def test_a_fan_out_goes_down_the_links(sched: SchedulerProcess, one_call: bool) -> None:
    """The run's start and output travel down the worker's link (its address has no
    listener): SUCCEEDED, with the worker's output line; one call (StartJobStream), or,
    for a worker that answers it UNIMPLEMENTED, StartJob and StreamJobOutput."""

    async def main() -> None:
        w = Worker(sched)
        await w.register()
        await w.link()
        seen: list[str] = []
        answering = asyncio.ensure_future(answer_like_an_agent(w, seen, one_call=one_call))
        final, lines = await asyncio.to_thread(run_everywhere, sched, w.worker_id)
        answering.cancel()
        (host,) = final.hosts
        assert host.state == "SUCCEEDED", (host.error_text, seen)
        assert host.job_id == "job-1"
        assert lines == [b"ok"]
        if one_call:
            assert seen == ["StartJobStream"]
        else:
            assert seen == ["StartJobStream", "StartJob", "StreamJobOutput"]
        await w.close()

    asyncio.run(main())


def test_dispatch_calls_go_down_the_link_and_relay_the_workers_status(
    sched: SchedulerProcess,
) -> None:
    """DispatchStartJob and DispatchQueryJob reach the worker down its link; a refusal it
    answers on the link (code and details) is relayed to the user as a direct call's."""

    async def main() -> None:
        w = Worker(sched)
        await w.register()
        await w.link()

        async def answer() -> None:
            while True:
                down = await w.recv()
                if down.call.method == "StartJob":
                    w.reply(down.call.callID, pb.StartJobRes(jobID="d1").SerializeToString())
                elif down.call.method == "QueryJob":
                    code = grpc.StatusCode.NOT_FOUND.value[0]
                    refusal = pb.LinkReply(
                        callID=down.call.callID, last=True, code=code, details="no job d1"
                    )
                    w.send(pb.LinkUp(reply=refusal))

        def dispatch() -> tuple[str, AgentClientError]:
            with SchedulerClient(sched.addr, sched.certs.tls("admin"), timeout=30) as c:
                job_id = c.start(w.worker_id, "true")
                with pytest.raises(AgentClientError) as e:
                    c.query(w.worker_id, job_id)
            return job_id, e.value

        answering = asyncio.ensure_future(answer())
        job_id, err = await asyncio.to_thread(dispatch)
        answering.cancel()
        assert job_id == "d1"
        assert err.code == grpc.StatusCode.NOT_FOUND and "no job d1" in err.details
        await w.close()

    asyncio.run(main())


def test_a_worker_without_calls_on_its_link_is_reached_at_its_address(
    sched: SchedulerProcess,
) -> None:
    """acceptsCalls false: the run connects to the address (nothing there): UNREACHABLE,
    and nothing came down the link."""

    async def main() -> None:
        w = Worker(sched)
        await w.register()
        await w.link(accepts_calls=False)
        final, _ = await asyncio.to_thread(run_everywhere, sched, w.worker_id)
        (host,) = final.hosts
        assert host.state == "UNREACHABLE", host
        w.send(pb.LinkUp(heartbeat=pb.HeartbeatReq(workerID=w.worker_id)))
        assert (await w.recv()).HasField("heartbeat")  # the next message: no call came
        await w.close()

    asyncio.run(main())


def test_a_link_that_closes_mid_run_leaves_the_host_unreachable(
    sched: SchedulerProcess,
) -> None:
    """The job started (its id came up the link); the link closes while its output is
    awaited: lost after start."""

    async def main() -> None:
        w = Worker(sched)
        await w.register()
        await w.link()

        async def start_then_close() -> None:
            while True:
                down = await w.recv()
                if down.HasField("call") and down.call.method == "StartJobStream":
                    first = pb.StreamJobOutputRes(jobID="j").SerializeToString()
                    w.reply(down.call.callID, first, last=False)
                    await asyncio.sleep(0.2)  # the scheduler records the host RUNNING
                    assert w.call is not None
                    w.call.cancel()
                    return

        closing = asyncio.ensure_future(start_then_close())
        final, _ = await asyncio.to_thread(run_everywhere, sched, w.worker_id)
        await closing
        (host,) = final.hosts
        assert host.state == "UNREACHABLE", host
        assert host.job_id == "j"
        assert "lost after start" in host.error_text and "unavailable" in host.error_text
        await w.close()

    asyncio.run(main())


def test_a_call_past_its_deadline_is_cancelled_on_the_link(sched: SchedulerProcess) -> None:
    """A start never answered: DEADLINE_EXCEEDED (UNREACHABLE) at the scheduler's
    [agents] call_timeout_seconds, and the worker is told to cancel that call."""

    async def main() -> None:
        w = Worker(sched)
        await w.register()
        await w.link()
        run = asyncio.ensure_future(asyncio.to_thread(run_everywhere, sched, w.worker_id))
        down = await w.recv()
        # One call a host: its stream has no deadline (the job may run long); the
        # scheduler gives up on the job id after call_timeout_seconds.
        assert down.call.method == "StartJobStream"
        cancel = await w.recv()
        assert cancel.cancel.callID == down.call.callID
        final, _ = await run
        (host,) = final.hosts
        assert host.state == "UNREACHABLE" and "DEADLINE_EXCEEDED" in host.error_text, host
        await w.close()

    asyncio.run(main())


def test_a_newer_link_replaces_the_older(sched: SchedulerProcess) -> None:
    """The same worker links again: the older link ends, calls go down the newer."""

    async def main() -> None:
        old = Worker(sched)
        await old.register()
        await old.link()
        new = Worker(sched)
        new.worker_id = old.worker_id
        await new.link()
        assert old.call is not None
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while await asyncio.wait_for(old.call.read(), 30) is not grpc.aio.EOF:
                pass
        assert "replaced" in str(e.value.details())
        seen: list[str] = []
        answering = asyncio.ensure_future(answer_like_an_agent(new, seen))
        final, _ = await asyncio.to_thread(run_everywhere, sched, new.worker_id)
        answering.cancel()
        assert final.hosts[0].state == "SUCCEEDED"
        await old.close()
        await new.close()

    asyncio.run(main())


class _Registered:
    """A registry of one worker, for the in-process tests of a link's calls."""

    def get(self, worker_id: str) -> object:
        from agent.scheduler.registry import Worker as Registered

        return Registered(worker_id, "agent", "127.0.0.1:1", 0.0, 0.0)


def _link(max_calls: int = 0) -> tuple[Any, list[pb.LinkDown]]:
    """A link (in process) whose messages down are collected, and its client."""
    from agent.scheduler.links import Links

    sent: list[pb.LinkDown] = []

    async def write(msg: pb.LinkDown) -> None:
        sent.append(msg)

    links = Links(5.0)
    hello = pb.LinkHello(workerID="w1", acceptsCalls=True, maxCalls=max_calls)
    links.open(_Registered(), "agent", "test", hello, write)  # type: ignore[arg-type]
    return links, sent


def test_an_abandoned_output_stream_tells_the_worker_to_cancel() -> None:
    """A caller that stops reading an output stream before its end: LinkCancel for it."""

    async def main() -> None:
        links, sent = _link()
        link = links.get("w1")
        client = links.client("w1")
        assert link is not None and client is not None
        stream = client.stream("j", follow=True).__aiter__()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        (down,) = sent
        assert down.call.method == "StreamJobOutput"
        data = pb.StreamJobOutputRes(data=b"x", offset=0).SerializeToString()
        link.deliver(pb.LinkReply(callID=down.call.callID, response=data))
        assert await first == b"x"
        await stream.aclose()
        await asyncio.sleep(0.01)
        assert sent[-1].cancel.callID == down.call.callID

    asyncio.run(main())


def test_calls_past_the_workers_max_are_refused_at_once() -> None:
    """maxCalls 1: a second call while one is in flight fails RESOURCE_EXHAUSTED; a link
    that closes fails the first UNAVAILABLE."""

    async def main() -> None:
        links, sent = _link(max_calls=1)
        client = links.client("w1")
        link = links.get("w1")
        assert client is not None and link is not None
        first = asyncio.ensure_future(client.query("j"))
        await asyncio.sleep(0.01)
        with pytest.raises(AgentClientError) as e:
            await client.stop("j")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        link.close("cut")
        links.remove(link)
        with pytest.raises(AgentClientError) as e:
            await first
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(sent) == 1  # the refused call never went down

    asyncio.run(main())


def test_the_legacy_listener_answers_link_unimplemented(tmp_path: Path, certs: Certs) -> None:
    """On the plaintext listener a Link is UNIMPLEMENTED: an agent there keeps its
    Heartbeat calls (and a worker without a certificate is never called down a link)."""
    s = SchedulerProcess(tmp_path / "sched", certs)
    legacy_addr = f"127.0.0.1:{free_port()}"
    with open(s.config_path, "a") as f:
        f.write(f'\n[legacy]\naddr = "{legacy_addr}"\n')
    s.start()

    async def main() -> None:
        async with grpc.aio.insecure_channel(legacy_addr) as ch:
            stub = pb_grpc.SchedulerStub(ch)
            res = await stub.RegisterWorker(
                pb.RegisterReq(address=f"127.0.0.1:{free_port()}"), timeout=10
            )
            hello = pb.LinkUp(hello=pb.LinkHello(workerID=res.workerID, acceptsCalls=True))
            never = asyncio.Event()

            async def ups() -> AsyncIterator[pb.LinkUp]:
                yield hello
                await never.wait()  # the link stays open on the worker's side

            call = stub.Link(ups())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(call.read(), 30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            call.cancel()

    try:
        wait_for(lambda: "legacy listener on" in s.log(), timeout=10)
        asyncio.run(main())
    finally:
        s.stop()


def test_links_coming_and_going_are_said_in_one_line_a_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10,000 links opening and half of them breaking make one INFO summary (how many
    are open, opened, closed, the commonest reasons), not a line each; each is at DEBUG."""
    import logging

    from agent.scheduler.linklog import LinkLog

    log = logging.getLogger("agent.scheduler.links")
    state = {"open": 0}

    async def fleet() -> None:
        said = LinkLog(log, lambda: (state["open"], state["open"] - 1), every=0.05)
        for i in range(10_000):
            state["open"] += 1
            said.opened_one(f"w{i}", "ipv4:127.0.0.1:1", accepts_calls=True)
        for i in range(5_000):
            state["open"] -= 1
            said.closed_one(
                f"w{i}", "ipv4:127.0.0.1:1", "broken" if i % 5 else "ended by the worker"
            )
        await asyncio.sleep(0.2)
        said.close()

    with caplog.at_level(logging.DEBUG, logger="agent.scheduler.links"):
        asyncio.run(fleet())
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == [
        "worker links: 5000 open (4999 accept calls); 10000 opened and 5000 closed in the "
        "last 0 s "
        "(4000 broken, 1000 ended by the worker)"
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 15_000
