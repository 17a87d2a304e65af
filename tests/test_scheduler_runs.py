"""The run executor against stand-in agents (no processes): the start recorded before it
is sent, concurrency, the error budget, cancel, unreachable workers, labelled lines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent.client import AgentClientError, JobStatus, PermissionDenied, Unavailable
from agent.scheduler import runs as runs_module
from agent.scheduler import takeover
from agent.scheduler.registry import Registry, Worker
from agent.scheduler.runs import ActiveRun, HostChange, OutputLine, RunEnded, RunManager
from agent.scheduler.store import SQLiteStore
from agent.vocabulary import HostState, RunState


class Agents:
    """Stand-ins for the agents of a fleet: what each does, and what they saw."""

    def __init__(self, store: SQLiteStore) -> None:
        # What the agents see stored is read over a connection of its own: only what
        # is committed (the store itself would commit its queue before reading).
        self.store = SQLiteStore(store.path)
        self.end_status = False  # agents send the job's status at the end of its stream
        self.waits = 0  # WaitJob calls
        self.run_id = ""
        self.fail: set[str] = set()  # addresses whose job exits 1
        self.down: set[str] = set()  # addresses that cannot be reached
        self.refuse: set[str] = set()  # addresses whose agent refuses the job
        self.hold = False  # jobs run until stopped
        self.running = 0
        self.peak = 0
        self.started: list[str] = []
        self.stored_at_send: list[HostState] = []
        self.stopped: set[str] = set()
        self.released = asyncio.Event()
        self.starting = 0  # StartJob calls in flight
        self.starting_peak = 0
        self.start_delay = 0.0
        self.one_call = True  # agents know StartJobStream (else UNIMPLEMENTED)
        self.one_calls = 0  # StartJobStream calls
        self.late: set[str] = set()  # addresses that start the job, then answer late_by later
        self.late_by = 0.0
        self.lost: set[str] = set()  # addresses whose start never arrives (no answer)
        self.lost_once: set[str] = set()  # ... only the first time it is sent
        self.sent: list[str] = []  # each start sent, by address
        self.keys: dict[str, str] = {}  # the requestKey of each address's job

    def client(self, w: Worker) -> Any:
        return Agent(self, w.address)


class Agent:
    def __init__(self, fleet: Agents, address: str) -> None:
        self.fleet = fleet
        self.address = address

    async def start_pb(self, req: pb.StartJobReq, *, timeout: float | None = None) -> str:
        f = self.fleet
        rec = f.store.run(f.run_id)
        assert rec is not None
        [h] = [h for h in rec.hosts if h.address == self.address]
        f.stored_at_send.append(h.state)
        if self.address in f.down:
            raise Unavailable("connection refused")
        f.sent.append(self.address)
        if self.address in f.lost_once:
            f.lost_once.discard(self.address)
            await asyncio.sleep(3600)
        if self.address in f.lost:
            await asyncio.sleep(3600)
        if f.start_delay:
            f.starting += 1
            f.starting_peak = max(f.starting_peak, f.starting)
            await asyncio.sleep(f.start_delay)
            f.starting -= 1
        if self.address in f.refuse:
            raise PermissionDenied("not in the policy")
        f.started.append(self.address)
        f.running += 1
        f.peak = max(f.peak, f.running)
        f.keys[self.address] = req.requestKey
        if self.address in f.late:
            await asyncio.sleep(f.late_by)  # started; the answer is on its way
            for _ in range(5):
                await asyncio.sleep(0)  # through the channel: a few turns of the loop
        return f"job@{self.address}"

    async def list_all(self, **_: Any) -> AsyncIterator[JobStatus]:
        if self.address in self.fleet.keys:
            yield _listed(f"job@{self.address}", self.fleet.keys[self.address], time.time())

    async def start_stream(
        self, req: pb.StartJobReq, *, timeout: float | None = None
    ) -> AsyncIterator[str | bytes | JobStatus]:
        if not self.fleet.one_call:
            raise AgentClientError("unknown method", grpc.StatusCode.UNIMPLEMENTED)
        self.fleet.one_calls += 1
        job_id = await self.start_pb(req)
        yield job_id
        async for item in self.stream_to_end(job_id):
            yield item

    async def stream(self, job_id: str, *, follow: bool = False) -> AsyncIterator[bytes]:
        for chunk in (b"one\ntw", b"o\nthree"):
            await asyncio.sleep(0)
            yield chunk

    async def stream_to_end(self, job_id: str) -> AsyncIterator[bytes | JobStatus]:
        async for chunk in self.stream(job_id, follow=True):
            yield chunk
        if self.fleet.end_status:
            yield await self._end()

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        self.fleet.waits += 1
        return await self._end()

    async def _end(self) -> JobStatus:
        f = self.fleet
        if f.hold:
            while self.address not in f.stopped:
                await asyncio.sleep(0.005)
        else:
            await asyncio.sleep(0.01)
        f.running -= 1
        if self.address in f.stopped:
            return _status("STOPPED", None)
        return _status("FAILED", 1) if self.address in f.fail else _status("SUCCEEDED", 0)

    async def stop(self, job_id: str, *, timeout: float | None = None) -> None:
        self.fleet.stopped.add(self.address)


def _status(state: str, code: int | None) -> JobStatus:
    m = pb.QueryJobRes(done=True, error=state != "SUCCEEDED", state=state)
    if code is not None:
        m.exitCode = code
    return JobStatus.from_pb(m)


def _setup(tmp_path: Path, n: int) -> tuple[RunManager, Agents, list[Worker]]:
    store = SQLiteStore(tmp_path / "s.db")
    reg = Registry(60, store=store)
    workers = [reg.register("agent", f"10.0.0.{i}:1") for i in range(n)]
    agents = Agents(store)
    return RunManager(store, reg, agents.client, 1.0), agents, workers


def _start(
    m: RunManager, agents: Agents, workers: list[Worker], concurrency: int, budget: int
) -> ActiveRun:
    job = pb.StartJobReq(command="true")
    run = m.start("admin", job, job, b"", workers, concurrency, budget)
    agents.run_id = run.record.run_id
    return run


async def _done(run: ActiveRun) -> list[HostState]:
    assert run.task is not None
    await asyncio.wait_for(run.task, 10)
    return [h.state for h in run.record.hosts]


def test_each_start_is_recorded_before_it_is_sent_and_after(tmp_path: Path) -> None:
    """When StartJob leaves, the store already says STARTING; once answered, RUNNING with the
    job id; at the end, the result. Lines are labelled with their host, split at newlines."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        run = _start(m, agents, workers, 3, 0)
        assert await _done(run) == [HostState.SUCCEEDED] * 3
        assert agents.stored_at_send == [HostState.STARTING] * 3
        assert agents.waits == 3
        states = [e.host.state for e in run.events if isinstance(e, HostChange)]
        assert states.count(HostState.RUNNING) == 3
        rec = m.store.run(run.record.run_id)
        assert rec is not None and rec.state is RunState.DONE
        assert [h.job_id for h in rec.hosts] == [f"job@{w.address}" for w in workers]
        lines = [(e.host, e.line) for e in run.events if isinstance(e, OutputLine)]
        assert sorted(lines) == sorted(
            (w.address, x) for w in workers for x in (b"one", b"two", b"three")
        )
        assert isinstance(run.events[-1], RunEnded)

    asyncio.run(main())


def test_a_status_at_the_end_of_the_stream_saves_the_wait(tmp_path: Path) -> None:
    """An agent that ends the output stream with the job's status is not asked WaitJob;
    the results are the same (an older agent's hosts are asked, as in the test above)."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        agents.end_status = True
        agents.fail.add(workers[1].address)
        run = _start(m, agents, workers, 3, 3)
        states = await _done(run)
        assert states == [HostState.SUCCEEDED, HostState.FAILED, HostState.SUCCEEDED]
        assert agents.waits == 0
        assert [h.exit_code for h in run.record.hosts] == [0, 1, 0]
        lines = [e.line for e in run.events if isinstance(e, OutputLine)]
        assert len(lines) == 9

    asyncio.run(main())


@pytest.mark.parametrize("concurrency", [1, 2, 5])
def test_never_more_at_once_than_the_concurrency(tmp_path: Path, concurrency: int) -> None:
    """The stand-ins count the jobs in flight: the peak is exactly the concurrency."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 5)
        assert await _done(_start(m, agents, workers, concurrency, 0)) == [HostState.SUCCEEDED] * 5
        assert agents.peak == concurrency

    asyncio.run(main())


def test_past_the_budget_nothing_new_starts(tmp_path: Path) -> None:
    """One error tolerated, one at a time: the second failure ends the starts."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 5)
        agents.fail = {workers[0].address}
        agents.refuse = {workers[2].address}
        states = await _done(_start(m, agents, workers, 1, 1))
        assert states == [
            HostState.FAILED,
            HostState.SUCCEEDED,
            HostState.FAILED,
            HostState.NOT_STARTED,
            HostState.NOT_STARTED,
        ]
        h = m.store.run(agents.run_id).hosts  # type: ignore[union-attr]
        assert h[0].exit_code == 1 and "PERMISSION_DENIED" in h[2].error
        assert h[3].error == "past the error budget"

    asyncio.run(main())


def test_start_calls_in_flight_are_paced_and_a_waiting_host_respects_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_STARTS StartJob calls at once, whatever the concurrency; a host still
    waiting for a start slot when the budget is spent is not started."""
    monkeypatch.setattr(runs_module, "MAX_STARTS", 2)

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 6)
        agents.start_delay = 0.01
        assert await _done(_start(m, agents, workers, 6, 0)) == [HostState.SUCCEEDED] * 6
        assert agents.starting_peak == 2
        m, agents, workers = _setup(tmp_path / "b", 6)
        agents.start_delay = 0.01
        # StartJob (the fake's fails at once; its StartJobStream one loop turn later).
        m.one_call_lacking = {w.worker_id for w in workers}
        agents.down = {workers[0].address}
        states = await _done(_start(m, agents, workers, 6, 0))
        # The run hands all six hosts to the start slots at once; the first fails
        # before any other is sent, and none of the others is sent after that.
        assert states == [HostState.UNREACHABLE] + [HostState.NOT_STARTED] * 5
        assert agents.started == []

    asyncio.run(main())


def test_unreachable_counts_against_the_budget(tmp_path: Path) -> None:
    """A worker that cannot be reached, or is no longer registered, is UNREACHABLE and an
    error: with none tolerated, nothing starts after it."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        agents.down = {workers[0].address}
        states = await _done(_start(m, agents, workers, 1, 0))
        assert states == [HostState.UNREACHABLE, HostState.NOT_STARTED, HostState.NOT_STARTED]
        m2, agents2, workers2 = _setup(tmp_path / "b", 2)
        assert m2.registry.deregister(workers2[1].worker_id, "agent")
        states = await _done(_start(m2, agents2, workers2, 2, 5))
        assert states == [HostState.SUCCEEDED, HostState.UNREACHABLE]
        assert m2.store.run(agents2.run_id).hosts[1].error == "no longer registered"  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_start_answered_after_its_deadline_is_followed_not_left_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start's answer can come after its deadline: a slow worker, or this scheduler's own
    loop held past it (a blocking store call: an etcd election). Its job runs: the host is
    found by its key and followed to its end, started once, not UNREACHABLE with its job
    unfollowed. A start the worker never got (a held loop may not even have sent it) is
    sent once more, with the same key; never got twice, UNREACHABLE. One whose worker
    cannot be asked about it is UNREACHABLE with both reasons."""
    monkeypatch.setattr(takeover, "SETTLE_S", 0.05)

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        m.call_timeout = 0.2
        addr = [w.address for w in workers]
        agents.late, agents.late_by, agents.lost = {addr[0]}, 0.5, {addr[1]}
        assert await _done(_start(m, agents, workers, 3, 5)) == [
            HostState.SUCCEEDED,
            HostState.UNREACHABLE,
            HostState.SUCCEEDED,
        ]
        rec = m.store.run(agents.run_id)
        assert rec is not None and rec.hosts[0].job_id == f"job@{addr[0]}"
        assert rec.hosts[1].error == "DEADLINE_EXCEEDED: no answer to the start"
        assert sorted(agents.started) == [addr[0], addr[2]]
        assert sorted(agents.sent) == [addr[0], addr[1], addr[1], addr[2]]
        assert agents.keys[addr[0]] == f"{agents.run_id}/{workers[0].worker_id}"
        # The first start lost on its way, the second answered: started once, followed.
        agents.started, agents.keys, agents.sent, agents.lost = [], {}, [], set()
        agents.lost_once, agents.late = {addr[1]}, set()
        assert await _done(_start(m, agents, workers, 3, 5)) == [HostState.SUCCEEDED] * 3
        assert sorted(agents.started) == sorted(addr) and agents.sent.count(addr[1]) == 2
        job = m.store.run(agents.run_id).hosts[1].job_id  # type: ignore[union-attr]
        assert job == f"job@{addr[1]}"
        # The loop itself held past the deadline while the answer came (0.05 s in).
        agents.started, agents.keys, agents.lost, agents.late_by = [], {}, set(), 0.05
        agents.sent = []
        agents.late = set(addr)
        run = _start(m, agents, workers, 3, 5)
        asyncio.get_running_loop().call_later(0.02, time.sleep, 0.6)
        assert await _done(run) == [HostState.SUCCEEDED] * 3
        assert sorted(agents.started) == sorted(addr)
        # No answer, and ListJobs fails too.
        agents.started, agents.keys, agents.lost = [], {}, {addr[0]}

        async def unlistable(**_: Any) -> AsyncIterator[JobStatus]:
            raise Unavailable("connection refused")
            yield

        monkeypatch.setattr(Agent, "list_all", lambda self, **kw: unlistable(**kw))
        assert (await _done(_start(m, agents, workers, 3, 5)))[0] is HostState.UNREACHABLE
        error = m.store.run(agents.run_id).hosts[0].error  # type: ignore[union-attr]
        assert error.startswith("DEADLINE_EXCEEDED: no answer to the start; nor could"), error

    asyncio.run(main())


def test_cancel_stops_the_running_and_starts_nothing_more(tmp_path: Path) -> None:
    """Two running of four: cancel stops both, the other two never start."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 4)
        agents.hold = True
        run = _start(m, agents, workers, 2, 0)
        while agents.running < 2:
            await asyncio.sleep(0.005)
        m.cancel(run)
        states = await _done(run)
        assert states == [HostState.FAILED] * 2 + [HostState.NOT_STARTED] * 2
        assert agents.started == [w.address for w in workers[:2]]
        assert run.record.state is RunState.CANCELLED

    asyncio.run(main())


def test_a_follower_sees_every_event_from_the_start(tmp_path: Path) -> None:
    """A follower that arrives late still reads the run from its first event to its end."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 2)
        run = _start(m, agents, workers, 1, 0)
        early = asyncio.ensure_future(_collect(run))
        await _done(run)
        late = await _collect(run)
        assert await early == late and isinstance(late[-1], RunEnded)

    asyncio.run(main())


def test_a_follower_in_batches_sees_the_same_events_at_most_a_batch_at_once(
    tmp_path: Path,
) -> None:
    """Batches hold the events in order, each about max_bytes at most (one event at least)."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 4)
        run = _start(m, agents, workers, 4, 0)
        await _done(run)
        batches = [b async for b in run.follow_batches(max_bytes=1)]
        assert [e for b in batches for e in b] == await _collect(run)
        assert {len(b) for b in batches} == {1}
        batches = [b async for b in run.follow_batches(max_bytes=700)]
        assert [e for b in batches for e in b] == await _collect(run)
        assert 1 < len(batches) < len(run.events)
        assert [len(b) for b in [b async for b in run.follow_batches()]] == [len(run.events)]

    asyncio.run(main())


async def _collect(run: ActiveRun) -> list[object]:
    return [e async for e in run.follow()]


def test_a_run_left_by_close_is_resumed_by_the_next_manager(tmp_path: Path) -> None:
    """The scheduler stops mid-run: the run stays RUNNING as recorded (the started host
    RUNNING with its job id, the rest PENDING); the next process resumes it (SQLite): the
    running job followed to its end, never started again, the others started once each."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        agents.hold = True
        run = _start(m, agents, workers, 1, 0)
        while agents.running < 1:
            await asyncio.sleep(0.005)
        await m.close()
        rec = m.store.run(run.record.run_id)
        assert rec is not None and rec.state is RunState.RUNNING
        assert [h.state for h in rec.hosts] == [HostState.RUNNING] + [HostState.PENDING] * 2
        assert rec.hosts[0].job_id == f"job@{workers[0].address}"
        agents.hold = False
        again = RunManager(m.store, m.registry, agents.client, 1.0)
        resumed = again.adopt(rec, resumed=True)
        assert await _done(resumed) == [HostState.SUCCEEDED] * 3
        assert agents.started == [w.address for w in workers]
        got = m.store.run(run.record.run_id)
        assert got is not None and got.state is RunState.DONE
        assert got.hosts[0].job_id == f"job@{workers[0].address}"

    asyncio.run(main())


def test_a_cancelled_run_left_by_close_starts_nothing_more(tmp_path: Path) -> None:
    """Cancelled, then the scheduler stops before the run ended: its hosts not started are
    NOT_STARTED at once, so a resume (or a takeover) starts none of them; the cancel is in
    the store, so the resumed run stays cancelled and ends CANCELLED."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        agents.hold = True
        run = _start(m, agents, workers, 1, 0)
        while agents.running < 1:
            await asyncio.sleep(0.005)
        m.cancel(run)
        await m.close()
        rec = m.store.run(run.record.run_id)
        assert rec is not None
        assert [h.state for h in rec.hosts] == [HostState.RUNNING] + [HostState.NOT_STARTED] * 2
        assert rec.hosts[1].error == "cancelled"
        agents.stopped.add(workers[0].address)  # the stop the cancel sent has arrived
        assert m.store.cancel_requests() == {run.record.run_id}
        resumed = RunManager(m.store, m.registry, agents.client, 1.0).adopt(rec, resumed=True)
        await _done(resumed)
        assert agents.started == [workers[0].address]
        assert resumed.record.state is RunState.CANCELLED

    asyncio.run(main())


class _Listing:
    """A worker's ListJobs as resolve_starting reads it (the client's list_all)."""

    def __init__(self, jobs: list[JobStatus]) -> None:
        self.jobs = jobs

    async def list_all(self, **_: Any) -> AsyncIterator[JobStatus]:
        for j in self.jobs:
            yield j


def _listed(job_id: str, key: str, started: float) -> JobStatus:
    import datetime

    return JobStatus(
        job_id, "RUNNING", False, False, "", None, None, 1, "scheduler", "/bin/bash",
        "x.sh", ("a",), datetime.datetime.fromtimestamp(started, datetime.timezone.utc),
        None, 0.0, 0.0, 0, 0, False, 0, request_key=key,
    )  # fmt: skip


def test_a_takeover_finds_a_host_by_its_key_on_an_agent_that_knows_keys() -> None:
    """Two jobs of the same path and arguments since the start (a heuristic match finds
    both: UNKNOWN, not sent again): the host's key picks its own exactly; a job with
    another key is never the host's (not received: sent again, with the same key). Jobs
    without a key (an older owner's, or an agent without keys) are matched as before."""
    from agent.scheduler.takeover import NOT_RECEIVED, host_key, resolve_starting

    job = pb.StartJobReq(command="bash", path="x.sh", args=["a"])
    key = host_key("run", "w1")
    mine, other = _listed("j1", key, 100.0), _listed("j2", host_key("run", "w2"), 100.0)

    def resolve(jobs: list[JobStatus], k: str = key) -> tuple[str, str]:
        return asyncio.run(resolve_starting(_Listing(jobs), job, 100.0, 0.0, k))  # type: ignore[arg-type]

    assert resolve([other, mine]) == ("j1", "")
    assert resolve([other]) == ("", NOT_RECEIVED)
    unkeyed = [_listed("j1", "", 100.0), _listed("j2", "", 100.0)]
    assert resolve(unkeyed)[0] == "" and "2 jobs match" in resolve(unkeyed)[1]
    assert resolve(unkeyed[:1]) == ("j1", "")
    # A start without a key (an older owner's) beside other hosts' keyed jobs: found.
    assert resolve([other, unkeyed[0]]) == ("j1", "")


def test_one_call_a_host_and_start_job_for_a_worker_without_it(tmp_path: Path) -> None:
    """Workers that know StartJobStream get one call a host (the job id, its output, its
    status); one that answers UNIMPLEMENTED gets StartJob and a stream, and is not asked
    the one call again in the next run."""

    async def main() -> None:
        m, agents, workers = _setup(tmp_path, 3)
        agents.end_status = True
        assert await _done(_start(m, agents, workers, 3, 0)) == [HostState.SUCCEEDED] * 3
        assert agents.one_calls == 3 and agents.waits == 0
        agents.one_call = False
        assert await _done(_start(m, agents, workers, 3, 0)) == [HostState.SUCCEEDED] * 3
        assert m.one_call_lacking == {w.worker_id for w in workers}
        assert agents.one_calls == 3 and len(agents.started) == 6

    asyncio.run(main())
