"""What every client call sends, how it is retried and what it returns (agent.client._calls).

Both clients (sync and asyncio) only carry out these Call values, so the rule that a
start is never retried, and the retry budget within a deadline, are pinned here once
for both; the clients against real agents and a real scheduler are
tests/test_scheduler.py and tests/test_agentctl.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent.client import (
    STATES,
    AgentClientError,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    TLSFiles,
    Unavailable,
    _calls,
)
from agent.client.errors import convert
from agent.vocabulary import LIMITS, JobState


class _RpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    """A failed call as grpc raises it, without a channel."""

    def __init__(self, code: grpc.StatusCode, details: str = "gone") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_only_calls_safe_to_repeat_are_retried() -> None:
    """StartJob, RunJob and DispatchStartJob never retry; query/stop/wait/list/dispatch do."""
    req = _calls.start_request("true", "")
    never: list[_calls.Call[Any]] = [
        _calls.start(req, 1),
        _calls.run(req, 1),
        _calls.dispatch_start("w", req, 1),
    ]
    safe: list[_calls.Call[Any]] = [
        _calls.query("j", 1),
        _calls.query_pb("j", 1),
        _calls.stop("j", 1),
        _calls.wait("j", 1),
        _calls.list_page((), "", 0, "", 1),
        _calls.list_workers(1),
        _calls.dispatch_query("w", "j", 1),
        _calls.dispatch_stop("w", "j", 1),
    ]
    assert [c.retry for c in never] == [False] * 3
    assert all(c.retry for c in safe)
    assert _calls.wait("j", 5).timeout == 5 + _calls.WAIT_MARGIN_S  # deadline past the wait


def test_attempts_retry_unavailable_within_the_deadline_only() -> None:
    """One attempt without a policy; UNAVAILABLE retried until attempts or deadline end."""
    unavailable = _RpcError(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(Unavailable):
        _calls.Attempts(None, 10).after(unavailable)
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.02)
    a = _calls.Attempts(policy, 10)
    assert 0 <= a.after(unavailable) <= 0.01
    assert 0 <= a.after(unavailable) <= 0.02
    with pytest.raises(Unavailable):
        a.after(unavailable)  # attempts used up
    with pytest.raises(NotFound):
        _calls.Attempts(policy, 10).after(_RpcError(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(Unavailable):  # a delay that would pass the deadline is not slept
        _calls.Attempts(RetryPolicy(initial=5.0, maximum=5.0), 0.0).after(unavailable)
    remaining = _calls.Attempts(policy, 10).remaining()
    assert remaining is not None and 9 < remaining <= 10
    assert _calls.Attempts(policy, None).remaining() is None


def test_errors_are_named_after_the_status() -> None:
    """A status without its own class keeps its code in AgentClientError."""
    assert isinstance(convert(_RpcError(grpc.StatusCode.PERMISSION_DENIED)), PermissionDenied)
    e = convert(_RpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(e) is AgentClientError and e.code is grpc.StatusCode.INTERNAL
    assert str(e) == "internal: boom"


def test_requests_take_names_from_the_vocabulary() -> None:
    """Limit and state names come from agent.vocabulary; unknown ones are ValueError."""
    req = _calls.start_request("true", "", limits={lim.name: i + 1 for i, lim in enumerate(LIMITS)})
    assert [getattr(req.limits, lim.wire) for lim in LIMITS] == list(range(1, len(LIMITS) + 1))
    with pytest.raises(ValueError, match="unknown limit"):
        _calls.start_request("true", "", limits={"bogus": 1})
    assert list(_calls.list_request(["running", "LOST"]).states) == [
        JobState.RUNNING.value,
        JobState.LOST.value,
    ]
    with pytest.raises(ValueError, match="unknown job state"):
        _calls.list_request(["sleeping"])
    assert {s.value: s.name for s in JobState} == STATES


def test_start_request_carries_every_field() -> None:
    """Arguments, environment, secret indexes and the timeout land in their wire fields;
    no timeout leaves the optional field unset (the agent's default applies)."""
    req = _calls.start_request(
        "bash", "/x.sh", ["a"], {"K": "v"}, timeout_seconds=5, secret_args=[0]
    )
    assert (req.command, req.path, req.timeoutSeconds) == ("bash", "/x.sh", 5)
    assert list(req.args) == ["a"] and dict(req.env) == {"K": "v"} and list(req.secretArgs) == [0]
    assert not _calls.start_request("true", "").HasField("timeoutSeconds")
    assert not _calls.start_request("true", "").HasField("limits")


def test_output_stream_resumes_from_the_last_byte() -> None:
    """After chunks are accepted, the next request starts where they ended."""
    s = _calls.OutputStream("j", 5, True, None)
    assert s.request().offset == 5

    class Chunk:
        offset = 5
        data = b"abc"

    assert s.accept(Chunk()) == b"abc"
    assert s.request().offset == 8 and s.request().follow
    assert _calls.stream_timeout(None, True, 30) is None
    assert _calls.stream_timeout(None, False, 30) == 30
    assert _calls.stream_timeout(2, True, 30) == 2


def test_channel_spec_needs_tls_unless_insecure() -> None:
    """No TLS files and not insecure: ValueError; insecure: plaintext with the options."""
    with pytest.raises(ValueError, match="tls is required"):
        _calls.channel_spec("127.0.0.1:1", None)
    spec = _calls.channel_spec("127.0.0.1:1", None, insecure=True, options=[("x", 1)])
    assert spec.credentials is None and ("x", 1) in spec.options
    assert spec.address == "127.0.0.1:1"


class _Msg:
    """A received output chunk."""

    def __init__(self, offset: int, data: bytes) -> None:
        self.offset, self.data = offset, data


def test_each_call_names_its_method_request_and_deadline() -> None:
    """Every call goes to its own RPC with the ids it was given and the caller's timeout."""
    req = _calls.start_request("true", "")
    start, run, dispatch = (
        _calls.start(req, 3),
        _calls.run(req, 4),
        _calls.dispatch_start("w", req, 5),
    )
    assert (start.method, start.request, start.timeout) == ("StartJob", req, 3)
    assert (run.method, run.request, run.timeout) == ("RunJob", req, 4)
    assert dispatch.method == "DispatchStartJob" and dispatch.timeout == 5
    assert (dispatch.request.workerID, dispatch.request.job) == ("w", req)
    for call, method in (
        (_calls.query("j", 2), "QueryJob"),
        (_calls.query_pb("j", 2), "QueryJob"),
        (_calls.stop("j", 2), "StopJob"),
    ):
        assert (call.method, call.request.jobID, call.timeout) == (method, "j", 2)
    for call, method in (
        (_calls.dispatch_query("w", "j", 2), "DispatchQueryJob"),
        (_calls.dispatch_stop("w", "j", 2), "DispatchStopJob"),
    ):
        assert (call.method, call.request.workerID, call.request.jobID) == (method, "w", "j")
    listing = _calls.list_page(["FAILED"], "bob", 7, "tok", 2)
    assert listing.method == "ListJobs"
    assert (list(listing.request.states), listing.request.owner) == ([JobState.FAILED.value], "bob")
    assert (listing.request.pageSize, listing.request.pageToken) == (7, "tok")
    assert _calls.list_workers(2).method == "ListWorkers"


def test_wait_asks_the_agent_for_at_least_a_millisecond() -> None:
    """WaitJob's waitMillis is the timeout in ms, never 0 (0 would mean "until done")."""
    assert _calls.wait("j", 1.5).request.waitMillis == 1500
    assert _calls.wait("j", 0).request.waitMillis == 1
    assert _calls.wait("j", 0.0004).request.waitMillis == 1
    assert _calls.wait("j", 0).request.jobID == "j"


def test_results_are_converted_from_the_replies() -> None:
    """StartJob answers the job id, QueryJob a JobStatus (named by the asked id when the
    reply has none), StopJob nothing, query_pb the reply itself."""
    assert (
        _calls.start(_calls.start_request("true", ""), 1).result(pb.StartJobRes(jobID="j1")) == "j1"
    )
    res = pb.QueryJobRes(state=pb.SUCCEEDED, done=True, exitCode=0)
    status = _calls.query("j2", 1).result(res)
    assert (status.job_id, status.state, status.done, status.exit_code) == (
        "j2",
        "SUCCEEDED",
        True,
        0,
    )
    assert _calls.query("j2", 1).result(pb.QueryJobRes(jobID="other")).job_id == "other"
    assert _calls.stop("j", 1).result(pb.StopJobRes()) is None
    assert _calls.query_pb("j", 1).result(res) is res
    assert _calls.wait("j3", 1).result(res).job_id == "j3"
    assert (
        _calls.run(_calls.start_request("true", ""), 1).result(pb.QueryJobRes(jobID="r")).job_id
        == "r"
    )


def test_a_list_page_is_its_jobs_and_the_next_token() -> None:
    """ListJobs answers (jobs in the reply's order, next token); '' at the last page."""
    res = pb.ListJobsRes(
        jobs=[
            pb.QueryJobRes(jobID="a", state=pb.RUNNING),
            pb.QueryJobRes(jobID="b", state=pb.FAILED),
        ],
        nextPageToken="more",
    )
    jobs, token = _calls.list_page((), "", 0, "", 1).result(res)
    assert [(j.job_id, j.state) for j in jobs] == [("a", "RUNNING"), ("b", "FAILED")]
    assert token == "more"
    assert _calls.list_page((), "", 0, "", 1).result(pb.ListJobsRes()) == ([], "")


def test_workers_carry_their_times_in_utc() -> None:
    """ListWorkers answers WorkerInfo with timezone-aware UTC times."""
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    w = pb.WorkerInfo(workerID="w1", address="h:1", identity="h1")
    w.registeredAt.FromDatetime(at)
    w.lastSeen.FromDatetime(at + datetime.timedelta(seconds=9))
    [info] = _calls.list_workers(1).result(pb.ListWorkersRes(workers=[w]))
    assert (info.worker_id, info.address, info.identity) == ("w1", "h:1", "h1")
    assert info.registered_at == at and info.last_seen == at + datetime.timedelta(seconds=9)
    assert info.registered_at.tzinfo is datetime.timezone.utc


def test_only_the_policys_codes_are_retried() -> None:
    """A policy that retries DEADLINE_EXCEEDED too retries it; codes outside it never."""
    policy = RetryPolicy(
        attempts=3,
        initial=0.001,
        maximum=0.001,
        codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}),
    )
    a = _calls.Attempts(policy, 10)
    assert a.after(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED)) <= 0.001
    with pytest.raises(AgentClientError) as e:
        a.after(_RpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert e.value.code is grpc.StatusCode.INTERNAL
    with pytest.raises(AgentClientError) as e:  # the default policy retries UNAVAILABLE only
        _calls.Attempts(RetryPolicy(), 10).after(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_output_out_of_order_is_an_error() -> None:
    """A chunk that does not start where the last one ended is refused, and the position
    does not move."""
    s = _calls.OutputStream("j", 0, False, 5)
    assert s.accept(_Msg(0, b"ab")) == b"ab"
    with pytest.raises(AgentClientError, match="out of order at 2"):
        s.accept(_Msg(3, b"c"))
    assert s.pos == 2 and s.request().offset == 2 and not s.request().follow
    assert s.accept(_Msg(2, b"")) == b"" and s.pos == 2


def test_channel_spec_with_tls_reads_the_files_and_sets_the_name(tmp_path: Path) -> None:
    """TLS files: credentials built from them, the expected server name as an option, the
    keepalive given; extra options replace the defaults of the same name."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    tls = TLSFiles(ca=ca, cert=b"cert", key=b"key", server_name="agent.example")
    spec = _calls.channel_spec(
        "h:1", tls, keepalive_s=7, options=[("grpc.max_receive_message_length", 5)]
    )
    assert spec.credentials is not None and spec.address == "h:1"
    opts = dict(spec.options)
    assert opts["grpc.ssl_target_name_override"] == "agent.example"
    assert opts["grpc.keepalive_time_ms"] == 7000
    assert [k for k, _ in spec.options].count("grpc.max_receive_message_length") == 1
    assert opts["grpc.max_receive_message_length"] == 5
    assert "grpc.ssl_target_name_override" not in dict(
        _calls.channel_spec("h:1", None, insecure=True).options
    )


def test_channel_spec_with_an_unreadable_file_is_oserror(tmp_path: Path) -> None:
    """A TLS file that cannot be read is the OSError of reading it, at spec time."""
    with pytest.raises(FileNotFoundError):
        _calls.channel_spec("h:1", TLSFiles(ca=tmp_path / "missing.crt"))
