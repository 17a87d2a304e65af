"""The agent's side of the keeper without a keeper: the keeper's messages read into
values (agent.daemon.keeperwire), the reports sent where they belong and what a dead
keeper leaves (agent.daemon.keeperreports), and the count of a helper's deaths
(agent.keeper.spawn.Deaths). The real keeper behind them: test_keeper_protocol.py,
test_keeper_survival.py, test_keeper_adopt.py."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.keeperreports import KEEPER_DIED, Outstanding
from agent.daemon.keeperwire import (
    PROTOCOL,
    Admission,
    Finished,
    hello_from_wire,
    refusal,
)
from agent.keeper.cgroups import Subtree
from agent.keeper.errors import AgentError, PermissionDenied, SpawnFailure
from agent.keeper.spawn import Deaths
from agent.vocabulary import JobState, Kind

EXIT = {"code": 0, "signal": None, "utime": 0.5, "stime": 0.25, "maxrss": 1024, "ended": 7.0}
ADMITTED = {"command": "/bin/true", "timeout": 60, "limits": {"cpu_seconds": 5}, "entry": "t"}


def finished(job_id: str, **more: Any) -> dict[str, Any]:
    """A "finished" report as the keeper sends it."""
    msg = {"op": "finished", "job": job_id, "state": "SUCCEEDED", "text": "exit status 0"}
    return msg | {"exit": EXIT, "size": 3, "truncated": False} | more


def hello(**more: Any) -> dict[str, Any]:
    """A keeper's hello, one job running and one ended."""
    kept = {"job": "j1", "pid": 41, "size": 5, "truncated": True, "ending": False, "record": {}}
    msg = {"op": "hello", "protocol": PROTOCOL, "pid": 40, "spawn": "vfork", "why": "w"}
    return msg | {"jobs": [kept], "ended": [finished("j2")]} | more


# ---------------------------------------------------------------- the keeper's messages


def test_a_hello_is_read_into_its_jobs_and_ends() -> None:
    h = hello_from_wire(hello(uid=0, service=True), fresh=True)
    assert (h.pid, h.spawn, h.fresh) == (40, "vfork", True)
    assert (h.service, h.uid, h.cgroups) == (True, 0, None)
    (kept,) = h.jobs
    assert (kept.job_id, kept.pid, kept.size) == ("j1", 41, 5)
    assert kept.truncated and not kept.ending
    (fin,) = h.ended
    assert fin.job_id == "j2" and fin.state is JobState.SUCCEEDED and fin.exit.end_time == 7.0
    where = {"jobs": "/sys/fs/cgroup/k/jobs", "controllers": ["pids", "memory"]}
    h = hello_from_wire(hello(cgroups=where), fresh=False)
    assert h.cgroups == Subtree(Path("/sys/fs/cgroup/k/jobs"), frozenset({"pids", "memory"}))
    assert (h.service, h.uid) == (False, -1)


@pytest.mark.parametrize("bad", [{"protocol": PROTOCOL + 1}, {"op": "started"}])
def test_a_hello_of_another_protocol_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(OSError) as e:
        hello_from_wire(hello(**bad), fresh=False)
    assert e.value.errno == errno.EPROTO


def test_a_malformed_hello_raises_what_attach_catches() -> None:
    msg = hello()
    del msg["jobs"][0]["pid"]
    with pytest.raises(KeyError):
        hello_from_wire(msg, fresh=False)


def test_a_refusal_is_raised_as_its_kind_and_an_unknown_kind_as_internal() -> None:
    e = refusal({"kind": "PERMISSION_DENIED", "rule": "r", "message": "no"})
    assert isinstance(e, PermissionDenied) and (e.rule, str(e)) == ("r", "no")
    e = refusal({"kind": "SOMETHING_ELSE"})
    assert type(e) is AgentError and e.kind is Kind.INTERNAL
    assert str(e) == "refused by the job keeper"


def test_a_finished_report_keeps_what_the_record_needs() -> None:
    fin = Finished.from_wire(finished("j", persist=False, start_failure="exec", record={"a": 1}))
    assert (fin.size, fin.truncated, fin.persist, fin.record) == (3, False, False, {"a": 1})
    assert (fin.exit.exit_code, fin.exit.max_rss, fin.exit.start_failure) == (0, 1024, "exec")
    with pytest.raises(KeyError):
        Finished.from_wire({"job": "j", "state": "NO_SUCH_STATE", "exit": EXIT})


# ---------------------------------------------------------------- the reports


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def on_output(self, size: int, truncated: bool) -> None:
        self.got.append(("output", (size, truncated)))

    def on_ending(self) -> None:
        self.got.append(("ending", None))

    def on_finished(self, fin: Finished) -> None:
        self.got.append(("finished", fin))


class Stops:
    def __init__(self) -> None:
        self.stops: list[tuple[str, str]] = []

    def stop(self, job_id: str, how: str) -> None:
        self.stops.append((job_id, how))


def run(body: Callable[[Outstanding, Stops], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        stops = Stops()
        out = Outstanding(stops, None, None)
        out.loop = asyncio.get_running_loop()
        await body(out, stops)

    asyncio.run(main())


def start(out: Outstanding, rid: int, job_id: str, sink: Sink) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    admitted: asyncio.Future[Admission] = loop.create_future()
    started: asyncio.Future[int] = loop.create_future()
    out.add_start(rid, admitted, started, job_id, sink)
    return admitted, started


def test_a_start_is_admitted_started_and_its_reports_reach_its_sink() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        sink = Sink()
        admitted, started = start(out, 1, "j", sink)
        out.dispatch({"op": "admitted", "id": 1} | ADMITTED)
        adm = admitted.result()
        assert (adm.command, adm.timeout, adm.entry) == ("/bin/true", 60, "t")
        assert adm.limits == {"cpu_seconds": 5}
        out.dispatch({"op": "started", "id": 1, "pid": 99})
        assert started.result() == 99 and out.pids == {"j": 99}
        out.dispatch({"op": "output", "jobs": [["j", 7, True], ["other", 1, False]]})
        out.dispatch({"op": "ending", "job": "j"})
        out.dispatch(finished("j"))
        assert sink.got == [("output", (7, True)), ("ending", None)]  # the end comes later
        await asyncio.sleep(0)
        assert sink.got[-1][0] == "finished" and out.pids == {} and out.sinks == {}
        assert stops.stops == []

    run(body)


def test_a_refused_start_raises_the_refusal() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        admitted, _ = start(out, 1, "j", Sink())
        out.dispatch({"op": "refused", "id": 1, "kind": "NOT_FOUND", "message": "no entry"})
        with pytest.raises(AgentError, match="no entry"):
            admitted.result()
        with pytest.raises(KeyError):  # answered: not waiting any more
            out.dispatch({"op": "started", "id": 1, "pid": 5})

    run(body)


def test_a_bad_admission_fails_the_start_and_stops_the_job_once_started() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        admitted, started = start(out, 1, "j", Sink())
        out.dispatch({"op": "admitted", "id": 1, "command": "/bin/true"})
        with pytest.raises(SpawnFailure, match="bad admission"):
            admitted.result()
        assert started.cancelled()
        out.dispatch({"op": "started", "id": 1, "pid": 5})
        assert stops.stops == [("j", "not_recorded")] and out.sinks == {}

    run(body)


def test_a_start_cancelled_before_its_answer_is_stopped_unseen() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        admitted, started = start(out, 1, "j", Sink())
        admitted.cancel()
        out.dispatch({"op": "admitted", "id": 1} | ADMITTED)
        assert started.cancelled()
        out.dispatch({"op": "started", "id": 1, "pid": 5})
        assert stops.stops == [("j", "not_recorded")]

    run(body)


def test_a_failed_spawn_fails_the_start_with_its_errno() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        _, started = start(out, 1, "j", Sink())
        out.dispatch({"op": "admitted", "id": 1} | ADMITTED)
        out.dispatch({"op": "started", "id": 1, "errno": errno.ENOEXEC, "error": "exec: x"})
        with pytest.raises(SpawnFailure) as e:
            started.result()
        assert e.value.errno == errno.ENOEXEC and out.pids == {}
        # Failed before any admission: the admission is what fails (its start is unseen).
        admitted, started = start(out, 2, "k", Sink())
        out.dispatch({"op": "started", "id": 2, "error": "no"})
        with pytest.raises(SpawnFailure) as e:
            admitted.result()
        assert e.value.errno == errno.EIO and not started.done()

    run(body)


def test_an_end_nobody_holds_is_recorded_unless_it_is_not_to_be_kept() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        unknown: list[str] = []
        out.on_unknown_finished = lambda fin: unknown.append(fin.job_id)
        out.dispatch(finished("a"))
        out.dispatch(finished("b", persist=False))
        out.dispatch({"op": "no-such-op"})  # said, and nothing else
        await asyncio.sleep(0)
        assert unknown == ["a"]

    run(body)


def test_a_dead_keeper_fails_what_waits_and_loses_what_no_new_keeper_holds() -> None:
    async def body(out: Outstanding, stops: Stops) -> None:
        waiting, _ = start(out, 1, "w", Sink())
        reload: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        out.add_reload(2, reload)
        held, gone, ended = Sink(), Sink(), Sink()
        for job_id, sink in (("held", held), ("gone", gone), ("ended", ended)):
            out.sinks[job_id] = sink
        out.fail_waiting("the job keeper died", kill=True)
        with pytest.raises(SpawnFailure, match="the job keeper died"):
            waiting.result()
        with pytest.raises(OSError, match="the job keeper died"):
            reload.result()
        kept = {"job": "held", "pid": 0, "size": 9, "truncated": False, "ending": True}
        new = hello(jobs=[kept | {"record": {}}], ended=[finished("ended")])
        out.readopt(hello_from_wire(new, fresh=True))
        assert held.got == [("output", (9, False)), ("ending", None)]
        await asyncio.sleep(0)
        assert ended.got[0][1].state is JobState.SUCCEEDED
        ((_, fin),) = gone.got
        assert fin.state is JobState.FAILED and fin.text == fin.exit.lost == KEEPER_DIED
        assert list(out.sinks) == ["held"]
        out.lose()
        await asyncio.sleep(0)
        assert held.got[-1][1].text == KEEPER_DIED and out.sinks == {}

    run(body)


# ---------------------------------------------------------------- deaths


def test_deaths_are_too_many_past_the_most_within_the_window() -> None:
    deaths = Deaths(3, 60.0)
    assert [deaths.count(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert deaths.count(3.0) is False and deaths.recent == 4
    # Those at 0, 1 and 2 s left the window: this one is the second within it.
    assert deaths.count(62.5) is True and deaths.recent == 2
